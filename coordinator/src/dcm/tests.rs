//! The DCM driven directly, without sockets: events and time in, outputs routed into one
//! queue per peer, as a driver would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use protocol::{ChildLink, Heartbeat, ParentLink, Source, SubstreamPlan};

use super::*;

/// The harness's clock: every test runs at a fixed virtual time unless it says otherwise.
const T0: u64 = 1_000_000;

fn now_ms() -> u64 {
    T0
}

/// What a driver would put on a peer's socket.
#[derive(Debug)]
enum Outbound {
    Msg(Box<ServerMsg>),
    Packet(Bytes),
    Text(Arc<str>),
    Close(String),
}

/// One peer's queue of outputs.
#[derive(Default)]
struct Rx(VecDeque<Box<Outbound>>);

impl Rx {
    fn try_recv(&mut self) -> Result<Box<Outbound>, ()> {
        self.0.pop_front().ok_or(())
    }
}

struct Harness {
    dcm: Dcm,
    outs: HashMap<PeerId, Rx>,
    /// What the origin pushes to whom and the epoch, as the outputs said (a driver keeps them
    /// outside the DCM for a DCM that takes over).
    fed: HashMap<PeerId, Vec<Push>>,
    epoch: u64,
    snapshots: Vec<(u64, TopologySnapshot)>,
    /// Background work is left for the test to do a slice at a time (as the server's loop).
    sliced: bool,
}

impl Dcm {
    fn on_heartbeat(&mut self, peer: PeerId, hb: Heartbeat, now: u64) {
        self.on_heartbeat_at(peer, hb, now, now);
    }

    fn on_tick(&mut self, now: u64) {
        self.handle_timeout(now);
    }
}

/// The flat channel the harness runs by default (and a DCM of another server takes over).
fn flat_config() -> DcmConfig {
    DcmConfig {
        k: 4,
        origin_fanout: 1,
        ..DcmConfig::flat("test", 400)
    }
}

impl Harness {
    fn new() -> Self {
        Self::with(flat_config())
    }

    /// Every peer's plan of the data trees.
    fn plans(&self) -> BTreeMap<PeerId, Vec<SubstreamPlan>> {
        self.dcm
            .peers
            .keys()
            .map(|p| (*p, self.dcm.planner.plan(*p).expect("plan").substreams))
            .collect()
    }

    /// `peer` of this harness's DCM resumes on `next`, another server's DCM, at `at`.
    fn resume_on(&self, next: &mut Dcm, peer: PeerId, at: u64) {
        let e = self.dcm.peers[&peer];
        next.handle(
            Event::Resume {
                peer,
                upload_kbps: e.upload_kbps,
                region: e.region,
                relay: e.relay,
                connectivity: None,
            },
            at,
        );
    }

    fn with(config: DcmConfig) -> Self {
        Harness {
            dcm: Dcm::new(config, T0),
            outs: HashMap::new(),
            fed: HashMap::new(),
            epoch: 0,
            snapshots: Vec::new(),
            sliced: false,
        }
    }

    /// Routes every output, background work included, to the peers' queues.
    fn pump(&mut self) {
        while let Some(o) = self.dcm.poll_output() {
            self.route(o);
        }
        self.epoch = self.dcm.epoch();
    }

    /// Routes the outputs ready now, leaving background work undone.
    fn pump_ready(&mut self) {
        while self.dcm.has_ready_output() {
            let Some(o) = self.dcm.poll_output() else {
                break;
            };
            self.route(o);
        }
    }

    fn route(&mut self, o: Output) {
        match o {
            Output::Send { peer, msg } => {
                let m = match msg {
                    OutMsg::Msg(m) => Outbound::Msg(m),
                    OutMsg::Packet(b) => Outbound::Packet(b),
                    OutMsg::Text(t) => Outbound::Text(t),
                };
                if let Some(rx) = self.outs.get_mut(&peer) {
                    rx.0.push_back(Box::new(m));
                }
            }
            Output::Close { peer, reason } | Output::Evict { peer, reason } => {
                if let Some(rx) = self.outs.get_mut(&peer) {
                    rx.0.push_back(Box::new(Outbound::Close(reason)));
                }
            }
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
            Output::Relays(_) => {}
            Output::Snapshot { token, snapshot } => self.snapshots.push((token, *snapshot)),
        }
    }

    /// `peer`'s queue, with every output so far routed.
    fn rx(&mut self, peer: &PeerId) -> Option<&mut Rx> {
        if self.sliced {
            self.pump_ready();
        } else {
            self.pump();
        }
        self.outs.get_mut(peer)
    }

    fn handle(&mut self, ev: Event) {
        self.dcm.handle(ev, T0);
    }

    fn join(&mut self, id: u64, upload_kbps: u32) {
        self.outs.insert(PeerId(id), Rx::default());
        self.dcm.handle(
            Event::Join {
                region: crate::topology::region::Region::V4([127, 0]),
                relay: false,
                peer: PeerId(id),
                upload_kbps,
                connectivity: None,
            },
            T0,
        );
    }

    /// The latest instructions queued for a peer, draining its queue.
    fn latest_plan(&mut self, id: u64) -> Option<Vec<SubstreamPlan>> {
        let rx = self.rx(&PeerId(id))?;
        let mut plan = None;
        while let Ok(m) = rx.try_recv() {
            if let Outbound::Msg(m) = *m {
                if let ServerMsg::Instructions { substreams, .. } = *m {
                    plan = Some(substreams);
                }
            }
        }
        plan
    }

    /// The origin's packets `0..n` go in (before anyone joins: nobody gets them).
    fn produce(&mut self, seqs: std::ops::Range<u64>) {
        self.handle(Event::Packets(seqs.map(|s| (s, packet(s))).collect()));
        self.pump();
    }
}

fn children_of(plan: &[SubstreamPlan]) -> usize {
    plan.iter().map(|s| s.children.len()).sum()
}

/// Of peers `1..=n`, the one with the most children.
fn busiest_relay(h: &Harness, n: u64) -> u64 {
    (1..=n)
        .max_by_key(|id| {
            h.dcm
                .planner
                .plan(PeerId(*id))
                .map_or(0, |p| children_of(&p.substreams))
        })
        .expect("peers")
}

