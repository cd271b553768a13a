//! [`MultiTree::restore`]: a new DCM rebuilds the trees from heartbeats.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use protocol::rng::XorShift as Rng;
use protocol::{PeerId, Source, SubstreamPlan};

use super::{MultiTree, MultiTreeConfig, ObservedPeer};

const CAPACITIES: [u32; 9] = [0, 100, 250, 500, 999, 1000, 2000, 5000, 100_000];

fn cfg(k: u32, origin_fanout: u32, max_fanout: u32) -> MultiTreeConfig {
    MultiTreeConfig {
        k,
        stream_kbps: 1000,
        origin_fanout,
        max_fanout,
    }
}

/// A tree shaped by random joins, re-joins and leaves, with the uploads of its peers.
fn churned(rng: &mut Rng, c: MultiTreeConfig, steps: u64) -> (MultiTree, BTreeMap<PeerId, u32>) {
    let mut m = MultiTree::new(c);
    let mut uploads = BTreeMap::new();
    let mut present: Vec<PeerId> = Vec::new();
    for step in 0..steps {
        if present.is_empty() || rng.below(100) < 65 {
            let id = PeerId(step);
            let up = CAPACITIES[rng.below(CAPACITIES.len() as u64) as usize];
            m.join(id, up);
            uploads.insert(id, up);
            present.push(id);
        } else if rng.below(10) == 0 {
            let id = present[rng.below(present.len() as u64) as usize];
            let up = CAPACITIES[rng.below(CAPACITIES.len() as u64) as usize];
            m.join(id, up);
            uploads.insert(id, up);
        } else {
            let id = present.swap_remove(rng.below(present.len() as u64) as usize);
            m.leave(id);
            uploads.remove(&id);
        }
    }
    m.check_invariants().unwrap();
    (m, uploads)
}

/// What every peer of `m` would report: its upload and its parent per substream.
fn observe(m: &MultiTree, uploads: &BTreeMap<PeerId, u32>) -> Vec<ObservedPeer> {
    m.peers()
        .map(|p| ObservedPeer {
            peer: p,
            upload_kbps: uploads[&p],
            parents: m
                .plan(p)
                .unwrap()
                .iter()
                .map(|s| (s.index, s.parent))
                .collect(),
        })
        .collect()
}

/// A plan with its children sorted: the order in which a parent gained them is not observable.
fn plan(m: &MultiTree, p: PeerId) -> Vec<SubstreamPlan> {
    let mut plan = m.plan(p).unwrap();
    for s in &mut plan {
        s.children.sort_unstable();
    }
    plan
}

fn all_plans(m: &MultiTree) -> BTreeMap<PeerId, Vec<SubstreamPlan>> {
    m.peers().map(|p| (p, m.plan(p).unwrap())).collect()
}

#[test]
fn consistent_reports_restore_every_plan_and_change_nobody() {
    for seed in 1..=8u64 {
        let mut rng = Rng::seeded(seed);
        let c = cfg(
            1 + rng.below(6) as u32,
            rng.below(4) as u32,
            1 + rng.below(8) as u32,
        );
        let (original, uploads) = churned(&mut rng, c, 900);
        assert!(original.len() >= 150, "seed {seed}: {}", original.len());
        let mut observed = observe(&original, &uploads);
        rng.shuffle(&mut observed);
        let (restored, changes) = MultiTree::restore(c, &observed);
        restored.check_invariants().unwrap();
        assert!(changes.affected.is_empty(), "seed {seed}: {changes:?}");
        assert_eq!(restored.len(), original.len());
        for p in original.peers() {
            assert_eq!(plan(&restored, p), plan(&original, p), "seed {seed}: {p}");
        }
        assert_eq!(restored.origin_load(), original.origin_load());
        assert_eq!(restored.max_depth(), original.max_depth());
    }
}

#[test]
fn a_bulk_built_tree_round_trips() {
    let mut rng = Rng::seeded(42);
    let c = cfg(4, 1, 6);
    let uploads: BTreeMap<PeerId, u32> = (0..400u64)
        .map(|i| (PeerId(i), CAPACITIES[rng.below(9) as usize]))
        .collect();
    let peers: Vec<(PeerId, u32)> = uploads.iter().map(|(p, u)| (*p, *u)).collect();
    let original = MultiTree::build(c, &peers);
    let (restored, changes) = MultiTree::restore(c, &observe(&original, &uploads));
    restored.check_invariants().unwrap();
    assert!(changes.affected.is_empty());
    for p in original.peers() {
        assert_eq!(plan(&restored, p), plan(&original, p));
    }
}

