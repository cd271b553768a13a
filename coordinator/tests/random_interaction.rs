//! Random interleavings of everything that can happen to a DCM (joins, leaves, heartbeats of
//! healthy and struggling peers, origin packets, signaling, ticks, snapshots, upload splits and a
//! failover), driven through the public sans-IO interface only, in the spirit of quinn-proto's
//! `random_interaction` tests. After every step the channel's invariants must hold and the
//! outputs must make sense to the peers that receive them. Seeded: a failure names its seed and
//! step, and reruns exactly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use coordinator::dcm::planner::Push;
use coordinator::topology::region::{Region, TopologyConfig};
use coordinator::{Adopted, Dcm, DcmConfig, Event, OutMsg, Output};
use protocol::rng::XorShift;
use protocol::{ChildLink, Heartbeat, ParentLink, PeerId, ServerMsg, Signal, SubstreamPlan};

const THREE_REGIONS: &str = r#"
[topology]
k = 4
fec_n = 2
mesh_c = 3
allow_region_hint = true

[[topology.region]]
name = "north"

[[topology.region]]
name = "south"
fec_n = 3

[[topology.region]]
name = "east"
"#;

/// What one simulated peer knows: its latest instructions and how many heartbeats it sent.
#[derive(Default)]
struct Peer {
    plan: Vec<SubstreamPlan>,
    epoch: u64,
    heartbeats: u64,
    /// Bytes uploaded so far: counters only grow (the DCM refuses heartbeats whose do not).
    bytes_up: u64,
    region: u16,
    upload_kbps: u32,
    /// The NAT class it reported (a third report none).
    connectivity: Option<protocol::Connectivity>,
}

struct World {
    dcm: Dcm,
    cfg: DcmConfig,
    now: u64,
    next_id: u64,
    next_seq: u64,
    peers: BTreeMap<PeerId, Peer>,
    /// What the outputs said the origin pushes (a driver keeps it for a take-over).
    fed: HashMap<PeerId, Vec<Push>>,
    snapshots_wanted: u64,
    snapshots_got: u64,
    seed: u64,
    step: usize,
    failovers: u32,
    most_peers: usize,
    tiered: bool,
}

fn packet(seq: u64, now: u64) -> Bytes {
    let header = protocol::PacketHeader {
        seq,
        flags: 0,
        created_ms: now,
    };
    Bytes::from(protocol::packet::encode(&header, &[seq as u8; 200]))
}