#[test]
fn a_reconnected_peer_keeps_its_place_and_is_told_it_again() {
    let mut h = Harness::new();
    for id in 1..=6 {
        h.join(id, 2000);
    }
    for id in 1..=6 {
        h.latest_plan(id);
    }
    let before = h.dcm.planner.plan(PeerId(3)).expect("placed").substreams;
    h.handle(Event::Reconnect { peer: PeerId(3) });
    assert_eq!(h.latest_plan(3), Some(before.clone()), "its place, again");
    assert_eq!(
        h.dcm.planner.plan(PeerId(3)).expect("placed").substreams,
        before
    );
    for id in [1, 2, 4, 5, 6] {
        assert_eq!(h.latest_plan(id), None, "{id} was re-instructed");
    }
    assert_eq!(h.dcm.stats().reconnects, 1);
    // A peer the DCM does not have (its old session's end came first) is not made up.
    h.handle(Event::Reconnect { peer: PeerId(99) });
    assert!(!h.dcm.has_peer(PeerId(99)));
    assert_eq!(h.dcm.stats().reconnects, 1);
}

#[test]
fn a_parent_reporting_a_stuck_uplink_is_capped_and_its_children_re_homed() {
    let mut h = Harness::new();
    for id in 1..=12 {
        h.join(id, 2000);
    }
    let relay = busiest_relay(&h, 12);
    let plan = h.dcm.planner.plan(PeerId(relay)).expect("plan").substreams;
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
        place: None,
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
    let after = children_of(&h.dcm.planner.plan(PeerId(relay)).expect("plan").substreams);
    assert!(after <= 1, "still feeds {after} children");
    if let super::planner::Planner::Flat(t) = &h.dcm.planner {
        t.check_invariants().expect("invariants");
    }
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
    assert!(h.dcm.stats().repairs >= 1);
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
    let rx = h.rx(&PeerId(3)).expect("rx");
    let mut closed = false;
    while let Ok(m) = rx.try_recv() {
        closed |= matches!(*m, Outbound::Close(ref r) if r.contains("heartbeats"));
    }
    assert!(closed);
}

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

fn tiered_config() -> DcmConfig {
    let topo = crate::topology::region::TopologyConfig::from_toml(THREE_REGIONS).expect("toml");
    DcmConfig {
        k: 4,
        topology: Some(Arc::new(topo)),
        ..DcmConfig::flat("test", 400)
    }
}

fn tiered_harness() -> Harness {
    Harness::with(tiered_config())
}

impl Harness {
    fn join_in(&mut self, id: u64, region: u16, upload_kbps: u32) {
        self.outs.insert(PeerId(id), Rx::default());
        self.handle(Event::Join {
            region: crate::topology::region::Region::Named(region),
            relay: false,
            peer: PeerId(id),
            upload_kbps,
            connectivity: None,
        });
    }

    /// Peers 1 to 18, six per region over regions 0 to 2: two strong, two medium, two weak.
    fn join_three_classes(&mut self) {
        let mut id = 0;
        for region in 0..3u16 {
            for kbps in [6000, 6000, 2000, 2000, 300, 300] {
                id += 1;
                self.join_in(id, region, kbps);
            }
        }
    }

    /// Latest tier plans and every binary frame queued, draining the queues.
    fn drain(&mut self) -> HashMap<PeerId, (Option<WireSeen>, Vec<Bytes>)> {
        self.pump();
        let mut out = HashMap::new();
        for (id, rx) in &mut self.outs {
            let e: &mut (Option<WireSeen>, Vec<Bytes>) = out.entry(*id).or_default();
            while let Ok(m) = rx.try_recv() {
                match *m {
                    Outbound::Msg(m) => {
                        if let ServerMsg::Instructions {
                            substreams, tier, ..
                        } = *m
                        {
                            e.0 = Some((substreams, tier));
                        }
                    }
                    Outbound::Packet(b) => e.1.push(b),
                    _ => {}
                }
            }
        }
        out
    }
}

#[test]
fn a_peer_the_origin_starts_feeding_gets_the_newest_packet_of_its_substreams_at_once() {
    let mut h = Harness::new();
    h.produce(0..10);
    h.join(1, 2000);
    // Alone, the peer hangs under the origin in all four trees: the instructions, then packets
    // 6, 7, 8, 9 (the newest of substreams 2, 3, 0, 1), in that order on its socket.
    let rx = h.rx(&PeerId(1)).unwrap();
    let mut seen = Vec::new();
    while let Ok(m) = rx.try_recv() {
        match *m {
            Outbound::Msg(m) if matches!(*m, ServerMsg::Instructions { .. }) => seen.push(None),
            Outbound::Packet(b) => seen.push(protocol::packet::peek_seq(&b)),
            _ => {}
        }
    }
    assert_eq!(seen[0], None, "{seen:?}");
    let mut primed: Vec<u64> = seen[1..].iter().map(|s| s.unwrap()).collect();
    primed.sort();
    assert_eq!(primed, vec![6, 7, 8, 9]);
    // Instructions that change nothing for the origin's pushes prime nothing again.
    h.dcm
        .send_instructions(BTreeSet::from([PeerId(1)]), now_ms());
    let rx = h.rx(&PeerId(1)).unwrap();
    while let Ok(m) = rx.try_recv() {
        assert!(!matches!(*m, Outbound::Packet(_)));
    }
}

type WireSeen = (Vec<SubstreamPlan>, Option<protocol::TierPlan>);

fn packet(seq: u64) -> Bytes {
    let header = protocol::PacketHeader {
        seq,
        flags: 0,
        created_ms: 1_000 + seq,
    };
    Bytes::from(protocol::packet::encode(
        &header,
        &vec![seq as u8; 100 + seq as usize * 37],
    ))
}

