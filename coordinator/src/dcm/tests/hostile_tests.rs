//! Forgery reports and eviction ([`crate::dcm::hostile`]), and the signed manifests' delivery.

use super::*;
use crate::dcm::hostile::{Evidence, Verdict};

/// Twelve peers on a flat channel; returns the busiest relay and two of its distinct children.
fn relay_with_two_children(h: &mut Harness) -> (PeerId, PeerId, PeerId) {
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = busiest_relay(h, 12);
    let plan = h.dcm.planner.plan(PeerId(relay)).expect("plan").substreams;
    let kids: BTreeSet<PeerId> = plan.iter().flat_map(|s| s.children.clone()).collect();
    let mut kids = kids.into_iter();
    let (a, b) = (
        kids.next().expect("child"),
        kids.next().expect("second child"),
    );
    (PeerId(relay), a, b)
}

fn evicted(h: &mut Harness, peer: PeerId) -> bool {
    let Some(rx) = h.rx(&peer) else { return false };
    let mut closed = false;
    while let Ok(m) = rx.try_recv() {
        closed |= matches!(*m, Outbound::Close(ref r) if r.starts_with("evicted"));
    }
    closed
}

#[test]
fn a_forger_reported_by_two_of_its_children_is_evicted_and_they_are_re_homed() {
    let mut h = Harness::new();
    let (forger, a, b) = relay_with_two_children(&mut h);
    let v = h.dcm.forgery_report(a, forger, 10, Evidence::Holds, T0);
    assert_eq!(v, Verdict::ReporterMoved);
    assert!(
        !h.dcm.linked(a, forger),
        "the reporter is moved away at once"
    );
    assert!(
        h.dcm.peers.contains_key(&forger),
        "one report evicts nobody"
    );
    let v = h.dcm.forgery_report(b, forger, 11, Evidence::Holds, T0);
    assert_eq!(v, Verdict::Evicted(forger));
    assert!(!h.dcm.peers.contains_key(&forger));
    assert!(evicted(&mut h, forger));
    assert_eq!(h.dcm.stats().evictions, 1);
    for id in 1..=12 {
        let p = PeerId(id);
        if p != forger {
            assert!(
                !h.dcm.linked(p, forger),
                "{p} still linked to the evicted peer"
            );
        }
    }
    h.dcm
        .check_invariants()
        .expect("invariants after the eviction");
}

#[test]
fn one_hostile_page_cannot_evict_an_honest_peer() {
    let mut h = Harness::new();
    let (honest, liar, _) = relay_with_two_children(&mut h);
    // A made-up hash: the evidence holds (it is not the origin's), but nobody corroborates.
    for seq in 0..5 {
        h.dcm
            .forgery_report(liar, honest, seq, Evidence::Holds, T0 + seq);
    }
    assert!(
        h.dcm.peers.contains_key(&honest),
        "a single accuser evicts nobody"
    );
    // Refuted reports (the hash it got was the origin's) count against the liar.
    let mut last = Verdict::Ignored;
    let other = (1..=12)
        .map(PeerId)
        .find(|p| *p != honest && *p != liar)
        .expect("peer");
    for seq in 0..3 {
        last = h
            .dcm
            .forgery_report(liar, other, seq, Evidence::Refuted, T0);
    }
    assert_eq!(last, Verdict::Evicted(liar));
    assert!(h.dcm.peers.contains_key(&honest) && h.dcm.peers.contains_key(&other));
    assert_eq!(h.dcm.stats().false_reports, 3);
    h.dcm.check_invariants().expect("invariants");
}

#[test]
fn an_accuser_of_many_that_nobody_corroborates_is_evicted() {
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let liar = PeerId(12);
    let mut verdicts = Vec::new();
    // It accuses each parent it is given in turn, with hashes that are not the origin's.
    for round in 0..6 {
        let Some(parent) = h
            .dcm
            .planner
            .plan(liar)
            .expect("plan")
            .substreams
            .iter()
            .find_map(|s| match s.parent {
                Source::Peer { id } => Some(id),
                Source::Origin => None,
            })
        else {
            break;
        };
        let v = h
            .dcm
            .forgery_report(liar, parent, round, Evidence::Holds, T0 + round);
        verdicts.push(v.clone());
        if v == Verdict::Evicted(liar) {
            break;
        }
    }
    assert_eq!(
        verdicts.last(),
        Some(&Verdict::Evicted(liar)),
        "{verdicts:?}"
    );
    assert_eq!(h.dcm.peers.len(), 11, "only the liar left");
}

