#![allow(clippy::unwrap_used)]

use super::*;

use protocol::rng::XorShift as Rng;

pub(super) fn small_cfg() -> HierarchyConfig {
    HierarchyConfig {
        k: 4,
        stream_kbps: 1000,
        fec_n: 2,
        cluster_min: 6,
        cluster_max: 16,
        ..HierarchyConfig::default()
    }
}

pub(super) fn region(i: u8) -> Region {
    Region::V4([10, i])
}

/// Every member of a middle or bottom cluster receives every substream of its cluster, and is
/// interior (has children) in at most one tree of it.
fn assert_all_fed(h: &Hierarchy) {
    for (p, info) in &h.peers {
        let plan = h.plan(*p).unwrap();
        match info.tier {
            Tier::Preferred => {
                assert!(plan.receive.iter().all(|l| l.algorithm == Algorithm::Flood));
                assert!(!plan.receive.is_empty());
            }
            Tier::Middle | Tier::Bottom => {
                let c = h.clusters.get(&plan.cluster.unwrap()).unwrap();
                let subs: BTreeSet<u32> = plan.receive.iter().filter_map(|l| l.substream).collect();
                assert_eq!(subs.len() as u32, c.kind.trees(), "{p}");
                let interior: BTreeSet<u32> = (0..c.kind.trees())
                    .filter(|t| !c.tree().plan(*p).unwrap()[*t as usize].children.is_empty())
                    .collect();
                assert!(interior.len() <= 1, "{p} interior in {interior:?}");
            }
        }
    }
}

fn uploads() -> [u32; 7] {
    [0, 0, 300, 800, 1500, 4000, 20_000]
}

#[test]
fn tiers_follow_capacity_and_plans_name_the_algorithm() {
    let mut h = Hierarchy::new(small_cfg());
    h.set_region_settings(
        region(2),
        RegionSettings {
            fec_n: Some(4),
            waypoint: None,
        },
    );
    for i in 0..60u64 {
        let r = region((i % 3) as u8);
        h.join(
            PeerId(i),
            r,
            uploads()[(i % 7) as usize],
            History::default(),
        );
        h.check_invariants().unwrap();
    }
    assert_all_fed(&h);
    let rep = h.report();
    assert!(
        rep.preferred >= 3 && rep.middle > 0 && rep.bottom > 0,
        "{rep:?}"
    );
    for p in h.peers.keys() {
        let plan = h.plan(*p).unwrap();
        match plan.tier {
            Tier::Preferred => assert_eq!(plan.cluster, None),
            Tier::Middle => {
                // Claim 4: the coded tier's redundancy is the child's region's.
                let n = if plan.region == region(2) { 4 } else { 2 };
                assert!(plan
                    .receive
                    .iter()
                    .all(|l| l.algorithm == Algorithm::MultitreeFec { k: 4, n }));
            }
            Tier::Bottom => {
                assert!(plan
                    .receive
                    .iter()
                    .all(|l| l.algorithm == Algorithm::Multitree));
            }
        }
    }
    // Every middle cluster is fed by at least two preferred nodes where the region has them.
    for rs in h.regions.values() {
        let c = h.clusters.get(&rs.middle).unwrap();
        let peers = c
            .feeders()
            .iter()
            .filter(|f| matches!(f.node, MeshNodeOrPeer::Peer(_)))
            .count();
        assert_eq!(peers, rs.preferred.len().min(2));
    }
}

