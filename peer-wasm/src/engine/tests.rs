//! Deterministic multi-engine tests: N engines, a simulated clock and network, an origin that
//! cuts packets, and a fixed multi-tree plan. No sockets, no browser.

use std::collections::{BTreeMap, VecDeque};

use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS};

use super::*;

// The same tests run in the browser under `wasm-pack test`.
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: u32 = 2;

fn packet(seq: u64, created_ms: u64) -> Vec<u8> {
    let payload: Vec<u8> = (0..1000).map(|i| (seq as usize * 7 + i) as u8).collect();
    let flags = if seq.is_multiple_of(8) {
        FLAG_RANDOM_ACCESS
    } else {
        0
    };
    encode(
        &PacketHeader {
            seq,
            flags,
            created_ms,
        },
        &payload,
    )
}

fn plan(parents: [Source; K as usize], children: [Vec<u64>; K as usize]) -> Vec<SubstreamPlan> {
    (0..K)
        .map(|i| SubstreamPlan {
            index: i,
            parent: parents[i as usize],
            children: children[i as usize].iter().map(|c| PeerId(*c)).collect(),
        })
        .collect()
}

/// A tiny swarm: peer 1 interior in tree 0, peer 2 interior in tree 1, peers 3 and 4 leaves.
struct Sim {
    engines: BTreeMap<u64, Engine>,
    delivered: BTreeMap<u64, Vec<u8>>,
    wire: VecDeque<(f64, u64, From, Vec<u8>)>,
    fetches: u64,
    now: f64,
    dead: Vec<u64>,
}

impl Sim {
    fn new(upload_kbps: u32) -> Self {
        let mut engines = BTreeMap::new();
        for id in 1..=4u64 {
            let mut e = Engine::new(
                EngineConfig {
                    upload_kbps,
                    ..EngineConfig::default()
                },
                0.0,
            );
            e.handle(
                Input::Welcome {
                    peer_id: PeerId(id),
                    substreams: K,
                    start_seq: 0,
                    live_seq: 0,
                    live_start_seq: None,
                },
                -1000.0,
            );
            engines.insert(id, e);
        }
        let o = Source::Origin;
        let p = |id| Source::Peer { id: PeerId(id) };
        let plans = [
            (1, plan([o, p(2)], [vec![2, 3, 4], vec![]])),
            (2, plan([p(1), o], [vec![], vec![1, 3, 4]])),
            (3, plan([p(1), p(2)], [vec![], vec![]])),
            (4, plan([p(1), p(2)], [vec![], vec![]])),
        ];
        for (id, pl) in plans {
            engines.get_mut(&id).unwrap().handle(
                Input::Instructions {
                    plan: pl,
                    tier: None,
                },
                0.0,
            );
        }
        Sim {
            engines,
            delivered: BTreeMap::new(),
            wire: VecDeque::new(),
            fetches: 0,
            now: 0.0,
            dead: vec![],
        }
    }

    fn run_actions(&mut self, id: u64, actions: Vec<Action>, origin: &BTreeMap<u64, Vec<u8>>) {
        for a in actions {
            match a {
                Action::Send { to, packet } => self.wire.push_back((
                    self.now + 5.0,
                    to.0,
                    From::Peer(PeerId(id)),
                    (*packet).clone(),
                )),
                Action::Fetch { seq } => {
                    self.fetches += 1;
                    match origin.get(&seq) {
                        Some(p) => {
                            self.wire
                                .push_back((self.now + 20.0, id, From::OriginFetch, p.clone()))
                        }
                        None => {
                            let e = self.engines.get_mut(&id).unwrap();
                            let more = e.handle(Input::FetchFailed { seq, gone: false }, self.now);
                            assert!(more.iter().all(|a| !matches!(a, Action::Deliver { .. })));
                        }
                    }
                }
                Action::Deliver { payload, .. } => {
                    self.delivered.entry(id).or_default().extend(payload)
                }
                Action::Connect { .. }
                | Action::Disconnect { .. }
                | Action::ReportForgery { .. } => {}
            }
        }
    }

    /// Runs `packets` packets, one every 50 ms, pushed by the origin to the tree roots.
    fn run(&mut self, packets: u64, kill_at: Option<(u64, u64)>) -> BTreeMap<u64, Vec<u8>> {
        let mut origin = BTreeMap::new();
        for step in 0..(packets * 5 + 200) {
            self.now = step as f64 * 10.0;
            if step % 5 == 0 && step / 5 < packets {
                let seq = step / 5;
                let p = packet(seq, self.now as u64);
                origin.insert(seq, p.clone());
                let root = if protocol::substream_of(seq, K) == 0 {
                    1
                } else {
                    2
                };
                self.wire
                    .push_back((self.now + 1.0, root, From::OriginPush, p));
                let ids: Vec<u64> = self.engines.keys().copied().collect();
                for id in ids {
                    let now = self.now;
                    let actions = self
                        .engines
                        .get_mut(&id)
                        .unwrap()
                        .handle(Input::LiveEdge { seq }, now);
                    self.run_actions(id, actions, &origin);
                }
            }
            if let Some((victim, at)) = kill_at {
                if step / 5 == at && !self.dead.contains(&victim) {
                    self.dead.push(victim);
                }
            }
            while self.wire.front().is_some_and(|w| w.0 <= self.now) {
                let (_, to2, from, bytes) = self.wire.pop_front().unwrap();
                if self.dead.contains(&to2) {
                    continue;
                }
                let actions = self.engines.get_mut(&to2).unwrap().handle(
                    Input::Packet {
                        from,
                        bytes: &bytes,
                    },
                    self.now,
                );
                self.run_actions(to2, actions, &origin);
            }
            let ids: Vec<u64> = self.engines.keys().copied().collect();
            for id in ids {
                if self.dead.contains(&id) {
                    continue;
                }
                let actions = self
                    .engines
                    .get_mut(&id)
                    .unwrap()
                    .handle(Input::Tick, self.now);
                self.run_actions(id, actions, &origin);
            }
        }
        origin
    }
}

/// The origin's bytes minus the last few packets: a gap is only noticed once a later packet
/// arrives, and the simulated stream ends.
fn origin_bytes(origin: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    origin
        .values()
        .take(origin.len() - 4)
        .flat_map(|p| Packet::decode(p).unwrap().payload.to_vec())
        .collect()
}

#[test]
fn every_peer_reassembles_the_origin_bytes_through_the_trees() {
    let mut sim = Sim::new(10_000);
    let origin = sim.run(100, None);
    let expected = origin_bytes(&origin);
    for id in 1..=4 {
        assert_eq!(
            sim.delivered[&id][..expected.len()],
            expected[..],
            "peer {id}"
        );
        let e = &sim.engines[&id];
        assert_eq!(
            e.counters.origin_fallbacks, 0,
            "peer {id} needed the origin"
        );
        assert_eq!(e.verified.unwrap().count, 100);
    }
    // Interior peers relayed; leaves only received.
    assert!(sim.engines[&1].counters.bytes_up > 0);
    assert!(sim.engines[&2].counters.bytes_up > 0);
    assert_eq!(sim.engines[&3].counters.bytes_up, 0);
    assert_eq!(sim.fetches, 0);
}

