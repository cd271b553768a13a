//! Synthetic heartbeat streams: a multi-tree of peers reporting what they received and sent.

use protocol::{ChildLink, ParentLink};

use super::*;
use crate::topology::{MultiTree, MultiTreeConfig};

const K: u32 = 4;

fn tree(n: u64) -> MultiTree {
    let mut t = MultiTree::new(MultiTreeConfig {
        k: K,
        stream_kbps: 400,
        origin_fanout: 1,
        max_fanout: 4,
    });
    for i in 1..=n {
        // Mixed capacities, some peers upload nothing.
        let up = [0, 100, 400, 2000][(i % 4) as usize];
        t.join(PeerId(i), up);
    }
    t
}

/// A heartbeat for `peer` saying it received (and sent) every packet up to `upto`, except the
/// packets of `starved` = (parent, child, substream) on that link, which stop at `stuck`.
fn heartbeat(
    t: &MultiTree,
    peer: PeerId,
    seq: u64,
    upto: u64,
    starved: Option<(PeerId, PeerId, u32, u64)>,
    now: u64,
) -> Heartbeat {
    let plan = t.plan(peer).expect("peer in tree");
    let newest = |s: u32| {
        (0..=upto)
            .rev()
            .find(|q| protocol::substream_of(*q, K) == s)
    };
    let parents = plan
        .iter()
        .map(|sp| {
            let mut last = newest(sp.index);
            if let Some((p, c, s, stuck)) = starved {
                if c == peer && s == sp.index && sp.parent == (Source::Peer { id: p }) {
                    last = Some(stuck);
                }
            }
            ParentLink {
                substream: sp.index,
                parent: sp.parent,
                last_seq: last,
                last_ts_ms: Some(now.saturating_sub(1500)),
            }
        })
        .collect();
    let children = plan
        .iter()
        .flat_map(|sp| sp.children.iter().map(move |c| (sp.index, *c)))
        .map(|(s, c)| {
            let mut last = newest(s);
            if let Some((p, cc, ss, stuck)) = starved {
                if p == peer && cc == c && ss == s {
                    last = Some(stuck);
                }
            }
            ChildLink {
                substream: s,
                child: c,
                last_seq: last,
                last_ts_ms: Some(now.saturating_sub(1500)),
            }
        })
        .collect();
    Heartbeat {
        client_id: peer,
        seq,
        local_ts_ms: now,
        parents,
        children,
        buffer: vec![1; K as usize],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up: 0,
        origin_fallbacks: 0,
        upload_kbps: 1000,
        send_backlog_ms: 0,
        place: None,
    }
}

/// Some (parent, child, substream) link between two peers.
fn relay_link(t: &MultiTree) -> (PeerId, PeerId, u32) {
    t.peers()
        .find_map(|p| {
            t.plan(p).and_then(|plan| {
                plan.iter()
                    .find(|sp| !sp.children.is_empty())
                    .map(|sp| (p, sp.children[0], sp.index))
            })
        })
        .expect("a relaying peer")
}

fn production(upto: u64, now: u64) -> ProductionLog {
    let mut log = ProductionLog::default();
    for seq in 0..=upto {
        // One fragment (k packets) per second, the last one two seconds ago.
        log.record(seq, now - 2000 - (upto - seq) / u64::from(K) * 1000);
    }
    log
}

#[test]
fn congestion_is_found_on_the_starved_link_only() {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    // Pick a peer-to-peer link in some tree.
    let (parent, child, sub) = relay_link(&t);
    let starved = Some((parent, child, sub, upto - 4 * u64::from(K)));
    let mut view = HeartbeatView::default();
    for p in t.peers() {
        view.ingest(heartbeat(&t, p, 1, upto, starved, now), now);
    }
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let mut found = Vec::new();
    // Seen from outside, lateness must repeat: two heartbeat rounds.
    for _ in 0..2 {
        for p in t.peers() {
            found.extend(det.on_heartbeat(&view, &log, K, p, |_, _, _| Some(0)));
        }
    }
    assert!(!found.is_empty(), "the starved link was not detected");
    for c in &found {
        assert_eq!(
            (c.parent, c.child, c.substream),
            (parent, child, sub),
            "false positive: {c:?}"
        );
        assert!(c.behind >= 3, "{c:?}");
    }
}