/// Reports of a churned tree with a tenth of the peers silent and some links corrupted, and the
/// links that restore must keep whatever it does with the rest.
struct Damaged {
    observed: Vec<ObservedPeer>,
    silent: BTreeSet<PeerId>,
    /// Links (peer, substream, parent) whose whole chain up to the origin is reported intact.
    must_keep: Vec<(PeerId, usize, PeerId)>,
    /// Links of the original tree between reporting peers.
    reported_links: usize,
}

fn damaged(seed: u64) -> (MultiTreeConfig, Damaged) {
    let mut rng = Rng::seeded(seed);
    let c = cfg(
        2 + rng.below(4) as u32,
        1 + rng.below(3) as u32,
        2 + rng.below(6) as u32,
    );
    let k = c.k as usize;
    let (m, uploads) = churned(&mut rng, c, 600);
    let peers: Vec<PeerId> = m.peers().collect();
    let silent: BTreeSet<PeerId> = peers
        .iter()
        .copied()
        .filter(|_| rng.below(10) == 0)
        .collect();
    let mut observed: Vec<ObservedPeer> = observe(&m, &uploads)
        .into_iter()
        .filter(|o| !silent.contains(&o.peer))
        .collect();
    // (peer, substream) whose report is wrong, and peers a wrong report names as parent.
    let mut corrupt: BTreeSet<(PeerId, usize)> = BTreeSet::new();
    let mut named: BTreeSet<PeerId> = BTreeSet::new();
    let mut extra = Vec::new();
    for o in &mut observed {
        let t = rng.below(k as u64) as usize;
        let bad = match rng.below(40) {
            // A parent nobody knows.
            0 => Source::Peer {
                id: PeerId(1_000_000 + rng.below(50)),
            },
            // A cycle: the parent is one of the peer's own descendants.
            1 | 2 => {
                let Some(&child) = m.children(o.peer).first() else {
                    continue;
                };
                let t_int = m.interior_tree(o.peer).unwrap() as usize;
                let grandchild = m.children(child).first().copied();
                let below = match grandchild {
                    Some(g) if m.interior_tree(child) == Some(t_int as u32) => g,
                    _ => child,
                };
                corrupt.insert((o.peer, t_int));
                named.insert(below);
                o.parents[t_int].1 = Source::Peer { id: below };
                continue;
            }
            // A parent that does not forward that substream.
            3 => {
                let q = peers[rng.below(peers.len() as u64) as usize];
                if q == o.peer || m.interior_tree(q) == Some(t as u32) {
                    continue;
                }
                Source::Peer { id: q }
            }
            // Two answers for one substream.
            4 => {
                o.parents.push((t as u32, Source::Origin));
                corrupt.insert((o.peer, t));
                continue;
            }
            // Noise that must be ignored: a substream that does not exist, a duplicate report
            // with less upload.
            5 => {
                o.parents.push((c.k + rng.below(3) as u32, Source::Origin));
                continue;
            }
            6 => {
                extra.push(ObservedPeer {
                    peer: o.peer,
                    upload_kbps: o.upload_kbps.saturating_sub(1),
                    parents: vec![(0, Source::Peer { id: PeerId(7) })],
                });
                continue;
            }
            _ => continue,
        };
        if let Source::Peer { id } = bad {
            named.insert(id);
        }
        corrupt.insert((o.peer, t));
        o.parents[t].1 = bad;
    }
    // A duplicate with less upload only exists when the peer reported some.
    extra.retain(|e| uploads[&e.peer] > 0);
    observed.extend(extra);
    rng.shuffle(&mut observed);

    let reporting = |p: &PeerId| !silent.contains(p);
    let mut must_keep = Vec::new();
    let mut reported_links = 0;
    for &p in peers.iter().filter(|p| reporting(p)) {
        for t in 0..k {
            let Source::Peer { id: q } = m.plan(p).unwrap()[t].parent else {
                continue;
            };
            if !reporting(&q) {
                continue;
            }
            reported_links += 1;
            // Intact chain: every link up to the origin reported as it is, by reporting peers
            // that no wrong report names (which could give them another interior tree or more
            // claimants than slots).
            let mut x = p;
            let intact = loop {
                if corrupt.contains(&(x, t)) {
                    break false;
                }
                match m.plan(x).unwrap()[t].parent {
                    Source::Origin => break true,
                    Source::Peer { id } => {
                        if !reporting(&id) || named.contains(&id) {
                            break false;
                        }
                        x = id;
                    }
                }
            };
            if intact {
                must_keep.push((p, t, q));
            }
        }
    }
    (
        c,
        Damaged {
            observed,
            silent,
            must_keep,
            reported_links,
        },
    )
}