#[test]
fn a_dead_parent_is_covered_by_origin_fallback_without_holes() {
    let mut sim = Sim::new(10_000);
    let origin = sim.run(100, Some((2, 40)));
    let expected = origin_bytes(&origin);
    for id in [1, 3, 4] {
        assert_eq!(
            sim.delivered[&id][..expected.len()],
            expected[..],
            "peer {id}"
        );
        assert!(sim.engines[&id].counters.origin_fallbacks > 0);
    }
}

#[test]
fn upload_cap_limits_relaying() {
    // 100 kbit/s cannot carry three copies of a 160 kbit/s substream: sends get dropped,
    // children fall back to the origin, and nobody loses bytes.
    let mut sim = Sim::new(100);
    let origin = sim.run(100, None);
    let expected = origin_bytes(&origin);
    let e1 = &sim.engines[&1];
    // 10 s of simulated time at 100 kbit/s is at most ~125 kB plus one burst.
    assert!(
        e1.counters.bytes_up <= 125_000 + 20_000,
        "{}",
        e1.counters.bytes_up
    );
    assert!(e1.counters.send_dropped > 0);
    for id in 1..=4 {
        assert_eq!(
            sim.delivered[&id][..expected.len()],
            expected[..],
            "peer {id}"
        );
    }
}

#[test]
fn heartbeat_reports_links_and_sequence_numbers() {
    let mut sim = Sim::new(10_000);
    sim.run(20, None);
    let hb = sim.engines.get_mut(&1).unwrap().heartbeat().unwrap();
    assert_eq!(hb.client_id, PeerId(1));
    assert_eq!(hb.parents.len(), K as usize);
    assert_eq!(hb.parents[0].parent, Source::Origin);
    assert_eq!(hb.parents[0].last_seq, Some(18));
    assert_eq!(hb.parents[1].last_seq, Some(19));
    let to2: Vec<_> = hb
        .children
        .iter()
        .filter(|c| c.child == PeerId(2))
        .collect();
    assert_eq!(to2[0].last_seq, Some(18));
    let next = sim.engines.get_mut(&1).unwrap().heartbeat().unwrap();
    assert_eq!(next.seq, hb.seq + 1);
}

#[test]
fn late_joiner_fetches_from_the_random_access_point() {
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    let actions = e.handle(
        Input::Welcome {
            peer_id: PeerId(9),
            substreams: K,
            start_seq: 16,
            live_seq: 19,
            live_start_seq: None,
        },
        1000.0,
    );
    let fetched: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch { seq } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(fetched, vec![16, 17, 18, 19]);
    // Packets out of order are held until the earlier ones arrive.
    let a = e.handle(
        Input::Packet {
            from: From::OriginFetch,
            bytes: &packet(17, 0),
        },
        1010.0,
    );
    assert!(a.iter().all(|a| !matches!(a, Action::Deliver { .. })));
    let a = e.handle(
        Input::Packet {
            from: From::OriginFetch,
            bytes: &packet(16, 0),
        },
        1020.0,
    );
    assert_eq!(
        a.iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .count(),
        2
    );
}

#[test]
fn a_joiner_that_starts_at_the_next_fragment_fetches_nothing_before_it() {
    // The origin's start budget is spent (a crowd): the Welcome's start is the packet after the
    // newest, which does not exist yet. Nothing is fetched, what the parents prime of the newest
    // fragment is not delivered, and the next fragment from the trees plays from its first
    // packet; its packets the trees miss are fetched after the fallback period as any gap.
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    let actions = |a: &[Action]| -> (Vec<u64>, Vec<u64>) {
        let mut fetched = Vec::new();
        let mut delivered = Vec::new();
        for a in a {
            match a {
                Action::Fetch { seq } => fetched.push(*seq),
                Action::Deliver { seq, .. } => delivered.push(*seq),
                _ => {}
            }
        }
        (fetched, delivered)
    };
    let a = e.handle(
        Input::Welcome {
            peer_id: PeerId(9),
            substreams: K,
            start_seq: 24,
            live_seq: 23,
            live_start_seq: Some(20),
        },
        1000.0,
    );
    assert_eq!(actions(&a), (vec![], vec![]));
    let p = |id| Source::Peer { id: PeerId(id) };
    let plan = plan([p(1), p(2)], [vec![], vec![]]);
    e.handle(Input::Instructions { plan, tier: None }, 1001.0);
    // The parents prime their newest packets, of the fragment before the start.
    for (seq, from) in [(22, 1), (23, 2)] {
        let bytes = packet(seq, 0);
        let a = e.handle(
            Input::Packet {
                from: From::Peer(PeerId(from)),
                bytes: &bytes,
            },
            1100.0,
        );
        assert_eq!(actions(&a), (vec![], vec![]));
    }
    for t in (1150..3000).step_by(50) {
        assert_eq!(
            actions(&e.handle(Input::Tick, f64::from(t))),
            (vec![], vec![])
        );
    }
    // The next fragment comes down the trees: 24 at once, 26 (after 25) once 25 comes; 27 is
    // missed by its tree and fetched after the fallback period.
    let bytes = packet(24, 3000);
    let a = e.handle(
        Input::Packet {
            from: From::Peer(PeerId(1)),
            bytes: &bytes,
        },
        3050.0,
    );
    assert_eq!(actions(&a), (vec![], vec![24]));
    let bytes = packet(26, 3000);
    let from = From::Peer(PeerId(1));
    e.handle(
        Input::Packet {
            from,
            bytes: &bytes,
        },
        3060.0,
    );
    let bytes = packet(25, 3000);
    let from = From::Peer(PeerId(2));
    let a = e.handle(
        Input::Packet {
            from,
            bytes: &bytes,
        },
        3070.0,
    );
    assert_eq!(actions(&a), (vec![], vec![25, 26]));
    let bytes = packet(28, 4000);
    let from = From::Peer(PeerId(1));
    e.handle(
        Input::Packet {
            from,
            bytes: &bytes,
        },
        4050.0,
    );
    assert_eq!(actions(&e.handle(Input::Tick, 4600.0)), (vec![], vec![]));
    assert_eq!(actions(&e.handle(Input::Tick, 4700.0)), (vec![27], vec![]));
}