#[test]
fn healthy_swarm_reports_no_congestion_and_young_links_are_not_judged() {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    let mut view = HeartbeatView::default();
    let mut det = CongestionDetector::new(CongestionConfig::default());
    for p in t.peers() {
        view.ingest(heartbeat(&t, p, 1, upto, None, now), now);
    }
    for p in t.peers() {
        assert!(det
            .on_heartbeat(&view, &log, K, p, |_, _, _| Some(0))
            .is_empty());
    }
    // A link created a moment ago is not judged even if nothing arrived on it yet.
    let (parent, child, sub) = relay_link(&t);
    view.ingest(
        heartbeat(&t, child, 2, upto, Some((parent, child, sub, 0)), now),
        now,
    );
    let young = det.on_heartbeat(&view, &log, K, child, |_, _, _| Some(now - 100));
    assert!(young.is_empty());
}

#[test]
fn a_fresh_view_rebuilds_the_topology_from_one_interval_of_heartbeats() {
    let t = tree(60);
    let now = 50_000;
    let mut view = HeartbeatView::default();
    for p in t.peers() {
        view.ingest(heartbeat(&t, p, 7, 100, None, now), now);
    }
    let rebuilt = view.plans();
    assert_eq!(rebuilt.len(), 60);
    for p in t.peers() {
        assert_eq!(rebuilt[&p], t.plan(p).unwrap(), "plan of {p}");
    }
}

#[test]
fn silent_peers_and_measured_upload() {
    let t = tree(3);
    let mut view = HeartbeatView::default();
    let mut hb = heartbeat(&t, PeerId(1), 1, 10, None, 1000);
    view.ingest(hb.clone(), 1000);
    hb.seq = 2;
    hb.bytes_up = 125_000; // 1 Mbit in 1 s
    view.ingest(hb, 2000);
    let kbps = view
        .get(PeerId(1))
        .and_then(|s| s.measured_upload_kbps)
        .unwrap();
    assert!((kbps - 1000.0).abs() < 1.0, "{kbps}");
    view.ingest(heartbeat(&t, PeerId(2), 1, 10, None, 4000), 4000);
    assert_eq!(view.silent_since(6000, 3000), vec![PeerId(1)]);
}

#[test]
fn a_parent_reporting_an_upload_backlog_is_congested_towards_children_it_owes() {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    let (parent, child, sub) = relay_link(&t);
    let mut view = HeartbeatView::default();
    // The parent received its newest packet only 100 ms ago (within the grace period), but its
    // upload queue has been stuck for 400 ms and it still owes the child that packet.
    let mut hb = heartbeat(
        &t,
        parent,
        1,
        upto,
        Some((parent, child, sub, upto - 8)),
        now,
    );
    for p in &mut hb.parents {
        p.last_ts_ms = Some(now - 100);
    }
    let mut det = CongestionDetector::new(CongestionConfig::default());
    view.ingest(hb.clone(), now);
    assert!(
        det.on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0))
            .is_empty(),
        "no backlog, within grace: not congested yet"
    );
    hb.seq = 2;
    hb.send_backlog_ms = 400;
    view.ingest(hb, now);
    let found = det.on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].parent, found[0].child, found[0].substream),
        (parent, child, sub)
    );
    assert!(found[0].parent_side);
}

/// A relay whose child got only `upto - 40` on one substream, reporting `own` as what it got
/// itself from its parent there: judged once without a backlog (nothing may be found), then
/// with its upload queue stuck. Returns that second judgment and the link.
fn relay_behind_with_a_stuck_queue(own: Option<u64>) -> (Vec<Congested>, (PeerId, PeerId, u32)) {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    let (parent, child, sub) = relay_link(&t);
    let mut view = HeartbeatView::default();
    let stuck = upto - 40;
    let mut hb = heartbeat(&t, parent, 1, upto, None, now);
    for p in &mut hb.parents {
        if p.substream == sub {
            p.last_seq = own;
            p.last_ts_ms = own.map(|_| now - 100);
        }
    }
    for c in &mut hb.children {
        if c.substream == sub && c.child == child {
            c.last_seq = Some(stuck);
        }
    }
    let mut det = CongestionDetector::new(CongestionConfig::default());
    view.ingest(hb.clone(), now);
    assert!(
        det.on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0))
            .is_empty(),
        "without a backlog the child has all the relay is known to have had"
    );
    hb.seq = 2;
    hb.send_backlog_ms = 600;
    view.ingest(hb, now);
    let found = det.on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0));
    (found, (parent, child, sub))
}

