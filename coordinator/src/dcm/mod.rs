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
//! download); [`origin`](self::origin) holds what the origin pushes to whom.

pub mod bridge;
pub mod event;
pub mod history;
mod invariants;
mod origin;
pub mod planner;
pub mod snapshot;
pub mod split;
pub mod view;

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;
use protocol::{ErrorCode, Heartbeat, PeerId, ServerMsg, Signal, Source};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::topology::multitree::ObservedPeer;
use crate::topology::region::Region;
use crate::topology::MultiTreeConfig;
use bridge::Bridges;
pub use event::{Adopted, DcmConfig, DcmStats, Event, OutMsg, Output, RelayRound};
use history::History;
use planner::{Planner, Push};
pub use snapshot::{CongestionRecord, PeerView, RepairRecord, TopologySnapshot};
use view::{CongestionConfig, CongestionDetector, HeartbeatView, ProductionLog};

struct PeerEntry {
    upload_kbps: u32,
    region: Region,
    relay: bool,
}

const LOG_KEEP: usize = 1000;

/// How often a hierarchical channel's top tier is re-chosen from the peers' records.
const REEVALUATE_MS: u64 = 10_000;

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
    history: History,
    /// Per child: (parent, substream, since when), server ms. Keyed by child so that updating
    /// one peer's links costs O(k), not a scan of every link of the channel.
    link_since: FxHashMap<PeerId, Vec<(PeerId, u32, u64)>>,
    congestion_log: VecDeque<CongestionRecord>,
    repair_log: VecDeque<RepairRecord>,
    /// When a child was last moved because of its own complaint (rate limit on moves).
    last_moved: FxHashMap<PeerId, u64>,
    /// Set while a DCM that took over collects one round of heartbeats (server ms deadline).
    recovering_until: Option<u64>,
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
    stats: DcmStats,
}

/// A fed peer gets one live-edge notice in this many (see `Dcm::edge_every`).
const EDGE_ALL_EVERY: u64 = 4;