#[test]
fn a_joiner_fetches_the_older_fragment_at_once_and_gives_the_newest_to_its_parents_first() {
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    let fetched = |actions: &[Action]| -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Fetch { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    };
    // Fragments start at 16 and 20; the newest packet is 23.
    let a = e.handle(
        Input::Welcome {
            peer_id: PeerId(9),
            substreams: K,
            start_seq: 16,
            live_seq: 23,
            live_start_seq: Some(20),
        },
        1000.0,
    );
    assert_eq!(fetched(&a), vec![16, 17, 18, 19]);
    e.handle(
        Input::Instructions {
            plan: plan(
                [
                    Source::Peer { id: PeerId(1) },
                    Source::Peer { id: PeerId(2) },
                ],
                [vec![], vec![]],
            ),
            tier: None,
        },
        1001.0,
    );
    // The parents prime 20 and 21 (each its newest of its tree, and these happen to be it).
    for (seq, from) in [(20, 1), (21, 2)] {
        let a = e.handle(
            Input::Packet {
                from: From::Peer(PeerId(from)),
                bytes: &packet(seq, 0),
            },
            1100.0,
        );
        assert!(fetched(&a).is_empty());
    }
    // Nothing more before a fallback period...
    assert!(fetched(&e.handle(Input::Tick, 1500.0)).is_empty());
    // ...then the origin gets asked for what no parent sent.
    assert_eq!(fetched(&e.handle(Input::Tick, 1700.0)), vec![22, 23]);
    // A server that does not say where the newest fragment starts: all of it at once.
    let mut old = Engine::new(EngineConfig::default(), 0.0);
    let a = old.handle(
        Input::Welcome {
            peer_id: PeerId(9),
            substreams: K,
            start_seq: 16,
            live_seq: 23,
            live_start_seq: None,
        },
        1000.0,
    );
    assert_eq!(fetched(&a), (16..=23).collect::<Vec<_>>());
}

#[test]
fn garbage_from_a_peer_is_counted_not_delivered() {
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    e.handle(
        Input::Welcome {
            peer_id: PeerId(1),
            substreams: K,
            start_seq: 0,
            live_seq: 0,
            live_start_seq: None,
        },
        0.0,
    );
    let a = e.handle(
        Input::Packet {
            from: From::Peer(PeerId(2)),
            bytes: b"nonsense",
        },
        1.0,
    );
    assert!(a.iter().all(|a| !matches!(a, Action::Deliver { .. })));
    assert_eq!(e.counters.invalid, 1);
}

#[test]
fn a_new_parent_whose_packet_overtook_our_instructions_counts_from_the_instructions() {
    let welcome = |e: &mut Engine| {
        e.handle(
            Input::Welcome {
                peer_id: PeerId(3),
                substreams: K,
                start_seq: 0,
                live_seq: 0,
                live_start_seq: None,
            },
            0.0,
        );
        e.handle(
            Input::Instructions {
                plan: plan(
                    [Source::Peer { id: PeerId(1) }, Source::Origin],
                    [vec![], vec![]],
                ),
                tier: None,
            },
            0.0,
        );
    };
    let moved = plan(
        [Source::Peer { id: PeerId(9) }, Source::Origin],
        [vec![], vec![]],
    );
    // Peer 9 was told first and primed us with packet 2 of tree 0 over an open link; our
    // instructions naming it come 40 ms later.
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    welcome(&mut e);
    e.handle(
        Input::Packet {
            from: From::Peer(PeerId(9)),
            bytes: &packet(2, 5000),
        },
        5000.0,
    );
    assert_eq!(e.link_stats()[0].first_packet_ms, None);
    e.handle(
        Input::Instructions {
            plan: moved.clone(),
            tier: None,
        },
        5040.0,
    );
    let l = &e.link_stats()[0];
    assert_eq!(l.parent, Source::Peer { id: PeerId(9) });
    assert_eq!((l.since_ms, l.first_packet_ms), (5040.0, Some(5040.0)));
    assert_eq!(e.heartbeat().unwrap().parents[0].last_seq, Some(2));
    // A packet from that peer long before proves nothing about the new link.
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    welcome(&mut e);
    e.handle(
        Input::Packet {
            from: From::Peer(PeerId(9)),
            bytes: &packet(2, 5000),
        },
        5000.0,
    );
    e.handle(
        Input::Instructions {
            plan: moved,
            tier: None,
        },
        8000.0,
    );
    assert_eq!(e.link_stats()[0].first_packet_ms, None);
}

#[test]
fn a_substream_the_origin_bridges_while_the_new_parent_connects_is_relayed_and_timed() {
    // Peer 3 is a forwarder of tree 0 (child 4). Its parent 1 is replaced by 9, whose link is
    // still opening; meanwhile the origin pushes tree 0 on the control socket.
    let mut e = welcomed(3);
    let with = |p: u64| {
        plan(
            [Source::Peer { id: PeerId(p) }, Source::Origin],
            [vec![4], vec![]],
        )
    };
    e.handle(
        Input::Instructions {
            plan: with(1),
            tier: None,
        },
        0.0,
    );
    e.handle(
        Input::Instructions {
            plan: with(9),
            tier: None,
        },
        1000.0,
    );
    let out = e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(2, 1000),
        },
        1030.0,
    );
    // Relayed to the child at once, like a packet from the parent.
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Send { to, .. } if *to == PeerId(4))));
    let l = &e.link_stats()[0];
    assert_eq!(
        (l.since_ms, l.first_packet_ms, l.bridged_ms),
        (1000.0, None, Some(1030.0))
    );
    // Not the new parent's progress: the DCM closes the bridge only when 9 itself delivers.
    assert_eq!(e.heartbeat().unwrap().parents[0].last_seq, None);
    e.handle(
        Input::Packet {
            from: From::Peer(PeerId(9)),
            bytes: &packet(4, 2000),
        },
        2400.0,
    );
    let l = &e.link_stats()[0];
    assert_eq!(
        (l.first_packet_ms, l.bridged_ms),
        (Some(2400.0), Some(1030.0))
    );
    // The heartbeat that ends the bridge goes early, once, when the server's budget allows.
    assert!(!e.wants_early_heartbeat(false));
    assert!(e.wants_early_heartbeat(true));
    assert!(!e.wants_early_heartbeat(true));
    assert_eq!(e.heartbeat().unwrap().parents[0].last_seq, Some(4));
    // A regular heartbeat that went first makes the early one unnecessary.
    e.bridge_ended = true;
    e.heartbeat();
    assert!(!e.wants_early_heartbeat(true));
    // Tree 1's own origin push is its parent's, not a bridge.
    e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(3, 2000),
        },
        2500.0,
    );
    assert_eq!(e.link_stats()[1].bridged_ms, None);
    // The next move starts the clock again, and the replaced link keeps its figures.
    e.handle(
        Input::Instructions {
            plan: with(5),
            tier: None,
        },
        3000.0,
    );
    assert_eq!(e.link_stats()[0].bridged_ms, None);
    assert_eq!(
        e.past_links().last().and_then(|l| l.bridged_ms),
        Some(1030.0)
    );
}