#[test]
fn a_backlogged_relay_under_a_starved_one_owes_what_the_origin_produced() {
    // The relay's own parent is starved (it got only `upto - 40` too): the relay fetched the
    // rest from the origin.
    let (found, link) = relay_behind_with_a_stuck_queue(Some(360));
    assert!(
        found
            .iter()
            .any(|f| (f.parent, f.child, f.substream) == link && f.parent_side),
        "{found:?}"
    );
}

#[test]
fn a_backlogged_relay_whose_new_parent_has_not_delivered_yet_is_still_judged() {
    // The relay was just moved under a new parent (nothing from it yet: the origin bridges the
    // substream meanwhile).
    let (found, (parent, child, sub)) = relay_behind_with_a_stuck_queue(None);
    assert!(
        found
            .iter()
            .any(|f| (f.parent, f.child, f.substream) == (parent, child, sub) && f.parent_side),
        "{found:?}"
    );
    // Only the children it owes: the others have what the origin produced.
    assert!(found.iter().all(|f| f.child == child || f.substream != sub));
}

#[test]
fn a_heartbeat_that_queued_in_the_server_is_judged_as_of_when_it_was_written() {
    let t = tree(40);
    let (_, child, _) = relay_link(&t);
    // Ten fragments of K packets, one a second.
    let base = 1_000_000u64;
    let mut log = ProductionLog::default();
    for seq in 0..10 * u64::from(K) {
        log.record(seq, base + seq / u64::from(K) * 1000);
    }
    let upto = |fragment: u64| (fragment + 1) * u64::from(K) - 1;
    let mut view = HeartbeatView::default();
    let mut det = CongestionDetector::new(CongestionConfig::default());
    // A heartbeat that arrives at once: the peer's clock is the server's.
    view.ingest(
        heartbeat(&t, child, 1, upto(4), None, base + 4000),
        base + 4000,
    );
    det.on_heartbeat(&view, &log, K, child, |_, _, _| Some(0));
    assert!(!det.last_behind());
    // Written at 5.0 s with everything of fragment 5, read by a busy server 2.5 s later.
    view.ingest(
        heartbeat(&t, child, 2, upto(5), None, base + 5000),
        base + 7500,
    );
    det.on_heartbeat(&view, &log, K, child, |_, _, _| Some(0));
    assert!(
        !det.last_behind(),
        "judged against packets cut while it queued"
    );
    // The same delay on a peer that really is behind (fragment 2 at 6.0 s) is still seen.
    view.ingest(
        heartbeat(&t, child, 3, upto(2), None, base + 6000),
        base + 8500,
    );
    det.on_heartbeat(&view, &log, K, child, |_, _, _| Some(0));
    assert!(det.last_behind());
}

#[test]
fn a_stuck_relay_owes_each_child_what_it_already_sent_a_sibling() {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    // A relay with two or more children in one tree.
    let (parent, sub, kids) = (1..=40u64)
        .find_map(|p| {
            let plan = t.plan(PeerId(p))?;
            plan.iter()
                .find(|s| s.children.len() >= 2)
                .map(|s| (PeerId(p), s.index, s.children.clone()))
        })
        .expect("a relay with two children in one tree");
    let mut view = HeartbeatView::default();
    // It got a packet just now (produced 100 ms ago, so no child is owed it by the grace
    // rule yet), sent it to its first child and queued it for the others.
    let fresh = upto + u64::from(K);
    let fresh = fresh - (fresh % u64::from(K)) + u64::from(sub);
    let mut hb = heartbeat(&t, parent, 1, upto, None, now);
    for c in &mut hb.children {
        if c.substream == sub && c.child == kids[0] {
            c.last_seq = Some(fresh);
            c.last_ts_ms = Some(now - 20);
        }
    }
    let mut det = CongestionDetector::new(CongestionConfig::default());
    // A passing backlog (a large fragment, or many new children primed at once) changes
    // nothing.
    hb.send_backlog_ms = 1200;
    view.ingest(hb.clone(), now);
    assert!(det
        .on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0))
        .is_empty());
    // Stuck for longer than a fragment: every other child of that tree is late at once.
    hb.seq = 2;
    hb.send_backlog_ms = 3000;
    view.ingest(hb, now);
    let found = det.on_heartbeat(&view, &log, K, parent, |_, _, _| Some(0));
    for kid in &kids[1..] {
        assert!(
            found
                .iter()
                .any(|f| (f.parent, f.child, f.substream) == (parent, *kid, sub) && f.parent_side),
            "{kid} not flagged: {found:?}"
        );
    }
    assert!(!found
        .iter()
        .any(|f| f.child == kids[0] && f.substream == sub));
}