#[test]
fn a_tiered_channel_places_three_classes_in_three_tiers_and_the_origin_feeds_them() {
    let mut h = tiered_harness();
    h.join_three_classes();
    let seen = h.drain();
    let mut tiers = BTreeMap::new();
    for (peer, (plan, _)) in &seen {
        let (subs, tier) = plan.clone().expect("every peer has instructions");
        let tier = tier.expect("a tiered channel sends tier plans");
        *tiers.entry(format!("{:?}", tier.tier)).or_insert(0) += 1;
        match tier.tier {
            protocol::TierName::Preferred => {
                assert!(!tier.mesh.is_empty(), "{peer} preferred without mesh");
                assert!(subs.is_empty());
            }
            protocol::TierName::Middle => {
                let fec = tier.fec.expect("middle tier is coded");
                let n = if tier.region == "south" { 3 } else { 2 };
                assert_eq!((fec.k, fec.n), (4, n), "{peer} in {}", tier.region);
                assert_eq!(subs.len() as u32, fec.k + fec.n);
            }
            protocol::TierName::Bottom => {
                assert!(tier.fec.is_none());
                assert_eq!(subs.len(), 4);
            }
        }
        // Every neighbour named in a plan may signal with the peer.
        for s in &subs {
            if let Source::Peer { id } = s.parent {
                assert!(h.dcm.linked(*peer, id) && h.dcm.linked(id, *peer));
            }
        }
        for m in &tier.mesh {
            if let Source::Peer { id } = m {
                assert!(h.dcm.linked(*peer, *id));
            }
        }
    }
    assert_eq!(tiers.len(), 3, "all three tiers in use: {tiers:?}");
    let view = h.dcm.snapshot(0).hierarchy.expect("hierarchy view");
    assert_eq!(view.regions.len(), 3);
    assert!(view.mesh_connectivity >= 1);
    // Every link is listed with its algorithm, and serializes for the topology API.
    let json = serde_json::to_value(&view).expect("json");
    let algorithms: BTreeSet<String> = json["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| l["algorithm"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        algorithms,
        ["flood", "multitree", "multitree_fec"]
            .map(String::from)
            .into(),
        "{json}"
    );

    // One group of packets from the origin: every peer fed by it gets what its plan says.
    h.handle(Event::Packets((0..8).map(|s| (s, packet(s))).collect()));
    let pushed = h.drain();
    let mut parity_checked = 0;
    for (peer, pushes) in h.dcm.origin_fed.clone() {
        let frames = &pushed[&peer].1;
        for p in pushes {
            match p {
                Push::Full => assert_eq!(frames.iter().filter(|f| f[0] == b'P').count(), 8),
                Push::Data { substream } => assert!(frames
                    .iter()
                    .any(|f| protocol::packet::peek_seq(f) == Some(u64::from(substream)))),
                Push::Parity { index, n } => {
                    let parity: Vec<_> = frames
                        .iter()
                        .filter_map(|f| protocol::fec::ParityFrame::decode(f).ok())
                        .filter(|f| u32::from(f.index) == index)
                        .collect();
                    assert_eq!(parity.len(), 2, "{peer}: one parity frame per group");
                    assert_eq!(u32::from(parity[0].n), n);
                    parity_checked += 1;
                }
            }
        }
    }
    assert!(!h.dcm.origin_fed.is_empty());
    // The origin floods into the mesh; with two capable peers per region nothing else needs it.
    assert!(
        h.dcm
            .origin_fed
            .values()
            .flatten()
            .all(|p| *p == Push::Full)
            || parity_checked > 0,
        "{:?}",
        h.dcm.origin_fed
    );

    // A preferred node leaves: the mesh stays connected and every peer still has instructions.
    let pref = seen
        .iter()
        .find(|(_, (p, _))| {
            p.as_ref()
                .and_then(|p| p.1.as_ref())
                .is_some_and(|t| t.tier == protocol::TierName::Preferred)
        })
        .map(|(p, _)| *p)
        .expect("a preferred node");
    h.handle(Event::Leave { peer: pref });
    let view = h.dcm.snapshot(0).hierarchy.expect("hierarchy view");
    assert!(view.mesh_connectivity >= 1);
    for peer in h.dcm.peers.keys() {
        assert!(h.dcm.planner.plan(*peer).is_some());
    }
}

/// A heartbeat reporting exactly the links of `plan`.
fn heartbeat_from_plan(peer: PeerId, plan: &[SubstreamPlan], now: u64) -> Heartbeat {
    Heartbeat {
        client_id: peer,
        seq: 1,
        local_ts_ms: now,
        parents: plan
            .iter()
            .map(|s| ParentLink {
                substream: s.index,
                parent: s.parent,
                last_seq: Some(100),
                last_ts_ms: Some(now - 50),
            })
            .collect(),
        children: plan
            .iter()
            .flat_map(|s| {
                s.children.iter().map(move |c| ChildLink {
                    substream: s.index,
                    child: *c,
                    last_seq: Some(100),
                    last_ts_ms: Some(now - 50),
                })
            })
            .collect(),
        buffer: vec![0; plan.len()],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up: 0,
        origin_fallbacks: 0,
        upload_kbps: 2000,
        send_backlog_ms: 0,
        place: None,
    }
}

#[test]
fn the_census_counts_what_the_snapshot_shows_without_copying_plans() {
    let mut h = tiered_harness();
    h.join_three_classes();
    let seen = h.drain();
    let census = h.dcm.census(3000);
    let ids: Vec<u64> = census.peers.iter().map(|p| p.id.0).collect();
    assert_eq!(ids, (1..=18).collect::<Vec<_>>(), "every peer, sorted");
    assert!(census
        .peers
        .iter()
        .all(|p| p.counters.is_none() && p.lagging_links == 0));
    // Viewers per (region, tier), as the snapshot's plans give them.
    let mut expected: BTreeMap<(String, protocol::TierName), u32> = BTreeMap::new();
    for v in h.dcm.snapshot(0).peers {
        let t = v.tier.expect("tier plan");
        *expected.entry((t.region, t.tier)).or_default() += 1;
    }
    let got: BTreeMap<(String, protocol::TierName), u32> = census
        .placements
        .iter()
        .map(|(place, n)| (place.clone().expect("placed"), *n))
        .collect();
    assert_eq!(got, expected);
    // Two bottom peers report: one healthy, one with a link silent for 5 s.
    let now = now_ms();
    let bottom: Vec<PeerId> = seen
        .iter()
        .filter(|(_, (plan, _))| {
            plan.as_ref()
                .and_then(|p| p.1.as_ref())
                .is_some_and(|t| t.tier == protocol::TierName::Bottom)
        })
        .map(|(p, _)| *p)
        .take(2)
        .collect();
    assert_eq!(bottom.len(), 2);
    for (i, peer) in bottom.iter().enumerate() {
        let plan = seen[peer].0.clone().expect("plan").0;
        let mut hb = heartbeat_from_plan(*peer, &plan, now);
        hb.bytes_from_peers = 1000 + i as u64;
        if i == 1 {
            hb.parents[0].last_ts_ms = Some(now - 5000);
        }
        h.dcm.on_heartbeat(*peer, hb, now);
    }
    let census = h.dcm.census(3000);
    let of = |p: PeerId| census.peers.iter().find(|c| c.id == p).expect("in census");
    assert_eq!(
        of(bottom[0]).counters.map(|c| c.bytes_from_peers),
        Some(1000)
    );
    assert_eq!(of(bottom[0]).lagging_links, 0);
    assert_eq!(
        of(bottom[1]).counters.map(|c| c.bytes_from_peers),
        Some(1001)
    );
    assert_eq!(of(bottom[1]).lagging_links, 1);
}