#[test]
fn priming_new_children_never_delays_the_stream() {
    // Peer 1 forwards tree 0 at 80 kbit/s: 10 bytes per ms, a packet (about 1 kB) per 100 ms,
    // and a burst of about 16 packets.
    let mut e = welcomed_with(
        1,
        EngineConfig {
            upload_kbps: 80,
            ..EngineConfig::default()
        },
    );
    let o = Source::Origin;
    e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![2], vec![]]),
            tier: None,
        },
        0.0,
    );
    let sends = |actions: &[Action]| -> Vec<(u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, packet } => {
                    Some((to.0, protocol::packet::peek_seq(packet).unwrap()))
                }
                _ => None,
            })
            .collect()
    };
    for seq in 0..4u64 {
        let t = 1000.0 * seq as f64;
        e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &packet(seq, t as u64),
            },
            t,
        );
    }
    // 29 new children at once: 29 primes (packet 2, the newest of tree 0), more than the
    // bucket lets out at once.
    let out = e.handle(
        Input::Instructions {
            plan: plan([o, o], [(2..32).collect(), vec![]]),
            tier: None,
        },
        5000.0,
    );
    let primed = sends(&out);
    assert!(primed.len() > 5 && primed.len() < 29, "{primed:?}");
    assert!(primed.iter().all(|(_, seq)| *seq == 2));
    // The next packet of tree 0 arrives: it goes to the children before any waiting prime.
    let mut after = sends(&e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(4, 5100),
        },
        5100.0,
    ));
    for t in (5150..=5400).step_by(50) {
        after.extend(sends(&e.handle(Input::Tick, f64::from(t))));
    }
    for t in (5450..7000).step_by(50) {
        after.extend(sends(&e.handle(Input::Tick, f64::from(t))));
    }
    assert!(after.iter().any(|(_, seq)| *seq == 4), "{after:?}");
    // Primes still waiting went stale behind the stream and were dropped, not sent late.
    assert!(after.iter().all(|(_, seq)| *seq == 4), "{after:?}");
}

/// An engine with default settings, welcomed as `peer` at time 0 (nothing to catch up on).
fn welcomed(peer: u64) -> Engine {
    welcomed_with(peer, EngineConfig::default())
}

fn welcomed_with(peer: u64, cfg: EngineConfig) -> Engine {
    let mut e = Engine::new(cfg, 0.0);
    e.handle(
        Input::Welcome {
            peer_id: PeerId(peer),
            substreams: K,
            start_seq: 0,
            live_seq: 0,
            live_start_seq: None,
        },
        0.0,
    );
    e
}

#[test]
fn a_throttled_uplink_reports_its_backlog_as_soon_as_a_packet_is_queued() {
    // Peer 1 forwards tree 0 to three children at 2000 kbit/s, then is cut to 64 kbit/s.
    let mut e = welcomed(1);
    e.handle(
        Input::Instructions {
            plan: plan([Source::Origin, Source::Origin], [vec![2, 3, 4], vec![]]),
            tier: None,
        },
        0.0,
    );
    let push = |e: &mut Engine, seq: u64, t: f64| {
        e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &packet(seq, t as u64),
            },
            t,
        )
    };
    // Healthy: sent at once, no backlog, no early heartbeat.
    push(&mut e, 0, 100.0);
    assert_eq!(e.send_backlog_ms(), 0.0);
    assert!(!e.wants_early_heartbeat(false));
    // Cut to 64 kbit/s (8 bytes per ms; the bucket keeps one maximal frame, about 16 kB, of
    // burst). A fragment of ten packets for three children is about 30 kB: the last copy will
    // wait well over a second, known the moment it is queued.
    e.set_upload_kbps(64);
    for seq in (2..=20).step_by(2) {
        push(&mut e, seq, 1100.0);
    }
    let backlog = e.send_backlog_ms();
    assert!(backlog > EARLY_HEARTBEAT_BACKLOG_MS, "{backlog}");
    assert!(e.wants_early_heartbeat(false));
    // Once per episode.
    assert!(!e.wants_early_heartbeat(false));
    assert_eq!(e.heartbeat().unwrap().send_backlog_ms, backlog as u32);
}

#[test]
fn a_substream_whose_tree_is_routinely_late_is_waited_for_not_fetched() {
    // Substream 1 travels a deeper tree: its packets arrive 700 ms after the next packet of
    // substream 0 has shown they exist. Substream 0 is prompt, until one of its packets is lost.
    let mut e = welcomed(9);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    let mut fetched: Vec<u64> = Vec::new();
    let mut step = |e: &mut Engine, at: f64, input: Input<'_>| {
        for a in e.handle(input, at) {
            if let Action::Fetch { seq } = a {
                fetched.push(seq);
            }
        }
    };
    // Packet 30 (substream 0) is lost on its prompt tree.
    for j in 0..20u64 {
        let t = 1000.0 * j as f64;
        let even = 2 * j;
        if even != 30 {
            step(
                &mut e,
                t,
                Input::Packet {
                    from: From::Peer(PeerId(1)),
                    bytes: &packet(even, t as u64),
                },
            );
        }
        // The odd packet of the previous pair arrives 700 ms after this even one.
        for dt in (50..1000).step_by(50) {
            let at = t + dt as f64;
            if dt == 700 && j > 0 {
                let odd = 2 * (j - 1) + 1;
                step(
                    &mut e,
                    at,
                    Input::Packet {
                        from: From::Peer(PeerId(2)),
                        bytes: &packet(odd, (at - 1700.0) as u64),
                    },
                );
            }
            step(&mut e, at, Input::Tick);
        }
    }
    let late: Vec<u64> = fetched.iter().copied().filter(|s| s % 2 == 1).collect();
    assert!(
        late.len() <= 1 && late.iter().all(|s| *s <= 3),
        "the late tree's packets were fetched: {late:?}"
    );
    assert!(
        fetched.contains(&30),
        "a packet lost on the prompt tree is still fetched: {fetched:?}"
    );
}

