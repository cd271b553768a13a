//! The control plane as the simulator sees it: one channel's coordinator, driven with virtual
//! time, plus the part of the server's session layer the simulator replaces (the Welcome).
//! Everything the coordinator decides goes through this module, so switching the placeholder
//! for the real `coordinator::Dcm` is local to it.
//!
//! Wall-clock CPU time spent inside the coordinator is measured per kind of event (it does not
//! influence the simulation, which stays deterministic).

mod placeholder;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use protocol::{Heartbeat, PeerId, ServerMsg, SubstreamPlan, TierName, PROTOCOL_VERSION};

use placeholder::Placeholder;

/// What the coordinator sends down one peer's control socket.
#[derive(Debug, Clone)]
pub enum Down {
    Msg(Box<ServerMsg>),
    /// A packet the origin pushes on the control socket.
    Packet(Bytes),
    /// A server message serialized once for many peers.
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
    /// Run the three-tier hierarchy over `regions` regions.
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
    pub other_ns: u128,
    /// Link failures the peers reported (no coordinator event exists for them yet).
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
    inner: Placeholder,
    out: std::collections::VecDeque<(PeerId, Down)>,
    pub cpu: CpuStats,
    /// Whether the real coordinator runs (false: the temporary placeholder).
    pub real: bool,
}

impl Control {
    pub fn new(cfg: ControlConfig, _now_ms: u64) -> Self {
        let inner = Placeholder::new(cfg.k, cfg.stream_kbps, cfg.max_fanout);
        Control {
            cfg,
            inner,
            out: std::collections::VecDeque::new(),
            cpu: CpuStats::default(),
            real: false,
        }
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// The Welcome the session layer sends before the coordinator hears of the join
    /// (`control-server/src/ws/session.rs`).
    pub fn welcome(&self, peer: PeerId, start_seq: u64, live_seq: u64) -> ServerMsg {
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
        }
    }

    pub fn join(&mut self, peer: PeerId, upload_kbps: u32, _region: u16, _now_ms: u64) {
        let t = Instant::now();
        self.inner.join(peer, upload_kbps);
        self.collect();
        self.cpu.joins += 1;
        self.cpu.join_ns += t.elapsed().as_nanos();
    }

    pub fn leave(&mut self, peer: PeerId, _now_ms: u64) {
        let t = Instant::now();
        self.inner.leave(peer);
        self.collect();
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    #[allow(clippy::boxed_local)] // the coordinator's event takes the heartbeat boxed
    pub fn heartbeat(&mut self, _peer: PeerId, _hb: Box<Heartbeat>, _arrived_ms: u64) {
        let t = Instant::now();
        // The placeholder reads no heartbeats.
        self.cpu.heartbeats += 1;
        self.cpu.heartbeat_ns += t.elapsed().as_nanos();
    }

    /// `peer` could not open its data channel to `other` (ICE failed). The coordinator has no
    /// event for this yet: counted, and otherwise left to the heartbeats (the child's parent
    /// link shows no progress).
    pub fn link_failed(&mut self, _peer: PeerId, _other: PeerId, _now_ms: u64) {
        self.cpu.link_failures += 1;
    }

    /// New origin packets: pushed to the peers whose parent is the origin.
    pub fn packets(&mut self, packets: Vec<(u64, Bytes)>, _now_ms: u64) {
        let t = Instant::now();
        let k = u64::from(self.cfg.k.max(1));
        for (seq, bytes) in packets {
            let tree = (seq % k) as usize;
            for p in &self.inner.origin_children[tree] {
                self.out.push_back((*p, Down::Packet(bytes.clone())));
            }
        }
        self.cpu.other_ns += t.elapsed().as_nanos();
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        None
    }

    pub fn handle_timeout(&mut self, _now_ms: u64) {}

    pub fn poll_output(&mut self) -> Option<(PeerId, Down)> {
        self.out.pop_front()
    }

    /// Every placed peer with its plan.
    pub fn snapshot(&self, _now_ms: u64) -> Vec<PeerSnap> {
        let mut v: Vec<PeerSnap> = self
            .inner
            .peers()
            .filter_map(|id| {
                Some(PeerSnap {
                    id,
                    plan: self.inner.plan(id)?,
                    tier: None,
                })
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Peers fed by the origin directly, per substream.
    pub fn origin_children(&self) -> Vec<Vec<PeerId>> {
        self.inner.origin_children.clone()
    }

    /// Interior tree of `peer` (for checks).
    pub fn interior_of(&self, peer: PeerId) -> Option<u32> {
        self.inner.interior_of(peer)
    }

    fn collect(&mut self) {
        for (p, m) in self.inner.take_instructions() {
            self.out.push_back((p, Down::Msg(Box::new(m))));
        }
    }
}
