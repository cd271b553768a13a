//! The session state machine behind the control socket: the coordinator's DCM (sans-IO) driven
//! by arbitrary sequences of what sessions can send it, the way the control server's driver
//! does (`control-server/src/dcm`): joins with fresh ids, heartbeats that passed the session's
//! checks (own id, bounded link lists, sane timestamps, increasing seq) but otherwise say
//! anything, signaling and link-failure reports naming any peer, leaves, origin packets, upload
//! splits, stream-rate changes, snapshots, time passing, and a failover to a DCM that takes over.
//! After every event all outputs are drained and `Dcm::check_invariants` must hold.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bytes::Bytes;
use coordinator::dcm::planner::Push;
use coordinator::topology::region::{Region, TopologyConfig};
use coordinator::{Adopted, Dcm, DcmConfig, Event, Output};
use libfuzzer_sys::fuzz_target;
use protocol::{ChildLink, Heartbeat, ParentLink, PeerId, Signal, Source};

/// A small hierarchy so that a few dozen peers already fill several tiers and clusters.
const TOPOLOGY: &str = r#"
[topology]
k = 4
fec_n = 2
mesh_c = 2
mesh_max = 6

[[topology.region]]
name = "lan"

[[topology.region]]
name = "mobile"
fec_n = 3
"#;

/// Server time at the start (ms since the epoch; heartbeats are judged against it).
const T0: u64 = 1_700_000_000_000;
/// Most peers one input may join (keeps every input fast).
const MAX_PEERS: usize = 96;

#[derive(Debug, Arbitrary)]
struct Input {
    tiered: bool,
    /// `k` of a flat channel, 1..=8 (a tiered one takes the topology's).
    k: u8,
    heartbeat_ms: u16,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Join {
        /// Upload in units of 50 kbit/s.
        upload: u8,
        region: u8,
        relay: bool,
        /// NAT class (issue 15): none, or one of the four, with TURN when the high bit is set.
        nat: u8,
    },
    Leave {
        who: u8,
    },
    /// The peer's session is replaced by a new connection (a resume while the old one was open).
    Reconnect {
        who: u8,
    },
    Heartbeat {
        who: u8,
        hb: Hb,
    },
    Signal {
        from: u8,
        to: u8,
    },
    LinkFailed {
        reporter: u8,
        peer: u8,
    },
    Packets {
        first: u16,
        count: u8,
        size: u8,
    },
    SplitUpload {
        who: u8,
        capacity: u16,
        file_rate: u16,
    },
    EndSplit {
        who: u8,
    },
    StreamRate {
        kbps: u16,
    },
    Snapshot {
        token: u8,
    },
    /// Time passes (ms); the periodic work runs when due.
    Advance {
        ms: u16,
    },
    /// The DCM fails and another takes over with the sessions and the origin's push list.
    Failover,
}

#[derive(Debug, Arbitrary)]
struct Hb {
    seq_step: u8,
    /// The peer's clock minus the server's (ms).
    skew: i16,
    parents: Vec<Link>,
    children: Vec<Link>,
    buffer: Vec<u8>,
    counters: [u32; 4],
    upload: u8,
    backlog: u16,
}

#[derive(Debug, Arbitrary)]
struct Link {
    substream: u8,
    /// A peer by index into every id ever joined (or an unknown one); `None`: the origin.
    peer: Option<u8>,
    last_seq: Option<u16>,
    /// How long ago (ms) by the peer's clock.
    ago: Option<u16>,
}

struct Driver {
    dcm: Dcm,
    cfg: DcmConfig,
    now: u64,
    /// Every id ever given, in order; `who` bytes index into it.
    ids: Vec<PeerId>,
    /// Sessions still open (joined, not left), as the server's channel attachments.
    sessions: HashMap<PeerId, Adopted>,
    /// Sessions the DCM closed whose end has not reached it yet: until then they may still
    /// send (a heartbeat already queued, a signal).
    closing: Vec<PeerId>,
    last_hb_seq: HashMap<PeerId, u64>,
    /// What the origin pushes, kept outside the DCM as the server does.
    fed: HashMap<PeerId, Vec<Push>>,
    epoch: u64,
}

impl Driver {
    fn id(&self, who: u8) -> PeerId {
        // Past the list: ids nobody holds.
        self.ids
            .get(usize::from(who))
            .copied()
            .unwrap_or(PeerId(10_000 + u64::from(who)))
    }