/// Packets of substream 1 that peer 9 fetched when that tree delivers each packet `late_ms`
/// after substream 0's next packet showed it exists, with `children` under peer 9 in it and
/// its player playing (`Some`: that much media ahead of the playhead at every tick) or not.
fn fetched_from_a_tree_late_by(late_ms: u64, children: Vec<u64>, slack: Option<f64>) -> Vec<u64> {
    let mut e = welcomed(9);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], children]),
            tier: None,
        },
        0.0,
    );
    let mut fetched: Vec<u64> = Vec::new();
    let mut step = |e: &mut Engine, at: f64, input: Input<'_>| {
        for a in e.handle(input, at) {
            if let Action::Fetch { seq } = a {
                fetched.push(seq);
            }
        }
    };
    // (time, seq, from tree 1): the even packets at each second, the odd one of the pair
    // before `late_ms` after, a tick every 50 ms; in time order.
    let mut events: Vec<(u64, Option<u64>)> =
        (0..20_000u64).step_by(50).map(|t| (t, None)).collect();
    for j in 0..20u64 {
        events.push((1000 * j, Some(2 * j)));
        if j > 0 {
            events.push((1000 * j + late_ms, Some(2 * (j - 1) + 1)));
        }
    }
    events.sort();
    for (at, seq) in events {
        let Some(seq) = seq else {
            e.set_player_slack(slack, at as f64);
            step(&mut e, at as f64, Input::Tick);
            continue;
        };
        let (from, created) = if seq % 2 == 0 {
            (PeerId(1), 500 * seq)
        } else {
            (PeerId(2), 500 * (seq - 1))
        };
        let bytes = packet(seq, created);
        let from = From::Peer(from);
        step(
            &mut e,
            at as f64,
            Input::Packet {
                from,
                bytes: &bytes,
            },
        );
    }
    fetched.into_iter().filter(|s| s % 2 == 1).collect()
}

#[test]
fn a_playing_leaf_waits_longer_for_a_late_tree_than_a_forwarder_of_it() {
    // The tail of a deep tree: each packet 1.1 s after it is known to exist. A leaf of that
    // tree whose player plays (2 s of media ahead: no deadline near) waits up to half the
    // playout slack for it, since its player fetches at once when about to run out; a peer
    // that forwards the substream waits an eighth, since its children wait on its copy, and so
    // does a player that has not started (its start waits on these packets).
    let playing = Some(2000.0);
    let leaf = fetched_from_a_tree_late_by(1100, vec![], playing);
    assert!(
        leaf.len() <= 2,
        "a leaf fetched the late tree's packets: {leaf:?}"
    );
    let forwarder = fetched_from_a_tree_late_by(1100, vec![5], playing);
    assert!(
        forwarder.len() >= 15,
        "a forwarder waited for its late tree: {forwarder:?}"
    );
    let starting = fetched_from_a_tree_late_by(1100, vec![], None);
    assert!(
        starting.len() >= 15,
        "a player not started waited for its late tree: {starting:?}"
    );
    // Later than even a playing leaf waits: fetched.
    let lost = fetched_from_a_tree_late_by(1900, vec![], playing);
    assert!(lost.len() >= 15, "{lost:?}");
}

#[test]
fn a_late_tree_is_waited_for_again_after_a_loss_on_it() {
    // Substream 1's tree delivers 700 ms after substream 0 shows its packets exist: more than
    // the fallback period, within the patience its usual lag earns. One of its packets is lost
    // and fetched, which drops the patience; the tree's copies that still come late (the
    // next packet's too, fetched first) show its lag again, so it is waited for again rather
    // than fetched for good.
    let mut e = welcomed(9);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    // The origin answers a fetch 50 ms later, before the tree's copy comes.
    let mut fetched: Vec<u64> = Vec::new();
    let mut replies: Vec<(u64, f64)> = Vec::new();
    let mut step = |e: &mut Engine, at: f64, input: Input<'_>| {
        let mut actions = e.handle(input, at);
        while let Some(i) = replies.iter().position(|(_, due)| *due <= at) {
            let (seq, _) = replies.remove(i);
            let bytes = packet(seq, 0);
            actions.extend(e.handle(
                Input::Packet {
                    from: From::OriginFetch,
                    bytes: &bytes,
                },
                at,
            ));
        }
        for a in actions {
            if let Action::Fetch { seq } = a {
                fetched.push(seq);
                replies.push((seq, at + 50.0));
            }
        }
    };
    let lost = 11;
    for j in 0..20u64 {
        let t = 1000.0 * j as f64;
        step(
            &mut e,
            t,
            Input::Packet {
                from: From::Peer(PeerId(1)),
                bytes: &packet(2 * j, t as u64),
            },
        );
        for dt in (50..1000).step_by(50) {
            let at = t + dt as f64;
            if dt == 700 && j > 0 {
                let odd = 2 * (j - 1) + 1;
                if odd != lost {
                    step(
                        &mut e,
                        at,
                        Input::Packet {
                            from: From::Peer(PeerId(2)),
                            bytes: &packet(odd, (at - 1700.0) as u64),
                        },
                    );
                }
            }
            step(&mut e, at, Input::Tick);
        }
    }
    assert!(fetched.contains(&lost), "{fetched:?}");
    let after: Vec<u64> = fetched.iter().copied().filter(|s| *s > lost).collect();
    assert!(
        after.len() <= 1,
        "the late tree's packets after the loss were fetched: {after:?}"
    );
}

#[test]
fn a_parent_gone_quiet_is_reported_in_early_heartbeats() {
    // Peer 9 gets tree 0 from peer 1 and tree 1 from peer 2. Peer 1 stops sending after
    // packet 2 (issue 13: a forwarder that claims to send and sends nothing).
    let mut e = welcomed(9);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    let from = |e: &mut Engine, id: u64, seq: u64, t: f64| {
        e.handle(
            Input::Packet {
                from: From::Peer(PeerId(id)),
                bytes: &packet(seq, t as u64),
            },
            t,
        )
    };
    from(&mut e, 1, 0, 1000.0);
    from(&mut e, 2, 1, 1000.0);
    from(&mut e, 1, 2, 2000.0);
    from(&mut e, 2, 3, 2000.0);
    // Packet 4 never comes from peer 1; packet 5 from peer 2 shows it exists.
    from(&mut e, 2, 5, 3000.0);
    let mut fetched_at = None;
    let mut early_at = Vec::new();
    let mut t = 3000.0;
    while t <= 5000.0 {
        let out = e.handle(Input::Tick, t);
        if fetched_at.is_none() && out.iter().any(|a| matches!(a, Action::Fetch { seq: 4 })) {
            fetched_at = Some(t);
        }
        if e.wants_early_heartbeat(false) {
            early_at.push(t);
        }
        t += 50.0;
    }
    assert!(fetched_at.is_some(), "the gap was never fetched");
    // As soon as the gap (noticed at 3000 ms) is older than the DCM's grace for dead links,
    // before the origin is asked for it, and once more a period later.
    assert_eq!(
        early_at,
        vec![
            3000.0 + QUIET_PARENT_REPORT_MS,
            3000.0 + 2.0 * QUIET_PARENT_REPORT_MS
        ]
    );

    // A parent that delivers the gap late (slow, not silent) is not reported.
    let mut e = welcomed(9);
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    from(&mut e, 1, 0, 1000.0);
    from(&mut e, 2, 1, 1000.0);
    from(&mut e, 2, 3, 2000.0);
    let mut t = 2000.0;
    while t <= 4000.0 {
        e.handle(Input::Tick, t);
        if t == 2400.0 {
            from(&mut e, 1, 2, t);
        }
        assert!(!e.wants_early_heartbeat(false), "reported at {t}");
        t += 50.0;
    }
}

