//! Delivery coordinator manager (FIG. 7) as a sans-IO state machine: one per channel, it owns
//! the channel's topology (a flat multi-tree or the three-tier hierarchy) and everything decided
//! from the peers' heartbeats. Joins, leaves, signaling, heartbeats and the origin's packets go
//! in as [`Event`]s with the time they happen; instructions, relayed signals, origin pushes and
//! records come out of [`Dcm::poll_output`]. Time only moves when the driver says so, so the same
//! code runs under the control server's tokio task and under the simulator's virtual clock.
//!
//! Use it as quinn-proto's `Connection` is used: after [`Dcm::handle`] or
//! [`Dcm::handle_timeout`], drain [`Dcm::poll_output`]; call [`Dcm::handle_timeout`] once
//! [`Dcm::poll_timeout`]'s time has come.
//!
//! The decisions themselves are made by pure parts: [`planner`] (placement), [`view`]
//! (the heartbeat view and congestion detection), [`history`] (per-peer records and capacity
//! caps), [`bridge`] (make-before-break repair), [`split`] (a page's upload shared with a
//! download). The DCM's own steps, one file each: `repair.rs` (heartbeats, congestion,
//! departures, silence and unreachable pairs), `instructions.rs` (telling peers, priming and
//! bridging), `recovery.rs` (restore after failover), `top_tier.rs` (re-choosing preferred
//! nodes, relay rounds), `origin.rs` (what the origin pushes to whom), `snapshot.rs` and
//! `invariants.rs`.

pub mod bridge;
pub mod event;
pub mod history;
pub mod hostile;
mod instructions;
mod invariants;
mod origin;
pub mod planner;
pub mod plausible;
mod production;
mod recovery;
mod repair;
pub mod snapshot;
pub mod split;
mod top_tier;
pub mod view;

use std::collections::VecDeque;

use protocol::{ErrorCode, PeerId, ServerMsg, Signal};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::topology::region::Region;
use crate::topology::MultiTreeConfig;
use bridge::Bridges;
pub use event::{Adopted, DcmConfig, DcmStats, Event, OutMsg, Output, RelayRound};
use history::PeerRecords;
use planner::{Planner, Push};
pub use snapshot::{
    link_lagging, Census, CensusPeer, CongestionRecord, HeartbeatCounters, PeerView, RepairRecord,
    TopologySnapshot,
};
use view::{CongestionConfig, CongestionDetector, HeartbeatView, ProductionLog};

#[derive(Debug, Clone, Copy)]
struct PeerEntry {
    upload_kbps: u32,
    region: Region,
    relay: bool,
    /// Its NAT class as it reported it (`None`: not reported).
    connectivity: Option<protocol::Connectivity>,
    /// A waypoint server ([`Event::Waypoint`]).
    waypoint: bool,
}

const LOG_KEEP: usize = 1000;

/// How often a hierarchical channel's top tier is re-chosen from the peers' records.
const REEVALUATE_MS: u64 = 10_000;

/// How far (a fraction) the measured stream rate may drift from the rate flat trees were
/// planned at before they are re-planned.
const REPLAN_CHANGE: f64 = 0.15;

/// Headroom for long fragments (numerator, denominator): flat trees of a stream whose fragments
/// are spread (see `production.rs`) are planned at this multiple of its measured rate, so that a
/// forwarder's uplink is filled to 70 % of what it offers at most (17/14 with the 85 % of
/// [`placement_kbps`]: 0.85 × 14/17 = 0.7). A fragment arrives whole and the viewer's playout lag
/// (two fragments) leaves one fragment's duration for it to come down the trees: a forwarder
/// filled to its cap takes all of that for one hop (4 s fragments at 1.5 times the rate: stalls
/// at every few boundaries), one filled to two thirds takes two thirds of it, less its
/// one-second token burst. The margin of [`placement_kbps`] is part of this one, not added to
/// it: planned at 1.5 times the rate on top of it, a peer offering
/// 1.5 times the stream fed 3 children a tree instead of 4, its uplink half idle, and the origin
/// fed 3 copies of the stream to 12 viewers instead of about one (issue 14).
const LONG_FRAGMENT_HEADROOM: (u32, u32) = (17, 14);