enum Background {
    /// A live-edge notice still to be sent to `ids[next..]`.
    Edge {
        text: std::sync::Arc<str>,
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
            view: HeartbeatView::default(),
            detector: CongestionDetector::new(CongestionConfig::default()),
            production: ProductionLog::default(),
            history: History::default(),
            link_since: FxHashMap::default(),
            congestion_log: VecDeque::new(),
            repair_log: VecDeque::new(),
            last_moved: FxHashMap::default(),
            recovering_until: None,
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
            stats: DcmStats::default(),
        }
    }

    /// A DCM taking over from one that failed (the resource service locator rebound its logical
    /// id). It adopts the sessions and the origin's push list as they were (so roots keep
    /// receiving), sends nothing, and collects heartbeats for `1.5` intervals; then
    /// [`Dcm::finish_recovery`] rebuilds the topology from the links the heartbeats report,
    /// keeping every consistent one, so viewers notice nothing.
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
                },
            );
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

    pub fn stats(&self) -> DcmStats {
        self.stats
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
            } => {
                if self.recovering() {
                    self.deferred_joins.push(Event::Join {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                    });
                    return;
                }
                self.join(peer, upload_kbps, region, relay, now);
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
            Event::EndSplit { peer } => {
                self.history.set_ceiling(peer, None);
                self.splits.remove(&peer);
            }
            Event::StreamRate { kbps } => self.stream_kbps = kbps.max(1),
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

    fn join(&mut self, peer: PeerId, upload_kbps: u32, region: Region, relay: bool, now: u64) {
        self.peers.insert(
            peer,
            PeerEntry {
                upload_kbps,
                region,
                relay,
            },
        );
        self.history.joined(peer, upload_kbps, now);
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

    /// `reporter` could not open a data channel with `peer`: the planner blocks the pair and
    /// re-places a child of theirs; the moved child is bridged by the origin as after any move.
    fn link_failed(&mut self, reporter: PeerId, peer: PeerId, now: u64) {
        if reporter == peer
            || !self.peers.contains_key(&reporter)
            || !self.peers.contains_key(&peer)
        {
            return;
        }
        self.stats.link_failures += 1;
        let changes = self.planner.block(reporter, peer);
        tracing::debug!(channel = %self.name, %reporter, %peer, affected = changes.affected.len(), "data channel never opened; pair blocked");
        if !changes.affected.is_empty() {
            self.log_repair(reporter, "unreachable pair", changes.affected.len(), now);
        }
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

    /// Rebuilds the topology from the heartbeats received since taking over. Peers whose
    /// reported links are all consistent get no message; the others are placed and told.
    fn finish_recovery(&mut self, now: u64) {
        if self.recovering_until.take().is_none() {
            return;
        }
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort();
        let changes = match &mut self.planner {
            Planner::Flat(tree) => {
                let observed: Vec<ObservedPeer> = ids
                    .iter()
                    .filter_map(|p| {
                        let state = self.view.get(*p)?;
                        let declared = self.peers.get(p).map_or(0, |e| e.upload_kbps);
                        Some(ObservedPeer {
                            peer: *p,
                            upload_kbps: placement_kbps(
                                self.history.effective_kbps(*p).unwrap_or(declared),
                            ),
                            parents: state
                                .heartbeat
                                .parents
                                .iter()
                                .map(|l| (l.substream, l.parent))
                                .collect(),
                        })
                    })
                    .collect();
                let (restored, mut changes) =
                    crate::topology::MultiTree::restore(*tree.config(), &observed);
                *tree = restored;
                // Sessions that sent no heartbeat in time are placed like joiners.
                for p in &ids {
                    if self.view.get(*p).is_none() {
                        let declared = self.peers.get(p).map_or(0, |e| e.upload_kbps);
                        changes
                            .affected
                            .extend(tree.join(*p, placement_kbps(declared)).affected);
                    }
                }
                changes
            }
            Planner::Tiered(_) => {
                // The hierarchy is re-placed from scratch (restoring it link by link is future
                // work): every peer gets new instructions.
                let mut changes = crate::topology::Changes::default();
                for p in &ids {
                    let Some(e) = self.peers.get(p) else {
                        continue;
                    };
                    let (region, kbps, relay) = (e.region, placement_kbps(e.upload_kbps), e.relay);
                    let placed = if relay {
                        self.planner.join_relay(*p, region, kbps)
                    } else {
                        let ranking = self.ranking(*p, now);
                        self.planner.join(*p, region, kbps, ranking)
                    };
                    changes.affected.extend(placed.affected);
                }
                changes
            }
        };
        // Links kept count as created now: they are judged only after the settle time.
        self.link_since.clear();
        let before = std::mem::take(&mut self.origin_fed);
        self.bridges.clear();
        for p in &ids {
            if let Some(wire) = self.planner.plan(*p) {
                let pushes = wire.origin_pushes(self.k);
                if !pushes.is_empty() {
                    self.origin_fed.insert(*p, pushes);
                }
                let links: Vec<(PeerId, u32, u64)> = wire
                    .substreams
                    .iter()
                    .filter_map(|sp| match sp.parent {
                        Source::Peer { id } => Some((id, sp.index, now)),
                        Source::Origin => None,
                    })
                    .collect();
                if !links.is_empty() {
                    self.link_since.insert(*p, links);
                }
            }
        }
        // Tell the driver what the origin pushes now, where it changed.
        for (peer, pushes) in &self.origin_fed {
            if before.get(peer) != Some(pushes) {
                self.outputs.push_back(Output::OriginFed {
                    peer: *peer,
                    pushes: pushes.clone(),
                    epoch: self.epoch,
                });
            }
        }
        for peer in before.keys() {
            if !self.origin_fed.contains_key(peer) {
                self.outputs.push_back(Output::OriginFed {
                    peer: *peer,
                    pushes: Vec::new(),
                    epoch: self.epoch,
                });
            }
        }
        tracing::info!(channel = %self.name, peers = ids.len(), instructed = changes.affected.len(), "DCM took over: topology rebuilt from heartbeats");
        self.send_instructions(changes.affected, now);
        for ev in std::mem::take(&mut self.deferred_joins) {
            self.handle(ev, now);
        }
    }

    /// Does up to `budget` peers' worth of the oldest background job.
    fn background_slice(&mut self, budget: usize) {
        let Some(job) = self.background.pop_front() else {
            return;
        };
        match job {
            Background::Edge {
                text,
                ids,
                mut next,
            } => {
                let end = ids.len().min(next.saturating_add(budget));
                for id in &ids[next..end] {
                    if self.peers.contains_key(id) {
                        self.stats.edge_notices += 1;
                        self.outputs.push_back(Output::Send {
                            peer: *id,
                            msg: OutMsg::Text(text.clone()),
                        });
                    }
                }
                next = end;
                if next < ids.len() {
                    self.background
                        .push_front(Background::Edge { text, ids, next });
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

    fn remove_peer(&mut self, peer: PeerId, reason: &str, now: u64) {
        self.deferred_joins
            .retain(|e| !matches!(e, Event::Join { peer: p, .. } if *p == peer));
        if self.peers.remove(&peer).is_none() {
            return;
        }
        self.view.remove(peer);
        self.detector.forget_peer(peer);
        self.edge_every.remove(&peer);
        self.offered.remove(&peer);
        self.history.left(peer);
        self.splits.remove(&peer);
        self.last_moved.remove(&peer);
        // Links where it was the parent are rewritten when its children get new instructions.
        self.link_since.remove(&peer);
        if self.origin_fed.remove(&peer).is_some() {
            self.outputs.push_back(Output::OriginFed {
                peer,
                pushes: Vec::new(),
                epoch: self.epoch,
            });
        }
        self.bridges.remove(peer);
        let changes = self.planner.leave(peer);
        tracing::debug!(channel = %self.name, %peer, reason, affected = changes.affected.len(), "peer removed");
        if !changes.affected.is_empty() {
            self.log_repair(peer, reason, changes.affected.len(), now);
        }
        self.send_instructions(changes.affected, now);
    }

    fn log_repair(&mut self, peer: PeerId, reason: &str, affected: usize, now: u64) {
        self.stats.repairs += 1;
        self.repair_log.push_back(RepairRecord {
            at_ms: now,
            reason: reason.to_string(),
            peer,
            affected,
        });
        while self.repair_log.len() > LOG_KEEP {
            self.repair_log.pop_front();
        }
    }

    /// A heartbeat that reached the server at `arrived` (server ms), applied at `now`.
    fn on_heartbeat_at(&mut self, peer: PeerId, hb: Heartbeat, arrived: u64, now: u64) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        self.stats.heartbeats += 1;
        if !self.bridges.is_empty() {
            self.bridges.on_heartbeat(peer, &hb.parents);
        }
        self.view.ingest(hb, arrived);
        if self.recovering() {
            // Collecting the view only; links are judged once the topology is rebuilt.
            return;
        }
        let link_since = &self.link_since;
        let found =
            self.detector
                .on_heartbeat(&self.view, &self.production, self.k, peer, |p, c, s| {
                    link_since
                        .get(&c)
                        .and_then(|v| v.iter().find(|l| l.0 == p && l.1 == s))
                        .map(|l| l.2)
                });
        if self.detector.last_behind() {
            self.edge_every.insert(peer);
        } else {
            self.edge_every.remove(&peer);
        }
        for link in found {
            self.on_congestion(link, now);
        }
    }

    /// A congested link. If the parent itself reports a stuck uplink, its capacity is capped at
    /// what its heartbeats show it actually uploads and the tree re-homes the children it can no
    /// longer feed. If only the child complains, only the child is moved: a peer's report can
    /// never lower another peer's standing.
    fn on_congestion(&mut self, link: view::Congested, now: u64) {
        self.stats.congestion_events += 1;
        self.congestion_log
            .push_back(CongestionRecord { at_ms: now, link });
        while self.congestion_log.len() > LOG_KEEP {
            self.congestion_log.pop_front();
        }
        tracing::info!(channel = %self.name, parent = %link.parent, child = %link.child, substream = link.substream, behind = link.behind, parent_side = link.parent_side, "congested link");
        let (peer, kbps, reason) = if link.parent_side {
            let measured = self
                .view
                .get(link.parent)
                .and_then(|s| s.measured_upload_kbps);
            // None: capped a moment ago; the move is under way.
            let Some(cap) = self.history.congested(link.parent, measured, now) else {
                return;
            };
            (link.parent, cap, "congested uplink")
        } else {
            if self
                .last_moved
                .get(&link.child)
                .is_some_and(|t| now.saturating_sub(*t) < 2_000)
            {
                return;
            }
            self.last_moved.insert(link.child, now);
            let Some(kbps) = self.history.effective_kbps(link.child) else {
                return;
            };
            (link.child, kbps, "congested link")
        };
        if !self.peers.contains_key(&peer) {
            return;
        }
        let ranking = self.ranking(peer, now);
        let changes = self.planner.rejoin(peer, placement_kbps(kbps), ranking);
        self.detector.forget_peer(peer);
        self.log_repair(peer, reason, changes.affected.len(), now);
        self.send_instructions(changes.affected, now);
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

    /// Claims 10, 18: the top tier re-chosen from history, with hysteresis (see
    /// [`Planner::reevaluate_preferred`]).
    fn reevaluate_preferred(&mut self, now: u64) {
        let candidates: Vec<crate::topology::mesh::Candidate<Region>> = self
            .peers
            .iter()
            .map(|(peer, e)| crate::topology::mesh::Candidate {
                peer: *peer,
                region: e.region,
                upload_kbps: placement_kbps(
                    self.history.effective_kbps(*peer).unwrap_or(e.upload_kbps),
                ),
                history: self.ranking(*peer, now),
            })
            .collect();
        let changes = self.planner.reevaluate_preferred(&candidates);
        if !changes.affected.is_empty() {
            tracing::info!(channel = %self.name, affected = changes.affected.len(), "top tier re-evaluated");
            self.send_instructions(changes.affected, now);
        }
    }

    /// Claims 19, 43: which of this channel's peers have upload to spare for the other channels
    /// of their region, and which regions here are short of capacity. The driver takes the
    /// round to the board the channels share.
    fn relay_round(&mut self) {
        let stream = self.stream_kbps;
        let mut round = RelayRound {
            need_kbps: stream.saturating_mul(3) / 2,
            ..RelayRound::default()
        };
        let mut offered = FxHashSet::default();
        for (peer, e) in &self.peers {
            let capacity =
                placement_kbps(self.history.effective_kbps(*peer).unwrap_or(e.upload_kbps));
            // Only a peer that could spare a whole stream is worth building a plan for: with a
            // million peers, every plan every round would cost seconds.
            if capacity < stream || e.relay {
                continue;
            }
            let Some(plan) = self.planner.plan(*peer) else {
                continue;
            };
            // Relays of this channel are not offered to a third one.
            if plan.tier.as_ref().is_some_and(|t| !t.plays) {
                continue;
            }
            let spare = capacity.saturating_sub(Planner::used_kbps(&plan, stream, self.k));
            if spare >= stream {
                round.offers.push((*peer, e.region, spare));
                offered.insert(*peer);
            }
        }
        // Withdrawn: offered last round, not now (peers that left are off the board already).
        round.withdrawals = self
            .offered
            .iter()
            .filter(|p| !offered.contains(*p) && self.peers.contains_key(*p))
            .copied()
            .collect();
        self.offered = offered;
        // Deterministic order, whatever the map's.
        round.offers.sort_by_key(|o| o.0);
        round.withdrawals.sort();
        // Middle-tier relays take k + n shards: at least one and a half streams.
        round.deficits = self.planner.deficits().into_keys().collect();
        self.outputs.push_back(Output::Relays(round));
    }

    fn send_instructions(&mut self, affected: BTreeSet<PeerId>, now: u64) {
        if affected.is_empty() {
            return;
        }
        self.epoch += 1;
        for peer in affected {
            let Some(wire) = self.planner.plan(peer) else {
                continue;
            };
            let pushes = wire.origin_pushes(self.k);
            let primes = self.origin_primes(peer, &pushes);
            // What fed each substream until now, for the bridges.
            let mut before: Vec<(u32, Option<PeerId>)> = self
                .link_since
                .get(&peer)
                .into_iter()
                .flatten()
                .map(|l| (l.1, Some(l.0)))
                .collect();
            for push in self.origin_fed.get(&peer).into_iter().flatten() {
                match *push {
                    Push::Full => before.extend((0..self.k).map(|s| (s, None))),
                    Push::Data { substream } => before.push((substream, None)),
                    Push::Parity { index, .. } => before.push((index, None)),
                }
            }
            let refused = self.bridges.refused;
            let bridged = self
                .bridges
                .replan(peer, &before, &wire.substreams, self.k, now);
            self.stats.bridges_refused += self.bridges.refused.saturating_sub(refused);
            let mut bridge_primes = Vec::new();
            if !bridged.is_empty() {
                tracing::debug!(channel = %self.name, %peer, ?bridged, "origin bridges the moved substreams");
                self.stats.bridges_opened += bridged.len() as u64;
                bridge_primes.extend(bridged.into_iter().filter_map(|s| self.origin.newest_of(s)));
            }
            let fed_before = self.origin_fed.get(&peer);
            if fed_before.map_or(!pushes.is_empty(), |b| *b != pushes) {
                self.outputs.push_back(Output::OriginFed {
                    peer,
                    pushes: pushes.clone(),
                    epoch: self.epoch,
                });
            }
            if pushes.is_empty() {
                self.origin_fed.remove(&peer);
            } else {
                self.origin_fed.insert(peer, pushes);
            }
            let plan = wire.substreams;
            // Remember when each of the peer's parent links appeared (young links are not judged).
            let old = self.link_since.remove(&peer).unwrap_or_default();
            let links: Vec<(PeerId, u32, u64)> = plan
                .iter()
                .filter_map(|sp| match sp.parent {
                    Source::Peer { id } => {
                        let since = old
                            .iter()
                            .find(|l| l.0 == id && l.1 == sp.index)
                            .map_or(now, |l| l.2);
                        Some((id, sp.index, since))
                    }
                    Source::Origin => None,
                })
                .collect();
            if !links.is_empty() {
                self.link_since.insert(peer, links);
            }
            // New links take a moment to deliver: until a heartbeat shows them feeding it,
            // the peer hears of every new packet from the origin.
            self.edge_every.insert(peer);
            let msg = ServerMsg::Instructions {
                epoch: self.epoch,
                substreams: plan,
                tier: wire.tier,
            };
            self.send(peer, OutMsg::Msg(Box::new(msg)));
            // After the instructions on the same socket, so the page counts them as its new
            // parent's (the origin's) or as the bridge's.
            for bytes in primes {
                self.stats.origin_push_bytes += bytes.len() as u64;
                self.send(peer, OutMsg::Packet(bytes));
            }
            for bytes in bridge_primes {
                self.stats.origin_push_bytes += bytes.len() as u64;
                self.stats.origin_bridge_bytes += bytes.len() as u64;
                self.send(peer, OutMsg::Packet(bytes));
            }
        }
    }

    /// The newest packet of each substream the origin starts feeding `peer` with `pushes`: a
    /// new tree root (a repair can make one) would otherwise wait for the substream's next
    /// packet, up to a fragment, while a peer parent primes its new children at once.
    fn origin_primes(&self, peer: PeerId, pushes: &[Push]) -> Vec<Bytes> {
        let before = self.origin_fed.get(&peer);
        pushes
            .iter()
            .filter(|p| before.is_none_or(|b| !b.contains(p)))
            .filter_map(|p| match *p {
                Push::Data { substream } => Some(substream),
                // Full streams (mesh) and parity are not primed: one packet or one stale shard
                // is not what those peers wait for.
                Push::Full | Push::Parity { .. } => None,
            })
            .filter_map(|sub| self.origin.newest_of(sub))
            .collect()
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