/// A parent that claims to have sent its child everything (its heartbeat lists the child's link
/// as up to date) while nothing has come over the link for `quiet_ms`: heartbeats of the
/// parent and of the child, the child's stuck at `upto - 4 k` on that substream.
fn silent_parent_view(quiet_ms: u64) -> (HeartbeatView, ProductionLog, (PeerId, PeerId, u32)) {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    let (parent, child, sub) = relay_link(&t);
    // Kept for the detector's grace, as the DCM keeps it.
    let mut view = HeartbeatView::with_quiet_threshold(CongestionConfig::default().dead_grace_ms);
    for p in t.peers() {
        let mut hb = heartbeat(
            &t,
            p,
            1,
            upto,
            Some((parent, child, sub, upto - 4 * u64::from(K))),
            now,
        );
        if p == parent {
            // It says it sent the child everything.
            for c in &mut hb.children {
                if c.child == child && c.substream == sub {
                    c.last_seq = Some(upto);
                }
            }
        }
        if p == child {
            for l in &mut hb.parents {
                if l.substream == sub {
                    l.last_ts_ms = Some(now - quiet_ms);
                }
            }
        }
        view.ingest(hb, now);
    }
    (view, log, (parent, child, sub))
}

#[test]
fn a_parent_that_claims_to_feed_a_dead_link_is_found_on_the_first_heartbeat() {
    // Nothing over the link for 5 s, while the newest packet owed was made 2 s ago.
    let (view, log, link) = silent_parent_view(5000);
    // Whichever heartbeat the detector reads second shows the contradiction: the child's...
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let found = det.on_heartbeat(&view, &log, K, link.1, |_, _, _| Some(0));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].parent, found[0].child, found[0].substream), link);
    assert!(
        !found[0].parent_side,
        "the child's complaint, not the parent's"
    );
    // ... or the parent's.
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let found = det.on_heartbeat(&view, &log, K, link.0, |_, _, _| Some(0));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].parent, found[0].child, found[0].substream), link);
    assert!(!found[0].parent_side);
    // A link created a moment ago is not judged, from either side.
    let mut det = CongestionDetector::new(CongestionConfig::default());
    for peer in [link.0, link.1] {
        assert!(det
            .on_heartbeat(&view, &log, K, peer, |_, _, _| Some(1_000_000 - 100))
            .is_empty());
    }
}

#[test]
fn the_quiet_set_holds_exactly_the_children_of_links_quiet_for_the_grace() {
    let (mut view, _, (_, child, sub)) = silent_parent_view(5000);
    let base = view.get(child).expect("child").heartbeat.clone();
    let at = base.local_ts_ms;
    // Every link delivered when the heartbeat was written, but one `quiet` ms earlier.
    let report = |view: &mut HeartbeatView, seq: u64, quiet: u64| {
        let mut hb = base.clone();
        hb.seq = seq;
        for l in &mut hb.parents {
            l.last_ts_ms = Some(if l.substream == sub { at - quiet } else { at });
        }
        view.ingest(hb, 1_000_000);
        view.may_have_quiet_link(child)
    };
    assert!(!report(&mut view, 2, 0), "all links delivered");
    assert!(report(&mut view, 3, 5000), "one link quiet for 5 s");
    assert!(
        !report(&mut view, 4, 100),
        "100 ms is under the 400 ms grace"
    );
    assert!(report(&mut view, 5, 400), "quiet for the grace itself");
    view.remove(child);
    assert!(!view.may_have_quiet_link(child), "gone with its peer");
}