impl World {
    fn new(seed: u64, tiered: bool) -> Self {
        let mut cfg = DcmConfig::flat("random", 400);
        if tiered {
            let topo = TopologyConfig::from_toml(THREE_REGIONS).expect("topology");
            cfg.topology = Some(Arc::new(topo));
        }
        World {
            dcm: Dcm::new(cfg.clone(), 0),
            cfg,
            now: 0,
            next_id: 1,
            next_seq: 0,
            peers: BTreeMap::new(),
            fed: HashMap::new(),
            snapshots_wanted: 0,
            snapshots_got: 0,
            seed,
            step: 0,
            failovers: 0,
            most_peers: 0,
            tiered,
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!("seed {} step {}: {what}", self.seed, self.step)
    }

    /// Moves every output to the peers, checking each makes sense.
    fn drain(&mut self) {
        while let Some(out) = self.dcm.poll_output() {
            match out {
                Output::Send { peer, msg } => {
                    let Some(p) = self.peers.get_mut(&peer) else {
                        self.fail(format!("a message for {peer}, who is gone: {msg:?}"));
                    };
                    if let OutMsg::Msg(m) = msg {
                        if let ServerMsg::Instructions {
                            epoch, substreams, ..
                        } = *m
                        {
                            if epoch <= p.epoch {
                                let was = p.epoch;
                                self.fail(format!("{peer}: epoch {epoch} after {was}"));
                            }
                            p.epoch = epoch;
                            p.plan = substreams;
                        }
                    }
                }
                Output::Close { peer, .. } | Output::Evict { peer, .. } => {
                    if self.peers.remove(&peer).is_none() {
                        self.fail(format!("{peer} closed twice"));
                    }
                }
                Output::OriginFed { peer, pushes, .. } => {
                    if pushes.is_empty() {
                        self.fed.remove(&peer);
                    } else {
                        self.fed.insert(peer, pushes);
                    }
                }
                Output::Relays(round) => {
                    for (p, _, _) in &round.offers {
                        if !self.peers.contains_key(p) {
                            self.fail(format!("{p} offered as a relay after it left"));
                        }
                    }
                }
                Output::Snapshot { snapshot, .. } => {
                    self.snapshots_got += 1;
                    if snapshot.peers.len() > self.peers.len() {
                        self.fail(format!(
                            "snapshot of {} peers, {} live",
                            snapshot.peers.len(),
                            self.peers.len()
                        ));
                    }
                }
            }
        }
    }

    fn check(&mut self) {
        if let Err(e) = self.dcm.check_invariants() {
            self.fail(e);
        }
        if self.dcm.recovering() {
            return;
        }
        // What the peers were told is what the DCM holds.
        let live: Vec<PeerId> = self.peers.keys().copied().collect();
        if self.dcm.peers() != live {
            self.fail(format!(
                "DCM peers {:?} != live {:?}",
                self.dcm.peers(),
                live
            ));
        }
        for (id, p) in &self.peers {
            if p.epoch == 0 {
                self.fail(format!("{id} was never told where to get the stream"));
            }
        }
    }

    fn heartbeat(&mut self, peer: PeerId, behind: bool, backlog_ms: u32) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.heartbeats += 1;
        p.bytes_up += if backlog_ms > 0 { 1_000 } else { 50_000 };
        let last = self.next_seq.saturating_sub(if behind { 40 } else { 1 });
        let hb = Heartbeat {
            client_id: peer,
            seq: p.heartbeats,
            local_ts_ms: now,
            parents: p
                .plan
                .iter()
                .map(|s| ParentLink {
                    substream: s.index,
                    parent: s.parent,
                    last_seq: Some(last),
                    last_ts_ms: Some(now.saturating_sub(if behind { 3000 } else { 50 })),
                })
                .collect(),
            children: p
                .plan
                .iter()
                .flat_map(|s| {
                    s.children.iter().map(move |c| ChildLink {
                        substream: s.index,
                        child: *c,
                        last_seq: Some(last),
                        last_ts_ms: Some(now.saturating_sub(50)),
                    })
                })
                .collect(),
            buffer: vec![4; p.plan.len()],
            bytes_from_peers: p.heartbeats * 50_000,
            bytes_from_origin: 0,
            bytes_up: p.bytes_up,
            origin_fallbacks: 0,
            upload_kbps: p.upload_kbps,
            send_backlog_ms: backlog_ms,
            place: None,
        };
        self.dcm.handle(
            Event::Heartbeat {
                peer,
                heartbeat: Box::new(hb),
                arrived_ms: now,
            },
            now,
        );
    }

    fn random_peer(&self, rng: &mut XorShift) -> Option<PeerId> {
        if self.peers.is_empty() {
            return None;
        }
        let i = rng.below(self.peers.len() as u64) as usize;
        self.peers.keys().nth(i).copied()
    }

    fn join(&mut self, rng: &mut XorShift) {
        let peer = PeerId(self.next_id);
        self.next_id += 1;
        let upload_kbps = [0, 300, 800, 2000, 4000, 8000][rng.below(6) as usize];
        let region = rng.below(3) as u16;
        use protocol::NatClass::*;
        let connectivity = [
            None,
            None,
            Some(Open),
            Some(EndpointIndependent),
            Some(EndpointDependent),
            Some(UdpBlocked),
        ][rng.below(6) as usize]
            .map(|class| protocol::Connectivity {
                class,
                turn: rng.below(8) == 0,
            });
        self.peers.insert(
            peer,
            Peer {
                region,
                upload_kbps,
                connectivity,
                ..Peer::default()
            },
        );
        self.dcm.handle(
            Event::Join {
                peer,
                upload_kbps,
                region: Region::Named(region),
                relay: false,
                connectivity,
            },
            self.now,
        );
    }

