//! The control plane: the real coordinator core (`coordinator::Dcm`, one channel), driven with
//! virtual time, plus the part of the server's session layer the simulator replaces (the
//! Welcome, sent before the DCM hears of the join, as `control-server/src/ws/session.rs` does).
//!
//! Everything the coordinator decides goes through this module. Wall-clock CPU time spent
//! inside the coordinator is measured per kind of event; it never feeds back into the
//! simulation, which stays deterministic.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use coordinator::topology::region::{Region, TopologyConfig};
use coordinator::{Dcm, DcmConfig, DcmStats, Event, OutMsg, Output, TopologySnapshot};
use protocol::{Heartbeat, PeerId, ServerMsg, SubstreamPlan, TierName, PROTOCOL_VERSION};

/// What the coordinator sends down one peer's control socket.
#[derive(Debug, Clone)]
pub enum Down {
    Msg(Box<ServerMsg>),
    /// A packet the origin pushes on the control socket.
    Packet(Bytes),
    /// A server message serialized once for many peers (live-edge notices).
    Text(Arc<str>),
    /// The session is closed by the server.
    Close,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub channel: String,
    pub k: u32,
    pub heartbeat_ms: u32,
    pub stream_kbps: u32,
    /// Run the three-tier hierarchy (regions are `Region::Named(0..regions)`).
    pub hierarchy: bool,
    pub regions: u16,
    pub origin_fanout: u32,
    pub max_fanout: u32,
}

/// Wall-clock cost of the coordinator, for `coordinator_cpu_us_per_*`.
#[derive(Debug, Clone, Default)]
pub struct CpuStats {
    pub joins: u64,
    pub join_ns: u128,
    pub heartbeats: u64,
    pub heartbeat_ns: u128,
    /// Leaves, origin packets, periodic work and output production.
    pub other_ns: u128,
    /// Link failures the peers reported.
    pub link_failures: u64,
}

/// One peer as the coordinator placed it.
#[derive(Debug, Clone)]
pub struct PeerSnap {
    pub id: PeerId,
    pub plan: Vec<SubstreamPlan>,
    pub tier: Option<TierName>,
}

pub struct Control {
    cfg: ControlConfig,
    dcm_cfg: DcmConfig,
    dcm: Dcm,
    /// The counts of DCMs that failed before this one (the failover scenario).
    earlier: DcmStats,
    out: VecDeque<(PeerId, Down)>,
    pub cpu: CpuStats,
}

impl Control {
    pub fn new(cfg: ControlConfig, now_ms: u64) -> Self {
        // As the server's `--hierarchy` without a topology file: default regions settings.
        let topology = cfg.hierarchy.then(|| {
            let mut t = TopologyConfig::default();
            t.k = cfg.k;
            Arc::new(t)
        });
        let dcm_cfg = DcmConfig {
            k: cfg.k,
            heartbeat_ms: u64::from(cfg.heartbeat_ms),
            topology,
            origin_fanout: cfg.origin_fanout,
            max_fanout: cfg.max_fanout,
            ..DcmConfig::flat(&cfg.channel, cfg.stream_kbps)
        };
        Control {
            dcm: Dcm::new(dcm_cfg.clone(), now_ms),
            dcm_cfg,
            earlier: DcmStats::default(),
            cfg,
            out: VecDeque::new(),
            cpu: CpuStats::default(),
        }
    }

    /// The DCM's server dies: its state and everything it had queued are gone, and a new DCM
    /// (another server's, which knows nothing) takes the channel over as peers resume.
    pub fn fail(&mut self, now_ms: u64) {
        self.earlier = self.earlier.plus(&self.dcm.stats());
        self.dcm = Dcm::new(self.dcm_cfg.clone(), now_ms);
        self.out.clear();
    }