#[test]
fn a_link_that_still_delivers_late_needs_two_strikes_even_if_its_parent_claims_more() {
    // The same claim, but packets came over the link 100 ms ago: slow, not dead. One late
    // report is not enough (an overloaded host makes links look late); the second is.
    let (view, log, link) = silent_parent_view(100);
    let mut det = CongestionDetector::new(CongestionConfig::default());
    assert!(det
        .on_heartbeat(&view, &log, K, link.1, |_, _, _| Some(0))
        .is_empty());
    assert!(det
        .on_heartbeat(&view, &log, K, link.0, |_, _, _| Some(0))
        .is_empty());
    let found = det.on_heartbeat(&view, &log, K, link.1, |_, _, _| Some(0));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].parent, found[0].child, found[0].substream), link);
}

#[test]
fn an_honest_parent_that_says_what_it_sent_is_not_taken_for_a_silent_one() {
    // The parent's report matches the child's (both stuck at the same packet), and nothing
    // came over the link for 5 s.
    let t = tree(40);
    let now = 1_000_000;
    let upto = 400;
    let log = production(upto, now);
    let (parent, child, sub) = relay_link(&t);
    let stuck = upto - 4 * u64::from(K);
    let mut view = HeartbeatView::default();
    for p in t.peers() {
        let mut hb = heartbeat(&t, p, 1, upto, Some((parent, child, sub, stuck)), now);
        if p == child {
            for l in &mut hb.parents {
                if l.substream == sub {
                    l.last_ts_ms = Some(now - 5000);
                }
            }
        }
        view.ingest(hb, now);
    }
    // The child's complaint alone, once, is not enough: the parent does not contradict it.
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let found = det.on_heartbeat(&view, &log, K, child, |_, _, _| Some(0));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_feeder_that_holds_the_packet_and_reports_no_backlog_is_judged_on_the_feeds_it_does_not_list() {
    let (mut view, log, (parent, child, sub)) = silent_parent_view(5000);
    // The link is a feed into another cluster: the parent's heartbeat does not list it.
    let mut hb = view.get(parent).unwrap().heartbeat.clone();
    hb.children
        .retain(|c| !(c.child == child && c.substream == sub));
    hb.seq += 1;
    view.ingest(hb.clone(), 1_000_000);
    // It received the packet 1.5 s before and has nothing queued: it passed it on then.
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let found = det.on_feeder_heartbeat(&view, &log, K, parent, &[(child, sub)], |_, _, _| Some(0));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].parent, found[0].child, found[0].substream),
        (parent, child, sub)
    );
    // Had it received the packet only 100 ms before the child wrote, it would still be on its
    // way.
    let mut late = hb.clone();
    late.seq += 10;
    for p in &mut late.parents {
        p.last_ts_ms = Some(1_000_000 - 100);
    }
    let mut v2 = HeartbeatView::default();
    for id in [parent, child] {
        v2.ingest(view.get(id).unwrap().heartbeat.clone(), 1_000_000);
    }
    v2.ingest(late, 1_000_000);
    let mut d2 = CongestionDetector::new(CongestionConfig::default());
    assert!(d2
        .on_feeder_heartbeat(&v2, &log, K, parent, &[(child, sub)], |_, _, _| Some(0))
        .is_empty());
    // Parity feeds are not judged, nor a young feed.
    let mut det = CongestionDetector::new(CongestionConfig::default());
    assert!(det
        .on_feeder_heartbeat(&view, &log, K, parent, &[(child, K)], |_, _, _| Some(0))
        .is_empty());
    assert!(det
        .on_feeder_heartbeat(&view, &log, K, parent, &[(child, sub)], |_, _, _| {
            Some(1_000_000 - 100)
        })
        .is_empty());
    // A feeder that says its uplink is backed up is not claiming to send what it has.
    hb.send_backlog_ms = 1000;
    hb.seq += 1;
    view.ingest(hb, 1_000_000);
    let mut det = CongestionDetector::new(CongestionConfig::default());
    assert!(det
        .on_feeder_heartbeat(&view, &log, K, parent, &[(child, sub)], |_, _, _| Some(0))
        .is_empty());
}

#[test]
fn a_packet_sent_a_moment_before_the_childs_report_is_not_yet_owed_on_one_report() {
    // The same claim, but the parent sent its last packet to the child only 100 ms before the
    // child wrote its heartbeat: on a long path or a slow uplink that packet is still on its way
    // (one packet per substream a second apart means nothing else arrived since either).
    let (mut view, log, (parent, child, sub)) = silent_parent_view(5000);
    let mut hb = view.get(parent).unwrap().heartbeat.clone();
    for c in &mut hb.children {
        if c.child == child && c.substream == sub {
            c.last_ts_ms = Some(1_000_000 - 100);
        }
    }
    hb.seq += 1;
    view.ingest(hb, 1_000_000);
    let mut det = CongestionDetector::new(CongestionConfig::default());
    assert!(det
        .on_heartbeat(&view, &log, K, child, |_, _, _| Some(0))
        .is_empty());
}