#[test]
fn split_and_merge_keep_every_node_fed() {
    let mut h = Hierarchy::new(small_cfg());
    let r = region(0);
    for i in 0..200u64 {
        h.join(
            PeerId(i),
            r,
            uploads()[(i % 7) as usize],
            History::default(),
        );
    }
    h.check_invariants().unwrap();
    let clusters = h.regions[&r].bottom.len();
    assert!(clusters >= h.report().bottom / 16, "{clusters} clusters");
    for c in h
        .clusters
        .values()
        .filter(|c| matches!(c.kind, ClusterKind::Bottom { .. }))
    {
        assert!(c.len() <= 16);
    }
    assert_all_fed(&h);
    for i in 0..190u64 {
        h.leave(PeerId(i));
        h.check_invariants().unwrap();
        assert_all_fed(&h);
    }
    assert!(h.regions[&r].bottom.len() <= 2);
    for i in 190..200u64 {
        h.leave(PeerId(i));
    }
    assert!(h.is_empty());
    assert!(h.regions.is_empty());
    assert_eq!(h.mesh().members(), &[MeshNode::Origin]);
}

#[test]
fn random_churn_keeps_invariants() {
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut h = Hierarchy::new(small_cfg());
        let mut present: Vec<PeerId> = Vec::new();
        for step in 0..800u64 {
            if present.is_empty() || rng.below(100) < 60 {
                let id = PeerId(step);
                let r = region(rng.below(4) as u8);
                let up = uploads()[rng.below(7) as usize];
                let ch = h.join(id, r, up, History::default());
                assert!(ch.affected.contains(&id));
                present.push(id);
            } else {
                let id = present.swap_remove(rng.below(present.len() as u64) as usize);
                let ch = h.leave(id);
                assert!(!ch.affected.contains(&id));
                assert!(h.plan(id).is_none());
            }
            if let Err(e) = h.check_invariants() {
                panic!("seed {seed} step {step}: {e}");
            }
        }
        assert_all_fed(&h);
        assert!(is_c_connected_or_small(&h));
    }
}

fn is_c_connected_or_small(h: &Hierarchy) -> bool {
    let c = h.config().mesh.c;
    h.mesh().len() <= c as usize || super::super::mesh::is_c_connected(h.mesh().adjacency(), c)
}

#[test]
fn ample_capacity_gives_everyone_the_full_rate() {
    let peers: Vec<(PeerId, Region, u32, History)> = (0..400u64)
        .map(|i| {
            (
                PeerId(i),
                region((i / 7 % 4) as u8),
                [0, 1500, 3000, 8000][(i % 4) as usize],
                History::default(),
            )
        })
        .collect();
    let h = Hierarchy::build(small_cfg(), &peers);
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    let rep = h.report();
    assert_eq!(rep.full_rate, rep.peers, "{rep:?}");
    assert!(rep.upload_used_kbps <= rep.upload_total_kbps);
}

#[test]
fn preferred_departure_promotes_a_middle_node_or_falls_back_to_a_waypoint() {
    let mut h = Hierarchy::new(HierarchyConfig {
        mesh: MeshConfig {
            per_region: 1,
            ..MeshConfig::default()
        },
        ..small_cfg()
    });
    let r = region(7);
    h.set_region_settings(
        r,
        RegionSettings {
            fec_n: None,
            waypoint: Some(3),
        },
    );
    h.join(PeerId(1), r, 500, History::default());
    // No capable client: the configured relay stands in.
    assert!(h.mesh().contains(MeshNode::Waypoint(3)));
    h.join(PeerId(2), r, 10_000, History::default());
    assert_eq!(h.tier(PeerId(2)), Some(Tier::Preferred));
    assert!(!h.mesh().contains(MeshNode::Waypoint(3)));
    for i in 3..10 {
        h.join(PeerId(i), r, 1000, History::default());
    }
    h.join(PeerId(20), r, 9000, History::default());
    h.leave(PeerId(2));
    h.check_invariants().unwrap();
    if h.tier(PeerId(20)) == Some(Tier::Preferred) {
        assert!(!h.mesh().contains(MeshNode::Waypoint(3)));
    } else {
        assert!(h.mesh().contains(MeshNode::Waypoint(3)));
    }
    assert_all_fed(&h);
}