#[test]
fn a_dcm_taking_over_rebuilds_the_same_topology_from_one_round_of_heartbeats_and_says_nothing() {
    let mut h = Harness::new();
    let mut rng = protocol::rng::XorShift::seeded(7);
    for id in 1..=30 {
        h.join(id, [300, 800, 2000, 4000][rng.below(4) as usize]);
    }
    h.handle(Event::Leave { peer: PeerId(5) });
    h.handle(Event::Leave { peer: PeerId(17) });
    let before = h.plans();
    let fed_before: HashMap<PeerId, Vec<Push>> = h.dcm.origin_fed.clone().into_iter().collect();
    for id in 1..=30 {
        h.latest_plan(id);
    }

    // The DCM dies; a new one adopts the sessions and hears one heartbeat from everyone.
    let now = 1_000_000;
    h.pump();
    let adopted: Vec<Adopted> = h
        .dcm
        .peers
        .iter()
        .map(|(peer, e)| Adopted {
            peer: *peer,
            upload_kbps: e.upload_kbps,
            region: e.region,
            relay: e.relay,
            connectivity: e.connectivity,
            waypoint: e.waypoint,
        })
        .collect();
    assert_eq!(
        h.fed, fed_before,
        "the outputs told the driver what the origin pushes"
    );
    let cfg = flat_config();
    let mut next = Dcm::take_over(cfg, &adopted, h.fed.clone(), h.epoch, now);
    assert!(next.recovering());
    assert_eq!(next.peers.len(), before.len());
    assert_eq!(
        next.origin_fed
            .clone()
            .into_iter()
            .collect::<HashMap<_, _>>(),
        fed_before,
        "the origin keeps pushing meanwhile"
    );
    for (peer, plan) in &before {
        next.on_heartbeat(
            *peer,
            heartbeat_from_plan(*peer, plan, now + 100),
            now + 100,
        );
    }
    next.on_tick(now + 500);
    assert!(
        next.recovering(),
        "waits 1.5 intervals for everyone's heartbeat"
    );
    next.on_tick(now + 1_600);
    assert!(!next.recovering());
    // Children in id order: heartbeats do not say in which order they were adopted.
    let sorted = |mut plan: Vec<SubstreamPlan>| {
        for s in &mut plan {
            s.children.sort();
        }
        plan
    };
    for (peer, plan) in &before {
        assert_eq!(
            sorted(next.planner.plan(*peer).expect("restored").substreams),
            sorted(plan.clone()),
            "{peer}"
        );
    }
    assert_eq!(
        next.origin_fed
            .clone()
            .into_iter()
            .collect::<HashMap<_, _>>(),
        fed_before
    );
    // Nobody is told anything: every link is as it was.
    for id in 1..=30 {
        assert!(
            h.latest_plan(id).is_none(),
            "peer {id} got new instructions"
        );
    }
    assert!(next.epoch >= h.dcm.epoch, "epochs keep increasing");
}

#[test]
fn a_dcm_of_another_server_adopts_resuming_peers_and_keeps_their_links() {
    let mut h = Harness::new();
    let mut rng = protocol::rng::XorShift::seeded(11);
    for id in 1..=24 {
        h.join(id, [300, 800, 2000, 4000][rng.below(4) as usize]);
    }
    let before = h.plans();
    let fed_before: HashMap<PeerId, Vec<Push>> = h.dcm.origin_fed.clone().into_iter().collect();
    let cfg = flat_config();
    // The server died: another one's DCM knows nothing, and peers come back one by one over
    // two seconds (jittered backoff), each sending a heartbeat at once.
    let now = 2_000_000;
    let mut next = Dcm::new(cfg, now);
    let mut order: Vec<PeerId> = before.keys().copied().collect();
    order.reverse();
    for (i, peer) in order.iter().enumerate() {
        let at = now + 80 * i as u64;
        h.resume_on(&mut next, *peer, at);
        next.handle(
            Event::Heartbeat {
                peer: *peer,
                heartbeat: Box::new(heartbeat_from_plan(*peer, &before[peer], at + 20)),
                arrived_ms: at + 20,
            },
            at + 20,
        );
        next.handle_timeout(at + 30);
        assert!(next.recovering(), "still adopting after {} resumes", i + 1);
    }
    let last = now + 80 * order.len() as u64;
    next.handle_timeout(last + 1_600);
    assert!(!next.recovering());
    let sorted = |mut plan: Vec<SubstreamPlan>| {
        for s in &mut plan {
            s.children.sort();
        }
        plan
    };
    for (peer, plan) in &before {
        assert_eq!(
            sorted(next.planner.plan(*peer).expect("restored").substreams),
            sorted(plan.clone()),
            "{peer}"
        );
    }
    assert_eq!(
        next.origin_fed
            .clone()
            .into_iter()
            .collect::<HashMap<_, _>>(),
        fed_before,
        "the origin feeds the same roots"
    );
    let stats = next.stats();
    assert_eq!(stats.resumes, before.len() as u64);
    assert_eq!(stats.recoveries, 1);
    assert!(stats.links_reported > 0);
    assert_eq!(stats.links_kept, stats.links_reported, "every link kept");
    // Each peer got the manifests a joiner gets, and nobody got instructions.
    while let Some(out) = next.poll_output() {
        if let Output::Send {
            peer,
            msg: OutMsg::Msg(m),
        } = out
        {
            assert!(
                !matches!(*m, ServerMsg::Instructions { .. }),
                "{peer} was told to change"
            );
        }
    }
    // A peer resuming once the channel runs again is placed like a joiner.
    next.handle(
        Event::Resume {
            peer: PeerId(99),
            upload_kbps: 2000,
            region: h.dcm.peers[&PeerId(1)].region,
            relay: false,
            connectivity: None,
        },
        last + 2_000,
    );
    assert!(next.planner.plan(PeerId(99)).is_some());
    assert!(!next.recovering());
}