/// Peers re-placed per tick after the stream rate changed: the moves are spread over a few
/// seconds rather than every child of the channel changing parent at once.
const REPLAN_PER_TICK: usize = 32;

/// How often spare peers are offered to other channels and short regions recruit relays.
const RELAY_ROUND_MS: u64 = 3_000;

/// Capacity a peer is placed with: 85 % of what it offers. The stream's rate is an average and
/// fragments vary around it; a forwarder filled to its exact cap would fall behind on every
/// large fragment.
fn placement_kbps(upload_kbps: u32) -> u32 {
    (u64::from(upload_kbps) * 85 / 100) as u32
}

/// State of one DCM.
pub struct Dcm {
    name: String,
    k: u32,
    heartbeat_ms: u64,
    stream_kbps: u32,
    /// The rate flat trees are planned at (the measured one once it moved far enough).
    planned_kbps: u32,
    /// Peers to re-place after the stream rate changed, a few per tick.
    replan_queue: VecDeque<PeerId>,
    planner: Planner,
    /// Peers the origin pushes to, and what (kept from the plans sent, so a packet costs a scan
    /// of the origin's direct children only).
    origin_fed: FxHashMap<PeerId, Vec<Push>>,
    /// Substreams the origin pushes to children whose new peer parent is still connecting
    /// (make-before-break repair, see [`bridge`]).
    bridges: Bridges,
    /// The origin's side: the newest packet of each substream, parity coders.
    origin: origin::OriginPush,
    peers: FxHashMap<PeerId, PeerEntry>,
    epoch: u64,
    view: HeartbeatView,
    detector: CongestionDetector,
    production: ProductionLog,
    history: PeerRecords,
    /// Per child: (parent, substream, since when), server ms. Keyed by child so that updating
    /// one peer's links costs O(k), not a scan of every link of the channel.
    link_since: FxHashMap<PeerId, Vec<(PeerId, u32, u64)>>,
    congestion_log: VecDeque<CongestionRecord>,
    repair_log: VecDeque<RepairRecord>,
    /// When a child was last moved because of its own complaint (rate limit on moves).
    last_moved: FxHashMap<PeerId, u64>,
    /// Set while a DCM that took over collects one round of heartbeats (server ms deadline).
    recovering_until: Option<u64>,
    /// While peers resume one by one after a failover across servers: the recovery window
    /// stretches with each resume, but never past this.
    recovery_deadline: Option<u64>,
    /// Joins that arrived while recovering, placed once the topology is rebuilt.
    deferred_joins: Vec<Event>,
    /// When the periodic work last ran (server ms); `None` before the first tick.
    last_tick: Option<u64>,
    /// When the top tier was last re-evaluated from the peers' records (server ms).
    last_reevaluation: u64,
    /// When spare peers were last offered to other channels (server ms).
    last_relay_round: u64,
    /// Live sessions sharing their page's upload with a download, and how.
    splits: FxHashMap<PeerId, split::UploadSplit>,
    /// Peers sent every live-edge notice: new or re-planned ones until a heartbeat shows them
    /// fed, and those whose last heartbeat showed them behind. The others, fed by their
    /// parents, learn of new packets from the packets themselves and get one notice in
    /// [`EDGE_ALL_EVERY`] only (in turns), which spares most of a message per peer per fragment.
    edge_every: FxHashSet<PeerId>,
    /// Live-edge notices sent so far.
    edges: u64,
    /// Peers offered to other channels as relays in the last relay round.
    offered: FxHashSet<PeerId>,
    /// Work yielded a slice at a time (see [`Dcm::poll_output`]): with tens of thousands of
    /// peers a snapshot or a live-edge notice to a quarter of them takes tens of ms, and
    /// heartbeats queued behind it would wait that long.
    background: VecDeque<Background>,
    /// Outputs ready now, in order.
    outputs: VecDeque<Output>,
    /// A repair (a departed, silent, congested or unreachable parent) was logged since the last
    /// instructions went out: their moves are bridged by the origin. Other re-plans (joins,
    /// re-evaluations) leave the old peer parent alive, which hands the child over itself.
    repairing: bool,
    stats: DcmStats,
    /// Forgery reports, per accused and per reporter ([`hostile`]).
    reports: hostile::Reports,
    /// The origin's last signed manifests, for joiners; empty on an unsigned channel.
    manifests: VecDeque<bytes::Bytes>,
    /// The check of heartbeats' claims (see [`plausible`]).
    plausible: plausible::Plausibility,
}