#[test]
fn while_the_control_connection_is_down_origin_fed_trees_are_fetched_at_once() {
    // Peer 1 roots tree 0 (the origin pushes it) and hangs under peer 2 in tree 1.
    let mut e = welcomed(1);
    let fetches = |actions: &[Action]| -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Fetch { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    };
    e.handle(
        Input::Instructions {
            plan: plan(
                [Source::Origin, Source::Peer { id: PeerId(2) }],
                [vec![3], vec![]],
            ),
            tier: None,
        },
        0.0,
    );
    // Control up: a known gap waits for its tree, whoever feeds it.
    assert!(fetches(&e.handle(Input::LiveEdge { seq: 3 }, 100.0)).is_empty());
    // The control connection drops: the origin's tree is fetched at once, the peer's waits.
    let got = fetches(&e.handle(Input::Control { up: false }, 110.0));
    assert!(
        got.iter().all(|s| protocol::substream_of(*s, K) == 0),
        "{got:?}"
    );
    assert!(got.contains(&2), "{got:?}");
    let later = fetches(&e.handle(Input::LiveEdge { seq: 5 }, 200.0));
    assert_eq!(later, vec![4], "only tree 0's new gap, without waiting");
    // Back: new gaps wait for the trees again.
    e.handle(Input::Control { up: true }, 300.0);
    assert!(fetches(&e.handle(Input::LiveEdge { seq: 7 }, 310.0)).is_empty());
}

#[test]
fn a_welcome_after_the_control_connection_dropped_lets_origin_fed_trees_wait_again() {
    // A page redirected before its first welcome closed one control connection (down) and was
    // welcomed on the next: the origin pushes the tree it roots, which is not fetched as well.
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    e.handle(Input::Control { up: false }, 0.0);
    e.handle(
        Input::Welcome {
            peer_id: PeerId(1),
            substreams: K,
            start_seq: 0,
            live_seq: 0,
            live_start_seq: None,
        },
        10.0,
    );
    e.handle(
        Input::Instructions {
            plan: plan([Source::Origin, Source::Origin], [vec![], vec![]]),
            tier: None,
        },
        20.0,
    );
    let actions = e.handle(Input::LiveEdge { seq: 3 }, 100.0);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Fetch { .. })),
        "{actions:?}"
    );
}

fn sends_to(actions: &[Action], to: u64) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Send { to: t, .. } if t.0 == to))
        .count()
}

fn disconnects(actions: &[Action], peer: u64) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Disconnect { peer: p } if p.0 == peer))
}

#[test]
fn a_moved_child_is_fed_by_its_old_parent_until_it_closes_the_link() {
    // Peer 1 roots tree 0 with child 3; new instructions move 3 away.
    let mut e = welcomed(1);
    let o = Source::Origin;
    e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![3], vec![]]),
            tier: None,
        },
        0.0,
    );
    let push = |e: &mut Engine, seq: u64, now: f64| {
        let p = packet(seq, now as u64);
        e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &p,
            },
            now,
        )
    };
    assert_eq!(sends_to(&push(&mut e, 2, 10.0), 3), 1);
    let moved = e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![], vec![]]),
            tier: None,
        },
        20.0,
    );
    assert!(!disconnects(&moved, 3), "make before break: {moved:?}");
    assert_eq!(sends_to(&push(&mut e, 4, 30.0), 3), 1, "still fed");
    // Its new parent delivered and it closed our link: the handover is over.
    e.handle(Input::LinkClosed { peer: PeerId(3) }, 40.0);
    assert_eq!(sends_to(&push(&mut e, 6, 50.0), 3), 0);
    assert!(e.neighbours().all(|p| p.0 != 3));

    // Another child moved away and never closing the link: fed until the handover's time.
    let mut e = welcomed(1);
    e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![4], vec![]]),
            tier: None,
        },
        0.0,
    );
    push(&mut e, 2, 10.0);
    e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![], vec![]]),
            tier: None,
        },
        20.0,
    );
    let until = 20.0 + EngineConfig::default().handover_ms;
    assert_eq!(sends_to(&push(&mut e, 4, until - 10.0), 4), 1);
    let over = e.handle(Input::Tick, until);
    assert!(disconnects(&over, 4), "{over:?}");
    assert_eq!(sends_to(&push(&mut e, 6, until + 10.0), 4), 0);
}

#[test]
fn a_child_keeps_its_old_parent_until_the_new_one_delivers() {
    let mut e = welcomed(3);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), Source::Origin], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    let from = |e: &mut Engine, peer: u64, seq: u64, now: f64| {
        let pk = packet(seq, now as u64);
        e.handle(
            Input::Packet {
                from: From::Peer(PeerId(peer)),
                bytes: &pk,
            },
            now,
        )
    };
    from(&mut e, 1, 2, 10.0);
    let moved = e.handle(
        Input::Instructions {
            plan: plan([p(2), Source::Origin], [vec![], vec![]]),
            tier: None,
        },
        20.0,
    );
    assert!(
        moved
            .iter()
            .any(|a| matches!(a, Action::Connect { peer } if peer.0 == 2)),
        "{moved:?}"
    );
    assert!(!disconnects(&moved, 1), "make before break: {moved:?}");
    // The old parent's packet is taken as any other.
    let dup_before = e.counters.duplicates;
    from(&mut e, 1, 4, 30.0);
    assert_eq!(e.counters.duplicates, dup_before);
    // The new parent's first packet ends the handover: the old link is closed.
    let first = from(&mut e, 2, 6, 40.0);
    assert!(disconnects(&first, 1), "{first:?}");
    assert!(e.neighbours().all(|p| p.0 != 1));
}

#[test]
fn sends_waiting_for_a_closed_link_are_dropped_without_spending_upload() {
    // Peer 1 roots tree 0 with children 3 and 4 on an uplink of two packets a second.
    let mut e = welcomed_with(
        1,
        EngineConfig {
            upload_kbps: 16,
            ..EngineConfig::default()
        },
    );
    let o = Source::Origin;
    e.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![3, 4], vec![]]),
            tier: None,
        },
        0.0,
    );
    // More than the bucket's burst (at least one maximal frame) for the two children.
    for (i, seq) in (1..=40u64).map(|n| 2 * n).enumerate() {
        let p = packet(seq, 10);
        e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &p,
            },
            10.0 + i as f64,
        );
    }
    // Child 3 left: its link closed before the instructions without it arrive.
    e.handle(Input::LinkClosed { peer: PeerId(3) }, 20.0);
    let mut to3 = 0;
    let mut to4 = 0;
    // Within the send timeout (1.5 s) the uplink carries about three packets.
    for t in 1..=29 {
        for a in e.handle(Input::Tick, 20.0 + 50.0 * t as f64) {
            if let Action::Send { to, .. } = a {
                match to.0 {
                    3 => to3 += 1,
                    4 => to4 += 1,
                    _ => {}
                }
            }
        }
    }
    assert_eq!(to3, 0, "nothing more for the closed link");
    assert!(to4 >= 2, "the other child gets the upload: {to4}");
}