#[test]
fn a_dcm_of_another_server_resends_the_roots_what_was_cut_while_they_moved() {
    let mut h = Harness::new();
    for id in 1..=8 {
        h.join(id, 2000);
    }
    let plans = h.plans();
    let (root, sub) = plans
        .iter()
        .find_map(|(p, plan)| {
            plan.iter()
                .find(|s| s.parent == Source::Origin)
                .map(|s| (*p, s.index))
        })
        .expect("a tree root");
    let leaf = *plans
        .iter()
        .find(|(_, plan)| plan.iter().all(|s| s.parent != Source::Origin))
        .expect("a peer the origin does not feed")
        .0;
    let cfg = flat_config();
    // The new owner's origin made packets 0..40 while the peers moved; the root's newest from
    // the origin is 30.
    let now = 2_000_000;
    let mut next = Dcm::new(cfg, now);
    next.handle(
        Event::Packets((0..40).map(|s| (s, packet(s))).collect()),
        now,
    );
    while next.poll_output().is_some() {}
    let sent_to = |next: &mut Dcm, peer: PeerId| -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(out) = next.poll_output() {
            if let Output::Send {
                peer: p,
                msg: OutMsg::Packet(b),
            } = out
            {
                if p == peer {
                    seqs.extend(protocol::packet::peek_seq(&b));
                }
            }
        }
        seqs
    };
    for (i, peer) in [root, leaf].into_iter().enumerate() {
        let at = now + 10 + i as u64;
        h.resume_on(&mut next, peer, at);
        let mut hb = heartbeat_from_plan(peer, &plans[&peer], at);
        for l in &mut hb.parents {
            l.last_seq = Some(30);
        }
        next.handle(
            Event::Heartbeat {
                peer,
                heartbeat: Box::new(hb.clone()),
                arrived_ms: at,
            },
            at,
        );
        let sent = sent_to(&mut next, peer);
        if peer == root {
            // Every packet of its tree after 30, in order; nothing of the other trees.
            let want: Vec<u64> = (31..40)
                .filter(|s| protocol::substream_of(*s, 4) == sub)
                .collect();
            assert!(!want.is_empty());
            assert_eq!(sent, want, "root {root} of tree {sub}");
        } else {
            assert!(sent.is_empty(), "{peer} is fed by peers: {sent:?}");
        }
        // A second heartbeat resends nothing: the origin feeds it now.
        next.handle(
            Event::Heartbeat {
                peer,
                heartbeat: Box::new(hb),
                arrived_ms: at + 1000,
            },
            at + 1000,
        );
        assert!(sent_to(&mut next, peer).is_empty());
    }
    assert!(next.stats().resent_after_move > 0);
}

#[test]
fn the_top_tier_is_re_evaluated_a_region_short_of_preferred_nodes_regains_one_without_flapping() {
    let mut h = tiered_harness();
    h.join_three_classes();
    let preferred_in = |h: &Harness, region: &str| -> Vec<PeerId> {
        let mut v: Vec<PeerId> = h
            .dcm
            .snapshot(0)
            .peers
            .iter()
            .filter(|p| {
                p.tier
                    .as_ref()
                    .is_some_and(|t| t.tier == protocol::TierName::Preferred && t.region == region)
            })
            .map(|p| p.id)
            .collect();
        v.sort();
        v
    };
    let before = preferred_in(&h, "north");
    assert_eq!(before.len(), 2);
    h.handle(Event::Leave { peer: before[0] });
    assert_eq!(
        preferred_in(&h, "north").len(),
        1,
        "one left, nobody promoted yet"
    );
    h.drain();
    h.dcm.reevaluate_preferred(50_000);
    let after = preferred_in(&h, "north");
    assert_eq!(
        after.len(),
        2,
        "a capable peer of the region moved up: {after:?}"
    );
    assert!(after.contains(&before[1]), "the incumbent keeps its place");
    let told = h.drain();
    assert!(told.values().any(|(plan, _)| plan.is_some()));
    // Nothing changed since: a second evaluation moves nobody.
    h.dcm.reevaluate_preferred(60_000);
    assert_eq!(preferred_in(&h, "north"), after);
    assert!(
        h.drain().values().all(|(plan, _)| plan.is_none()),
        "flapping"
    );
    for region in ["south", "east"] {
        assert_eq!(preferred_in(&h, region).len(), 2);
    }
}

/// Live-edge notices queued for a peer, draining its queue.
fn edges_queued(h: &mut Harness, id: u64) -> usize {
    let Some(rx) = h.rx(&PeerId(id)) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(m) = rx.try_recv() {
        if let Outbound::Text(t) = *m {
            n += usize::from(t.contains("live_edge"));
        }
    }
    n
}

#[test]
fn fed_peers_get_one_live_edge_notice_in_four_and_peers_behind_get_all() {
    let mut h = Harness::new();
    for id in 1..=6 {
        h.join(id, 2000);
    }
    let batch = |from: u64| Event::Packets((from..from + 8).map(|s| (s, packet(s))).collect());
    // Newly placed peers hear of every packet.
    h.handle(batch(0));
    for id in 1..=6 {
        assert_eq!(edges_queued(&mut h, id), 1, "peer {id}");
    }
    // Peers 1-5 report every substream up to date; peer 6 is one packet short on substream 2.
    let now = now_ms();
    for id in 1..=6u64 {
        let plan = h.dcm.planner.plan(PeerId(id)).expect("plan").substreams;
        let mut hb = heartbeat_from_plan(PeerId(id), &plan, now);
        for p in &mut hb.parents {
            let newest = 4 + u64::from(p.substream);
            p.last_seq = Some(if id == 6 && p.substream == 2 {
                newest - 4
            } else {
                newest
            });
        }
        h.dcm.on_heartbeat(PeerId(id), hb, now);
    }
    // Over the next four notices each fed peer gets one, the peer behind all four.
    let mut got = [0usize; 7];
    for round in 1..=super::EDGE_ALL_EVERY {
        h.handle(batch(8 * round));
        for (id, n) in got.iter_mut().enumerate().skip(1) {
            *n += edges_queued(&mut h, id as u64);
        }
    }
    assert_eq!(&got[1..6], &[1; 5], "fed peers");
    assert_eq!(got[6], super::EDGE_ALL_EVERY as usize, "the peer behind");
    // A peer given new instructions hears of every packet again until it reports being fed.
    h.dcm.send_instructions(BTreeSet::from([PeerId(3)]), now);
    let mut got3 = 0;
    for round in 1..=super::EDGE_ALL_EVERY {
        h.handle(batch(8 * (super::EDGE_ALL_EVERY + round)));
        got3 += edges_queued(&mut h, 3);
    }
    assert_eq!(got3, super::EDGE_ALL_EVERY as usize);
}