    /// The DCM fails and a new one adopts the sessions and the origin's push list; everyone
    /// sends a heartbeat of what they were told; the new DCM rebuilds.
    fn failover(&mut self) {
        self.failovers += 1;
        let adopted: Vec<Adopted> = self
            .peers
            .iter()
            .map(|(peer, p)| Adopted {
                peer: *peer,
                upload_kbps: p.upload_kbps,
                region: Region::Named(p.region),
                relay: false,
                connectivity: p.connectivity,
                waypoint: false,
            })
            .collect();
        let epoch = self.dcm.epoch();
        self.dcm = Dcm::take_over(
            self.cfg.clone(),
            &adopted,
            self.fed.clone(),
            epoch,
            self.now,
        );
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.heartbeat(id, false, 0);
        }
        self.drain();
        self.now += self.cfg.heartbeat_ms * 2;
        self.dcm.handle_timeout(self.now);
        self.drain();
        if self.dcm.recovering() {
            self.fail("still recovering two intervals after a take-over".into());
        }
    }

    fn step(&mut self, rng: &mut XorShift) {
        self.step += 1;
        let r = rng.below(100);
        match r {
            0..=24 => self.join(rng),
            25..=34 => {
                if let Some(p) = self.random_peer(rng) {
                    self.peers.remove(&p);
                    self.dcm.handle(Event::Leave { peer: p }, self.now);
                }
            }
            35..=64 => {
                if let Some(p) = self.random_peer(rng) {
                    let behind = rng.below(8) == 0;
                    let backlog = if rng.below(8) == 0 { 2_000 } else { 0 };
                    self.heartbeat(p, behind, backlog);
                }
            }
            65..=74 => {
                let n = 1 + rng.below(8);
                let packets = (0..n)
                    .map(|_| {
                        let s = self.next_seq;
                        self.next_seq += 1;
                        (s, packet(s, self.now))
                    })
                    .collect();
                self.dcm.handle(Event::Packets(packets), self.now);
            }
            75..=86 => {
                // Time passes; everyone alive sends its heartbeat, some peers fall silent.
                self.now += self.cfg.heartbeat_ms;
                let ids: Vec<PeerId> = self.peers.keys().copied().collect();
                for id in ids {
                    if rng.below(20) != 0 {
                        self.heartbeat(id, false, 0);
                    }
                }
                self.dcm.handle_timeout(self.now);
            }
            87..=89 => {
                // A silence of a few seconds: most peers are late, some are judged silent.
                self.now += 1_000 + rng.below(5_000);
                self.dcm.handle_timeout(self.now);
            }
            90..=91 => {
                // A data channel that never opened: with a parent it was told of, or anyone.
                if let Some(a) = self.random_peer(rng) {
                    let parent = self.peers.get(&a).and_then(|p| {
                        p.plan.iter().find_map(|s| match s.parent {
                            protocol::Source::Peer { id } => Some(id),
                            protocol::Source::Origin => None,
                        })
                    });
                    let other = match parent {
                        Some(p) if rng.below(4) != 0 => Some(p),
                        _ => self.random_peer(rng),
                    };
                    if let Some(b) = other {
                        self.dcm.handle(
                            Event::LinkFailed {
                                reporter: a,
                                peer: b,
                            },
                            self.now,
                        );
                        self.drain();
                        if let Some(p) = self.peers.get(&a) {
                            let under = p
                                .plan
                                .iter()
                                .any(|s| s.parent == protocol::Source::Peer { id: b });
                            // Flat: never. A hierarchy blocks pairs within a cluster only
                            // (a feeder and a root of another tier are not re-planned yet).
                            if under && a != b && !self.tiered {
                                self.fail(format!("{a} still under {b} after reporting it"));
                            }
                        }
                    }
                }
            }
            92 if rng.below(2) == 0 => {
                // A forgery report (issue 13): true, false or without evidence, about a parent
                // or anyone. Whoever is evicted leaves through `Output::Evict`, and the
                // invariants hold after it.
                if let Some(a) = self.random_peer(rng) {
                    let parent = self.peers.get(&a).and_then(|p| {
                        p.plan.iter().find_map(|s| match s.parent {
                            protocol::Source::Peer { id } => Some(id),
                            protocol::Source::Origin => None,
                        })
                    });
                    let accused = match parent {
                        Some(p) if rng.below(3) != 0 => Some(p),
                        _ => self.random_peer(rng),
                    };
                    let evidence = match rng.below(4) {
                        0 => coordinator::dcm::hostile::Evidence::Refuted,
                        1 => coordinator::dcm::hostile::Evidence::Unknown,
                        _ => coordinator::dcm::hostile::Evidence::Holds,
                    };
                    if let Some(b) = accused {
                        self.dcm.handle(
                            Event::ForgeryReport {
                                reporter: a,
                                accused: b,
                                seq: self.next_seq,
                                evidence,
                            },
                            self.now,
                        );
                    }
                }
            }
            92 => {
                if let (Some(a), Some(b)) = (self.random_peer(rng), self.random_peer(rng)) {
                    self.dcm.handle(
                        Event::Signal {
                            from: a,
                            to: b,
                            signal: Signal::Ice {
                                candidate: "candidate:0 1 udp 1 127.0.0.1 9 typ host".into(),
                                sdp_mid: None,
                                sdp_m_line_index: None,
                            },
                        },
                        self.now,
                    );
                }
            }
            93..=94 => {
                self.snapshots_wanted += 1;
                let token = self.snapshots_wanted;
                self.dcm.handle(Event::Snapshot { token }, self.now);
            }
            95..=96 => {
                if let Some(p) = self.random_peer(rng) {
                    let _ = self.dcm.split_upload(p, 3000, 1000);
                    if rng.below(2) == 0 {
                        self.dcm.handle(Event::EndSplit { peer: p }, self.now);
                    }
                }
            }
            _ => {
                if rng.below(6) == 0 {
                    self.failover();
                } else {
                    self.now += 500;
                    self.dcm.handle_timeout(self.now);
                }
            }
        }
        self.drain();
        self.check();
        self.most_peers = self.most_peers.max(self.peers.len());
    }
}