/// Seqs of the packets `actions` send to `to` (wants and parity frames left out).
fn packets_to(actions: &[Action], to: u64) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to: t, packet } if t.0 == to && packet.first() == Some(&b'P') => {
                protocol::packet::peek_seq(packet)
            }
            _ => None,
        })
        .collect()
}

fn wants_to(actions: &[Action], to: u64) -> Vec<protocol::want::Want> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to: t, packet } if t.0 == to => {
                protocol::want::Want::decode(packet).ok()
            }
            _ => None,
        })
        .collect()
}

/// Peer 1, fed both trees by the origin, has delivered packets 0..=19 (fragments start at 0, 8
/// and 16).
fn parent_holding_three_fragments() -> Engine {
    let mut p = welcomed(1);
    let o = Source::Origin;
    p.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    for seq in 0..20 {
        p.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &packet(seq, 100),
            },
            100.0,
        );
    }
    p
}

/// Peer 5 joins at 200 ms: it starts at 8, the newest fragment is 16..=19. With the Welcome's
/// actions.
fn joiner() -> (Engine, Vec<Action>) {
    let mut j = Engine::new(EngineConfig::default(), 200.0);
    let acts = j.handle(
        Input::Welcome {
            peer_id: PeerId(5),
            substreams: K,
            start_seq: 8,
            live_seq: 19,
            live_start_seq: Some(16),
        },
        200.0,
    );
    (j, acts)
}

#[test]
fn a_joiner_gets_the_newest_fragment_from_its_new_parent_not_the_origin() {
    let mut parent = parent_holding_three_fragments();
    let (mut j, welcome) = joiner();
    let fetches = |acts: &[Action]| -> Vec<u64> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Fetch { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        fetches(&welcome),
        (8..16).collect::<Vec<_>>(),
        "the older fragment"
    );
    let p1 = Source::Peer { id: PeerId(1) };
    let acts = j.handle(
        Input::Instructions {
            plan: plan([p1, p1], [vec![], vec![]]),
            tier: None,
        },
        210.0,
    );
    // Connect first: the want waits in the link until its data channel opens.
    let connect = acts
        .iter()
        .position(|a| matches!(a, Action::Connect { peer } if peer.0 == 1));
    let first_send = acts
        .iter()
        .position(|a| matches!(a, Action::Send { to, .. } if to.0 == 1));
    assert!(connect < first_send, "{acts:?}");
    let wants = wants_to(&acts, 1);
    let ranges: Vec<(u32, u64, u64)> = wants
        .iter()
        .map(|w| (w.substream, w.from_seq, w.to_seq))
        .collect();
    assert_eq!(ranges, vec![(0, 16, 19), (1, 16, 19)]);
    assert_eq!(j.counters.catch_up_asked, 2);
    // The parent's instructions add the child (it primes 18 and 19), then the wants arrive.
    let o = Source::Origin;
    let mut sent = packets_to(
        &parent.handle(
            Input::Instructions {
                plan: plan([o, o], [vec![5], vec![5]]),
                tier: None,
            },
            220.0,
        ),
        5,
    );
    for w in &wants {
        sent.extend(packets_to(
            &parent.handle(
                Input::Packet {
                    from: From::Peer(PeerId(5)),
                    bytes: &w.encode(),
                },
                260.0,
            ),
            5,
        ));
    }
    for t in 0..10 {
        sent.extend(packets_to(
            &parent.handle(Input::Tick, 270.0 + 10.0 * f64::from(t)),
            5,
        ));
    }
    sent.sort_unstable();
    assert_eq!(sent, vec![16, 17, 18, 19], "each wanted packet once");
    assert_eq!(
        parent.counters.catch_up_sent, 2,
        "16 and 17; 18 and 19 were primes"
    );
    // The newest fragment is never fetched.
    let mut fetched = fetches(&acts);
    for seq in 16..20 {
        j.handle(
            Input::Packet {
                from: From::Peer(PeerId(1)),
                bytes: &packet(seq, 100),
            },
            300.0,
        );
    }
    for t in 0..30 {
        fetched.extend(fetches(&j.handle(Input::Tick, 300.0 + 50.0 * f64::from(t))));
    }
    assert_eq!(fetched, Vec::<u64>::new());
}

#[test]
fn a_want_that_overtakes_the_parents_instructions_is_served_when_they_come() {
    let mut parent = parent_holding_three_fragments();
    let want = protocol::want::Want {
        substream: 0,
        from_seq: 16,
        to_seq: 19,
    };
    let early = parent.handle(
        Input::Packet {
            from: From::Peer(PeerId(5)),
            bytes: &want.encode(),
        },
        150.0,
    );
    assert!(packets_to(&early, 5).is_empty(), "not our child yet");
    // A stranger's want is never served: it is not made a child within the wait.
    parent.handle(
        Input::Packet {
            from: From::Peer(PeerId(9)),
            bytes: &want.encode(),
        },
        150.0,
    );
    let o = Source::Origin;
    let mut sent = packets_to(
        &parent.handle(
            Input::Instructions {
                plan: plan([o, o], [vec![5], vec![]]),
                tier: None,
            },
            400.0,
        ),
        5,
    );
    for t in 0..10 {
        sent.extend(packets_to(
            &parent.handle(Input::Tick, 410.0 + 10.0 * f64::from(t)),
            5,
        ));
    }
    sent.sort_unstable();
    assert_eq!(sent, vec![16, 18], "the prime (18) and the wanted 16");
    // Peer 9 becomes a child long after its want: it expired.
    let late = parent.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![5, 9], vec![]]),
            tier: None,
        },
        5000.0,
    );
    let mut to9 = packets_to(&late, 9);
    for t in 0..10 {
        to9.extend(packets_to(
            &parent.handle(Input::Tick, 5010.0 + 10.0 * f64::from(t)),
            9,
        ));
    }
    assert_eq!(to9, vec![18], "only the prime");
}

