//! Delivery coordinator manager (FIG. 7): one task per channel that owns the channel's
//! multi-tree and the outbound queues of its peers. Joins, leaves, signaling and heartbeats come
//! in as [`DcmEvent`]s; instructions, relayed signals and origin packets go out. The topology
//! decisions are made by the pure [`crate::topology::MultiTree`]; the heartbeat-driven view and
//! congestion detection by the pure [`view`] module; this file only wires them together.

pub mod bridge;
pub mod history;
pub mod planner;
pub mod relay;
pub mod split;
pub mod view;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{ErrorCode, Heartbeat, PeerId, ServerMsg, Signal, Source};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::channel::{now_ms, Channel};
use crate::config::Config;
use crate::topology::multitree::ObservedPeer;
use crate::topology::region::Region;
use crate::topology::MultiTreeConfig;
use bridge::Bridges;
use history::History;
use planner::{HierarchyView, Planner, Push};
use view::{CongestionConfig, CongestionDetector, HeartbeatView, ProductionLog};

/// What a session's task sends to its WebSocket.
#[derive(Debug)]
pub enum Outbound {
    Msg(Box<ServerMsg>),
    Packet(Bytes),
    /// A message serialized once for many peers (live-edge notices).
    Text(axum::extract::ws::Utf8Bytes),
    Close(String),
}

impl Outbound {
    pub fn msg(m: ServerMsg) -> Box<Self> {
        Box::new(Outbound::Msg(Box::new(m)))
    }
}

/// Boxed in the queue: a tokio channel allocates its first block of 32 slots up front, and
/// tens of thousands of idle sessions' queues must stay small (8 bytes a slot, not 40).
pub type OutboundTx = mpsc::Sender<Box<Outbound>>;

#[derive(Debug)]
pub enum DcmEvent {
    Join {
        peer: PeerId,
        upload_kbps: u32,
        /// The peer's region (classified by the session from its address, rules and hint).
        region: Region,
        /// A recruited relay's session (it forwards without playing).
        relay: bool,
        out: OutboundTx,
    },
    Leave {
        peer: PeerId,
    },
    Signal {
        from: PeerId,
        to: PeerId,
        signal: Signal,
    },
    Heartbeat {
        peer: PeerId,
        heartbeat: Box<Heartbeat>,
        /// When the session received it (to measure how long applying it takes).
        received: std::time::Instant,
    },
    /// New packets from the origin: pushed to the peers whose parent is the origin.
    Packets(Vec<(u64, Bytes)>),
    Snapshot {
        reply: oneshot::Sender<TopologySnapshot>,
    },
    /// A download session of the same page asks for its share of the page's upload (claim 1):
    /// this (live) DCM decides the split, live first, keeps `peer` within its share from now on,
    /// and answers `None` if `peer` is not one of its sessions.
    SplitUpload {
        peer: PeerId,
        capacity_kbps: u32,
        file_rate_kbps: u32,
        reply: oneshot::Sender<Option<split::UploadSplit>>,
    },
    /// The download beside `peer` ended: it may use the page's whole upload again (from its
    /// next placement on).
    EndSplit {
        peer: PeerId,
    },
    /// Fault injection for failover tests and drills: the DCM panics, as a bug would make it.
    /// Its supervisor starts a new DCM, which rebuilds the topology from heartbeats.
    InjectFailure,
}