#[test]
fn reports_without_evidence_or_link_are_ignored() {
    let mut h = Harness::new();
    let (relay, child, _) = relay_with_two_children(&mut h);
    for id in 13..=40 {
        h.join(id, 2000);
    }
    assert_eq!(
        h.dcm.forgery_report(child, relay, 1, Evidence::Unknown, T0),
        Verdict::Ignored
    );
    assert_eq!(
        h.dcm
            .forgery_report(child, PeerId(999), 1, Evidence::Holds, T0),
        Verdict::Ignored
    );
    assert_eq!(
        h.dcm.forgery_report(child, child, 1, Evidence::Holds, T0),
        Verdict::Ignored
    );
    let unlinked = (1..=40)
        .map(PeerId)
        .find(|p| *p != child && !h.dcm.linked(child, *p))
        .expect("an unlinked peer");
    assert_eq!(
        h.dcm
            .forgery_report(child, unlinked, 1, Evidence::Holds, T0),
        Verdict::Ignored
    );
    assert_eq!(h.dcm.peers.len(), 40);
}

#[test]
fn manifests_reach_every_peer_replace_live_edge_notices_and_joiners_get_the_last_few() {
    let mut h = Harness::new();
    for id in 1..=6 {
        h.join(id, 2000);
    }
    h.pump();
    for id in 1..=6 {
        while h.rx(&PeerId(id)).is_some_and(|rx| rx.try_recv().is_ok()) {}
    }
    for i in 0..10u8 {
        h.handle(Event::Manifest(Bytes::from(vec![b'M', i])));
        h.handle(Event::Packets(
            (u64::from(i) * 4..u64::from(i) * 4 + 4)
                .map(|s| (s, packet(s)))
                .collect(),
        ));
    }
    for id in 1..=6 {
        let rx = h.rx(&PeerId(id)).expect("queue");
        let (mut manifests, mut edges) = (0, 0);
        while let Ok(m) = rx.try_recv() {
            match *m {
                Outbound::Packet(ref b) if b[0] == b'M' => manifests += 1,
                Outbound::Text(ref t) if t.contains("live_edge") => edges += 1,
                _ => {}
            }
        }
        assert_eq!((manifests, edges), (10, 0), "peer {id}");
    }
    h.join(7, 2000);
    let rx = h.rx(&PeerId(7)).expect("queue");
    let mut got = Vec::new();
    while let Ok(m) = rx.try_recv() {
        if let Outbound::Packet(ref b) = *m {
            if b[0] == b'M' {
                got.push(b[1]);
            }
        }
    }
    assert_eq!(
        got,
        (2..10).collect::<Vec<u8>>(),
        "the last eight, in order"
    );
}

/// A heartbeat of `peer` under `plan` written at `at`: it received `got` from each parent and
/// claims to have sent `sent` to each child (50 ms before).
fn heartbeat(peer: PeerId, plan: &[SubstreamPlan], got: u64, sent: u64, at: u64) -> Heartbeat {
    let mut hb = heartbeat_from_plan(peer, plan, at);
    for p in &mut hb.parents {
        p.last_seq = Some(got);
    }
    for c in &mut hb.children {
        c.last_seq = Some(sent);
    }
    hb
}

/// Two children of the busiest relay in one tree, and that tree.
fn two_children_in_one_tree(h: &Harness, relay: PeerId) -> (u32, PeerId, PeerId) {
    let plan = h.dcm.planner.plan(relay).expect("plan").substreams;
    let s = plan
        .iter()
        .find(|s| s.children.len() >= 2)
        .expect("a tree where the relay feeds two peers");
    (s.index, s.children[0], s.children[1])
}