#[test]
fn silent_and_corrupt_reports_keep_every_intact_link() {
    let (mut kept, mut total) = (0, 0);
    for seed in 1..=8u64 {
        let (c, d) = damaged(seed);
        let (m, changes) = MultiTree::restore(c, &d.observed);
        if let Err(e) = m.check_invariants() {
            panic!("seed {seed}: {e}");
        }
        let reporting: BTreeSet<PeerId> = d.observed.iter().map(|o| o.peer).collect();
        assert_eq!(m.peers().collect::<BTreeSet<_>>(), reporting);
        for p in &d.silent {
            assert!(m.plan(*p).is_none());
        }
        for p in &reporting {
            let plan = m.plan(*p).unwrap();
            assert_eq!(plan.len(), c.k as usize);
            for (t, s) in plan.iter().enumerate() {
                assert_eq!(s.index, t as u32);
                assert!(m.depth(*p, t as u32).is_some());
            }
        }
        for &(p, t, q) in &d.must_keep {
            assert_eq!(
                m.plan(p).unwrap()[t].parent,
                Source::Peer { id: q },
                "seed {seed}: {p} lost its intact link to {q} in tree {t}"
            );
        }
        // Whoever is not told anything keeps its reported parents (the duplicates with less
        // upload are not its report).
        let mut upload: BTreeMap<PeerId, u32> = BTreeMap::new();
        for o in &d.observed {
            let u = upload.entry(o.peer).or_insert(0);
            *u = (*u).max(o.upload_kbps);
        }
        for o in &d.observed {
            if !changes.affected.contains(&o.peer) && upload[&o.peer] == o.upload_kbps {
                for &(s, src) in o.parents.iter().filter(|(s, _)| *s < c.k) {
                    assert_eq!(m.plan(o.peer).unwrap()[s as usize].parent, src);
                }
            }
        }
        // The silent peers' parents still feed them as far as restore knows, so the only
        // peers told are around a silent or corrupt link.
        assert!(changes.affected.len() < reporting.len());
        kept += d.must_keep.len();
        total += d.reported_links;

        // The order heartbeats arrive in does not matter.
        let mut shuffled = d.observed.clone();
        Rng::seeded(seed + 100).shuffle(&mut shuffled);
        shuffled.reverse();
        let (again, changes_again) = MultiTree::restore(c, &shuffled);
        assert_eq!(all_plans(&again), all_plans(&m), "seed {seed}");
        assert_eq!(changes_again, changes);
    }
    // Most links survive a tenth of the peers going silent plus a few corrupt reports.
    println!("intact links kept: {kept} of {total} reported links");
    assert!(kept * 2 > total, "{kept} of {total}");
}

#[test]
fn a_restored_tree_takes_joins_and_leaves() {
    for seed in 1..=4u64 {
        let (c, d) = damaged(seed);
        let (mut m, _) = MultiTree::restore(c, &d.observed);
        let mut rng = Rng::seeded(seed + 7);
        let mut present: Vec<PeerId> = m.peers().collect();
        for i in 0..300u64 {
            if present.is_empty() || rng.below(2) == 0 {
                let id = PeerId(10_000 + i);
                m.join(id, CAPACITIES[rng.below(9) as usize]);
                present.push(id);
            } else {
                let id = present.swap_remove(rng.below(present.len() as u64) as usize);
                m.leave(id);
            }
            if let Err(e) = m.check_invariants() {
                panic!("seed {seed} step {i}: {e}");
            }
        }
    }
}

#[test]
fn arbitrary_reports_never_break_the_tree() {
    for seed in 1..=30u64 {
        let mut rng = Rng::seeded(seed);
        let c = cfg(
            rng.below(5) as u32,
            rng.below(3) as u32,
            rng.below(5) as u32,
        );
        let n = 1 + rng.below(80);
        let mut observed: Vec<ObservedPeer> = (0..n + rng.below(20))
            .map(|_| ObservedPeer {
                peer: PeerId(rng.below(n)),
                upload_kbps: CAPACITIES[rng.below(9) as usize],
                parents: (0..rng.below(8))
                    .map(|_| {
                        let src = match rng.below(4) {
                            0 => Source::Origin,
                            _ => Source::Peer {
                                id: PeerId(rng.below(n + 5)),
                            },
                        };
                        (rng.below(u64::from(c.k) + 2) as u32, src)
                    })
                    .collect(),
            })
            .collect();
        let (m, _) = MultiTree::restore(c, &observed);
        if let Err(e) = m.check_invariants() {
            panic!("seed {seed}: {e}");
        }
        let distinct: BTreeSet<PeerId> = observed.iter().map(|o| o.peer).collect();
        assert_eq!(m.len(), distinct.len());
        rng.shuffle(&mut observed);
        let (again, _) = MultiTree::restore(c, &observed);
        assert_eq!(all_plans(&again), all_plans(&m), "seed {seed}");
    }
}

