//! The DCM driven directly, without sockets: events in, queued messages out.

use std::sync::Arc;

use protocol::{ChildLink, ParentLink, SubstreamPlan};
use tokio::sync::mpsc;

use super::*;
use crate::origin::PacketWindow;

struct Harness {
    dcm: Dcm,
    outs: HashMap<PeerId, mpsc::Receiver<Outbound>>,
}

impl Harness {
    fn new() -> Self {
        let (tx, _rx) = mpsc::channel(16);
        let channel = Arc::new(Channel::new(
            "test".into(),
            400,
            PacketWindow::new(64, 1024),
            tx,
        ));
        let config = Config {
            substreams: 4,
            origin_fanout: 1,
            ..Config::default()
        };
        Harness {
            dcm: Dcm::new(channel, &config),
            outs: HashMap::new(),
        }
    }

    fn join(&mut self, id: u64, upload_kbps: u32) {
        let (out, rx) = mpsc::channel(1024);
        self.outs.insert(PeerId(id), rx);
        self.dcm.handle(DcmEvent::Join {
            peer: PeerId(id),
            upload_kbps,
            out,
        });
    }

    /// The latest instructions queued for a peer, draining its queue.
    fn latest_plan(&mut self, id: u64) -> Option<Vec<SubstreamPlan>> {
        let rx = self.outs.get_mut(&PeerId(id))?;
        let mut plan = None;
        while let Ok(m) = rx.try_recv() {
            if let Outbound::Msg(m) = m {
                if let ServerMsg::Instructions { substreams, .. } = *m {
                    plan = Some(substreams);
                }
            }
        }
        plan
    }
}

fn children_of(plan: &[SubstreamPlan]) -> usize {
    plan.iter().map(|s| s.children.len()).sum()
}

#[test]
fn a_parent_reporting_a_stuck_uplink_is_capped_and_its_children_re_homed() {
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = (1..=12u64)
        .max_by_key(|id| h.dcm.tree.plan(PeerId(*id)).map_or(0, |p| children_of(&p)))
        .expect("peers");
    let plan = h.dcm.tree.plan(PeerId(relay)).expect("plan");
    let before = children_of(&plan);
    assert!(before >= 2, "the busiest relay feeds {before}");
    // Links old enough to be judged.
    for links in h.dcm.link_since.values_mut() {
        for l in links.iter_mut() {
            l.2 = 0;
        }
    }
    let now = now_ms();
    // Its children are owed the newest packet of its substream and its queue is stuck.
    let sub = plan
        .iter()
        .find(|s| !s.children.is_empty())
        .expect("sub")
        .index;
    let hb = |seq: u64, bytes_up: u64, backlog: u32| Heartbeat {
        client_id: PeerId(relay),
        seq,
        local_ts_ms: now,
        parents: plan
            .iter()
            .map(|s| ParentLink {
                substream: s.index,
                parent: s.parent,
                last_seq: Some(100 + u64::from(s.index)),
                last_ts_ms: Some(now - 50),
            })
            .collect(),
        children: plan
            .iter()
            .flat_map(|s| {
                s.children.iter().map(move |c| ChildLink {
                    substream: s.index,
                    child: *c,
                    last_seq: Some(96 + u64::from(s.index)),
                    last_ts_ms: Some(now - 900),
                })
            })
            .collect(),
        buffer: vec![0; 4],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up,
        origin_fallbacks: 0,
        upload_kbps: 2000,
        send_backlog_ms: backlog,
    };
    h.dcm.on_heartbeat(PeerId(relay), hb(1, 0, 0), now - 1000);
    assert_eq!(h.dcm.congestion_log.len(), 0);
    // One second later: 25 kB uploaded (200 kbit/s) and a 600 ms backlog.
    h.dcm.on_heartbeat(PeerId(relay), hb(2, 25_000, 600), now);
    assert!(
        h.dcm
            .congestion_log
            .iter()
            .any(|c| c.link.parent == PeerId(relay)
                && c.link.substream == sub
                && c.link.parent_side),
        "no congestion recorded: {:?}",
        h.dcm.congestion_log
    );
    // Capped at 80 % of 200 kbit/s: at most one child of a 100 kbit/s substream.
    assert_eq!(h.dcm.history.effective_kbps(PeerId(relay)), Some(160));
    let after = children_of(&h.dcm.tree.plan(PeerId(relay)).expect("plan"));
    assert!(after <= 1, "still feeds {after} children");
    h.dcm.tree.check_invariants().expect("invariants");
    // The children it dropped were told their new parents.
    let mut moved = 0;
    for s in &plan {
        for c in &s.children {
            let Some(new) = h.latest_plan(c.0) else {
                continue;
            };
            let parent = new.iter().find(|x| x.index == s.index).map(|x| x.parent);
            if parent.is_some_and(|p| p != (Source::Peer { id: PeerId(relay) })) {
                moved += 1;
            }
        }
    }
    assert!(
        moved >= before - after,
        "only {moved} of {} children were re-homed",
        before - after
    );
    assert!(h.dcm.channel.counters.repairs.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_childs_complaint_moves_only_the_child_and_silent_peers_are_removed() {
    let mut h = Harness::new();
    for id in 1..=8 {
        h.join(id, 2000);
    }
    let before: Vec<Option<u32>> = (1..=8)
        .map(|i| h.dcm.history.effective_kbps(PeerId(i)))
        .collect();
    let link = view::Congested {
        parent: PeerId(1),
        child: PeerId(2),
        substream: 0,
        behind: 3,
        parent_side: false,
    };
    h.dcm.on_congestion(link, now_ms());
    let after: Vec<Option<u32>> = (1..=8)
        .map(|i| h.dcm.history.effective_kbps(PeerId(i)))
        .collect();
    assert_eq!(before, after, "a child's report must not cap anyone");
    assert_eq!(h.dcm.repair_log.back().map(|r| r.peer), Some(PeerId(2)));

    // Nobody sends heartbeats: after the timeout everyone is removed and told why.
    let later = now_ms() + 60_000;
    h.dcm.on_tick(later);
    assert!(h.dcm.peers.is_empty());
    let rx = h.outs.get_mut(&PeerId(3)).expect("rx");
    let mut closed = false;
    while let Ok(m) = rx.try_recv() {
        closed |= matches!(m, Outbound::Close(ref r) if r.contains("heartbeats"));
    }
    assert!(closed);
}