/// What a run went through, so that the tests can tell they exercised something.
#[derive(Debug, Default)]
struct Seen {
    congestion_events: u64,
    repairs: u64,
    bridges: u64,
    failovers: u32,
    most_peers: usize,
}

fn run(seed: u64, tiered: bool, steps: usize, seen: &mut Seen) {
    let mut rng = XorShift::seeded(seed);
    let mut w = World::new(seed, tiered);
    for _ in 0..steps {
        w.step(&mut rng);
    }
    assert_eq!(
        w.snapshots_got, w.snapshots_wanted,
        "seed {seed}: every snapshot asked for is answered"
    );
    let s = w.dcm.stats();
    seen.congestion_events += s.congestion_events;
    seen.repairs += s.repairs;
    seen.bridges += s.bridges_opened;
    seen.failovers += w.failovers;
    seen.most_peers = seen.most_peers.max(w.most_peers);
}

#[test]
fn random_interleavings_keep_a_flat_channel_consistent() {
    let mut seen = Seen::default();
    for seed in 1..=8 {
        run(seed, false, 800, &mut seen);
    }
    assert!(
        seen.congestion_events > 0 && seen.repairs > 0 && seen.bridges > 0,
        "{seen:?}"
    );
    assert!(seen.failovers > 0 && seen.most_peers >= 20, "{seen:?}");
}

#[test]
fn random_interleavings_keep_a_hierarchy_consistent() {
    let mut seen = Seen::default();
    for seed in 1..=4 {
        run(seed, true, 500, &mut seen);
    }
    assert!(seen.repairs > 0 && seen.failovers > 0, "{seen:?}");
    assert!(seen.most_peers >= 20, "{seen:?}");
}