#[test]
fn recruited_relay_forwards_a_channel_it_does_not_play() {
    let mut h = Hierarchy::new(small_cfg());
    let r = region(1);
    for i in 0..12 {
        h.join(PeerId(i), r, 0, History::default()); // nobody here can upload
    }
    assert!(h.deficits().contains_key(&r));
    let mut reg = RelayRegistry::default();
    reg.offer(2, r, PeerId(500), 20_000); // watches channel 2
    reg.offer(1, r, PeerId(501), 50_000); // same channel: not a relay candidate
    let ch = h.recruit_relays(1, &mut reg);
    assert!(ch.affected.contains(&PeerId(500)));
    let plan = h.plan(PeerId(500)).unwrap();
    assert!(!plan.plays);
    assert!(!plan.send.is_empty(), "the relay forwards");
    assert_eq!(h.report().relays, 1);
    assert!(
        reg.recruit(1, r, 0).is_none(),
        "recruited once; the other watches channel 1"
    );
    h.check_invariants().unwrap();
}

#[test]
fn live_is_favoured_over_a_file_when_capacity_is_short() {
    assert_eq!(split_capacity(3000, 1000, 5000), (1000, 2000));
    assert_eq!(split_capacity(800, 1000, 5000), (800, 0));
    assert_eq!(split_capacity(10_000, 1000, 2000), (1000, 2000));
    assert_eq!(split_capacity(0, 1000, 2000), (0, 0));
}

/// Plans of every peer, links sorted so that only real changes show.
fn all_plans(h: &Hierarchy) -> BTreeMap<PeerId, String> {
    h.peers
        .keys()
        .map(|p| {
            let plan = h.plan(*p).unwrap();
            let mut recv: Vec<String> = plan.receive.iter().map(|l| format!("{l:?}")).collect();
            let mut send: Vec<String> = plan.send.iter().map(|l| format!("{l:?}")).collect();
            recv.sort();
            send.sort();
            (
                *p,
                format!("{:?} {:?} {recv:?} {send:?}", plan.tier, plan.cluster),
            )
        })
        .collect()
}

#[test]
fn every_peer_whose_plan_changes_is_told() {
    for seed in 1..=3u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let peers: Vec<(PeerId, Region, u32, History)> = (0..120u64)
            .map(|i| {
                let up = uploads()[rng.below(7) as usize];
                (
                    PeerId(i),
                    region(rng.below(3) as u8),
                    up,
                    History::default(),
                )
            })
            .collect();
        let mut h = Hierarchy::build(small_cfg(), &peers);
        h.check_invariants().unwrap();
        let mut present: Vec<PeerId> = peers.iter().map(|p| p.0).collect();
        for step in 0..300u64 {
            let before = all_plans(&h);
            let ch = if rng.below(2) == 0 {
                let id = PeerId(1000 + step);
                present.push(id);
                let up = uploads()[rng.below(7) as usize];
                h.join(id, region(rng.below(3) as u8), up, History::default())
            } else {
                let id = present.swap_remove(rng.below(present.len() as u64) as usize);
                h.leave(id)
            };
            h.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            for (p, now) in all_plans(&h) {
                if before.get(&p) != Some(&now) {
                    assert!(
                        ch.affected.contains(&p),
                        "seed {seed} step {step}: {p} changed silently: {:?} -> {now}",
                        before.get(&p)
                    );
                }
            }
        }
    }
}