#[test]
fn snapshots_and_live_edge_notices_are_built_a_slice_at_a_time_in_the_dcm_loop() {
    let mut h = Harness::new();
    for id in 1..=10 {
        h.join(id, 2000);
    }
    h.pump();
    h.sliced = true;
    h.handle(Event::Snapshot { token: 7 });
    h.handle(Event::Packets(vec![(0, packet(0))]));
    h.pump_ready();
    // Four peers a slice: the snapshot takes three slices, then the notice three more.
    for _ in 0..2 {
        h.dcm.background_slice(4);
        h.pump_ready();
        assert!(
            h.snapshots.is_empty(),
            "snapshot answered before it was complete"
        );
    }
    h.dcm.background_slice(4);
    h.pump_ready();
    let (token, snap) = h.snapshots.pop().expect("snapshot after three slices");
    assert_eq!(token, 7);
    assert_eq!(snap.peers.len(), 10);
    assert!(snap.peers.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        edges_queued(&mut h, 1),
        0,
        "the notice waits for the snapshot"
    );
    h.dcm.background_slice(4);
    h.pump_ready();
    let after_one: usize = (1..=10).map(|id| edges_queued(&mut h, id)).sum();
    assert_eq!(after_one, 4);
    h.dcm.background_slice(4);
    h.dcm.background_slice(4);
    h.pump_ready();
    let total: usize = (1..=10).map(|id| edges_queued(&mut h, id)).sum();
    assert_eq!(total, 6, "every newly placed peer got the notice once");
    assert!(h.dcm.background.is_empty());
}

/// What the peer's queue holds now, in order: `None` for instructions (with the substream's
/// parent), `Some(seq)` for a pushed packet.
fn drain(h: &mut Harness, id: u64, sub: u32) -> (Vec<Option<u64>>, Option<Source>) {
    let mut seen = Vec::new();
    let mut parent = None;
    let Some(rx) = h.rx(&PeerId(id)) else {
        return (seen, parent);
    };
    while let Ok(m) = rx.try_recv() {
        match *m {
            Outbound::Msg(m) => {
                if let ServerMsg::Instructions { substreams, .. } = *m {
                    parent = substreams.iter().find(|s| s.index == sub).map(|s| s.parent);
                    seen.push(None);
                }
            }
            Outbound::Packet(b) => seen.push(protocol::packet::peek_seq(&b)),
            _ => {}
        }
    }
    (seen, parent)
}

#[test]
fn a_child_whose_parent_left_is_bridged_by_the_origin_until_its_new_parent_delivers() {
    let mut h = Harness::new();
    h.produce(0..10);
    for id in 1..=10 {
        h.join(id, 2000);
    }
    // A forwarder of some tree and one of its children there that the origin does not feed.
    let (parent, child, sub) = (1..=10u64)
        .find_map(|p| {
            let plan = h.dcm.planner.plan(PeerId(p))?.substreams;
            plan.iter().find_map(|s| {
                // A leaf of that tree (a forwarder's subtree may move under the origin).
                let c = s.children.iter().find(|c| {
                    h.dcm.planner.interior_tree(**c) != Some(s.index)
                        && !h
                            .dcm
                            .origin_fed
                            .get(c)
                            .is_some_and(|v| v.contains(&Push::Data { substream: s.index }))
                })?;
                Some((p, c.0, s.index))
            })
        })
        .expect("a relay with a child");
    for id in 1..=10 {
        drain(&mut h, id, sub);
    }
    h.handle(Event::Leave {
        peer: PeerId(parent),
    });
    // New instructions, then at once the newest packet of the lost substream (9 mod 4 = 1,
    // so substream s's newest is the largest seq ≤ 9 with seq mod 4 = s).
    let (seen, new_parent) = drain(&mut h, child, sub);
    let Some(Source::Peer { id: new_parent }) = new_parent else {
        panic!("child {child} not re-homed under a peer: {new_parent:?}");
    };
    let newest = (0..10u64).rev().find(|s| s % 4 == u64::from(sub)).unwrap();
    assert_eq!(seen.first(), Some(&None), "{seen:?}");
    assert!(seen.contains(&Some(newest)), "no bridge prime: {seen:?}");
    // Every substream the re-plan moved is bridged (the leave may move more than the lost one).
    let subs: Vec<u32> = h
        .dcm
        .snapshot(now_ms())
        .peers
        .iter()
        .find(|p| p.id == PeerId(child))
        .map(|p| p.origin_bridges.clone())
        .unwrap_or_default();
    assert!(subs.contains(&sub), "{subs:?}");
    let fed: Vec<u32> = h
        .dcm
        .origin_fed
        .get(&PeerId(child))
        .into_iter()
        .flatten()
        .filter_map(|p| match p {
            Push::Data { substream } => Some(*substream),
            _ => None,
        })
        .collect();
    // The origin's next packets: the bridged substreams' reach the child, the others do not.
    let next: Vec<(u64, Bytes)> = (10..14).map(|s| (s, packet(s))).collect();
    h.handle(Event::Packets(next));
    let (seen, _) = drain(&mut h, child, sub);
    let got: Vec<u64> = seen.iter().flatten().copied().collect();
    let want: Vec<u64> = (10..14)
        .filter(|s| {
            let s4 = (s % 4) as u32;
            subs.contains(&s4) || fed.contains(&s4)
        })
        .collect();
    assert_eq!(got, want);
    assert!(h.dcm.stats().origin_bridge_bytes > 0);
    // A heartbeat showing the new parent delivering closes the bridge.
    let plan = h.dcm.planner.plan(PeerId(child)).expect("plan").substreams;
    let hb = heartbeat_from_plan(PeerId(child), &plan, now_ms());
    assert!(hb
        .parents
        .iter()
        .any(|l| l.substream == sub && l.parent == Source::Peer { id: new_parent }));
    h.dcm.on_heartbeat(PeerId(child), hb, now_ms());
    assert!(h.dcm.bridges.of(PeerId(child)).next().is_none());
    let next: Vec<(u64, Bytes)> = (14..18).map(|s| (s, packet(s))).collect();
    h.handle(Event::Packets(next));
    let (seen, _) = drain(&mut h, child, sub);
    assert!(
        !seen.iter().flatten().any(|s| s % 4 == u64::from(sub)),
        "still bridged: {seen:?}"
    );
    assert_eq!(h.dcm.stats().bridges_opened, h.dcm.bridges.opened);
}