/// Fragments of `n` packets every `every_ms`, the newest made `age_ms` before `now`, each handed
/// to the origin whole (one creation time per fragment), up to packet `upto`.
fn fragments(upto: u64, n: u64, every_ms: u64, age_ms: u64, now: u64) -> ProductionLog {
    let mut log = ProductionLog::default();
    let last = upto / n;
    for f in 0..=last {
        let created = now - age_ms - (last - f) * every_ms;
        let batch: Vec<(u64, u64)> = (f * n..(f + 1) * n).map(|s| (s, created)).collect();
        log.record_batch(&batch);
    }
    log
}

/// One relay link whose parent has passed on `sent` packets of the newest fragment (16 packets,
/// 4 per substream), reporting `backlog_ms` of upload queued; every other link is up to date.
/// Two heartbeat rounds; returns what was found congested and the link.
fn passing_a_burst(
    log: &ProductionLog,
    sent: u64,
    backlog_ms: u32,
) -> (Vec<Congested>, (PeerId, PeerId, u32)) {
    let t = tree(40);
    let now = 1_000_000;
    let upto = 16 * 30 - 1;
    let (parent, child, sub) = relay_link(&t);
    let first = upto + 1 - 16;
    // The newest packet of the link's substream among the first `sent` of the fragment.
    let stuck = (first..first + sent)
        .rev()
        .find(|s| protocol::substream_of(*s, K) == sub)
        .unwrap_or(first - 16 + u64::from(sub));
    let mut view = HeartbeatView::default();
    let mut det = CongestionDetector::new(CongestionConfig::default());
    let mut found = Vec::new();
    for round in 1..=2 {
        for p in t.peers() {
            let mut hb = heartbeat(&t, p, round, upto, Some((parent, child, sub, stuck)), now);
            if p == parent {
                hb.send_backlog_ms = backlog_ms;
            }
            view.ingest(hb, now);
        }
        for p in t.peers() {
            found.extend(det.on_heartbeat(&view, log, K, p, |_, _, _| Some(0)));
        }
    }
    (found, (parent, child, sub))
}

#[test]
fn a_forwarder_passing_on_a_long_fragment_is_not_taken_for_a_congested_one() {
    let now = 1_000_000;
    let upto = 16 * 30 - 1;
    // 4 s fragments, the newest cut 1.5 s ago (the heartbeats say the parent got it then): a
    // forwarder at 1.5 times its share passes it on over 2/3 of 4 s, and has sent half of it.
    let long = fragments(upto, 16, 4_000, 1_500, now);
    let (found, _) = passing_a_burst(&long, 8, 2_000);
    assert!(
        found.is_empty(),
        "a passing burst taken for congestion: {found:?}"
    );
    // The same reports read as 1 s fragments, each due whole: that parent would be late.
    let short = fragments(upto, 16, 1_000, 1_500, now);
    let (found, link) = passing_a_burst(&short, 8, 2_000);
    assert!(
        found
            .iter()
            .any(|c| (c.parent, c.child, c.substream) == link),
        "{found:?}"
    );
}

#[test]
fn a_forwarder_stuck_on_a_long_fragment_is_still_found() {
    let now = 1_000_000;
    let upto = 16 * 30 - 1;
    let long = fragments(upto, 16, 4_000, 1_500, now);
    // Nothing of the fragment passed on in 1.5 s, with no backlog to show for it: the child
    // lacks what was due 0.7 s ago while its parent holds it.
    let (found, link) = passing_a_burst(&long, 0, 0);
    assert!(
        found
            .iter()
            .any(|c| (c.parent, c.child, c.substream) == link),
        "{found:?}"
    );
    // Nothing passed on and a backlog longer than the fragment: its uplink is stuck.
    let (found, link) = passing_a_burst(&long, 0, 5_000);
    assert!(
        found
            .iter()
            .any(|c| (c.parent, c.child, c.substream) == link && c.parent_side),
        "{found:?}"
    );
}
