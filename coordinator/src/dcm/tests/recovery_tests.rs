//! A DCM of another server taking a hierarchical channel over: tiers, clusters and trees are
//! rebuilt from the places and parents the heartbeats report.

use super::*;

/// A heartbeat as a peer of a hierarchy sends it under the instructions it last received.
fn tiered_heartbeat(peer: PeerId, seen: &WireSeen, now: u64) -> Heartbeat {
    let (subs, tier) = seen;
    let mut hb = heartbeat_from_plan(peer, subs, now);
    hb.place = tier.as_ref().map(|t| protocol::Place {
        tier: t.tier,
        cluster: t.cluster,
        digest: protocol::plan_digest(subs, Some(t)),
        origin_full: t.mesh.contains(&Source::Origin),
    });
    hb
}

/// 24 viewers over three regions: strong, medium and weak ones, so every tier is in use.
fn running_hierarchy() -> (Harness, BTreeMap<PeerId, WireSeen>) {
    let mut h = tiered_harness();
    let mut id = 0;
    for region in 0..3u16 {
        for kbps in [6000, 6000, 2500, 2000, 2000, 300, 300, 300] {
            id += 1;
            h.join_in(id, region, kbps);
        }
    }
    let seen: BTreeMap<PeerId, WireSeen> = h
        .drain()
        .into_iter()
        .map(|(p, (plan, _))| (p, plan.expect("every peer has instructions")))
        .collect();
    (h, seen)
}

/// Resumes `peers` at a new DCM, each sending one heartbeat under its old instructions, and
/// lets the recovery window close. Returns the DCM and the instructions it sent.
fn take_over(
    h: &Harness,
    seen: &BTreeMap<PeerId, WireSeen>,
    peers: &[PeerId],
) -> (Dcm, BTreeMap<PeerId, WireSeen>) {
    let now = 3_000_000;
    let mut next = Dcm::new(tiered_config(), now);
    for (i, peer) in peers.iter().enumerate() {
        let at = now + 50 * i as u64;
        let e = h.dcm.peers[peer];
        next.handle(
            Event::Resume {
                peer: *peer,
                upload_kbps: e.upload_kbps,
                region: e.region,
                relay: e.relay,
                connectivity: None,
            },
            at,
        );
        next.handle(
            Event::Heartbeat {
                peer: *peer,
                heartbeat: Box::new(tiered_heartbeat(*peer, &seen[peer], at + 10)),
                arrived_ms: at + 10,
            },
            at + 10,
        );
        assert!(next.recovering());
    }
    if peers.len() == seen.len() {
        // Before the rebuild, the origin already pushes what it pushed: the whole stream to its
        // mesh neighbours, the data and parity shards of the roots it fed.
        assert_eq!(
            origin_feeds(&next),
            origin_feeds(&h.dcm),
            "the origin feeds the same peers during the recovery"
        );
    }
    next.handle_timeout(now + 50 * peers.len() as u64 + 5_000);
    assert!(!next.recovering());
    let mut told = BTreeMap::new();
    while let Some(out) = next.poll_output() {
        if let Output::Send {
            peer,
            msg: OutMsg::Msg(m),
        } = out
        {
            if let ServerMsg::Instructions {
                substreams, tier, ..
            } = *m
            {
                told.insert(peer, (substreams, tier));
            }
        }
    }
    (next, told)
}

/// What the origin pushes, per peer, in a comparable form.
fn origin_feeds(dcm: &Dcm) -> HashMap<PeerId, Vec<Push>> {
    dcm.origin_fed.clone().into_iter().collect()
}

fn digest((subs, tier): &WireSeen) -> u64 {
    protocol::plan_digest(subs, tier.as_ref())
}

#[test]
fn a_hierarchy_taken_over_keeps_every_link_and_nobody_is_told_anything() {
    let (h, seen) = running_hierarchy();
    let tiers: BTreeSet<String> = seen
        .values()
        .filter_map(|(_, t)| t.as_ref().map(|t| format!("{:?}", t.tier)))
        .collect();
    assert_eq!(tiers.len(), 3, "{tiers:?}");
    assert!(
        h.dcm
            .origin_fed
            .values()
            .flatten()
            .any(|p| *p == Push::Full),
        "the origin floods to some top-tier peer: {:?}",
        h.dcm.origin_fed
    );
    let peers: Vec<PeerId> = seen.keys().copied().collect();
    let (next, told) = take_over(&h, &seen, &peers);
    assert!(told.is_empty(), "re-instructed: {:?}", told.keys());
    for (peer, was) in &seen {
        let now = next.planner.plan(*peer).expect("placed");
        assert_eq!(
            protocol::plan_digest(&now.substreams, now.tier.as_ref()),
            digest(was),
            "{peer}"
        );
    }
    let stats = next.stats();
    assert!(stats.links_reported > 0);
    assert_eq!(stats.links_kept, stats.links_reported, "every link kept");
    assert_eq!(
        origin_feeds(&next),
        origin_feeds(&h.dcm),
        "the origin feeds the same peers"
    );
    next.planner.check_invariants().expect("invariants");
}

#[test]
fn peers_that_do_not_come_back_are_placed_around_and_only_their_neighbours_hear_of_it() {
    let (h, seen) = running_hierarchy();
    // A preferred node and a middle node of the first region are gone.
    let of_tier = |t: protocol::TierName| {
        seen.iter()
            .find(|(_, (_, tier))| tier.as_ref().is_some_and(|x| x.tier == t))
            .map(|(p, _)| *p)
            .expect("a peer of that tier")
    };
    let gone = [
        of_tier(protocol::TierName::Preferred),
        of_tier(protocol::TierName::Middle),
    ];
    let peers: Vec<PeerId> = seen.keys().copied().filter(|p| !gone.contains(p)).collect();
    let (next, told) = take_over(&h, &seen, &peers);
    next.planner.check_invariants().expect("invariants");
    for p in &peers {
        let plan = next.planner.plan(*p).expect("placed");
        let now = protocol::plan_digest(&plan.substreams, plan.tier.as_ref());
        // Told exactly when the plan changed, and then the plan it has now.
        assert_eq!(told.contains_key(p), now != digest(&seen[p]), "{p}");
        if let Some(t) = told.get(p) {
            assert_eq!(digest(t), now);
        }
    }
    for g in gone {
        assert!(next.planner.plan(g).is_none());
    }
    assert!(
        !told.is_empty() && told.len() < peers.len() / 2,
        "told {}",
        told.len()
    );
    let stats = next.stats();
    assert!(
        stats.links_kept * 10 >= stats.links_reported * 8,
        "{stats:?}"
    );
}

#[test]
fn a_peer_without_a_place_in_its_heartbeat_is_placed_as_a_joiner() {
    let (h, mut seen) = running_hierarchy();
    // One peer runs an older page: its heartbeat names its parents but not its place.
    let old = *seen.keys().last().expect("peers");
    seen.get_mut(&old).expect("seen").1 = None;
    let peers: Vec<PeerId> = seen.keys().copied().collect();
    let (next, told) = take_over(&h, &seen, &peers);
    next.planner.check_invariants().expect("invariants");
    assert!(told.contains_key(&old));
    assert!(next.planner.plan(old).is_some());
}