#[test]
fn a_join_that_moves_a_child_between_peers_leaves_the_handover_to_its_old_parent() {
    // Joins re-plan the trees: a child moved from one peer parent to another while the old one
    // stays gets no origin bridge (its old parent feeds it until the new one delivers: the
    // engine's handover); a repair's moves still get one (the test above).
    let mut h = Harness::new();
    h.produce(0..10);
    let parents = |h: &Harness, id: u64| -> Vec<(u32, Source)> {
        h.dcm
            .planner
            .plan(PeerId(id))
            .map(|p| p.substreams.iter().map(|s| (s.index, s.parent)).collect())
            .unwrap_or_default()
    };
    let mut moves = 0;
    for id in 1..=60u64 {
        let before: Vec<Vec<(u32, Source)>> = (1..id).map(|p| parents(&h, p)).collect();
        // Uplinks from a tenth of the stream to ten times it.
        h.join(id, 100 + (id * 7919 % 60) as u32 * 170);
        for (p, old) in (1..id).zip(before) {
            for (sub, now) in parents(&h, p) {
                let was = old.iter().find(|(s, _)| *s == sub).map(|(_, src)| *src);
                if let (Some(Source::Peer { id: a }), Source::Peer { id: b }) = (was, now) {
                    if a != b {
                        moves += 1;
                        assert!(
                            !h.dcm.bridges.of(PeerId(p)).any(|b| b.substream == sub),
                            "peer {p}'s substream {sub} moved from {a} to {b} and was bridged"
                        );
                    }
                }
            }
        }
    }
    assert!(moves > 0, "no join moved a child between peer parents");
}

#[test]
fn with_max_bridges_zero_nothing_is_bridged_and_the_refusals_are_counted() {
    let mut h = Harness::with(DcmConfig {
        k: 4,
        origin_fanout: 1,
        max_bridges: 0,
        ..DcmConfig::flat("test", 400)
    });
    h.produce(0..10);
    for id in 1..=10 {
        h.join(id, 2000);
    }
    let relay = busiest_relay(&h, 10);
    h.handle(Event::Leave {
        peer: PeerId(relay),
    });
    let c = h.dcm.stats();
    assert_eq!(c.bridges_opened, 0);
    assert!(c.bridges_refused > 0);
    assert!(h.dcm.bridges.is_empty());
}

#[test]
fn a_child_that_cannot_reach_its_parent_is_re_homed_bridged_and_never_paired_with_it_again() {
    let mut h = Harness::new();
    h.produce(0..10);
    for id in 1..=12 {
        h.join(id, 2000);
    }
    h.pump();
    let relay = busiest_relay(&h, 12);
    let plan = h.dcm.planner.plan(PeerId(relay)).expect("plan").substreams;
    let (sub, child) = plan
        .iter()
        .find_map(|s| s.children.first().map(|c| (s.index, *c)))
        .expect("a child");
    for id in 1..=12 {
        h.latest_plan(id);
    }
    // The child's data channel with its parent never opens; it says so.
    h.handle(Event::LinkFailed {
        reporter: child,
        peer: PeerId(relay),
    });
    let new = h.latest_plan(child.0).expect("new instructions");
    let parent = new.iter().find(|s| s.index == sub).map(|s| s.parent);
    assert_ne!(parent, Some(Source::Peer { id: PeerId(relay) }));
    assert!(
        h.dcm.bridges.of(child).any(|b| b.substream == sub) || parent == Some(Source::Origin),
        "the origin bridges the moved substream until the new parent delivers"
    );
    assert_eq!(h.dcm.stats().link_failures, 1);
    assert_eq!(
        h.dcm.repair_log.back().map(|r| r.reason.as_str()),
        Some("unreachable pair")
    );
    // Joins, leaves and more reports never put them together again.
    for id in 13..=30 {
        h.join(id, [300, 2000, 4000][id as usize % 3]);
    }
    for id in [2u64, 5, 9] {
        if id != relay && PeerId(id) != child {
            h.handle(Event::Leave { peer: PeerId(id) });
        }
    }
    h.dcm.check_invariants().expect("invariants");
    let plan = h.dcm.planner.plan(child).expect("plan").substreams;
    assert!(plan
        .iter()
        .all(|s| s.parent != Source::Peer { id: PeerId(relay) }));
    let relay_plan = h.dcm.planner.plan(PeerId(relay)).expect("plan").substreams;
    assert!(relay_plan.iter().all(|s| !s.children.contains(&child)));
    // Reports naming unknown peers or the reporter itself change nothing.
    h.handle(Event::LinkFailed {
        reporter: child,
        peer: PeerId(999),
    });
    h.handle(Event::LinkFailed {
        reporter: child,
        peer: child,
    });
    assert_eq!(h.dcm.stats().link_failures, 1);
}