#[test]
fn a_region_short_of_upload_borrows_from_a_neighbour_middle_tier() {
    // Region 0 can barely upload; region 1 has strong peers to spare.
    let mut peers: Vec<(PeerId, Region, u32, History)> = (0..60u64)
        .map(|i| {
            (
                PeerId(i),
                region(0),
                [0, 300, 600][(i % 3) as usize],
                History::default(),
            )
        })
        .collect();
    peers.extend((100..140u64).map(|i| {
        let up = if i < 110 { 40_000 } else { 1500 };
        (PeerId(i), region(1), up, History::default())
    }));
    let h = Hierarchy::build(small_cfg(), &peers);
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    let rep = h.report();
    assert_eq!(rep.full_rate, rep.peers, "{rep:?}");
    // Region 0's bottom clusters are fed (also) by region 1's middle nodes.
    let lent: Vec<PeerId> = h.regions[&region(0)]
        .feeders
        .values()
        .flatten()
        .copied()
        .filter(|p| h.peers[p].region == region(1))
        .collect();
    assert!(!lent.is_empty(), "no cross-region feeder");
    for p in &lent {
        let plan = h.plan(*p).unwrap();
        assert_eq!(plan.tier, Tier::Middle);
        assert!(plan
            .send
            .iter()
            .any(|l| matches!(l.peer, MeshNodeOrPeer::Peer(q) if h.peers[&q].region == region(0))));
    }
    // A lender leaving is repaired like any feeder; the region emptying frees the lenders.
    let mut h2 = h.clone();
    h2.leave(lent[0]);
    h2.check_invariants().unwrap();
    assert_all_fed(&h2);
    let mut h3 = h;
    for i in 0..60u64 {
        h3.leave(PeerId(i));
        h3.check_invariants().unwrap();
    }
    assert!(!h3.regions.contains_key(&region(0)));
    for p in &lent[1..] {
        assert!(h3.peers[p]
            .feeds
            .iter()
            .all(|f| h3.clusters.contains_key(&f.0)));
    }
}

#[test]
fn bulk_build_splits_strong_nodes_over_clusters_and_uses_every_feed() {
    // One very strong peer and many weak ones: its feeds are split over all bottom clusters.
    let mut peers: Vec<(PeerId, Region, u32, History)> = (0..80u64)
        .map(|i| {
            (
                PeerId(i),
                region(3),
                [0, 500][(i % 2) as usize],
                History::default(),
            )
        })
        .collect();
    peers.push((PeerId(900), region(3), 200_000, History::default()));
    peers.push((PeerId(901), region(3), 200_000, History::default()));
    peers.push((PeerId(902), region(3), 200_000, History::default()));
    let h = Hierarchy::build(small_cfg(), &peers);
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    let rep = h.report();
    assert_eq!(rep.full_rate, rep.peers, "{rep:?}");
    let strong = h
        .peers
        .values()
        .filter(|i| i.tier == Tier::Middle && i.feeds.len() > 1)
        .count();
    assert!(strong >= 1, "a strong middle node feeds several clusters");
}

#[test]
fn blocking_a_middle_feeder_and_a_root_it_feeds_re_deals_that_clusters_roots() {
    let mut tried = 0;
    for seed in 1..=5u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let peers: Vec<(PeerId, Region, u32, History)> = (0..150u64)
            .map(|i| {
                let up = uploads()[rng.below(7) as usize];
                (PeerId(i), region(0), up, History::default())
            })
            .collect();
        let mut h = Hierarchy::build(small_cfg(), &peers);
        h.check_invariants().unwrap();
        // A bottom-cluster root and the middle node feeding it one of its substreams.
        let Some((root, feeder, cid)) = h.peers.iter().find_map(|(p, info)| {
            if info.tier != Tier::Bottom {
                return None;
            }
            let plan = h.plan(*p)?;
            plan.receive.iter().find_map(|l| match l.peer {
                MeshNodeOrPeer::Peer(f)
                    if h.peers.get(&f).is_some_and(|i| i.tier == Tier::Middle) =>
                {
                    Some((*p, f, plan.cluster?))
                }
                _ => None,
            })
        }) else {
            continue;
        };
        tried += 1;
        let before = all_plans(&h);
        let ch = h.block(root, feeder);
        h.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_all_fed(&h);
        assert!(
            !h.feeder_peers(cid).contains(&feeder),
            "seed {seed}: {feeder} still feeds the cluster of {root}"
        );
        let plan = h.plan(root).unwrap();
        assert!(
            plan.receive
                .iter()
                .all(|l| l.peer != MeshNodeOrPeer::Peer(feeder)),
            "seed {seed}: {root} still fed by {feeder}: {plan:?}"
        );
        for (p, now) in all_plans(&h) {
            if before.get(&p) != Some(&now) {
                assert!(
                    ch.affected.contains(&p),
                    "seed {seed}: {p} changed silently"
                );
            }
        }
        // Either order of the pair does it.
        let mut h2 = Hierarchy::build(small_cfg(), &peers);
        h2.block(feeder, root);
        assert!(!h2.feeder_peers(cid).contains(&feeder), "seed {seed}");
    }
    assert!(
        tried >= 3,
        "only {tried} seeds had a root fed by a middle node"
    );
}