    /// A peer reconnected to the new DCM's server with its resume token.
    pub fn resume(
        &mut self,
        peer: PeerId,
        upload_kbps: u32,
        region: u16,
        connectivity: Option<protocol::Connectivity>,
        now_ms: u64,
    ) {
        let t = Instant::now();
        self.dcm.handle(
            Event::Resume {
                peer,
                upload_kbps,
                region: Region::Named(region),
                relay: false,
                connectivity,
            },
            now_ms,
        );
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    /// The counts of the DCM running now (the one that took over, after a failover).
    pub fn current_stats(&self) -> DcmStats {
        self.dcm.stats()
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// The Welcome the session layer sends before the coordinator hears of the join.
    pub fn welcome(
        &self,
        peer: PeerId,
        start_seq: u64,
        live_start_seq: u64,
        live_seq: u64,
    ) -> ServerMsg {
        let base = format!("/api/channels/{}", self.cfg.channel);
        ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: peer,
            channel: self.cfg.channel.clone(),
            heartbeat_ms: self.cfg.heartbeat_ms,
            substreams: self.cfg.k,
            stream_kbps: self.cfg.stream_kbps,
            mime: "video/mp4".into(),
            init_url: format!("{base}/init"),
            packet_url: format!("{base}/packets/"),
            start_seq,
            live_seq,
            file: None,
            upload_kbps: None,
            public_key: None,
            fragment_ms: None,
            live_start_seq: Some(live_start_seq),
        }
    }

    pub fn join(
        &mut self,
        peer: PeerId,
        upload_kbps: u32,
        region: u16,
        connectivity: Option<protocol::Connectivity>,
        now_ms: u64,
    ) {
        let t = Instant::now();
        self.dcm.handle(
            Event::Join {
                peer,
                upload_kbps,
                region: Region::Named(region),
                relay: false,
                connectivity,
            },
            now_ms,
        );
        self.cpu.joins += 1;
        self.cpu.join_ns += t.elapsed().as_nanos();
    }

    pub fn leave(&mut self, peer: PeerId, now_ms: u64) {
        let t = Instant::now();
        self.dcm.handle(Event::Leave { peer }, now_ms);
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    pub fn heartbeat(&mut self, peer: PeerId, heartbeat: Box<Heartbeat>, arrived_ms: u64) {
        let t = Instant::now();
        self.dcm.handle(
            Event::Heartbeat {
                peer,
                heartbeat,
                arrived_ms,
            },
            arrived_ms,
        );
        self.cpu.heartbeats += 1;
        self.cpu.heartbeat_ns += t.elapsed().as_nanos();
    }

    /// `peer`'s data channel to `other` never opened (ICE failed after the timeout), reported
    /// as the glue reports it (`ClientMsg::LinkFailed`): the DCM never pairs the two again and
    /// re-places the child at once.
    pub fn link_failed(&mut self, peer: PeerId, other: PeerId, now_ms: u64) {
        let t = Instant::now();
        self.cpu.link_failures += 1;
        self.dcm.handle(
            Event::LinkFailed {
                reporter: peer,
                peer: other,
            },
            now_ms,
        );
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    /// New origin packets: the DCM pushes them to the peers the origin feeds.
    pub fn packets(&mut self, packets: Vec<(u64, Bytes)>, now_ms: u64) {
        let t = Instant::now();
        self.dcm.handle(Event::Packets(packets), now_ms);
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        self.dcm.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        let t = Instant::now();
        self.dcm.handle_timeout(now_ms);
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    /// The next message for a peer. Outputs the simulator has no use for (origin push lists
    /// kept for a take-over, relay rounds, snapshots) are dropped.
    pub fn poll_output(&mut self) -> Option<(PeerId, Down)> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        let t = Instant::now();
        let mut found = None;
        while let Some(o) = self.dcm.poll_output() {
            match o {
                Output::Send { peer, msg } => {
                    let down = match msg {
                        OutMsg::Msg(m) => Down::Msg(m),
                        OutMsg::Packet(b) => Down::Packet(b),
                        OutMsg::Text(t) => Down::Text(t),
                    };
                    found = Some((peer, down));
                    break;
                }
                Output::Close { peer, .. } | Output::Evict { peer, .. } => {
                    found = Some((peer, Down::Close));
                    break;
                }
                Output::OriginFed { .. } | Output::Relays(_) | Output::Snapshot { .. } => {}
            }
        }
        self.cpu.other_ns += t.elapsed().as_nanos();
        found
    }

    /// The coordinator's full snapshot.
    pub fn topology(&self, now_ms: u64) -> TopologySnapshot {
        self.dcm.snapshot(now_ms)
    }

    /// Every placed peer with its plan and tier.
    pub fn snapshot(&self, now_ms: u64) -> Vec<PeerSnap> {
        self.dcm
            .snapshot(now_ms)
            .peers
            .into_iter()
            .map(|p| PeerSnap {
                id: p.id,
                plan: p.plan,
                tier: p.tier.map(|t| t.tier),
            })
            .collect()
    }

    /// The coordinator's own invariants (trees, tiers, mesh, plans sent); the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.dcm.check_invariants()
    }

    /// The channel's counts, across takeovers.
    pub fn stats(&self) -> DcmStats {
        self.earlier.plus(&self.dcm.stats())
    }

    /// Pushes the origin makes per packet group: (full streams, data substreams, parity shards).
    pub fn hierarchy_report(&self) -> Option<coordinator::topology::hierarchy::HierarchyReport> {
        self.dcm.hierarchy_report()
    }

    pub fn origin_fed_counts(&self) -> (usize, usize, usize) {
        self.dcm.origin_push_counts()
    }

    pub fn peer_count(&self) -> usize {
        self.dcm.peer_count()
    }
}
