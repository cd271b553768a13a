//! Tiers, tested with many engines in one process: a small router moves `Send` actions between
//! engines on a simulated clock, the origin pushes and serves fetches, and peers can die.

use std::collections::{BTreeMap, BTreeSet};

use protocol::fec::{encode_parity_frames, Fec, FecParams, ParityFrame};
use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS};
use protocol::{FecSpec, Feed, TierName, TierPlan};

use super::*;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: u32 = 3;
const PACKETS: u64 = 99;

/// Packets of varying length, so parity is padded and rebuilt lengths matter.
fn packet(seq: u64, created_ms: u64) -> Vec<u8> {
    let len = 200 + (seq as usize * 37) % 800;
    let payload: Vec<u8> = (0..len).map(|i| (seq as usize * 7 + i) as u8).collect();
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

fn tier(
    name: TierName,
    mesh: Vec<Source>,
    feeds: Vec<Feed>,
    fec: Option<FecSpec>,
) -> Option<TierPlan> {
    Some(TierPlan {
        tier: name,
        region: "test".into(),
        cluster: None,
        plays: true,
        fec,
        mesh,
        feeds,
    })
}

fn peer(id: u64) -> Source {
    Source::Peer { id: PeerId(id) }
}

struct Net {
    engines: BTreeMap<u64, Engine>,
    /// (due, to, from, bytes), processed in due order.
    wire: Vec<(f64, u64, From, Vec<u8>)>,
    origin: BTreeMap<u64, Vec<u8>>,
    /// `Fetch` actions per engine after the Welcome.
    fetches: BTreeMap<u64, u64>,
    delivered: BTreeMap<u64, Vec<u8>>,
    dead: BTreeSet<u64>,
    now: f64,
}

impl Net {
    fn new(ids: &[u64]) -> Self {
        Net::with_fallback(ids, EngineConfig::default().fallback_after_ms)
    }

    fn with_fallback(ids: &[u64], fallback_after_ms: f64) -> Self {
        let mut engines = BTreeMap::new();
        for &id in ids {
            let mut e = Engine::new(
                EngineConfig {
                    upload_kbps: 20_000,
                    fallback_after_ms,
                    ..EngineConfig::default()
                },
                -1000.0,
            );
            // The Welcome's own fetch of packet 0 (it exists at the origin) is not counted:
            // packet 0 reaches everyone through the swarm before that fetch would matter.
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
        Net {
            engines,
            wire: Vec::new(),
            origin: BTreeMap::new(),
            fetches: BTreeMap::new(),
            delivered: BTreeMap::new(),
            dead: BTreeSet::new(),
            now: 0.0,
        }
    }

    fn instruct(&mut self, id: u64, plan: Vec<SubstreamPlan>, tier: Option<TierPlan>) {
        let now = self.now;
        let e = self.engines.get_mut(&id).expect("known engine");
        let actions = e.handle(Input::Instructions { plan, tier }, now);
        self.run_actions(id, actions);
    }

    fn input(&mut self, id: u64, input: Input<'_>) {
        if self.dead.contains(&id) {
            return;
        }
        let now = self.now;
        let e = self.engines.get_mut(&id).expect("known engine");
        let actions = e.handle(input, now);
        self.run_actions(id, actions);
    }

    fn run_actions(&mut self, id: u64, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, packet } => {
                    assert_ne!(to, PeerId(id), "sent to itself");
                    self.wire.push((
                        self.now + 5.0,
                        to.0,
                        From::Peer(PeerId(id)),
                        (*packet).clone(),
                    ));
                }
                Action::Fetch { seq } => {
                    *self.fetches.entry(id).or_default() += 1;
                    match self.origin.get(&seq) {
                        Some(p) => {
                            self.wire
                                .push((self.now + 20.0, id, From::OriginFetch, p.clone()))
                        }
                        None => self.input(id, Input::FetchFailed { seq, gone: false }),
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

    /// Cuts `packets` packets, one every 50 ms, pushing each to `push(seq)` (origin-fed peers)
    /// and calling `event(net, seq)` just before it is cut; then lets the swarm settle.
    fn run(
        &mut self,
        packets: u64,
        push: impl Fn(u64) -> Vec<u64>,
        mut event: impl FnMut(&mut Net, u64),
    ) {
        for step in 0..(packets * 5 + 200) {
            self.now = step as f64 * 10.0;
            if step % 5 == 0 && step / 5 < packets {
                let seq = step / 5;
                event(self, seq);
                let p = packet(seq, self.now as u64);
                self.origin.insert(seq, p.clone());
                for to in push(seq) {
                    self.wire
                        .push((self.now + 1.0, to, From::OriginPush, p.clone()));
                }
                let ids: Vec<u64> = self.engines.keys().copied().collect();
                for id in ids {
                    self.input(id, Input::LiveEdge { seq });
                }
            }
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wire)
                .into_iter()
                .partition(|w| w.0 <= now);
            self.wire = later;
            let mut due = due;
            due.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (_, to, from, bytes) in due {
                self.input(
                    to,
                    Input::Packet {
                        from,
                        bytes: &bytes,
                    },
                );
            }
            let ids: Vec<u64> = self.engines.keys().copied().collect();
            for id in ids {
                self.input(id, Input::Tick);
            }
        }
    }

    fn origin_bytes(&self) -> Vec<u8> {
        self.origin
            .values()
            .flat_map(|p| {
                Packet::decode(p)
                    .map(|p| p.payload.to_vec())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn assert_complete(&self, id: u64) {
        let expected = self.origin_bytes();
        let got = self.delivered.get(&id).map_or(&[][..], Vec::as_slice);
        // Equal lengths as well as bytes: a packet delivered twice would lengthen the stream.
        assert_eq!(got.len(), expected.len(), "peer {id}: wrong length");
        assert!(got == expected, "peer {id}: bytes differ from the origin's");
        let e = &self.engines[&id];
        assert_eq!(e.verified.map(|v| v.count), Some(self.origin.len() as u64));
    }

    fn fetches(&self, id: u64) -> u64 {
        self.fetches.get(&id).copied().unwrap_or(0)
    }
}

/// Five preferred nodes in a 3-connected mesh (K5 without the edges 1-2 and 3-4); the origin
/// pushes the stream to nodes 1 and 2. Nodes 2 and 3 die a third of the way in.
#[test]
fn mesh_floods_every_packet_to_all_once_and_survives_two_failures() {
    let ids = [1u64, 2, 3, 4, 5];
    let missing = [(1, 2), (2, 1), (3, 4), (4, 3)];
    let mut net = Net::new(&ids);
    for &id in &ids {
        let mut mesh: Vec<Source> = ids
            .iter()
            .filter(|&&o| o != id && !missing.contains(&(id, o)))
            .map(|&o| peer(o))
            .collect();
        if id <= 2 {
            mesh.push(Source::Origin);
        }
        net.instruct(
            id,
            Vec::new(),
            tier(TierName::Preferred, mesh, vec![], None),
        );
        assert!(net.engines[&id].mesh_neighbours().len() >= 3);
    }
    net.run(
        PACKETS,
        |_| vec![1, 2],
        |net, seq| {
            if seq == PACKETS / 3 {
                net.dead.extend([2, 3]);
            }
        },
    );
    for id in [1, 4, 5] {
        net.assert_complete(id);
        assert_eq!(net.fetches(id), 0, "peer {id} needed the origin");
        assert_eq!(net.engines[&id].counters.invalid, 0);
    }
    // Copies did arrive (a node gets each packet from several neighbours); they were dropped.
    let dups: u64 = net.engines.values().map(|e| e.counters.duplicates).sum();
    assert!(dups > PACKETS, "{dups}");
}

/// `k + n` trees rooted at the middle members, fed by one preferred node; member `10` is a leaf
/// with one parent per tree.
fn coded_cluster(net: &mut Net, preferred: u64, roots: &[u64], leaf: u64) {
    let spec = FecSpec { k: K, n: 2 };
    let feeds = roots
        .iter()
        .enumerate()
        .map(|(i, &r)| Feed {
            to: PeerId(r),
            substream: i as u32,
            fec: Some(spec),
        })
        .collect();
    net.instruct(
        preferred,
        Vec::new(),
        tier(TierName::Preferred, vec![Source::Origin], feeds, None),
    );
    for &member in roots.iter().chain([&leaf]) {
        let plan = roots
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let (parent, children) = if r == member {
                    let kids = roots
                        .iter()
                        .chain([&leaf])
                        .filter(|&&o| o != r)
                        .map(|&o| PeerId(o))
                        .collect();
                    (peer(preferred), kids)
                } else {
                    (peer(r), vec![])
                };
                SubstreamPlan {
                    index: i as u32,
                    parent,
                    children,
                }
            })
            .collect();
        net.instruct(
            member,
            plan,
            tier(TierName::Middle, vec![], vec![], Some(spec)),
        );
    }
}

/// The fallback period (40 ms) is shorter than a group takes to be cut (3 × 50 ms): only the
/// rule that a gap's clock starts when its group's end is known keeps parity ahead of the origin.
#[test]
fn coded_member_losing_n_parents_recovers_everything_without_the_origin() {
    let roots = [20u64, 21, 22, 23, 24];
    let mut net = Net::with_fallback(&[1, 20, 21, 22, 23, 24, 10], 40.0);
    coded_cluster(&mut net, 1, &roots, 10);
    assert_eq!(net.engines[&10].trees(), 5);
    // Two data-tree parents (trees 0 and 2) fail at once.
    net.run(
        PACKETS,
        |_| vec![1],
        |net, seq| {
            if seq == PACKETS / 3 {
                net.dead.extend([20, 22]);
            }
        },
    );
    for id in [10, 21, 23, 24] {
        net.assert_complete(id);
        assert_eq!(net.fetches(id), 0, "peer {id} fetched from the origin");
        let c = &net.engines[&id].counters;
        assert!(c.packets_recovered > 0, "peer {id} rebuilt nothing");
        assert!(c.parity_frames_received > 0);
        assert_eq!(c.invalid, 0, "peer {id}");
    }
    // Before the failure nothing needed rebuilding (except a group cut before the plan).
    let leaf = net.engines.get_mut(&10).expect("leaf");
    let recovered = leaf.counters.packets_recovered;
    assert!(
        recovered <= 2 * (PACKETS - PACKETS / 3) / 3 + 2,
        "{recovered}"
    );
    // The heartbeat has one link per tree; parity trees report in packet sequence numbers.
    let hb = leaf.heartbeat().expect("welcomed");
    assert_eq!(hb.parents.len(), 5);
    assert_eq!(hb.buffer.len(), 5);
    for p in &hb.parents[3..] {
        let last = p.last_seq.expect("parity arrived");
        assert_eq!(last % u64::from(K), u64::from(K) - 1, "a group's last seq");
        assert_eq!(last, PACKETS - 1);
    }
    // The dead parent of tree 0 stopped short.
    assert!(hb.parents[0].last_seq.expect("some") < PACKETS / 3 + 3);
}

#[test]
fn preferred_node_codes_parity_once_per_group_identical_to_encode_parity_frames() {
    let mut net = Net::new(&[1]);
    let spec = FecSpec { k: K, n: 2 };
    let feeds = vec![
        Feed {
            to: PeerId(30),
            substream: 3,
            fec: Some(spec),
        },
        Feed {
            to: PeerId(31),
            substream: 4,
            fec: Some(spec),
        },
        Feed {
            to: PeerId(32),
            substream: 1,
            fec: Some(spec),
        },
    ];
    let e = net.engines.get_mut(&1).expect("engine");
    let a = e.handle(
        Input::Instructions {
            plan: vec![],
            tier: tier(TierName::Preferred, vec![Source::Origin], feeds, None),
        },
        0.0,
    );
    let connects: BTreeSet<PeerId> = a
        .iter()
        .filter_map(|a| match a {
            Action::Connect { peer } => Some(*peer),
            _ => None,
        })
        .collect();
    assert_eq!(connects, [30, 31, 32].map(PeerId).into_iter().collect());
    // Packets out of order and some twice; two complete groups and one partial.
    let order = [1u64, 0, 2, 2, 5, 3, 4, 1, 7, 6];
    let mut sent: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (i, seq) in order.iter().enumerate() {
        let now = 10.0 * i as f64;
        let p = packet(*seq, 1000 + *seq);
        for a in e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &p,
            },
            now,
        ) {
            if let Action::Send { to, packet } = a {
                sent.entry(to.0).or_default().push((*packet).clone());
            }
        }
    }
    let fec = Fec::new(FecParams::new(K, 2).expect("params")).expect("fec");
    for group in 0..2u64 {
        let ps: Vec<Vec<u8>> = (group * 3..group * 3 + 3)
            .map(|s| packet(s, 1000 + s))
            .collect();
        let refs: Vec<&[u8]> = ps.iter().map(Vec::as_slice).collect();
        let frames = encode_parity_frames(&fec, group, 1000 + group * 3 + 2, &refs).expect("code");
        assert_eq!(
            sent[&30][group as usize], frames[0],
            "group {group} shard 3"
        );
        assert_eq!(
            sent[&31][group as usize], frames[1],
            "group {group} shard 4"
        );
    }
    assert_eq!(sent[&30].len(), 2, "one frame per complete group");
    assert_eq!(sent[&31].len(), 2);
    assert!(sent[&30].iter().all(|f| ParityFrame::decode(f).is_ok()));
    // The data feed of substream 1 got packets 1, 4, 7 as they are.
    let seqs: Vec<u64> = sent[&32]
        .iter()
        .filter_map(|p| protocol::packet::peek_seq(p))
        .collect();
    assert_eq!(seqs, vec![1, 4, 7]);
}

#[test]
fn a_recruited_relay_forwards_but_plays_nothing() {
    let mut net = Net::new(&[1]);
    let mut plan = tier(TierName::Bottom, vec![], vec![], None);
    if let Some(t) = plan.as_mut() {
        t.plays = false;
    }
    let subs = (0..K)
        .map(|i| SubstreamPlan {
            index: i,
            parent: Source::Origin,
            children: vec![PeerId(7)],
        })
        .collect();
    let e = net.engines.get_mut(&1).expect("engine");
    e.handle(
        Input::Instructions {
            plan: subs,
            tier: plan,
        },
        0.0,
    );
    assert!(!e.plays());
    let mut sends = 0;
    for seq in 0..6 {
        let a = e.handle(
            Input::Packet {
                from: From::OriginPush,
                bytes: &packet(seq, 0),
            },
            seq as f64,
        );
        assert!(a.iter().all(|a| !matches!(a, Action::Deliver { .. })));
        sends += a
            .iter()
            .filter(|a| matches!(a, Action::Send { .. }))
            .count();
    }
    assert_eq!(sends, 6);
    assert_eq!(e.verified.map(|v| v.count), Some(6), "still verified");
}

#[test]
fn garbage_parity_frames_are_counted_not_relayed() {
    let mut net = Net::new(&[1]);
    let e = net.engines.get_mut(&1).expect("engine");
    let mut frame = vec![b'F', 1, 3, 2, 0, 0, 0, 9];
    frame.extend_from_slice(&[0; 25]);
    let a = e.handle(
        Input::Packet {
            from: From::Peer(PeerId(2)),
            bytes: &frame,
        },
        1.0,
    );
    assert!(a.is_empty());
    assert_eq!(e.counters.invalid, 1);
}

/// A hostile parent's parity frame for a group far ahead of the stream is dropped: taken, it
/// moved the assembler's window past every real group and cost the member its recovery (found
/// by `cargo xtask fuzz`).
#[test]
fn a_parity_frame_far_ahead_of_the_stream_does_not_disable_recovery() {
    let roots = [20u64, 21, 22, 23, 24];
    let mut net = Net::with_fallback(&[1, 20, 21, 22, 23, 24, 10], 40.0);
    coded_cluster(&mut net, 1, &roots, 10);
    let fec = Fec::new(FecParams::new(K, 2).expect("params")).expect("fec");
    let far = 1_000_000u64;
    let ps: Vec<Vec<u8>> = (far * 3..far * 3 + 3).map(|s| packet(s, 0)).collect();
    let refs: Vec<&[u8]> = ps.iter().map(Vec::as_slice).collect();
    let frames = encode_parity_frames(&fec, far, 0, &refs).expect("code");
    let leaf = net.engines.get_mut(&10).expect("leaf");
    leaf.handle(
        Input::Packet {
            from: From::Peer(PeerId(23)),
            bytes: &frames[0],
        },
        0.0,
    );
    assert_eq!(leaf.counters.invalid, 1, "the far-ahead frame is refused");
    net.run(
        PACKETS,
        |_| vec![1],
        |net, seq| {
            if seq == PACKETS / 3 {
                net.dead.extend([20, 22]);
            }
        },
    );
    net.assert_complete(10);
    assert_eq!(net.fetches(10), 0, "the leaf still recovers from parity");
    assert!(net.engines[&10].counters.packets_recovered > 0);
}