/// Manifests a joiner is sent: those of the packets it may still get from peers (it starts a
/// fragment or two behind the live edge, and fetches what is older from the origin).
const JOIN_MANIFESTS: usize = 8;

/// A fed peer gets one live-edge notice in this many (see `Dcm::edge_every`).
const EDGE_ALL_EVERY: u64 = 4;

enum Background {
    /// A live-edge notice (or a signed manifest) still to be sent to `ids[next..]`.
    Edge {
        msg: OutMsg,
        ids: Vec<PeerId>,
        next: usize,
    },
    /// A topology snapshot being assembled (peers that leave meanwhile are skipped).
    Snapshot {
        token: u64,
        ids: Vec<PeerId>,
        views: Vec<PeerView>,
        next: usize,
        now: u64,
    },
}

impl Dcm {
    pub fn new(cfg: DcmConfig, _now: u64) -> Self {
        let k = cfg.k.max(1);
        let stream_kbps = cfg.stream_kbps.max(1);
        Dcm {
            name: cfg.channel,
            k,
            heartbeat_ms: cfg.heartbeat_ms.max(1),
            stream_kbps,
            planned_kbps: stream_kbps,
            replan_queue: VecDeque::new(),
            planner: match cfg.topology {
                Some(topo) => Planner::tiered(topo, stream_kbps, cfg.max_fanout, cfg.cluster_max),
                None => Planner::flat(MultiTreeConfig {
                    k,
                    stream_kbps,
                    origin_fanout: cfg.origin_fanout,
                    max_fanout: cfg.max_fanout,
                }),
            },
            origin_fed: FxHashMap::default(),
            bridges: Bridges::new(cfg.max_bridges),
            origin: origin::OriginPush::new(k),
            peers: FxHashMap::default(),
            epoch: 0,
            view: HeartbeatView::with_quiet_threshold(CongestionConfig::default().dead_grace_ms),
            detector: CongestionDetector::new(CongestionConfig::default()),
            production: ProductionLog::default(),
            history: PeerRecords::default(),
            link_since: FxHashMap::default(),
            congestion_log: VecDeque::new(),
            repair_log: VecDeque::new(),
            last_moved: FxHashMap::default(),
            recovering_until: None,
            recovery_deadline: None,
            deferred_joins: Vec::new(),
            last_tick: None,
            last_reevaluation: 0,
            last_relay_round: 0,
            splits: FxHashMap::default(),
            edge_every: FxHashSet::default(),
            edges: 0,
            offered: FxHashSet::default(),
            background: VecDeque::new(),
            outputs: VecDeque::new(),
            repairing: false,
            stats: DcmStats::default(),
            reports: hostile::Reports::default(),
            manifests: VecDeque::new(),
            plausible: plausible::Plausibility::default(),
        }
    }