#[test]
fn nat_classes_hold_in_every_cluster_and_keep_symmetric_peers_at_the_bottom() {
    use protocol::{Connectivity, NatClass::*};
    let class = |i: u64| match i % 8 {
        0..=1 => None,
        2..=3 => Some(Open),
        4..=5 => Some(EndpointIndependent),
        6 => Some(EndpointDependent),
        _ => Some(UdpBlocked),
    };
    let conn = |i: u64| class(i).map(|class| Connectivity { class, turn: false });
    let mut h = Hierarchy::new(small_cfg());
    let mut rng = Rng::seeded(11);
    for i in 1..=240u64 {
        let up = uploads()[rng.below(7) as usize];
        let r = region((i % 2) as u8);
        // Most announce their class at join, some a moment later.
        if i % 5 != 0 {
            h.set_connectivity(PeerId(i), conn(i));
        }
        h.join(PeerId(i), r, up, History::default());
        if i % 5 == 0 {
            h.set_connectivity(PeerId(i), conn(i));
        }
        if i % 9 == 0 {
            h.leave(PeerId(i - 4));
        }
    }
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    let mut tree_links = 0;
    for (p, info) in &h.peers {
        if matches!(class(p.0), Some(EndpointDependent | UdpBlocked)) {
            assert_eq!(info.tier, Tier::Bottom, "{p}");
        }
        let Some(cid) = h.cluster_of(*p) else {
            continue;
        };
        for s in h.clusters[&cid].tree().plan(*p).unwrap() {
            if let protocol::Source::Peer { id } = s.parent {
                tree_links += 1;
                assert!(
                    Connectivity::can_pair(conn(p.0), conn(id.0)),
                    "{p} under {id}"
                );
            }
        }
    }
    assert!(tree_links > 200, "{tree_links}");
    // Across the tiers too (mesh floods, feeds of a cluster's roots): every link a peer
    // receives on comes from a peer its class can reach, or from a server.
    let mut cross = 0;
    for p in h.peers.keys() {
        for l in h.plan(*p).unwrap().receive {
            if let MeshNodeOrPeer::Peer(q) = l.peer {
                cross += 1;
                assert!(
                    Connectivity::can_pair(conn(p.0), conn(q.0)),
                    "{p} ({:?}) receives from {q} ({:?})",
                    class(p.0),
                    class(q.0)
                );
            }
        }
    }
    assert!(
        cross > tree_links,
        "{cross} links in all, {tree_links} in trees"
    );
    // Re-placing keeps the class.
    let edm = *h
        .peers
        .keys()
        .find(|p| class(p.0) == Some(EndpointDependent))
        .unwrap();
    h.join(edm, region(0), 20_000, History::default());
    assert_eq!(h.peers[&edm].tier, Tier::Bottom);
    h.check_invariants().unwrap();
}