#[test]
fn a_parent_that_claims_to_send_what_two_children_never_get_is_demoted() {
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = PeerId(busiest_relay(&h, 12));
    let (sub, a, b) = two_children_in_one_tree(&h, relay);
    let plan_of = |h: &Harness, p: PeerId| h.dcm.planner.plan(p).expect("plan").substreams;
    // The relay says it got and sent up to 200; its children, a second later, got nothing
    // after 100.
    let hb = heartbeat(relay, &plan_of(&h, relay), 200, 200, T0);
    h.dcm.on_heartbeat(relay, hb, T0);
    for c in [a, b] {
        let hb = heartbeat(c, &plan_of(&h, c), 100, 100, T0 + 1000);
        h.dcm.on_heartbeat(c, hb, T0 + 1000);
    }
    let complaint = |child| view::Congested {
        parent: relay,
        child,
        substream: sub,
        behind: 25,
        parent_side: false,
    };
    h.dcm.on_congestion(complaint(a), T0 + 1000);
    assert!(
        h.dcm.history.effective_kbps(relay).is_some_and(|k| k > 0),
        "one child's word demotes nobody"
    );
    h.dcm.on_congestion(complaint(b), T0 + 1500);
    assert_eq!(h.dcm.history.effective_kbps(relay), Some(0), "demoted");
    assert_eq!(h.dcm.stats().silent_demoted, 1);
    let left = plan_of(&h, relay);
    assert_eq!(children_of(&left), 0, "no child left with it: {left:?}");
    h.dcm.check_invariants().expect("invariants");
}

#[test]
fn a_parent_whose_last_sends_are_still_in_flight_is_not_demoted() {
    // The relay sent up to 200 just before its children wrote their heartbeats: the packets
    // are on the wire (a fragment serialized to several children), not withheld.
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = PeerId(busiest_relay(&h, 12));
    let (sub, a, b) = two_children_in_one_tree(&h, relay);
    let plan_of = |h: &Harness, p: PeerId| h.dcm.planner.plan(p).expect("plan").substreams;
    let hb = heartbeat(relay, &plan_of(&h, relay), 200, 200, T0);
    h.dcm.on_heartbeat(relay, hb, T0);
    for c in [a, b] {
        let hb = heartbeat(c, &plan_of(&h, c), 100, 100, T0 + 100);
        h.dcm.on_heartbeat(c, hb, T0 + 100);
    }
    for (i, c) in [a, b].into_iter().enumerate() {
        let link = view::Congested {
            parent: relay,
            child: c,
            substream: sub,
            behind: 25,
            parent_side: false,
        };
        h.dcm.on_congestion(link, T0 + 100 + 100 * i as u64);
    }
    assert_eq!(h.dcm.stats().silent_demoted, 0);
    assert!(h.dcm.history.effective_kbps(relay).is_some_and(|k| k > 0));
}

#[test]
fn an_honest_parent_whose_children_got_what_it_sent_is_not_demoted() {
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = PeerId(busiest_relay(&h, 12));
    let (sub, a, b) = two_children_in_one_tree(&h, relay);
    let plan_of = |h: &Harness, p: PeerId| h.dcm.planner.plan(p).expect("plan").substreams;
    // It sent up to 100 only (its uplink or its own parent is the problem, not a lie).
    let mut hb = heartbeat(relay, &plan_of(&h, relay), 200, 100, T0);
    hb.send_backlog_ms = 900;
    h.dcm.on_heartbeat(relay, hb, T0);
    for c in [a, b] {
        let hb = heartbeat(c, &plan_of(&h, c), 100, 100, T0);
        h.dcm.on_heartbeat(c, hb, T0);
    }
    for (i, c) in [a, b].into_iter().enumerate() {
        let link = view::Congested {
            parent: relay,
            child: c,
            substream: sub,
            behind: 25,
            parent_side: false,
        };
        h.dcm.on_congestion(link, T0 + 2_500 * i as u64);
    }
    assert_eq!(h.dcm.stats().silent_demoted, 0);
}