#[test]
fn garbled_or_stray_wants_are_counted_and_ignored() {
    let mut parent = parent_holding_three_fragments();
    let invalid = parent.counters.invalid;
    let mut short = protocol::want::Want {
        substream: 0,
        from_seq: 16,
        to_seq: 19,
    }
    .encode();
    short.pop();
    let bad_tree = protocol::want::Want {
        substream: K,
        from_seq: 16,
        to_seq: 19,
    }
    .encode();
    for (from, bytes) in [
        (From::Peer(PeerId(5)), short),
        (From::Peer(PeerId(5)), bad_tree.clone()),
        (From::OriginFetch, bad_tree),
        (From::Peer(PeerId(5)), b"W".to_vec()),
    ] {
        let acts = parent.handle(
            Input::Packet {
                from,
                bytes: &bytes,
            },
            150.0,
        );
        assert!(packets_to(&acts, 5).is_empty());
    }
    assert_eq!(parent.counters.invalid, invalid + 4);
}

#[test]
fn a_joiner_relays_its_start_from_spare_upload_behind_the_live_packets() {
    // The joiner roots tree 0 (fed by the origin) with child 7, on an uplink of 8 kbit/s: its
    // burst (one maximal frame, 16 kB) is all it can send here. Its start, 0..=63, is fetched;
    // 64 is the first live packet.
    let mut j = Engine::new(
        EngineConfig {
            upload_kbps: 8,
            ..EngineConfig::default()
        },
        200.0,
    );
    j.handle(
        Input::Welcome {
            peer_id: PeerId(5),
            substreams: K,
            start_seq: 0,
            live_seq: 63,
            live_start_seq: Some(32),
        },
        200.0,
    );
    let o = Source::Origin;
    j.handle(
        Input::Instructions {
            plan: plan([o, o], [vec![7], vec![]]),
            tier: None,
        },
        210.0,
    );
    let mut to7 = Vec::new();
    for seq in 0..=64 {
        let from = if seq < 64 {
            From::OriginFetch
        } else {
            From::OriginPush
        };
        to7.extend(packets_to(
            &j.handle(
                Input::Packet {
                    from,
                    bytes: &packet(seq, 100),
                },
                300.0,
            ),
            7,
        ));
    }
    assert!(to7.contains(&64), "the live packet goes: {to7:?}");
    // Spare sends leave half the burst: a few of tree 0's 32 start packets, not the 15 that the
    // whole burst would have carried in front of packet 64.
    let start = to7.iter().filter(|s| **s < 64).count();
    assert!((1..=8).contains(&start), "{to7:?}");
    let hb = j.heartbeat().expect("welcomed");
    let link = hb
        .children
        .iter()
        .find(|c| c.child == PeerId(7))
        .expect("child 7");
    assert_eq!(
        link.last_seq,
        Some(64),
        "the heartbeat reports the live packet"
    );
}

#[test]
fn a_late_packet_from_the_parent_does_not_make_the_link_look_behind() {
    let mut c = welcomed(3);
    let p1 = Source::Peer { id: PeerId(1) };
    c.handle(
        Input::Instructions {
            plan: plan([p1, p1], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    for seq in [4, 6, 2] {
        c.handle(
            Input::Packet {
                from: From::Peer(PeerId(1)),
                bytes: &packet(seq, 100),
            },
            100.0,
        );
    }
    let hb = c.heartbeat().expect("welcomed");
    let tree0 = hb
        .parents
        .iter()
        .find(|p| p.substream == 0)
        .expect("tree 0");
    assert_eq!(
        tree0.last_seq,
        Some(6),
        "the newest, not the last to arrive"
    );
}

#[test]
fn gaps_the_player_is_about_to_need_are_fetched_without_waiting() {
    // Fragments of 8 packets (random access at 0, 8, 16). The first is delivered; of the next
    // two only a few packets came, so the engine knows gaps in both.
    let run = |slack_ms: Option<f64>| -> Vec<u64> {
        let mut e = welcomed(9);
        let p = |id| Source::Peer { id: PeerId(id) };
        e.handle(
            Input::Instructions {
                plan: plan([p(1), p(2)], [vec![], vec![]]),
                tier: None,
            },
            0.0,
        );
        let mut fetched = Vec::new();
        let mut note = |actions: Vec<Action>| {
            for a in actions {
                if let Action::Fetch { seq } = a {
                    fetched.push(seq);
                }
            }
        };
        for seq in (0..8).chain([9, 11, 16, 17, 19]) {
            let from = From::Peer(PeerId(1 + seq % 2));
            let bytes = packet(seq, 100);
            note(e.handle(
                Input::Packet {
                    from,
                    bytes: &bytes,
                },
                100.0,
            ));
        }
        e.set_player_slack(slack_ms, 150.0);
        // Well within the fallback period.
        note(e.handle(Input::Tick, 200.0));
        fetched
    };
    assert!(run(None).is_empty(), "a player that does not say waits");
    assert!(
        run(Some(3000.0)).is_empty(),
        "a player with media to spare waits"
    );
    // A player about to run dry: the next fragment's gaps at once, not the one after it.
    assert_eq!(run(Some(200.0)), vec![8, 10, 12, 13, 14, 15]);
}

#[test]
fn a_player_about_to_run_dry_fetches_the_fragment_its_clock_says_was_cut() {
    // Every tree is late and no live-edge notice came: only the clock says the next fragment
    // exists. (Fragments of 8 packets, 1 s apart.)
    let mut e = welcomed(9);
    e.set_fragment_hint(1000.0);
    let p = |id| Source::Peer { id: PeerId(id) };
    e.handle(
        Input::Instructions {
            plan: plan([p(1), p(2)], [vec![], vec![]]),
            tier: None,
        },
        0.0,
    );
    for seq in 0..8 {
        let bytes = packet(seq, 100);
        let from = From::Peer(PeerId(1 + seq % 2));
        e.handle(
            Input::Packet {
                from,
                bytes: &bytes,
            },
            100.0,
        );
    }
    let fetches = |actions: Vec<Action>| -> Vec<u64> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Fetch { seq } => Some(seq),
                _ => None,
            })
            .collect()
    };
    // Plenty of media: nothing is guessed.
    e.set_player_slack(Some(1500.0), 1100.0);
    assert!(fetches(e.handle(Input::Tick, 1100.0)).is_empty());
    // About to run dry, but the next fragment is not due yet (cut at 100 + 1000).
    e.set_player_slack(Some(100.0), 1150.0);
    assert!(fetches(e.handle(Input::Tick, 1150.0)).is_empty());
    // Past a fragment and a fifth: the next fragment's first packet of each tree.
    assert_eq!(fetches(e.handle(Input::Tick, 1400.0)), vec![8, 9]);
    // The origin had not cut it yet (a clock ahead of the origin's): not asked again at once.
    e.handle(
        Input::FetchFailed {
            seq: 8,
            gone: false,
        },
        1450.0,
    );
    assert!(fetches(e.handle(Input::Tick, 1500.0)).is_empty());
    assert_eq!(fetches(e.handle(Input::Tick, 2100.0)), vec![8]);
}