#[test]
fn preferred_nodes_feed_the_bottom_clusters_no_middle_node_feeds() {
    // A region of weak viewers (below the stream rate) and one strong node (a waypoint): the
    // strong node is preferred and feeds the bottom roots instead of the origin.
    let mut h = Hierarchy::new(small_cfg());
    let r = region(0);
    for i in 1..=6u64 {
        h.join(PeerId(i), r, 400, History::default());
    }
    let roots_fed_by_server = |h: &Hierarchy| {
        h.peers
            .keys()
            .filter_map(|p| h.plan(*p))
            .flat_map(|plan| plan.receive)
            .filter(|l| matches!(l.peer, MeshNodeOrPeer::Server(_)) && l.substream.is_some())
            .count()
    };
    assert!(
        roots_fed_by_server(&h) > 0,
        "the origin feeds the weak region"
    );
    let wp = PeerId(100);
    h.join(wp, r, 20_000, History::default());
    assert_eq!(h.peers[&wp].tier, Tier::Preferred);
    let plan = h.plan(wp).unwrap();
    let feeds = plan
        .send
        .iter()
        .filter(|l| matches!(l.peer, MeshNodeOrPeer::Peer(_)) && l.substream.is_some())
        .count();
    assert!(
        feeds >= 4,
        "the preferred node feeds the bottom roots: {plan:?}"
    );
    assert_eq!(roots_fed_by_server(&h), 0, "nothing left for the origin");
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    // It leaves: the origin feeds the region again.
    h.leave(wp);
    assert!(roots_fed_by_server(&h) > 0);
    h.check_invariants().unwrap();
}

#[test]
fn idle_middle_nodes_take_the_roots_the_origin_would_feed() {
    use protocol::{Connectivity, NatClass::*};
    let conn = |class| Some(Connectivity { class, turn: false });
    let mut h = Hierarchy::new(HierarchyConfig {
        cluster_max: 128,
        ..small_cfg()
    });
    let r = region(0);
    // Strong nodes behind endpoint-independent NATs, one of them open; then weak viewers (one
    // unit each) behind NATs, every third a symmetric one: more of those than the open node
    // has slots for.
    for i in 1..=12u64 {
        h.set_connectivity(
            PeerId(i),
            conn(if i == 12 { Open } else { EndpointIndependent }),
        );
        h.join(PeerId(i), r, 20_000, History::default());
    }
    for i in 100..160u64 {
        let class = if i % 3 == 0 {
            EndpointDependent
        } else {
            EndpointIndependent
        };
        h.set_connectivity(PeerId(i), conn(class));
        h.join(PeerId(i), r, 300, History::default());
    }
    h.check_invariants().unwrap();
    assert_all_fed(&h);
    assert_eq!(h.peers[&PeerId(12)].tier, Tier::Middle);
    let bottom = h.peers[&PeerId(100)].cluster.unwrap();
    assert!(
        h.clusters[&bottom].feeders().len() > h.cfg.feeders_per_cluster,
        "idle middle nodes joined the feeders: {:?}",
        h.clusters[&bottom].feeders()
    );
    // Every root the origin still feeds is one behind a symmetric NAT that the open node had
    // no slot left for; the open node feeds symmetric-NAT roots and nothing else.
    let mut open_feeds = 0;
    for p in (100..160u64).map(PeerId) {
        for l in h.plan(p).unwrap().receive {
            match l.peer {
                MeshNodeOrPeer::Server(_) => assert_eq!(p.0 % 3, 0, "{p} fed by the origin"),
                MeshNodeOrPeer::Peer(q) if q.0 < 100 => {
                    if p.0 % 3 == 0 {
                        assert_eq!(q, PeerId(12), "{p} fed by {q}");
                    }
                    if q == PeerId(12) {
                        open_feeds += 1;
                    }
                }
                MeshNodeOrPeer::Peer(_) => {}
            }
        }
    }
    assert!(open_feeds > 0);
    let edm_fed_by_open = (100..160u64)
        .filter(|i| i % 3 == 0)
        .flat_map(|i| h.plan(PeerId(i)).unwrap().receive)
        .filter(|l| l.peer == MeshNodeOrPeer::Peer(PeerId(12)))
        .count();
    assert_eq!(
        edm_fed_by_open, open_feeds,
        "its slots go to the roots that need it"
    );
}