    /// A DCM taking over from one that failed (the resource service locator rebound its logical
    /// id). It adopts the sessions and the origin's push list as they were (so roots keep
    /// receiving), sends nothing, and collects heartbeats for `1.5` intervals; the first
    /// [`Dcm::handle_timeout`] after that rebuilds the topology from the links the heartbeats
    /// report, keeping every consistent one, so viewers notice nothing.
    pub fn take_over(
        cfg: DcmConfig,
        adopted: &[Adopted],
        origin_fed: std::collections::HashMap<PeerId, Vec<Push>>,
        epoch: u64,
        now: u64,
    ) -> Self {
        let mut dcm = Dcm::new(cfg, now);
        for a in adopted {
            dcm.peers.insert(
                a.peer,
                PeerEntry {
                    upload_kbps: a.upload_kbps,
                    region: a.region,
                    relay: a.relay,
                    connectivity: a.connectivity,
                    waypoint: a.waypoint,
                },
            );
            dcm.planner.set_connectivity(a.peer, a.connectivity);
            dcm.history.joined(a.peer, a.upload_kbps, now);
        }
        dcm.origin_fed = origin_fed.into_iter().collect();
        dcm.epoch = epoch;
        dcm.recovering_until = Some(now + dcm.heartbeat_ms * 3 / 2);
        tracing::warn!(channel = %dcm.name, peers = dcm.peers.len(), "DCM taking over; rebuilding the topology from heartbeats");
        dcm
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn substreams(&self) -> u32 {
        self.k
    }

    /// The epoch of the newest instructions.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Peers the DCM steers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Whether `peer` is one of the peers the DCM steers.
    pub fn has_peer(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// The origin's pushes under the current plans: (full streams, data substreams, parity
    /// shards), bridges not included.
    pub fn origin_push_counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for push in self.origin_fed.values().flatten() {
            match push {
                Push::Full => counts.0 += 1,
                Push::Data { .. } => counts.1 += 1,
                Push::Parity { .. } => counts.2 += 1,
            }
        }
        counts
    }

    /// The hierarchy's summary (tiers, depths, root feeds); `None` for a flat channel.
    pub fn hierarchy_report(&self) -> Option<crate::topology::hierarchy::HierarchyReport> {
        self.planner.hierarchy_report()
    }

    pub fn stats(&self) -> DcmStats {
        DcmStats {
            heartbeats_refused: self.plausible.refused,
            ..self.stats
        }
    }

    /// Whether this DCM is still collecting heartbeats after taking over.
    pub fn recovering(&self) -> bool {
        self.recovering_until.is_some()
    }

    /// The next output, if any. Outputs of the events handled so far come first, in order; then
    /// background work (live-edge notices to many peers, snapshots) is produced a slice at a
    /// time, so a driver that handles events between outputs keeps heartbeats from waiting
    /// behind it. [`Dcm::has_background`] tells whether such work remains.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(o) = self.outputs.pop_front() {
            return Some(o);
        }
        while self.outputs.is_empty() && !self.background.is_empty() {
            self.background_slice(BACKGROUND_SLICE);
        }
        self.outputs.pop_front()
    }

    /// Whether outputs are ready without doing background work.
    pub fn has_ready_output(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// Whether background work remains (so a driver may handle queued events first).
    pub fn has_background(&self) -> bool {
        !self.background.is_empty()
    }

    /// When [`Dcm::handle_timeout`] is due next (server ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        let interval = self.heartbeat_ms.max(100);
        Some(match (self.recovering_until, self.last_tick) {
            (Some(until), _) => until,
            (None, Some(t)) => t + interval,
            (None, None) => 0,
        })
    }

    /// Handles one event that happened at `now` (server ms).
    pub fn handle(&mut self, ev: Event, now: u64) {
        match ev {
            Event::Join {
                peer,
                upload_kbps,
                region,
                relay,
                connectivity,
            } => {
                if self.recovering() {
                    self.deferred_joins.push(Event::Join {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                        connectivity,
                    });
                    return;
                }
                self.planner.set_connectivity(peer, connectivity);
                self.join(peer, upload_kbps, region, relay, now);
                self.note_connectivity(peer, connectivity);
            }
            Event::Resume {
                peer,
                upload_kbps,
                region,
                relay,
                connectivity,
            } => {
                self.planner.set_connectivity(peer, connectivity);
                self.resume(peer, upload_kbps, region, relay, now);
                self.note_connectivity(peer, connectivity);
            }
            Event::Reconnect { peer } => self.reconnect(peer, now),
            Event::Waypoint { peer } => {
                if let Some(e) = self.peers.get_mut(&peer) {
                    e.waypoint = true;
                }
            }
            Event::Connectivity { peer, connectivity } => {
                if self.peers.contains_key(&peer) {
                    self.note_connectivity(peer, Some(connectivity));
                    let changes = self.planner.set_connectivity(peer, Some(connectivity));
                    if !self.recovering() {
                        self.send_instructions(changes.affected, now);
                    }
                }
            }
            Event::Leave { peer } => self.remove_peer(peer, "left", now),
            Event::Signal { from, to, signal } => self.relay_signal(from, to, signal),
            Event::Heartbeat {
                peer,
                heartbeat,
                arrived_ms,
            } => self.on_heartbeat_at(peer, *heartbeat, arrived_ms.min(now), now),
            Event::LinkFailed { reporter, peer } => self.link_failed(reporter, peer, now),
            Event::Packets(packets) => self.push_from_origin(packets),
            Event::Manifest(frame) => self.broadcast_manifest(frame),
            Event::ForgeryReport {
                reporter,
                accused,
                seq,
                evidence,
            } => {
                self.forgery_report(reporter, accused, seq, evidence, now);
            }
            Event::EndSplit { peer } => {
                self.history.set_ceiling(peer, None);
                self.splits.remove(&peer);
            }
            Event::StreamRate { kbps } => self.on_stream_rate(kbps),
            Event::Snapshot { token } => {
                let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
                ids.sort();
                self.background.push_back(Background::Snapshot {
                    token,
                    ids,
                    views: Vec::new(),
                    next: 0,
                    now,
                });
            }
        }
    }

    /// Records the NAT class `peer` reported, for the operator's view and the class counts.
    fn note_connectivity(&mut self, peer: PeerId, connectivity: Option<protocol::Connectivity>) {
        if let Some(e) = self.peers.get_mut(&peer) {
            if connectivity.is_some() {
                e.connectivity = connectivity;
            }
        }
    }

    /// A peer becomes one of this DCM's: its record, its history and plausibility checks start
    /// now, and it gets the manifests of the packets it may still get from peers.
    fn admit(&mut self, peer: PeerId, upload_kbps: u32, region: Region, relay: bool, now: u64) {
        self.peers.insert(
            peer,
            PeerEntry {
                upload_kbps,
                region,
                relay,
                connectivity: None,
                waypoint: false,
            },
        );
        self.history.joined(peer, upload_kbps, now);
        self.send_manifests_to(peer);
        self.plausible.joined(peer, now);
    }

    fn join(&mut self, peer: PeerId, upload_kbps: u32, region: Region, relay: bool, now: u64) {
        self.admit(peer, upload_kbps, region, relay, now);
        let changes = if relay {
            self.planner
                .join_relay(peer, region, placement_kbps(upload_kbps))
        } else {
            self.planner.join(
                peer,
                region,
                placement_kbps(upload_kbps),
                self.ranking(peer, now),
            )
        };
        tracing::debug!(channel = %self.name, %peer, upload_kbps, affected = changes.affected.len(), "peer joined");
        self.send_instructions(changes.affected, now);
    }

    /// A peer's record as the hierarchy ranks it for the top and middle tiers (issue 4, 3):
    /// uptime and a delivered share lowered by each congestion event on its links.
    fn ranking(&self, peer: PeerId, now: u64) -> crate::topology::mesh::History {
        crate::topology::mesh::History {
            uptime_s: (self.history.age_ms(peer, now).unwrap_or(0) / 1000) as u32,
            delivered_permille: 1000u32
                .saturating_sub(self.history.congestion_events(peer).saturating_mul(100))
                as u16,
            // Not the measured upload: a peer uploads only what it is asked to, and the DCM's own
            // history already caps a congested peer (and lets it recover, with hysteresis).
            measured_upload_kbps: 0,
        }
    }

    /// Does up to `budget` peers' worth of the oldest background job.
    fn background_slice(&mut self, budget: usize) {
        let Some(job) = self.background.pop_front() else {
            return;
        };
        match job {
            Background::Edge { msg, ids, mut next } => {
                let end = ids.len().min(next.saturating_add(budget));
                for id in &ids[next..end] {
                    if self.peers.contains_key(id) {
                        match msg {
                            OutMsg::Packet(_) => self.stats.manifests_sent += 1,
                            _ => self.stats.edge_notices += 1,
                        }
                        self.outputs.push_back(Output::Send {
                            peer: *id,
                            msg: msg.clone(),
                        });
                    }
                }
                next = end;
                if next < ids.len() {
                    self.background
                        .push_front(Background::Edge { msg, ids, next });
                }
            }
            Background::Snapshot {
                token,
                ids,
                mut views,
                mut next,
                now,
            } => {
                let end = ids.len().min(next.saturating_add(budget));
                views.extend(
                    ids[next..end]
                        .iter()
                        .filter_map(|id| self.peer_view(*id, now)),
                );
                next = end;
                if next < ids.len() {
                    self.background.push_front(Background::Snapshot {
                        token,
                        ids,
                        views,
                        next,
                        now,
                    });
                } else {
                    let snapshot = Box::new(self.snapshot_of(views));
                    self.outputs.push_back(Output::Snapshot { token, snapshot });
                }
            }
        }
    }

    /// Splits a live session's page upload with a download of the same page: live keeps what
    /// it needs ([`split::split_upload`]). The live peer's fan-out is lowered in place to its
    /// share, so none of its children moves (a repair would cost them a fallback burst) and it
    /// is given no new ones beyond its share. On a hierarchy the share applies from the peer's
    /// next placement on. `None` if `peer` is not one of this DCM's peers.
    pub fn split_upload(
        &mut self,
        peer: PeerId,
        capacity_kbps: u32,
        file_rate_kbps: u32,
    ) -> Option<split::UploadSplit> {
        if !self.peers.contains_key(&peer) {
            return None;
        }
        let stream_kbps = self.stream_kbps;
        let used = self.planner.plan(peer).map_or(0, |w| {
            split::planned_upload_kbps(&w.substreams, stream_kbps, self.k)
        });
        let s = split::split_upload(capacity_kbps, stream_kbps, used, file_rate_kbps);
        self.history.set_ceiling(peer, Some(s.live_kbps));
        let kbps = self.history.effective_kbps(peer).unwrap_or(s.live_kbps);
        // Never below what its current children take (the share covers them by construction;
        // the placement margin may not): it keeps them, and gets no new ones beyond its share.
        let lowered = self
            .planner
            .lower_capacity(peer, placement_kbps(kbps).max(used));
        tracing::info!(channel = %self.name, %peer, capacity_kbps, live_kbps = s.live_kbps, file_kbps = s.file_kbps, lowered, "upload split with a download");
        self.splits.insert(peer, s);
        Some(s)
    }

    /// The periodic work, once per heartbeat interval (see [`Dcm::poll_timeout`]): a DCM that
    /// took over rebuilds the topology once its round of heartbeats is in; peers gone silent
    /// are removed, recovered peers regain capacity, and on a hierarchy the top tier and the
    /// relays are re-evaluated.
    pub fn handle_timeout(&mut self, now: u64) {
        if let Some(until) = self.recovering_until {
            if now >= until {
                self.finish_recovery(now);
                self.last_tick = Some(now);
            }
            return;
        }
        self.last_tick = Some(now);
        self.bridges.expire(now);
        if !self.replan_queue.is_empty() {
            self.replan_some(now);
        }
        // Three intervals, but never less than a few seconds: with short intervals a busy server
        // (or a busy peer) must not cut off viewers whose heartbeats are merely late.
        let timeout = (self.heartbeat_ms * 3).max(3000) + 1000;
        let mut silent = self.view.silent_since(now, timeout);
        // Peers that never sent a heartbeat at all are judged from their join time.
        silent.extend(
            self.peers
                .keys()
                .filter(|p| self.view.get(**p).is_none())
                .filter(|p| {
                    self.history
                        .age_ms(**p, now)
                        .is_some_and(|a| a > timeout + 2000)
                })
                .copied(),
        );
        for peer in silent {
            if self.peers.contains_key(&peer) {
                self.remove_peer(peer, "silent", now);
                self.outputs.push_back(Output::Close {
                    peer,
                    reason: "heartbeats stopped".into(),
                });
            }
        }
        for (peer, kbps) in self.history.recovered(now) {
            if self.peers.contains_key(&peer) {
                let ranking = self.ranking(peer, now);
                let changes = self.planner.rejoin(peer, placement_kbps(kbps), ranking);
                self.send_instructions(changes.affected, now);
            }
        }
        if self.planner.is_tiered() {
            // Both scan every peer's plan: every few seconds is enough for capacity that
            // changes with joins and leaves, and keeps heartbeats from queueing behind them.
            if now.saturating_sub(self.last_relay_round) >= RELAY_ROUND_MS {
                self.last_relay_round = now;
                self.relay_round();
            }
            if now.saturating_sub(self.last_reevaluation) >= REEVALUATE_MS {
                self.last_reevaluation = now;
                self.reevaluate_preferred(now);
            }
        }
    }

    /// The origin measured the stream at `kbps`. A flat channel's trees were planned at the
    /// rate known when the DCM started (an ingest channel's is a guess until its publisher has
    /// sent a few seconds): when the measured rate (with [`LONG_FRAGMENT_HEADROOM`] for long
    /// fragments) moves more than [`REPLAN_CHANGE`] away from the planned one, joins are planned
    /// at the new rate, and peers that now carry more children than their upload allows are
    /// re-placed, [`REPLAN_PER_TICK`] per tick.
    fn on_stream_rate(&mut self, kbps: u32) {
        let kbps = kbps.max(1);
        self.stream_kbps = kbps;
        let kbps = if self.production.current_spread() > 0 {
            let (num, den) = LONG_FRAGMENT_HEADROOM;
            kbps.saturating_mul(num) / den
        } else {
            kbps
        };
        let planned = self.planned_kbps;
        let off = f64::from(kbps.abs_diff(planned)) / f64::from(planned.max(1));
        if off <= REPLAN_CHANGE || !self.planner.set_stream_kbps(kbps) {
            return;
        }
        tracing::info!(channel = %self.name, planned, measured = kbps, "stream rate changed: re-planning");
        self.planned_kbps = kbps;
        self.stats.replans += 1;
        let mut over: Vec<PeerId> = self
            .peers
            .keys()
            .copied()
            .filter(|p| {
                let kbps = self.history.effective_kbps(*p).unwrap_or(0);
                self.planner.over_capacity(*p, placement_kbps(kbps)) == Some(true)
            })
            .collect();
        over.sort();
        self.replan_queue = over.into();
    }

    /// Re-places up to [`REPLAN_PER_TICK`] peers queued by [`Dcm::on_stream_rate`].
    fn replan_some(&mut self, now: u64) {
        let mut affected = std::collections::BTreeSet::new();
        for _ in 0..REPLAN_PER_TICK {
            let Some(peer) = self.replan_queue.pop_front() else {
                break;
            };
            if !self.peers.contains_key(&peer) {
                continue;
            }
            let kbps = self.history.effective_kbps(peer).unwrap_or(0);
            let ranking = self.ranking(peer, now);
            let changes = self.planner.rejoin(peer, placement_kbps(kbps), ranking);
            self.log_repair(peer, "stream rate changed", changes.affected.len(), now);
            affected.extend(changes.affected);
        }
        self.send_instructions(affected, now);
    }

    fn send(&mut self, peer: PeerId, msg: OutMsg) {
        if self.peers.contains_key(&peer) {
            self.outputs.push_back(Output::Send { peer, msg });
        }
    }

    fn linked(&self, a: PeerId, b: PeerId) -> bool {
        self.planner.plan(a).is_some_and(|plan| plan.links_to(b))
            || self.planner.plan(b).is_some_and(|plan| plan.links_to(a))
    }

    fn relay_signal(&mut self, from: PeerId, to: PeerId, signal: Signal) {
        // While recovering the DCM does not know the links yet; peers finishing a connection
        // their old instructions asked for must not be cut off.
        let allowed = self.recovering() || self.linked(from, to);
        if !self.peers.contains_key(&to) || !allowed {
            self.send(
                from,
                OutMsg::Msg(Box::new(ServerMsg::Error {
                    code: ErrorCode::NotLinked,
                    message: format!("{to} is not linked with {from}; signaling refused"),
                })),
            );
            return;
        }
        self.send(
            to,
            OutMsg::Msg(Box::new(ServerMsg::Signal { from, signal })),
        );
    }
}

/// Peers handled per slice of background work (a few ms).
const BACKGROUND_SLICE: usize = 1000;

#[cfg(test)]
mod tests;