    fn session(&self, who: u8) -> Option<PeerId> {
        let id = self.id(who);
        self.sessions.contains_key(&id).then_some(id)
    }

    fn handle(&mut self, ev: Event) {
        self.dcm.handle(ev, self.now);
        self.drain();
    }

    /// Moves every output as the server's driver does; a closed session ends later (its
    /// leave reaches the DCM when time passes, see `Op::Advance`).
    fn drain(&mut self) {
        while let Some(out) = self.dcm.poll_output() {
            match out {
                Output::Close { peer, .. } | Output::Evict { peer, .. } => self.closing.push(peer),
                Output::OriginFed {
                    peer,
                    pushes,
                    epoch,
                } => {
                    self.epoch = epoch;
                    if pushes.is_empty() {
                        self.fed.remove(&peer);
                    } else {
                        self.fed.insert(peer, pushes);
                    }
                }
                // Sends, relay rounds, snapshots. A wildcard, not a list: outputs a newer core
                // adds must not break this crate, which `cargo check --workspace` never builds
                // (one that ends a session, like an eviction, belongs with `Close` above).
                _ => {}
            }
        }
        if let Err(e) = self.dcm.check_invariants() {
            panic!("DCM invariant broken: {e}");
        }
    }

    fn heartbeat(&mut self, peer: PeerId, hb: Hb) {
        let k = self.dcm.substreams() as usize;
        let max_links = k + if self.cfg.topology.is_some() { 16 } else { 0 };
        let local = self.now.saturating_add_signed(i64::from(hb.skew));
        let link = |l: &Link| {
            let id = l.peer.map(|w| self.id(w));
            let ts = l.ago.map(|a| local.saturating_sub(u64::from(a)));
            (u32::from(l.substream), id, l.last_seq.map(u64::from), ts)
        };
        let parents: Vec<ParentLink> = hb
            .parents
            .iter()
            .take(max_links)
            .map(|l| {
                let (substream, id, last_seq, last_ts_ms) = link(l);
                ParentLink {
                    substream,
                    parent: id.map_or(Source::Origin, |id| Source::Peer { id }),
                    last_seq,
                    last_ts_ms,
                }
            })
            .collect();
        let children: Vec<ChildLink> = hb
            .children
            .iter()
            .take(64 * max_links)
            .map(|l| {
                let (substream, id, last_seq, last_ts_ms) = link(l);
                ChildLink {
                    substream,
                    child: id.unwrap_or(peer),
                    last_seq,
                    last_ts_ms,
                }
            })
            .collect();
        let seq = self
            .last_hb_seq
            .get(&peer)
            .map_or(0, |s| s + 1 + u64::from(hb.seq_step));
        self.last_hb_seq.insert(peer, seq);
        let heartbeat = Heartbeat {
            client_id: peer,
            seq,
            local_ts_ms: local,
            parents,
            children,
            buffer: hb
                .buffer
                .iter()
                .take(max_links)
                .map(|b| u32::from(*b))
                .collect(),
            bytes_from_peers: u64::from(hb.counters[0]),
            bytes_from_origin: u64::from(hb.counters[1]),
            bytes_up: u64::from(hb.counters[2]),
            origin_fallbacks: u64::from(hb.counters[3]),
            upload_kbps: u32::from(hb.upload) * 50,
            send_backlog_ms: u32::from(hb.backlog),
            place: None,
        };
        self.handle(Event::Heartbeat {
            peer,
            heartbeat: Box::new(heartbeat),
            arrived_ms: self.now,
        });
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Join {
                upload,
                region,
                relay,
                nat,
            } => {
                if self.ids.len() >= MAX_PEERS {
                    return;
                }
                let peer = PeerId(self.ids.len() as u64 + 1);
                self.ids.push(peer);
                let region = match region % 4 {
                    0 => Region::Named(0),
                    1 => Region::Named(1),
                    2 => Region::V4([10, region / 4 % 2]),
                    _ => Region::V6([0x2001, 0xdb8, u16::from(region)]),
                };
                let upload_kbps = u32::from(upload) * 50;
                use protocol::NatClass::*;
                let connectivity = match nat % 6 {
                    0 | 1 => None,
                    2 => Some(Open),
                    3 => Some(EndpointIndependent),
                    4 => Some(EndpointDependent),
                    _ => Some(UdpBlocked),
                }
                .map(|class| protocol::Connectivity {
                    class,
                    turn: nat >= 128,
                });
                self.sessions.insert(
                    peer,
                    Adopted {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                        connectivity,
                        waypoint: false,
                    },
                );
                self.handle(Event::Join {
                    peer,
                    upload_kbps,
                    region,
                    relay,
                    connectivity,
                });
            }
            Op::Leave { who } => {
                if let Some(peer) = self.session(who) {
                    self.sessions.remove(&peer);
                    self.handle(Event::Leave { peer });
                }
            }
            Op::Reconnect { who } => {
                if let Some(peer) = self.session(who) {
                    self.handle(Event::Reconnect { peer });
                }
            }
            Op::Heartbeat { who, hb } => {
                if let Some(peer) = self.session(who) {
                    self.heartbeat(peer, hb);
                }
            }
            Op::Signal { from, to } => {
                let to = self.id(to);
                if let Some(from) = self.session(from).filter(|f| *f != to) {
                    let signal = Signal::Offer { sdp: "v=0".into() };
                    self.handle(Event::Signal { from, to, signal });
                }
            }
            Op::LinkFailed { reporter, peer } => {
                let peer = self.id(peer);
                if let Some(reporter) = self.session(reporter).filter(|r| *r != peer) {
                    self.handle(Event::LinkFailed { reporter, peer });
                }
            }
            Op::Packets { first, count, size } => {
                let packets = (0..u64::from(count % 16))
                    .map(|i| {
                        let seq = u64::from(first) + i;
                        let header = protocol::PacketHeader {
                            seq,
                            flags: u8::from(i == 0),
                            created_ms: self.now,
                        };
                        let payload = vec![size; usize::from(size)];
                        (
                            seq,
                            Bytes::from(protocol::packet::encode(&header, &payload)),
                        )
                    })
                    .collect();
                self.handle(Event::Packets(packets));
            }
            Op::SplitUpload {
                who,
                capacity,
                file_rate,
            } => {
                if let Some(peer) = self.session(who) {
                    let _ = self
                        .dcm
                        .split_upload(peer, u32::from(capacity), u32::from(file_rate));
                    self.drain();
                }
            }
            Op::EndSplit { who } => {
                if let Some(peer) = self.session(who) {
                    self.handle(Event::EndSplit { peer });
                }
            }
            Op::StreamRate { kbps } => self.handle(Event::StreamRate {
                kbps: u32::from(kbps),
            }),
            Op::Snapshot { token } => self.handle(Event::Snapshot {
                token: u64::from(token),
            }),
            Op::Advance { ms } => {
                for peer in std::mem::take(&mut self.closing) {
                    if self.sessions.remove(&peer).is_some() {
                        self.handle(Event::Leave { peer });
                    }
                }
                self.now += u64::from(ms);
                if self.dcm.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.dcm.handle_timeout(self.now);
                    self.drain();
                }
            }
            Op::Failover => {
                let mut adopted: Vec<Adopted> = self.sessions.values().copied().collect();
                adopted.sort_by_key(|a| a.peer);
                self.dcm = Dcm::take_over(
                    self.cfg.clone(),
                    &adopted,
                    self.fed.clone(),
                    self.epoch,
                    self.now,
                );
                self.drain();
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let topology = input
        .tiered
        .then(|| Arc::new(TopologyConfig::from_toml(TOPOLOGY).expect("the fuzz topology parses")));
    let k = topology
        .as_ref()
        .map_or(u32::from(input.k % 8) + 1, |t| t.k);
    let cfg = DcmConfig {
        k,
        heartbeat_ms: u64::from(input.heartbeat_ms % 2000) + 50,
        topology,
        origin_fanout: 2,
        max_fanout: 8,
        cluster_max: 8,
        ..DcmConfig::flat("fuzz", 800)
    };
    let mut d = Driver {
        dcm: Dcm::new(cfg.clone(), T0),
        cfg,
        now: T0,
        ids: Vec::new(),
        sessions: HashMap::new(),
        closing: Vec::new(),
        last_hb_seq: HashMap::new(),
        fed: HashMap::new(),
        epoch: 0,
    };
    for op in input.ops.into_iter().take(400) {
        d.op(op);
    }
});