#[test]
fn a_peer_that_reports_every_link_as_failed_cuts_off_only_itself() {
    let mut h = Harness::new();
    h.produce(0..10);
    for id in 1..=20 {
        h.join(id, 2000);
    }
    h.pump();
    let liar = PeerId(20);
    let relays_before: Vec<u64> = (1..=19)
        .filter(|id| {
            h.dcm.planner.plan(PeerId(*id)).is_some_and(|p| {
                p.substreams
                    .iter()
                    .any(|s| s.children.iter().any(|c| *c != liar))
            })
        })
        .collect();
    assert!(relays_before.len() > 2, "{relays_before:?}");
    // It claims it could not reach anyone, twice over.
    for _ in 0..2 {
        for id in 1..=19 {
            h.handle(Event::LinkFailed {
                reporter: liar,
                peer: PeerId(id),
            });
        }
    }
    h.dcm.check_invariants().expect("invariants");
    // Its own plan: the origin, no peer.
    let own = h.dcm.planner.plan(liar).expect("plan").substreams;
    assert!(
        own.iter()
            .all(|s| s.parent == Source::Origin && s.children.is_empty()),
        "{own:?}"
    );
    // Every peer that relayed to others still does: the blocks are the liar's pairs only.
    for id in &relays_before {
        let p = h.dcm.planner.plan(PeerId(*id)).expect("plan").substreams;
        assert!(
            p.iter().any(|s| !s.children.is_empty()),
            "peer {id} relays to nobody any more: {p:?}"
        );
    }
    // And new viewers are placed under them as before.
    for id in 21..=30 {
        h.join(id, 2000);
    }
    h.pump();
    h.dcm.check_invariants().expect("invariants");
    let fed_by_peers = (21..=30)
        .filter(|id| {
            h.dcm.planner.plan(PeerId(*id)).is_some_and(|p| {
                p.substreams
                    .iter()
                    .any(|s| matches!(s.parent, Source::Peer { id } if id != liar))
            })
        })
        .count();
    assert!(
        fed_by_peers >= 5,
        "{fed_by_peers} of 10 new viewers fed by peers"
    );
}

#[test]
fn a_waypoint_that_dies_is_repaired_around_like_a_peer() {
    let mut h = Harness::new();
    h.produce(0..10);
    // The waypoint first, with the capacity of a server; then viewers that can carry little.
    h.join(1, 40_000);
    h.handle(Event::Waypoint { peer: PeerId(1) });
    for id in 2..=16 {
        h.join(id, 300);
    }
    h.pump();
    let children = |h: &Harness| -> usize {
        h.dcm
            .planner
            .plan(PeerId(1))
            .map_or(0, |p| children_of(&p.substreams))
    };
    assert!(
        children(&h) >= 8,
        "the waypoint feeds {} links",
        children(&h)
    );
    h.handle(Event::Leave { peer: PeerId(1) });
    h.pump();
    h.dcm.check_invariants().expect("invariants");
    for id in 2..=16 {
        let p = h.dcm.planner.plan(PeerId(id)).expect("plan").substreams;
        assert!(
            p.iter().all(|s| s.parent != Source::Peer { id: PeerId(1) }),
            "peer {id} still waits on the dead waypoint: {p:?}"
        );
    }
    assert!(h.dcm.repair_log.iter().any(|r| r.peer == PeerId(1)));
}

mod hostile_tests;
mod recovery_tests;

#[test]
fn a_flat_channel_is_re_planned_when_the_measured_stream_rate_moves_and_no_relay_is_left_over_capacity(
) {
    // Planned at 400 kbit/s (100 per substream); every peer offers 1000 (850 placed: 8 units).
    let mut h = Harness::new();
    for id in 1..=40 {
        h.join(id, 1000);
    }
    h.pump();
    let most = |h: &mut Harness| (1..=40).map(|id| busiest_relay_children(h, id)).max();
    let before = most(&mut h).unwrap_or(0);
    assert!(before > 2, "{before}");
    // A drift within 15 % changes nothing.
    h.dcm.handle(Event::StreamRate { kbps: 440 }, T0 + 1000);
    assert_eq!(h.dcm.stats().replans, 0);
    // The origin measures 1600 kbit/s (400 per substream: 850 carries 2 children).
    h.dcm.handle(Event::StreamRate { kbps: 1600 }, T0 + 2000);
    assert_eq!(h.dcm.stats().replans, 1);
    // Re-placed a few per tick.
    for i in 0..10 {
        h.dcm.handle_timeout(T0 + 3000 + i * 1000);
    }
    h.pump();
    h.dcm.check_invariants().unwrap();
    for id in 1..=40 {
        let n = busiest_relay_children(&mut h, id);
        assert!(n <= 2, "peer {id} still feeds {n} children in its tree");
    }
    // New joiners are planned at the new rate as well.
    h.join(41, 1000);
    h.pump();
    assert!(busiest_relay_children(&mut h, 41) <= 2);
}

/// Children of `id` in its busiest tree, from the DCM's planner.
fn busiest_relay_children(h: &mut Harness, id: u64) -> usize {
    h.dcm.planner.plan(PeerId(id)).map_or(0, |p| {
        p.substreams
            .iter()
            .map(|s| s.children.len())
            .max()
            .unwrap_or(0)
    })
}

#[test]
fn a_stream_of_long_fragments_is_planned_with_headroom() {
    // Planned at 400 kbit/s (100 per substream); every peer offers 1000 (850 placed: 8 units).
    let mut h = Harness::new();
    for id in 1..=40 {
        h.join(id, 1000);
    }
    h.pump();
    h.dcm.handle(Event::StreamRate { kbps: 400 }, T0 + 1000);
    assert_eq!(h.dcm.stats().replans, 0);
    // Two fragments 4 s apart, each handed over whole: the stream's fragments are long.
    let fragment = |first: u64, created_ms: u64| {
        Event::Packets(
            (first..first + 8)
                .map(|seq| {
                    let header = protocol::PacketHeader {
                        seq,
                        flags: 0,
                        created_ms,
                    };
                    (
                        seq,
                        Bytes::from(protocol::packet::encode(&header, &[1; 200])),
                    )
                })
                .collect(),
        )
    };
    h.handle(fragment(0, 10_000));
    h.handle(fragment(8, 14_000));
    // The same measured rate is now planned at 485 (121 per substream: 7 children at most, 700 of
    // the 1000 offered; at the rate itself it would be 8).
    h.dcm.handle(Event::StreamRate { kbps: 400 }, T0 + 2000);
    assert_eq!(h.dcm.stats().replans, 1);
    for i in 0..10 {
        h.dcm.handle_timeout(T0 + 3000 + i * 1000);
    }
    h.pump();
    h.dcm.check_invariants().unwrap();
    for id in 1..=40 {
        let n = busiest_relay_children(&mut h, id);
        assert!(n <= 7, "peer {id} feeds {n} children in its tree");
    }
}