/// The channel's current distribution topology, for `/api/channels/{id}/topology` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct TopologySnapshot {
    pub channel: String,
    pub substreams: u32,
    pub stream_kbps: u32,
    pub epoch: u64,
    pub max_depth: u32,
    pub peers: Vec<PeerView>,
    /// Peers the origin feeds directly, per substream.
    pub origin_children: Vec<Vec<PeerId>>,
    /// Recent congested links found from heartbeats (newest last).
    pub congestion: Vec<CongestionRecord>,
    /// Recent repairs (newest last).
    pub repairs: Vec<RepairRecord>,
    /// Regions, tiers, clusters (one DCM each) and the mesh; `None` on a flat channel.
    pub hierarchy: Option<HierarchyView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub id: PeerId,
    pub upload_kbps: u32,
    /// Capacity the DCM actually uses for this peer (declared, capped by measurement).
    pub effective_upload_kbps: u32,
    pub interior_tree: Option<u32>,
    pub plan: Vec<protocol::SubstreamPlan>,
    /// Tier, region, cluster, FEC, mesh neighbours and feeds (hierarchical channels).
    pub tier: Option<protocol::TierPlan>,
    /// What the origin pushes to this peer on its control socket.
    pub origin_pushes: Vec<Push>,
    /// Substreams the origin bridges to this peer while their new peer parents connect.
    pub origin_bridges: Vec<u32>,
    /// Set while a download of the same page shares its upload (claim 1).
    pub upload_split: Option<split::UploadSplit>,
    pub last_heartbeat: Option<Heartbeat>,
    pub measured_upload_kbps: Option<f64>,
    pub congestion_events: u32,
    pub uptime_s: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CongestionRecord {
    /// Server wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    #[serde(flatten)]
    pub link: view::Congested,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairRecord {
    pub at_ms: u64,
    pub reason: String,
    /// The peer whose links were rebuilt (a departed, silent or congested parent).
    pub peer: PeerId,
    /// Peers that got new instructions.
    pub affected: usize,
}

struct PeerEntry {
    out: OutboundTx,
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

/// State of one DCM. Kept separate from the task loop so it can be driven directly in tests.
pub struct Dcm {
    channel: Arc<Channel>,
    k: u32,
    heartbeat_ms: u64,
    planner: Planner,
    /// Peers the origin pushes to, and what (kept from the plans sent, so a packet costs a scan
    /// of the origin's direct children only).
    origin_fed: HashMap<PeerId, Vec<Push>>,
    /// Substreams the origin pushes to children whose new peer parent is still connecting
    /// (make-before-break repair, see [`bridge`]).
    bridges: Bridges,
    /// The newest packets, to code parity shards for coded roots the origin feeds itself.
    recent: VecDeque<(u64, Bytes)>,
    /// One Reed-Solomon coder per parity count in use.
    fecs: HashMap<u32, protocol::fec::Fec>,
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
    last_moved: HashMap<PeerId, u64>,
    /// Set while a DCM that took over collects one round of heartbeats (server ms deadline).
    recovering_until: Option<u64>,
    /// Joins that arrived while recovering, placed once the topology is rebuilt.
    deferred_joins: Vec<DcmEvent>,
    /// When the top tier was last re-evaluated from the peers' records (server ms).
    last_reevaluation: u64,
    /// When spare peers were last offered to other channels (server ms).
    last_relay_round: u64,
    /// Live sessions sharing their page's upload with a download, and how.
    splits: HashMap<PeerId, split::UploadSplit>,
    /// Peers sent every live-edge notice: new or re-planned ones until a heartbeat shows them
    /// fed, and those whose last heartbeat showed them behind. The others, fed by their
    /// parents, learn of new packets from the packets themselves and get one notice in
    /// [`EDGE_ALL_EVERY`] only (in turns), which spares most of a message per peer per fragment.
    edge_every: FxHashSet<PeerId>,
    /// Live-edge notices sent so far.
    edges: u64,
    /// Work done a slice at a time between events when the DCM runs its own loop
    /// ([`Dcm::run`]): with tens of thousands of peers a snapshot or a live-edge notice to a
    /// quarter of them takes tens of ms, and heartbeats queued behind it would wait that long.
    background: VecDeque<Background>,
    /// Set by [`Dcm::run`]; driven directly (tests), background work finishes within the event.
    sliced: bool,
}

/// Peers handled per slice of background work (a few ms).
const BACKGROUND_SLICE: usize = 1000;

/// Events handled, at most, between two slices of background work.
const EVENTS_PER_SLICE: usize = 256;

enum Background {
    /// A live-edge notice still to be queued for `ids[next..]`.
    Edge {
        text: axum::extract::ws::Utf8Bytes,
        ids: Vec<PeerId>,
        next: usize,
    },
    /// A topology snapshot being assembled (peers that leave meanwhile are skipped).
    Snapshot {
        reply: oneshot::Sender<TopologySnapshot>,
        ids: Vec<PeerId>,
        views: Vec<PeerView>,
        next: usize,
        now: u64,
    },
}

/// A fed peer gets one live-edge notice in this many (see `Dcm::edge_every`).
const EDGE_ALL_EVERY: u64 = 4;

impl Dcm {
    pub fn new(channel: Arc<Channel>, config: &Config) -> Self {
        let stream_kbps = channel.media.read().map(|m| m.stream_kbps).unwrap_or(1000);
        let k = config.substreams;
        Dcm {
            channel,
            k,
            heartbeat_ms: u64::from(config.heartbeat_ms),
            planner: match &config.topology {
                Some(topo) => Planner::tiered(
                    topo.clone(),
                    stream_kbps,
                    config.max_fanout,
                    config.cluster_max,
                ),
                None => Planner::flat(MultiTreeConfig {
                    k,
                    stream_kbps,
                    origin_fanout: config.origin_fanout,
                    max_fanout: config.max_fanout,
                }),
            },
            origin_fed: HashMap::new(),
            bridges: Bridges::new(config.max_bridges),
            recent: VecDeque::new(),
            fecs: HashMap::new(),
            peers: FxHashMap::default(),
            epoch: 0,
            view: HeartbeatView::default(),
            detector: CongestionDetector::new(CongestionConfig::default()),
            production: ProductionLog::default(),
            history: History::default(),
            link_since: FxHashMap::default(),
            congestion_log: VecDeque::new(),
            repair_log: VecDeque::new(),
            last_moved: HashMap::new(),
            recovering_until: None,
            deferred_joins: Vec::new(),
            last_reevaluation: 0,
            last_relay_round: 0,
            splits: HashMap::new(),
            edge_every: FxHashSet::default(),
            edges: 0,
            background: VecDeque::new(),
            sliced: false,
        }
    }

    /// A DCM taking over from one that failed. It adopts the channel's sessions and the origin's
    /// push list as they were (so roots keep receiving), sends nothing, and collects heartbeats
    /// for `1.5` intervals; then [`Dcm::finish_recovery`] rebuilds the topology from the links
    /// the heartbeats report, keeping every consistent one, so viewers notice nothing.
    pub fn take_over(channel: Arc<Channel>, config: &Config, now: u64) -> Self {
        let mut dcm = Dcm::new(channel, config);
        if let Ok(a) = dcm.channel.attachments.lock() {
            for (peer, att) in &a.sessions {
                dcm.peers.insert(
                    *peer,
                    PeerEntry {
                        out: att.out.clone(),
                        upload_kbps: att.upload_kbps,
                        region: att.region,
                        relay: att.relay,
                    },
                );
                dcm.history.joined(*peer, att.upload_kbps, now);
            }
            dcm.origin_fed = a.origin_fed.clone();
            dcm.epoch = a.epoch;
        }
        dcm.recovering_until = Some(now + dcm.heartbeat_ms * 3 / 2);
        tracing::warn!(channel = %dcm.channel.name, peers = dcm.peers.len(), "DCM taking over; rebuilding the topology from heartbeats");
        dcm
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

    /// Whether this DCM is still collecting heartbeats after taking over.
    pub fn recovering(&self) -> bool {
        self.recovering_until.is_some()
    }

    /// Rebuilds the topology from the heartbeats received since taking over. Peers whose
    /// reported links are all consistent get no message; the others are placed and told.
    pub fn finish_recovery(&mut self, now: u64) {
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
                        Some(ObservedPeer {
                            peer: *p,
                            upload_kbps: placement_kbps(
                                self.history
                                    .effective_kbps(*p)
                                    .unwrap_or(self.peers[p].upload_kbps),
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
                        let kbps = placement_kbps(self.peers[p].upload_kbps);
                        changes.affected.extend(tree.join(*p, kbps).affected);
                    }
                }
                changes
            }
            Planner::Tiered(_) => {
                // The hierarchy is re-placed from scratch (restoring it link by link is future
                // work): every peer gets new instructions.
                let mut changes = crate::topology::Changes::default();
                for p in &ids {
                    let e = &self.peers[p];
                    let (region, kbps) = (e.region, placement_kbps(e.upload_kbps));
                    let placed = if e.relay {
                        self.planner.join_relay(*p, region, kbps)
                    } else {
                        self.planner.join(*p, region, kbps, self.ranking(*p, now))
                    };
                    changes.affected.extend(placed.affected);
                }
                changes
            }
        };
        // Links kept count as created now: they are judged only after the settle time.
        self.link_since.clear();
        self.origin_fed.clear();
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
        if let Ok(mut a) = self.channel.attachments.lock() {
            a.origin_fed = self.origin_fed.clone();
        }
        tracing::info!(channel = %self.channel.name, peers = ids.len(), instructed = changes.affected.len(), "DCM took over: topology rebuilt from heartbeats");
        self.send_instructions(changes.affected, now);
        for ev in std::mem::take(&mut self.deferred_joins) {
            self.handle(ev);
        }
    }

    /// Runs until the event channel closes. Takes the receiver by reference so that, when this
    /// DCM fails, its supervisor hands the same queue to the DCM that takes over.
    pub async fn run(mut self, events: &mut mpsc::Receiver<DcmEvent>) {
        use futures_util::FutureExt;
        self.sliced = true;
        let mut tick = tokio::time::interval(Duration::from_millis(self.heartbeat_ms.max(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'run: loop {
            if self.background.is_empty() {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => self.handle(ev),
                        None => break,
                    },
                    _ = tick.tick() => self.on_tick(now_ms()),
                }
                continue;
            }
            // Queued events first, then one slice of the background work.
            for _ in 0..EVENTS_PER_SLICE {
                match events.try_recv() {
                    Ok(ev) => self.handle(ev),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => break 'run,
                }
            }
            if tick.tick().now_or_never().is_some() {
                self.on_tick(now_ms());
            }
            self.background_slice(BACKGROUND_SLICE);
            // Let the runtime breathe (timers, the reply just sent).
            tokio::task::yield_now().await;
        }
        tracing::debug!(channel = %self.channel.name, "DCM stopped");
    }

    pub fn handle(&mut self, ev: DcmEvent) {
        self.handle_event(ev);
        if !self.sliced {
            while !self.background.is_empty() {
                self.background_slice(usize::MAX);
            }
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
                    self.send(*id, Box::new(Outbound::Text(text.clone())));
                }
                next = end;
                if next < ids.len() {
                    self.background
                        .push_front(Background::Edge { text, ids, next });
                }
            }
            Background::Snapshot {
                reply,
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
                        reply,
                        ids,
                        views,
                        next,
                        now,
                    });
                } else {
                    let _ = reply.send(self.snapshot_of(views));
                }
            }
        }
    }

    fn handle_event(&mut self, ev: DcmEvent) {
        let now = now_ms();
        match ev {
            DcmEvent::Join {
                peer,
                upload_kbps,
                region,
                relay,
                out,
            } => {
                if self.recovering() {
                    self.deferred_joins.push(DcmEvent::Join {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                        out,
                    });
                    return;
                }
                if let Ok(mut a) = self.channel.attachments.lock() {
                    a.sessions.insert(
                        peer,
                        crate::channel::Attached {
                            out: out.clone(),
                            upload_kbps,
                            region,
                            relay,
                        },
                    );
                }
                self.peers.insert(
                    peer,
                    PeerEntry {
                        out,
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
                tracing::info!(channel = %self.channel.name, %peer, upload_kbps, affected = changes.affected.len(), "peer joined");
                self.send_instructions(changes.affected, now);
            }
            DcmEvent::Leave { peer } => self.remove_peer(peer, "left", now),
            DcmEvent::Signal { from, to, signal } => self.relay_signal(from, to, signal),
            DcmEvent::Heartbeat {
                peer,
                heartbeat,
                received,
            } => {
                // Judged as of its arrival: a heartbeat that queued behind others (a busy
                // server) must not make its peer look late for packets cut meanwhile.
                let waited = received.elapsed();
                let arrived = now.saturating_sub(waited.as_millis() as u64);
                self.on_heartbeat_at(peer, *heartbeat, arrived, now);
                self.channel.counters.heartbeat_apply.record(waited);
            }
            DcmEvent::Packets(packets) => self.push_from_origin(packets),
            DcmEvent::Snapshot { reply } => {
                let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
                ids.sort();
                self.background.push_back(Background::Snapshot {
                    reply,
                    ids,
                    views: Vec::new(),
                    next: 0,
                    now,
                });
            }
            DcmEvent::SplitUpload {
                peer,
                capacity_kbps,
                file_rate_kbps,
                reply,
            } => {
                let _ = reply.send(self.split_upload(peer, capacity_kbps, file_rate_kbps));
            }
            DcmEvent::EndSplit { peer } => {
                self.history.set_ceiling(peer, None);
                self.splits.remove(&peer);
            }
            DcmEvent::InjectFailure => {
                panic!("injected DCM failure (channel {})", self.channel.name)
            }
        }
    }

    /// Splits a live session's page upload with a download of the same page: live keeps what
    /// it needs ([`split::split_upload`]). The live peer's fan-out is lowered in place to its
    /// share, so none of its children moves (a repair would cost them a fallback burst) and it
    /// is given no new ones beyond its share. On a hierarchy the share applies from the peer's
    /// next placement on.
    fn split_upload(
        &mut self,
        peer: PeerId,
        capacity_kbps: u32,
        file_rate_kbps: u32,
    ) -> Option<split::UploadSplit> {
        if !self.peers.contains_key(&peer) {
            return None;
        }
        let stream_kbps = self
            .channel
            .media
            .read()
            .map(|m| m.stream_kbps)
            .unwrap_or(0);
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
        tracing::info!(channel = %self.channel.name, %peer, capacity_kbps, live_kbps = s.live_kbps, file_kbps = s.file_kbps, lowered, "upload split with a download");
        self.splits.insert(peer, s);
        Some(s)
    }

    fn remove_peer(&mut self, peer: PeerId, reason: &str, now: u64) {
        self.deferred_joins
            .retain(|e| !matches!(e, DcmEvent::Join { peer: p, .. } if *p == peer));
        if let Ok(mut a) = self.channel.attachments.lock() {
            a.sessions.remove(&peer);
            a.origin_fed.remove(&peer);
        }
        self.channel.relays.session_ended(peer);
        if self.peers.remove(&peer).is_none() {
            return;
        }
        self.view.remove(peer);
        self.detector.forget_peer(peer);
        self.edge_every.remove(&peer);
        self.history.left(peer);
        self.splits.remove(&peer);
        self.last_moved.remove(&peer);
        // Links where it was the parent are rewritten when its children get new instructions.
        self.link_since.remove(&peer);
        self.origin_fed.remove(&peer);
        self.bridges.remove(peer);
        let changes = self.planner.leave(peer);
        tracing::info!(channel = %self.channel.name, %peer, reason, affected = changes.affected.len(), "peer removed");
        if !changes.affected.is_empty() {
            self.log_repair(peer, reason, changes.affected.len(), now);
        }
        self.send_instructions(changes.affected, now);
    }

    fn log_repair(&mut self, peer: PeerId, reason: &str, affected: usize, now: u64) {
        self.channel
            .counters
            .repairs
            .fetch_add(1, Ordering::Relaxed);
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

    #[cfg(test)]
    fn on_heartbeat(&mut self, peer: PeerId, hb: Heartbeat, now: u64) {
        self.on_heartbeat_at(peer, hb, now, now);
    }

    /// A heartbeat that reached the server at `arrived` (server ms), applied at `now`.
    fn on_heartbeat_at(&mut self, peer: PeerId, hb: Heartbeat, arrived: u64, now: u64) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        self.channel
            .counters
            .heartbeats
            .fetch_add(1, Ordering::Relaxed);
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
        self.channel
            .counters
            .congestion_events
            .fetch_add(1, Ordering::Relaxed);
        self.congestion_log
            .push_back(CongestionRecord { at_ms: now, link });
        while self.congestion_log.len() > LOG_KEEP {
            self.congestion_log.pop_front();
        }
        tracing::info!(channel = %self.channel.name, parent = %link.parent, child = %link.child, substream = link.substream, behind = link.behind, parent_side = link.parent_side, "congested link");
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

    /// Every heartbeat interval: peers gone silent are removed, recovered peers regain capacity.
    pub fn on_tick(&mut self, now: u64) {
        if let Some(until) = self.recovering_until {
            if now >= until {
                self.finish_recovery(now);
            }
            return;
        }
        // Three intervals, but never less than a few seconds: with short intervals a busy server
        // (or a busy peer) must not cut off viewers whose heartbeats are merely late.
        self.bridges.expire(now);
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
            if let Some(e) = self.peers.get(&peer) {
                let _ = e
                    .out
                    .try_send(Box::new(Outbound::Close("heartbeats stopped".into())));
            }
            self.remove_peer(peer, "silent", now);
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
                self.manage_relays(now);
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
            tracing::info!(channel = %self.channel.name, affected = changes.affected.len(), "top tier re-evaluated");
            self.send_instructions(changes.affected, now);
        }
    }

    /// Claims 19, 43: offers this channel's peers with upload to spare to the other channels of
    /// their region, and recruits one relay at a time for a region short of capacity here.
    fn manage_relays(&mut self, now: u64) {
        let stream = self
            .channel
            .media
            .read()
            .map(|m| m.stream_kbps)
            .unwrap_or(1000);
        let board = self.channel.relays.clone();
        for (peer, e) in &self.peers {
            let Some(plan) = self.planner.plan(*peer) else {
                continue;
            };
            // Relays of this channel are not offered to a third one.
            if plan.tier.as_ref().is_some_and(|t| !t.plays) {
                continue;
            }
            let capacity =
                placement_kbps(self.history.effective_kbps(*peer).unwrap_or(e.upload_kbps));
            let spare = capacity.saturating_sub(Planner::used_kbps(&plan, stream, self.k));
            if spare >= stream {
                board.offer(&self.channel.name, e.region, *peer, spare, &e.out);
            } else {
                board.withdraw(*peer);
            }
        }
        if board.pending_for(&self.channel.name, now) {
            return;
        }
        // Middle-tier relays take k + n shards: at least one and a half streams.
        let need = stream.saturating_mul(3) / 2;
        for region in self.planner.deficits().into_keys() {
            let Some((relay_token, upload_kbps, out)) =
                board.recruit(&self.channel.name, region, need, now)
            else {
                continue;
            };
            tracing::info!(channel = %self.channel.name, upload_kbps, "recruiting a relay from another channel");
            let msg = ServerMsg::Recruit {
                channel: self.channel.name.clone(),
                relay_token,
                upload_kbps,
            };
            let _ = out.try_send(Outbound::msg(msg));
            self.channel
                .counters
                .relays_recruited
                .fetch_add(1, Ordering::Relaxed);
            break;
        }
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
            if self.bridges.refused > refused {
                self.channel
                    .counters
                    .bridges_refused
                    .fetch_add(self.bridges.refused - refused, Ordering::Relaxed);
            }
            let mut bridge_primes = Vec::new();
            if !bridged.is_empty() {
                tracing::debug!(channel = %self.channel.name, %peer, ?bridged, "origin bridges the moved substreams");
                self.channel
                    .counters
                    .bridges_opened
                    .fetch_add(bridged.len() as u64, Ordering::Relaxed);
                bridge_primes.extend(bridged.into_iter().filter_map(|s| self.newest_of(s)));
            }
            if let Ok(mut a) = self.channel.attachments.lock() {
                a.epoch = self.epoch;
                if pushes.is_empty() {
                    a.origin_fed.remove(&peer);
                } else {
                    a.origin_fed.insert(peer, pushes.clone());
                }
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
            self.send(peer, Outbound::msg(msg));
            // After the instructions on the same socket, so the page counts them as its new
            // parent's (the origin's) or as the bridge's.
            for bytes in primes {
                self.channel
                    .counters
                    .origin_push_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.send(peer, Box::new(Outbound::Packet(bytes)));
            }
            for bytes in bridge_primes {
                let c = &self.channel.counters;
                c.origin_push_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                c.origin_bridge_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.send(peer, Box::new(Outbound::Packet(bytes)));
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
            .filter_map(|sub| self.newest_of(sub))
            .collect()
    }

    /// The newest packet the origin has of substream `sub`.
    fn newest_of(&self, sub: u32) -> Option<Bytes> {
        let (_, latest) = self.channel.live_position()?;
        let k = u64::from(self.k.max(1));
        let seq = (latest.saturating_sub(k - 1)..=latest)
            .rev()
            .find(|s| protocol::substream_of(*s, self.k) == sub)?;
        match self.channel.packet(seq) {
            crate::origin::Lookup::Found(bytes) => Some(bytes),
            _ => None,
        }
    }

    fn send(&mut self, peer: PeerId, msg: Box<Outbound>) {
        let Some(entry) = self.peers.get(&peer) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = entry.out.try_send(msg) {
            // A peer that cannot keep up with its control queue is cut loose rather than
            // allowed to hold up every other viewer of the channel.
            tracing::warn!(%peer, "outbound queue full; closing session");
            let _ = entry
                .out
                .try_send(Box::new(Outbound::Close("outbound queue full".into())));
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
                Outbound::msg(ServerMsg::Error {
                    code: ErrorCode::NotLinked,
                    message: format!("{to} is not linked with {from}; signaling refused"),
                }),
            );
            return;
        }
        self.send(to, Outbound::msg(ServerMsg::Signal { from, signal }));
    }

    fn push_from_origin(&mut self, packets: Vec<(u64, Bytes)>) {
        for (seq, bytes) in &packets {
            if let Ok(p) = protocol::Packet::decode(bytes) {
                self.production.record(*seq, p.header.created_ms);
            }
        }
        if let Some(edge) = packets.last().map(|p| p.0) {
            // Serialized once: with tens of thousands of peers this notice dominates otherwise.
            if let Ok(text) = serde_json::to_string(&ServerMsg::LiveEdge { seq: edge }) {
                let text = axum::extract::ws::Utf8Bytes::from(text);
                // The fed peers take turns, a quarter per notice, so that no notice goes to
                // everyone at once and holds up the heartbeats queued behind it.
                let turn = self.edges % EDGE_ALL_EVERY;
                self.edges += 1;
                let everyone = self.recovering();
                let ids: Vec<PeerId> = self
                    .peers
                    .keys()
                    .filter(|p| {
                        everyone || p.0 % EDGE_ALL_EVERY == turn || self.edge_every.contains(p)
                    })
                    .copied()
                    .collect();
                self.background
                    .push_back(Background::Edge { text, ids, next: 0 });
            }
        }
        let k = self.k;
        let mut pushed = 0u64;
        let mut bridged = 0u64;
        for (seq, bytes) in packets {
            let sub = protocol::substream_of(seq, k);
            let parity = self.parity_completed_by(seq, &bytes);
            for (peer, pushes) in &self.origin_fed {
                let Some(entry) = self.peers.get(peer) else {
                    continue;
                };
                for push in pushes {
                    let frame = match *push {
                        Push::Full => Some(&bytes),
                        Push::Data { substream } if substream == sub => Some(&bytes),
                        Push::Data { .. } => None,
                        Push::Parity { index, n } => parity
                            .get(&n)
                            .and_then(|frames| frames.get(index.saturating_sub(k) as usize)),
                    };
                    let Some(frame) = frame else {
                        continue;
                    };
                    // Dropped when the peer's queue is full: it fetches the packet over HTTP.
                    if entry
                        .out
                        .try_send(Box::new(Outbound::Packet(frame.clone())))
                        .is_ok()
                    {
                        pushed += frame.len() as u64;
                    }
                }
            }
            if self.bridges.is_empty() {
                continue;
            }
            for (peer, bridges) in self.bridges.iter() {
                if !bridges.iter().any(|b| b.substream == sub) {
                    continue;
                }
                let Some(entry) = self.peers.get(peer) else {
                    continue;
                };
                if entry
                    .out
                    .try_send(Box::new(Outbound::Packet(bytes.clone())))
                    .is_ok()
                {
                    bridged += bytes.len() as u64;
                }
            }
        }
        let c = &self.channel.counters;
        c.origin_push_bytes
            .fetch_add(pushed + bridged, Ordering::Relaxed);
        c.origin_bridge_bytes.fetch_add(bridged, Ordering::Relaxed);
    }

    /// Parity frames (per parity count in use) of the group `seq` completes, for coded roots the
    /// origin feeds itself; empty when no such root exists or the group is not complete.
    fn parity_completed_by(&mut self, seq: u64, bytes: &Bytes) -> HashMap<u32, Vec<Bytes>> {
        let k = u64::from(self.k);
        let wanted: BTreeSet<u32> = self
            .origin_fed
            .values()
            .flatten()
            .filter_map(|p| match p {
                Push::Parity { n, .. } => Some(*n),
                _ => None,
            })
            .collect();
        let mut out = HashMap::new();
        if wanted.is_empty() {
            self.recent.clear();
            return out;
        }
        self.recent.push_back((seq, bytes.clone()));
        while self.recent.len() > 2 * k as usize {
            self.recent.pop_front();
        }
        if seq % k != k - 1 {
            return out;
        }
        let first = seq + 1 - k;
        let group: Vec<&[u8]> = (first..=seq)
            .filter_map(|s| self.recent.iter().find(|(q, _)| *q == s))
            .map(|(_, b)| b.as_ref())
            .collect();
        if group.len() != k as usize {
            return out;
        }
        let created = protocol::Packet::decode(bytes).map_or(0, |p| p.header.created_ms);
        for n in wanted {
            let fec = match self.fecs.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match protocol::fec::FecParams::new(self.k, n).and_then(protocol::fec::Fec::new)
                    {
                        Ok(f) => e.insert(f),
                        Err(err) => {
                            tracing::warn!(n, "cannot code parity: {err}");
                            continue;
                        }
                    }
                }
            };
            match protocol::fec::encode_parity_frames(fec, seq / k, created, &group) {
                Ok(frames) => {
                    out.insert(n, frames.into_iter().map(Bytes::from).collect());
                }
                Err(err) => tracing::warn!(n, "cannot code parity: {err}"),
            }
        }
        out
    }

    pub fn snapshot(&self, now: u64) -> TopologySnapshot {
        let views = self
            .peers
            .keys()
            .filter_map(|id| self.peer_view(*id, now))
            .collect();
        self.snapshot_of(views)
    }

    fn peer_view(&self, id: PeerId, now: u64) -> Option<PeerView> {
        let e = self.peers.get(&id)?;
        let id = &id;
        let state = self.view.get(*id);
        let wire = self.planner.plan(*id);
        Some(PeerView {
            id: *id,
            upload_kbps: e.upload_kbps,
            effective_upload_kbps: self.history.effective_kbps(*id).unwrap_or(e.upload_kbps),
            interior_tree: self.planner.interior_tree(*id),
            plan: wire
                .as_ref()
                .map(|w| w.substreams.clone())
                .unwrap_or_default(),
            tier: wire.and_then(|w| w.tier),
            origin_pushes: self.origin_fed.get(id).cloned().unwrap_or_default(),
            origin_bridges: self.bridges.of(*id).map(|b| b.substream).collect(),
            upload_split: self.splits.get(id).copied(),
            last_heartbeat: state.map(|s| s.heartbeat.clone()),
            measured_upload_kbps: state.and_then(|s| s.measured_upload_kbps),
            congestion_events: self.history.congestion_events(*id),
            uptime_s: self.history.age_ms(*id, now).unwrap_or(0) as f64 / 1000.0,
        })
    }

    /// The snapshot made of `peers`' views (sorted here).
    fn snapshot_of(&self, mut peers: Vec<PeerView>) -> TopologySnapshot {
        peers.sort_by_key(|p| p.id);
        TopologySnapshot {
            channel: self.channel.name.clone(),
            substreams: self.k,
            stream_kbps: self
                .channel
                .media
                .read()
                .map(|m| m.stream_kbps)
                .unwrap_or(0),
            epoch: self.epoch,
            max_depth: self.planner.max_depth(),
            origin_children: (0..self.k)
                .map(|s| {
                    let mut v: Vec<PeerId> = peers
                        .iter()
                        .filter(|p| {
                            p.origin_pushes
                                .iter()
                                .any(|x| *x == Push::Full || *x == Push::Data { substream: s })
                        })
                        .map(|p| p.id)
                        .collect();
                    v.sort();
                    v
                })
                .collect(),
            peers,
            congestion: self.congestion_log.iter().copied().collect(),
            repairs: self.repair_log.iter().cloned().collect(),
            hierarchy: self.planner.hierarchy_view(),
        }
    }
}

#[cfg(test)]
mod tests;