#[test]
fn a_cycle_is_cut_at_its_smallest_id() {
    let c = cfg(1, 1, 4);
    let report = |p: u64, parent: u64| ObservedPeer {
        peer: PeerId(p),
        upload_kbps: 4000,
        parents: vec![(0, Source::Peer { id: PeerId(parent) })],
    };
    // 3 -> 2 -> 1 -> 3, and 4 hangs below 3.
    let (m, changes) =
        MultiTree::restore(c, &[report(1, 3), report(2, 1), report(3, 2), report(4, 3)]);
    m.check_invariants().unwrap();
    assert_eq!(m.plan(PeerId(1)).unwrap()[0].parent, Source::Origin);
    assert_eq!(m.depth(PeerId(2), 0), Some(2));
    assert_eq!(m.depth(PeerId(3), 0), Some(3));
    assert_eq!(m.depth(PeerId(4), 0), Some(4));
    // 1 gets a new parent, 3 loses its child 1; 2 and 4 run what they ran.
    let told: Vec<u64> = changes.affected.iter().map(|p| p.0).collect();
    assert_eq!(told, [1, 3]);
}

#[test]
fn a_peer_claimed_in_two_trees_forwards_in_one() {
    let c = cfg(2, 4, 4);
    let o = |p: u64, upload_kbps: u32, parents: [Source; 2]| ObservedPeer {
        peer: PeerId(p),
        upload_kbps,
        parents: vec![(0, parents[0]), (1, parents[1])],
    };
    let peer = |id: u64| Source::Peer { id: PeerId(id) };
    // 1 and 4 forward (fan-out 2), 2 and 3 cannot upload. Two children name 1 in tree 0, one
    // (3) in tree 1 as well: 1 forwards in tree 0, so 3's tree-1 link is not kept.
    let observed = [
        o(1, 1000, [Source::Origin, peer(4)]),
        o(2, 0, [peer(1), peer(4)]),
        o(3, 0, [peer(1), peer(1)]),
        o(4, 1000, [Source::Origin, Source::Origin]),
    ];
    let (m, changes) = MultiTree::restore(c, &observed);
    m.check_invariants().unwrap();
    assert_eq!(m.interior_tree(PeerId(1)), Some(0));
    assert_eq!(m.interior_tree(PeerId(4)), Some(1));
    assert_eq!(m.children(PeerId(1)), [PeerId(2), PeerId(3)]);
    assert_eq!(m.children(PeerId(4)), [PeerId(1), PeerId(2)]);
    // 4 is full, so the origin feeds 3 in tree 1.
    assert_eq!(m.plan(PeerId(3)).unwrap()[1].parent, Source::Origin);
    // 3 gets a new parent and 1 loses the child 3 believed it had; 2 and 4 run what they ran.
    let told: Vec<u64> = changes.affected.iter().map(|p| p.0).collect();
    assert_eq!(told, [1, 3]);
}

/// `cargo test -p control-server --release -- --ignored --nocapture restore_scales`
#[test]
#[ignore = "slow in debug builds; run with --release"]
fn restore_scales_to_100k_peers() {
    let n: u64 = std::env::var("RESTORE_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let c = cfg(4, 1, 8);
    let mut rng = Rng::seeded(5);
    let uploads: BTreeMap<PeerId, u32> = (0..n)
        .map(|i| (PeerId(i), [0, 300, 1000, 2000, 3000][rng.below(5) as usize]))
        .collect();
    let mut m = MultiTree::new(c);
    for (p, u) in &uploads {
        m.join(*p, *u);
    }
    let mut observed = observe(&m, &uploads);
    let start = std::time::Instant::now();
    let (restored, changes) = MultiTree::restore(c, &observed);
    let round_trip = start.elapsed();
    assert!(changes.affected.is_empty());
    assert_eq!(restored.len(), m.len());
    // A tenth silent and every 50th report pointing back at one of its own children.
    observed.retain(|_| rng.below(10) > 0);
    for o in observed.iter_mut().step_by(50) {
        if let (Some(t), Some(&c)) = (m.interior_tree(o.peer), m.children(o.peer).first()) {
            o.parents[t as usize].1 = Source::Peer { id: c };
        }
    }
    let start = std::time::Instant::now();
    let (restored, changes) = MultiTree::restore(c, &observed);
    let damaged = start.elapsed();
    restored.check_invariants().unwrap();
    println!(
        "{n} peers: consistent restore {round_trip:?}; damaged restore {damaged:?}, {} of {} told",
        changes.affected.len(),
        restored.len()
    );
}
