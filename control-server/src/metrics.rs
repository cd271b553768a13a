//! Operator metrics: running totals per channel, a one-second sampler that keeps a ring buffer of
//! samples per channel (the dashboard's charts), link health derived from heartbeats, and the
//! Prometheus text exposition served at `/metrics`.
//!
//! Byte counts come from two places. The *server-side* counters of [`crate::channel`] count what
//! the origin sent (pushed over WebSockets to tree roots, served over HTTP as fallback): that is
//! origin egress, exact. The *peer-reported* counters come from heartbeats: the DCM keeps the
//! last heartbeat of every peer, and this module adds the last values of departed peers to a
//! running total so the counters never go backwards when viewers leave.
//!
//! The exposition is written by hand (about a hundred lines) rather than with a client library:
//! every value is read at scrape time from atomics and a DCM snapshot that already exist, so a
//! registry of metric objects would only duplicate them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use protocol::{Heartbeat, PeerId, Source, SubstreamPlan};
use serde::Serialize;

use crate::channel::{now_ms, Channel};
use crate::dcm::{Census, DcmEvent, PeerView, TopologySnapshot};
use crate::{AppState, SharedChannel};
use coordinator::dcm::HeartbeatCounters;

/// The only region today; every DCM and viewer belongs to it.
pub const DEFAULT_REGION: &str = "default";
/// The only distribution tier today: the multi-tree of substreams.
pub const DEFAULT_TIER: &str = "multitree";
/// How the default tier links peers (shown per link on the dashboard).
pub const DEFAULT_ALGORITHM: &str = "multi-tree (k substream trees, interior in one)";
/// Interval of the sampler behind the charts.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept per channel: 15 minutes at one per second.
pub const SERIES_LEN: usize = 900;
/// Rates and the p2p share on the charts are averaged over this many samples.
const RATE_WINDOW: usize = 5;
/// A tree link whose child heard nothing from its parent for this long is shown as lagging.
pub const LAGGING_AFTER_MS: u64 = 3000;
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a viewer sits: its region (a group of DCMs) and tier (distribution algorithm).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Placement {
    pub region: String,
    pub tier: String,
}

/// The region and tier of a peer: from its tier plan on a hierarchical channel, else the flat
/// channel's single region and tier.
pub fn placement(peer: &PeerView) -> Placement {
    match &peer.tier {
        Some(t) => Placement {
            region: t.region.clone(),
            tier: tier_label(t.tier).into(),
        },
        None => Placement {
            region: DEFAULT_REGION.into(),
            tier: DEFAULT_TIER.into(),
        },
    }
}

/// A tier's label in the metrics and on the dashboard.
fn tier_label(tier: protocol::TierName) -> &'static str {
    match tier {
        protocol::TierName::Preferred => "preferred",
        protocol::TierName::Middle => "middle",
        protocol::TierName::Bottom => "bottom",
    }
}

/// What this module needs of one peer in a DCM snapshot.
#[derive(Debug, Clone)]
pub struct PeerSample<'a> {
    pub id: PeerId,
    pub placement: Placement,
    pub plan: &'a [SubstreamPlan],
    pub heartbeat: Option<&'a Heartbeat>,
}

/// The peers of a snapshot, as [`PeerSample`]s.
pub fn peer_samples(snap: &TopologySnapshot) -> Vec<PeerSample<'_>> {
    snap.peers
        .iter()
        .map(|p| PeerSample {
            id: p.id,
            placement: placement(p),
            plan: &p.plan,
            heartbeat: p.last_heartbeat.as_ref(),
        })
        .collect()
}

/// What [`Metrics::observe_with`] folds into a channel's totals: each peer's counters (`None`
/// before its first heartbeat), the viewers per placement and the lagging links. Made from a
/// full snapshot's peers ([`Observed::of_samples`]) or from the DCM's lighter census
/// ([`Observed::of_census`], what the one-second sampler asks for).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub peers: Vec<(PeerId, Option<PeerTotals>)>,
    pub by_placement: BTreeMap<Placement, u32>,
    pub lagging_links: u32,
}

impl Observed {
    pub fn of_samples(peers: &[PeerSample<'_>]) -> Self {
        let mut by_placement: BTreeMap<Placement, u32> = BTreeMap::new();
        for p in peers {
            *by_placement.entry(p.placement.clone()).or_default() += 1;
        }
        Observed {
            peers: peers
                .iter()
                .map(|p| (p.id, p.heartbeat.map(PeerTotals::of)))
                .collect(),
            by_placement,
            lagging_links: link_health(peers).iter().filter(|l| l.lagging).count() as u32,
        }
    }

    /// From a census: its lagging links are those the peers' heartbeats list (a snapshot's are
    /// those of the current plans; they differ only while a re-plan is on its way).
    pub fn of_census(c: &Census) -> Self {
        let by_placement = c
            .placements
            .iter()
            .map(|(place, n)| {
                let placement = match place {
                    Some((region, tier)) => Placement {
                        region: region.clone(),
                        tier: tier_label(*tier).into(),
                    },
                    None => Placement {
                        region: DEFAULT_REGION.into(),
                        tier: DEFAULT_TIER.into(),
                    },
                };
                (placement, *n)
            })
            .collect();
        Observed {
            peers: c
                .peers
                .iter()
                .map(|p| (p.id, p.counters.map(PeerTotals::from)))
                .collect(),
            by_placement,
            lagging_links: c.peers.iter().map(|p| p.lagging_links).sum(),
        }
    }
}

/// Cumulative counters a peer reports in its heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerTotals {
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    pub origin_fallbacks: u64,
}

impl From<HeartbeatCounters> for PeerTotals {
    fn from(h: HeartbeatCounters) -> Self {
        PeerTotals {
            bytes_from_peers: h.bytes_from_peers,
            bytes_from_origin: h.bytes_from_origin,
            bytes_up: h.bytes_up,
            origin_fallbacks: h.origin_fallbacks,
        }
    }
}

impl PeerTotals {
    fn of(hb: &Heartbeat) -> Self {
        HeartbeatCounters::of(hb).into()
    }

    fn max_with(&mut self, o: &PeerTotals) {
        self.bytes_from_peers = self.bytes_from_peers.max(o.bytes_from_peers);
        self.bytes_from_origin = self.bytes_from_origin.max(o.bytes_from_origin);
        self.bytes_up = self.bytes_up.max(o.bytes_up);
        self.origin_fallbacks = self.origin_fallbacks.max(o.origin_fallbacks);
    }

    fn add(&mut self, o: &PeerTotals) {
        self.bytes_from_peers += o.bytes_from_peers;
        self.bytes_from_origin += o.bytes_from_origin;
        self.bytes_up += o.bytes_up;
        self.origin_fallbacks += o.origin_fallbacks;
    }

    /// Share of received bytes that came from peers, if anything was received.
    pub fn p2p_share(&self) -> Option<f64> {
        let total = self.bytes_from_peers + self.bytes_from_origin;
        (total > 0).then(|| self.bytes_from_peers as f64 / total as f64)
    }
}

/// Viewers of one region and tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlacementCount {
    pub region: String,
    pub tier: String,
    pub viewers: u32,
}

/// Everything `/metrics` and the dashboard report about one channel at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChannelTotals {
    pub viewers: u32,
    pub viewers_by_placement: Vec<PlacementCount>,
    /// Peer-reported, departed viewers included.
    pub received: PeerTotals,
    pub origin_push_bytes: u64,
    /// Of `origin_push_bytes`, what bridges pushed to children whose new parent was connecting.
    pub origin_bridge_bytes: u64,
    /// Substreams the origin bridged after moves.
    pub bridges_opened: u64,
    pub fallback_bytes: u64,
    pub fallback_packets: u64,
    pub packets_produced: u64,
    pub heartbeats: u64,
    /// Heartbeats refused as implausible, by reason (see `coordinator::dcm::plausible`).
    pub heartbeats_refused: [u64; 4],
    pub congestion_events: u64,
    pub repairs: u64,
    /// Times the channel's DCM failed and a new one took over.
    pub dcm_failovers: u64,
    /// Peers whose control connection was replaced by a new one to the same node, keeping
    /// their place (a half-open socket after a network blip).
    pub reconnects: u64,
    /// The signed stream (issue 13): manifest bytes the origin made, manifest frames sent,
    /// forgery reports (and false ones), peers evicted.
    pub manifest_bytes: u64,
    pub manifests_sent: u64,
    pub forgery_reports: u64,
    pub false_reports: u64,
    pub evictions: u64,
    /// Tree links whose child reports no packet from its parent for [`LAGGING_AFTER_MS`].
    pub lagging_links: u32,
}

impl ChannelTotals {
    /// Bytes the origin sent: WebSocket pushes plus HTTP fallback.
    pub fn origin_egress_bytes(&self) -> u64 {
        self.origin_push_bytes + self.fallback_bytes
    }
}

/// One point of a channel's time series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Server wall clock, ms since the Unix epoch.
    pub t_ms: u64,
    pub viewers: u32,
    /// Cumulative, peer-reported.
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    /// Cumulative, server-side: push + fallback.
    pub origin_egress_bytes: u64,
    pub congestion_events: u64,
    pub repairs: u64,
    pub lagging_links: u32,
    /// Share of bytes received from peers over the last few seconds.
    pub p2p_share: Option<f64>,
    /// Receive rates the viewers report, kbit/s, summed over viewers.
    pub peers_kbps: f64,
    pub origin_kbps: f64,
    /// What the origin sent, kbit/s.
    pub egress_kbps: f64,
}

#[derive(Default)]
struct Track {
    live: HashMap<PeerId, PeerTotals>,
    departed: PeerTotals,
    /// Recently departed peers: a snapshot taken before a departure but observed after it
    /// (scrapes and the sampler race) must not bring them back and count them twice.
    gone: HashSet<PeerId>,
    gone_order: VecDeque<PeerId>,
    samples: VecDeque<Sample>,
    last: ChannelTotals,
}

/// Departed peers remembered against stale snapshots.
const GONE_KEEP: usize = 4096;

/// Per-channel running totals and series. One per server, in [`AppState`].
#[derive(Default)]
pub struct Metrics {
    tracks: Mutex<HashMap<String, Track>>,
    sampler: AtomicBool,
    /// Addresses refused after an eviction, since start.
    bans: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    pub fn record_ban(&self) {
        self.bans.fetch_add(1, Ordering::Relaxed);
    }

    /// Folds a DCM snapshot into the channel's running totals (peers gone since the last
    /// snapshot move to the departed total) and returns the channel's totals. Without a
    /// snapshot (DCM not answering) the last known peer figures are kept.
    pub fn observe(&self, ch: &Channel, snap: Option<&TopologySnapshot>) -> ChannelTotals {
        let peers = snap.map(peer_samples);
        self.observe_peers(ch, peers.as_deref())
    }

    /// [`Metrics::observe`] on the peers of a snapshot.
    pub fn observe_peers(&self, ch: &Channel, peers: Option<&[PeerSample<'_>]>) -> ChannelTotals {
        self.observe_with(ch, peers.map(Observed::of_samples))
    }

    /// Folds what was observed of the channel's peers into its running totals (peers gone since
    /// the last observation move to the departed total); `None` keeps the last peer figures.
    pub fn observe_with(&self, ch: &Channel, observed: Option<Observed>) -> ChannelTotals {
        let mut tracks = lock(&self.tracks);
        let track = tracks.entry(ch.name.clone()).or_default();
        let mut totals = match observed {
            Some(o) => {
                let current: HashSet<PeerId> = o.peers.iter().map(|p| p.0).collect();
                let gone: Vec<PeerId> = track
                    .live
                    .keys()
                    .filter(|id| !current.contains(id))
                    .copied()
                    .collect();
                for id in gone {
                    if let Some(t) = track.live.remove(&id) {
                        track.departed.add(&t);
                        track.gone.insert(id);
                        track.gone_order.push_back(id);
                    }
                }
                while track.gone_order.len() > GONE_KEEP {
                    if let Some(id) = track.gone_order.pop_front() {
                        track.gone.remove(&id);
                    }
                }
                for (id, totals) in &o.peers {
                    let Some(totals) = totals else {
                        continue;
                    };
                    if track.gone.contains(id) {
                        continue;
                    }
                    // Per-peer counters only grow: a stale snapshot does not lower them.
                    let t = track.live.entry(*id).or_default();
                    t.max_with(totals);
                }
                ChannelTotals {
                    viewers: o.peers.len() as u32,
                    viewers_by_placement: o
                        .by_placement
                        .into_iter()
                        .map(|(p, n)| PlacementCount {
                            region: p.region,
                            tier: p.tier,
                            viewers: n,
                        })
                        .collect(),
                    lagging_links: o.lagging_links,
                    ..ChannelTotals::default()
                }
            }
            None => track.last.clone(),
        };
        let mut received = track.departed;
        for t in track.live.values() {
            received.add(t);
        }
        totals.received = received;
        let c = &ch.counters;
        totals.origin_push_bytes = c.origin_push_bytes.load(Ordering::Relaxed);
        totals.origin_bridge_bytes = c.origin_bridge_bytes.load(Ordering::Relaxed);
        totals.bridges_opened = c.bridges_opened.load(Ordering::Relaxed);
        totals.fallback_bytes = c.fallback_bytes.load(Ordering::Relaxed);
        totals.fallback_packets = c.fallback_packets.load(Ordering::Relaxed);
        totals.packets_produced = c.packets_produced.load(Ordering::Relaxed);
        totals.heartbeats = c.heartbeats.load(Ordering::Relaxed);
        for (t, c) in totals
            .heartbeats_refused
            .iter_mut()
            .zip(&c.heartbeats_refused)
        {
            *t = c.load(Ordering::Relaxed);
        }
        totals.congestion_events = c.congestion_events.load(Ordering::Relaxed);
        totals.repairs = c.repairs.load(Ordering::Relaxed);
        totals.dcm_failovers = c.dcm_failovers.load(Ordering::Relaxed);
        totals.reconnects = c.reconnects.load(Ordering::Relaxed);
        totals.manifest_bytes = c.manifest_bytes.load(Ordering::Relaxed);
        totals.manifests_sent = c.manifests_sent.load(Ordering::Relaxed);
        totals.forgery_reports = c.forgery_reports.load(Ordering::Relaxed);
        totals.false_reports = c.false_reports.load(Ordering::Relaxed);
        totals.evictions = c.evictions.load(Ordering::Relaxed);
        track.last = totals.clone();
        totals
    }

    /// Observes and appends one sample to the channel's series.
    pub fn record(&self, ch: &Channel, snap: Option<&TopologySnapshot>, t_ms: u64) -> Sample {
        let peers = snap.map(peer_samples);
        self.record_peers(ch, peers.as_deref(), t_ms)
    }

    /// [`Metrics::record`] on the peers of a snapshot.
    pub fn record_peers(
        &self,
        ch: &Channel,
        peers: Option<&[PeerSample<'_>]>,
        t_ms: u64,
    ) -> Sample {
        self.record_with(ch, peers.map(Observed::of_samples), t_ms)
    }

    /// [`Metrics::record`] on what was observed of the channel's peers.
    pub fn record_with(&self, ch: &Channel, observed: Option<Observed>, t_ms: u64) -> Sample {
        let totals = self.observe_with(ch, observed);
        let mut tracks = lock(&self.tracks);
        let track = tracks.entry(ch.name.clone()).or_default();
        let mut s = Sample {
            t_ms,
            viewers: totals.viewers,
            bytes_from_peers: totals.received.bytes_from_peers,
            bytes_from_origin: totals.received.bytes_from_origin,
            origin_egress_bytes: totals.origin_egress_bytes(),
            congestion_events: totals.congestion_events,
            repairs: totals.repairs,
            lagging_links: totals.lagging_links,
            p2p_share: None,
            peers_kbps: 0.0,
            origin_kbps: 0.0,
            egress_kbps: 0.0,
        };
        let back = track.samples.len().min(RATE_WINDOW);
        if let Some(prev) = track
            .samples
            .len()
            .checked_sub(back)
            .and_then(|i| track.samples.get(i))
        {
            let dt_ms = t_ms.saturating_sub(prev.t_ms);
            if dt_ms > 0 {
                let d_peers = s.bytes_from_peers.saturating_sub(prev.bytes_from_peers);
                let d_origin = s.bytes_from_origin.saturating_sub(prev.bytes_from_origin);
                let d_egress = s
                    .origin_egress_bytes
                    .saturating_sub(prev.origin_egress_bytes);
                // bytes * 8 / ms = kbit/s
                let kbps = |b: u64| b as f64 * 8.0 / dt_ms as f64;
                s.peers_kbps = kbps(d_peers);
                s.origin_kbps = kbps(d_origin);
                s.egress_kbps = kbps(d_egress);
                s.p2p_share =
                    (d_peers + d_origin > 0).then(|| d_peers as f64 / (d_peers + d_origin) as f64);
            }
        }
        track.samples.push_back(s.clone());
        while track.samples.len() > SERIES_LEN {
            track.samples.pop_front();
        }
        s
    }

    /// Samples of a channel newer than `since_ms`, oldest first.
    pub fn series(&self, channel: &str, since_ms: u64) -> Vec<Sample> {
        lock(&self.tracks)
            .get(channel)
            .map(|t| {
                t.samples
                    .iter()
                    .filter(|s| s.t_ms > since_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the state of channels that no longer exist.
    fn retain(&self, names: &HashSet<String>) {
        lock(&self.tracks).retain(|k, _| names.contains(k));
    }
}

/// Asks a channel's DCM for its topology; `None` if it does not answer in time.
pub async fn snapshot(ch: &Channel) -> Option<TopologySnapshot> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = async {
        ch.dcm.send(DcmEvent::Snapshot { reply: tx }).await.ok()?;
        rx.await.ok()
    };
    tokio::time::timeout(SNAPSHOT_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// Asks a channel's DCM for its census (what the sampler needs; far lighter than a snapshot);
/// `None` if it does not answer in time.
pub async fn census(ch: &Channel) -> Option<Census> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = async {
        ch.dcm
            .send(DcmEvent::Census {
                lagging_after_ms: LAGGING_AFTER_MS,
                reply: tx,
            })
            .await
            .ok()?;
        rx.await.ok()
    };
    tokio::time::timeout(SNAPSHOT_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// Starts the one-second sampler of `state` if it is not running yet (needs a tokio runtime;
/// without one, nothing is started and the next call tries again).
pub fn ensure_sampler(state: &AppState) {
    if state.metrics.sampler.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        state.metrics.sampler.store(false, Ordering::SeqCst);
        return;
    };
    let channels = state.channels_weak();
    let metrics = std::sync::Arc::downgrade(&state.metrics);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            // Ends when the server state is dropped.
            let (Some(channels), Some(metrics)) = (channels.upgrade(), metrics.upgrade()) else {
                break;
            };
            let list: Vec<SharedChannel> = channels
                .read()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            drop(channels);
            let t_ms = now_ms();
            for ch in &list {
                let census = census(ch).await;
                metrics.record_with(ch, census.as_ref().map(Observed::of_census), t_ms);
            }
            metrics.retain(&list.iter().map(|c| c.name.clone()).collect());
        }
    });
}

/// Health of one tree link, from the child's last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkHealth {
    pub substream: u32,
    pub parent: Source,
    pub child: PeerId,
    /// Last sequence number the child received from this parent.
    pub last_seq: Option<u64>,
    /// How long the child had heard nothing from this parent when it sent the heartbeat.
    pub silent_ms: Option<u64>,
    pub lagging: bool,
}

/// Health of every link of the current plan for which the child has sent a heartbeat.
pub fn link_health(peers: &[PeerSample<'_>]) -> Vec<LinkHealth> {
    let mut out = Vec::new();
    for p in peers {
        let Some(hb) = p.heartbeat else {
            continue;
        };
        for s in p.plan {
            let Some(link) = hb
                .parents
                .iter()
                .find(|l| l.substream == s.index && l.parent == s.parent)
            else {
                continue;
            };
            let silent_ms = link.last_ts_ms.map(|t| hb.local_ts_ms.saturating_sub(t));
            // A link that never delivered counts once the child has been around a while.
            let lagging = match silent_ms {
                Some(ms) => ms > LAGGING_AFTER_MS,
                None => hb.seq * 1000 > LAGGING_AFTER_MS,
            };
            out.push(LinkHealth {
                substream: s.index,
                parent: s.parent,
                child: p.id,
                last_seq: link.last_seq,
                silent_ms,
                lagging,
            });
        }
    }
    out
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Exposition(String);

impl Exposition {
    /// One metric family: `# HELP`, `# TYPE` and its samples (`labels` without braces).
    fn family(&mut self, name: &str, kind: &str, help: &str, rows: &[(String, u64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, v) in rows {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {v}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
            }
        }
    }
}

/// Viewers of a channel's snapshot by reported NAT class.
fn nat_class_counts(s: &coordinator::TopologySnapshot) -> [(&'static str, u64); 5] {
    use protocol::NatClass::*;
    let mut n = [0u64; 5];
    for p in &s.peers {
        let i = match p.connectivity.map(|c| c.class) {
            Some(Open) => 0,
            Some(EndpointIndependent) => 1,
            Some(EndpointDependent) => 2,
            Some(UdpBlocked) => 3,
            None => 4,
        };
        n[i] += 1;
    }
    [
        ("open", n[0]),
        ("endpoint_independent", n[1]),
        ("endpoint_dependent", n[2]),
        ("udp_blocked", n[3]),
        ("unknown", n[4]),
    ]
}

/// The Prometheus text exposition (format 0.0.4) of every channel, read now.
pub async fn render(state: &AppState) -> String {
    let mut rows: Vec<(String, ChannelTotals)> = Vec::new();
    let mut nat_rows: Vec<(String, u64)> = Vec::new();
    let (mut waypoints, mut waypoint_up) = (Vec::new(), Vec::new());
    for name in state.channel_names() {
        let Some(ch) = state.channel(&name) else {
            continue;
        };
        let snap = snapshot(&ch).await;
        if let Some(s) = snap.as_ref() {
            let label = format!(
                "channel=\"{}\",region=\"{}\"",
                esc(&name),
                esc(DEFAULT_REGION)
            );
            let wps: Vec<_> = s.peers.iter().filter(|p| p.waypoint).collect();
            waypoints.push((label.clone(), wps.len() as u64));
            let up = wps
                .iter()
                .filter_map(|p| p.last_heartbeat.as_ref().map(|h| h.bytes_up))
                .sum();
            waypoint_up.push((label, up));
            for (class, n) in nat_class_counts(s) {
                nat_rows.push((
                    format!(
                        "channel=\"{}\",region=\"{}\",class=\"{class}\"",
                        esc(&name),
                        esc(DEFAULT_REGION)
                    ),
                    n,
                ));
            }
        }
        rows.push((name, state.metrics.observe(&ch, snap.as_ref())));
    }
    let region = DEFAULT_REGION;
    let base = |ch: &str| format!("channel=\"{}\",region=\"{}\"", esc(ch), esc(region));
    let per = |f: &dyn Fn(&ChannelTotals) -> u64| -> Vec<(String, u64)> {
        rows.iter().map(|(n, t)| (base(n), f(t))).collect()
    };
    let mut e = Exposition(String::new());
    e.family(
        "p2p_dcms",
        "gauge",
        "Delivery coordinator managers running (one per channel in each region).",
        &[(format!("region=\"{}\"", esc(region)), rows.len() as u64)],
    );
    let mut viewers = Vec::new();
    for (n, t) in &rows {
        if t.viewers_by_placement.is_empty() {
            viewers.push((format!("{},tier=\"{}\"", base(n), esc(DEFAULT_TIER)), 0));
        }
        for p in &t.viewers_by_placement {
            viewers.push((
                format!(
                    "channel=\"{}\",region=\"{}\",tier=\"{}\"",
                    esc(n),
                    esc(&p.region),
                    esc(&p.tier)
                ),
                u64::from(p.viewers),
            ));
        }
    }
    e.family(
        "p2p_viewers",
        "gauge",
        "Viewers joined to the channel, per region and tier.",
        &viewers,
    );
    let mut received = Vec::new();
    for (n, t) in &rows {
        received.push((
            format!("{},source=\"peers\"", base(n)),
            t.received.bytes_from_peers,
        ));
        received.push((
            format!("{},source=\"origin\"", base(n)),
            t.received.bytes_from_origin,
        ));
    }
    e.family(
        "p2p_received_bytes_total",
        "counter",
        "Media bytes viewers received, by source, as their heartbeats report (departed viewers included).",
        &received,
    );
    e.family(
        "p2p_viewers_by_nat_class",
        "gauge",
        "Viewers by the NAT class their ICE gathering reported (unknown: none reported).",
        &nat_rows,
    );
    e.family(
        "p2p_waypoints",
        "gauge",
        "Waypoint servers joined to the channel (FIG. 1, 3: relays the operator runs).",
        &waypoints,
    );
    e.family(
        "p2p_waypoint_uploaded_bytes",
        "gauge",
        "Media bytes the channel's current waypoints relayed to viewers, as their heartbeats report (also counted in p2p_uploaded_bytes_total).",
        &waypoint_up,
    );
    e.family(
        "p2p_uploaded_bytes_total",
        "counter",
        "Media bytes viewers relayed to other viewers, as their heartbeats report.",
        &per(&|t| t.received.bytes_up),
    );
    e.family(
        "p2p_viewer_origin_fallbacks_total",
        "counter",
        "Packets viewers fetched from the origin because the swarm did not deliver them in time.",
        &per(&|t| t.received.origin_fallbacks),
    );
    let mut egress = Vec::new();
    for (n, t) in &rows {
        egress.push((format!("{},path=\"push\"", base(n)), t.origin_push_bytes));
        egress.push((format!("{},path=\"fallback\"", base(n)), t.fallback_bytes));
    }
    e.family(
        "p2p_origin_egress_bytes_total",
        "counter",
        "Bytes the origin sent: pushed over WebSockets to tree roots, or served over HTTP as fallback.",
        &egress,
    );
    e.family(
        "p2p_origin_fallback_packets_total",
        "counter",
        "Packets the origin served over HTTP.",
        &per(&|t| t.fallback_packets),
    );
    e.family(
        "p2p_packets_produced_total",
        "counter",
        "Packets the origin cut from the source.",
        &per(&|t| t.packets_produced),
    );
    e.family(
        "p2p_heartbeats_total",
        "counter",
        "Heartbeats received from viewers.",
        &per(&|t| t.heartbeats),
    );
    let mut refused = Vec::new();
    for (n, t) in &rows {
        for (i, r) in coordinator::dcm::plausible::Refusal::ALL.iter().enumerate() {
            refused.push((
                format!("{},reason=\"{}\"", base(n), r.label()),
                t.heartbeats_refused[i],
            ));
        }
    }
    e.family(
        "p2p_heartbeats_refused_total",
        "counter",
        "Heartbeats the DCM refused as implausible (substream, counters_backwards, \
         counters_implausible), or whose links with unknown peers it dropped (unknown_link).",
        &refused,
    );
    e.family(
        "p2p_congestion_events_total",
        "counter",
        "Links the DCM found congested.",
        &per(&|t| t.congestion_events),
    );
    e.family(
        "p2p_repairs_total",
        "counter",
        "Topology repairs (children moved after congestion, departures or silence).",
        &per(&|t| t.repairs),
    );
    e.family(
        "p2p_origin_bridge_bytes_total",
        "counter",
        "Of the origin's push bytes, those it bridged to children whose new parent was connecting.",
        &per(&|t| t.origin_bridge_bytes),
    );
    e.family(
        "p2p_bridges_total",
        "counter",
        "Substreams the origin bridged to a moved child until its new parent delivered.",
        &per(&|t| t.bridges_opened),
    );
    e.family(
        "p2p_dcm_failovers_total",
        "counter",
        "Times a channel's DCM failed and a new one took over, rebuilding from heartbeats.",
        &per(&|t| t.dcm_failovers),
    );
    e.family(
        "p2p_reconnects_total",
        "counter",
        "Peers whose control connection a new one to the same node replaced, keeping their place.",
        &per(&|t| t.reconnects),
    );
    e.family(
        "p2p_manifest_bytes_total",
        "counter",
        "Bytes of signed manifests the origin made (each goes to every viewer).",
        &per(&|t| t.manifest_bytes),
    );
    e.family(
        "p2p_forgery_reports_total",
        "counter",
        "Reports from viewers of packets whose hash is not the signed one.",
        &per(&|t| t.forgery_reports),
    );
    e.family(
        "p2p_false_forgery_reports_total",
        "counter",
        "Forgery reports refuted by the origin's own hash (they count against the reporter).",
        &per(&|t| t.false_reports),
    );
    e.family(
        "p2p_evictions_total",
        "counter",
        "Viewers evicted as hostile (forged data, false or uncorroborated accusations).",
        &per(&|t| t.evictions),
    );
    e.family(
        "p2p_bans_total",
        "counter",
        "Addresses refused for a while after an eviction.",
        &[(String::new(), state.metrics.bans.load(Ordering::Relaxed))],
    );
    let refusals: Vec<(String, u64)> = crate::limits::Limit::ALL
        .iter()
        .map(|l| {
            (
                format!("limit=\"{}\"", l.label()),
                state.addresses.refusals.get(*l),
            )
        })
        .collect();
    e.family(
        "p2p_limit_refusals_total",
        "counter",
        "Messages, sessions, joins and ingest channels refused by an abuse limit (see the limits \
         table in docs/protocol.md).",
        &refusals,
    );
    e.family(
        "p2p_address_limit_entries",
        "gauge",
        "Network addresses the per-address limits track now (open sessions or recent joins).",
        &[(String::new(), state.addresses.len() as u64)],
    );
    // HLS pulls (issue 14): one row per channel that has one.
    let pulls = state.pulls.all();
    let pull_rows = |f: &dyn Fn(&crate::source::hls::PullStatus) -> u64| -> Vec<(String, u64)> {
        pulls.iter().map(|p| (base(&p.channel), f(p))).collect()
    };
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    e.family(
        "p2p_pull_segments_total",
        "counter",
        "Segments an HLS pull fetched whole and published.",
        &pull_rows(&|p| n(&p.segments)),
    );
    e.family(
        "p2p_pull_bytes_total",
        "counter",
        "Bytes of segments and init segments an HLS pull published.",
        &pull_rows(&|p| n(&p.bytes)),
    );
    e.family(
        "p2p_pull_retries_total",
        "counter",
        "Requests of an HLS pull that failed and were retried with backoff (connection refused, \
         HTTP errors, timeouts, truncated bodies, unparsable playlists).",
        &pull_rows(&|p| n(&p.retries)),
    );
    e.family(
        "p2p_pull_refused_segments_total",
        "counter",
        "Segments an HLS pull skipped because they were not fragmented MP4.",
        &pull_rows(&|p| n(&p.refused_segments)),
    );
    e.family(
        "p2p_pull_skipped_segments_total",
        "counter",
        "Segments an HLS pull never published: gone from the playlist, or given up after retries.",
        &pull_rows(&|p| n(&p.skipped_segments)),
    );
    e.family(
        "p2p_pull_backwards_total",
        "counter",
        "Loads of a pulled playlist that went back in time (ignored).",
        &pull_rows(&|p| n(&p.backwards)),
    );
    e.family(
        "p2p_pull_up",
        "gauge",
        "1 while an HLS pull follows its playlist (0: starting, retrying, ended, refused, stopped).",
        &pull_rows(&|p| u64::from(p.phase() == crate::source::hls::Phase::Following)),
    );
    // RTMP ingest (issue 14): the listener as a whole (refused channel names come from
    // unauthenticated clients, so no channel label).
    let rtmp = &state.rtmp;
    e.family(
        "p2p_rtmp_publishers",
        "gauge",
        "RTMP publishers feeding a channel now.",
        &[(String::new(), rtmp.publishers())],
    );
    e.family(
        "p2p_rtmp_publishes_total",
        "counter",
        "RTMP publish requests accepted.",
        &[(String::new(), rtmp.publishes())],
    );
    let rtmp_refusals: Vec<(String, u64)> = crate::source::rtmp::Reason::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.label()), rtmp.refusals(*r)))
        .collect();
    e.family(
        "p2p_rtmp_refusals_total",
        "counter",
        "RTMP publishers refused: another application (application), wrong or missing stream key \
         (key), a channel with a live source (busy), a bad channel name (channel_name), the \
         address's channel limit (limit), a codec other than H.264/AAC (codec), an unreadable tag \
         (malformed), the channel could not start (server).",
        &rtmp_refusals,
    );
    e.family(
        "p2p_rtmp_dropped_total",
        "counter",
        "RTMP publishers whose connection ended with an error (protocol error, silence, cut).",
        &[(String::new(), rtmp.dropped())],
    );
    e.family(
        "p2p_rtmp_failed_connections_total",
        "counter",
        "RTMP connections that ended with an error before publishing (not RTMP, handshake, silence).",
        &[(String::new(), rtmp.failed_connections())],
    );
    e.family(
        "p2p_lagging_links",
        "gauge",
        "Tree links whose child heard nothing from its parent for 3 s, per the child's last heartbeat.",
        &per(&|t| u64::from(t.lagging_links)),
    );
    #[cfg(feature = "cluster")]
    cluster_families(&mut e, state);
    e.0
}

/// Cluster mode (issue 12): the nodes this node sees, the logical DCMs each owns, this node's
/// failovers by cause and its redirects. Absent on a lone server.
#[cfg(feature = "cluster")]
fn cluster_families(e: &mut Exposition, state: &AppState) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(cluster) = state.cluster() else {
        return;
    };
    let nodes = cluster.nodes();
    e.family(
        "p2p_cluster_nodes",
        "gauge",
        "Live nodes of the cluster, as this node sees them in etcd.",
        &[(String::new(), nodes.len() as u64)],
    );
    let owned: Vec<(String, u64)> = nodes
        .iter()
        .map(|(id, (_, dcms))| (format!("node=\"{}\"", esc(id)), dcms.len() as u64))
        .collect();
    e.family(
        "p2p_dcm_owned",
        "gauge",
        "Logical DCMs each node owns (under its lease).",
        &owned,
    );
    let c = &cluster.counters;
    e.family(
        "p2p_failovers_total",
        "counter",
        "DCMs this node took over (lease_expired: its owner died; handover: its owner was stopped), released to another owner (fenced) or handed over when stopped (drain).",
        &[
            ("cause=\"lease_expired\"".into(), c.failovers_lease.load(Relaxed)),
            ("cause=\"handover\"".into(), c.failovers_handover.load(Relaxed)),
            ("cause=\"fenced\"".into(), c.failovers_fenced.load(Relaxed)),
            ("cause=\"drain\"".into(), c.failovers_drain.load(Relaxed)),
        ],
    );
    e.family(
        "p2p_redirects_total",
        "counter",
        "Peers this node sent to the node that owns their channel's DCM.",
        &[(String::new(), c.redirects.load(Relaxed))],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::PacketWindow;
    use protocol::SubstreamPlan;

    fn channel() -> Channel {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Channel::new("demo".into(), 1000, PacketWindow::new(64, 1_000_000), tx)
    }

    fn hb(id: u64, seq: u64, peers: u64, origin: u64) -> Heartbeat {
        // From JSON, so fields added to the heartbeat later (with serde defaults) need no edit.
        serde_json::from_value(serde_json::json!({
            "client_id": id,
            "seq": seq,
            "local_ts_ms": 10_000,
            "parents": [{
                "substream": 0,
                "parent": {"kind": "origin"},
                "last_seq": 4,
                "last_ts_ms": 5_000,
            }],
            "children": [],
            "buffer": [],
            "bytes_from_peers": peers,
            "bytes_from_origin": origin,
            "bytes_up": 0,
            "origin_fallbacks": 0,
        }))
        .expect("heartbeat JSON")
    }

    fn plan() -> Vec<SubstreamPlan> {
        vec![SubstreamPlan {
            index: 0,
            parent: Source::Origin,
            children: vec![],
        }]
    }

    fn peers<'a>(
        list: &'a [(u64, Option<Heartbeat>)],
        plan: &'a [SubstreamPlan],
    ) -> Vec<PeerSample<'a>> {
        list.iter()
            .map(|(id, hb)| PeerSample {
                id: PeerId(*id),
                placement: Placement {
                    region: DEFAULT_REGION.into(),
                    tier: DEFAULT_TIER.into(),
                },
                plan,
                heartbeat: hb.as_ref(),
            })
            .collect()
    }

    #[test]
    fn departed_peers_stay_in_the_totals_and_series_have_rates() {
        let ch = channel();
        let m = Metrics::default();
        let plan = plan();
        let first = [(1, Some(hb(1, 3, 100, 50))), (2, None)];
        let t = m.observe_peers(&ch, Some(&peers(&first, &plan)));
        assert_eq!(t.viewers, 2);
        assert_eq!(t.received.bytes_from_peers, 100);
        assert_eq!(t.viewers_by_placement[0].viewers, 2);
        let second = [(1, Some(hb(1, 4, 200, 50)))];
        m.record_peers(&ch, Some(&peers(&second, &plan)), 1_000);
        // Peer 1 leaves: its last figures stay in the totals.
        let third = [(3, Some(hb(3, 1, 0, 1000)))];
        let s = m.record_peers(&ch, Some(&peers(&third, &plan)), 2_000);
        assert_eq!(s.viewers, 1);
        assert_eq!(s.bytes_from_peers, 200);
        assert_eq!(s.bytes_from_origin, 1050);
        // 1000 origin bytes in 1 s = 8 kbit/s, no peer bytes: share 0.
        assert!((s.origin_kbps - 8.0).abs() < 1e-9);
        assert_eq!(s.p2p_share, Some(0.0));
        assert_eq!(m.series("demo", 1_000), vec![s]);
        // Without a snapshot the last figures are kept.
        assert_eq!(m.observe_peers(&ch, None).viewers, 1);
        // A stale snapshot (from before peer 1 left, with older figures) changes no total.
        let stale = [(1, Some(hb(1, 3, 100, 50))), (3, Some(hb(3, 1, 0, 10)))];
        let t = m.observe_peers(&ch, Some(&peers(&stale, &plan)));
        assert_eq!(t.received.bytes_from_peers, 200);
        assert_eq!(t.received.bytes_from_origin, 1050);
    }

    #[test]
    fn a_census_folds_in_as_the_snapshot_does() {
        let ch = channel();
        let plan = plan();
        let list = [(1, Some(hb(1, 3, 100, 50))), (2, None)];
        let from_snapshot = Metrics::default().observe_peers(&ch, Some(&peers(&list, &plan)));
        let counters = |h: &Heartbeat| coordinator::dcm::HeartbeatCounters::of(h);
        let census = Census {
            peers: list
                .iter()
                .map(|(id, h)| coordinator::dcm::CensusPeer {
                    id: PeerId(*id),
                    counters: h.as_ref().map(counters),
                    lagging_links: h.as_ref().map_or(0, |h| {
                        h.parents
                            .iter()
                            .filter(|l| {
                                coordinator::dcm::link_lagging(h, l.last_ts_ms, LAGGING_AFTER_MS)
                            })
                            .count() as u32
                    }),
                })
                .collect(),
            placements: vec![(None, 2)],
        };
        let from_census = Metrics::default().observe_with(&ch, Some(Observed::of_census(&census)));
        assert_eq!(from_census.viewers, from_snapshot.viewers);
        assert_eq!(from_census.received, from_snapshot.received);
        assert_eq!(from_census.lagging_links, from_snapshot.lagging_links);
        assert_eq!(from_census.lagging_links, 1);
        assert_eq!(
            from_census.viewers_by_placement[0].viewers,
            from_snapshot.viewers_by_placement[0].viewers
        );
        assert_eq!(
            from_census.viewers_by_placement[0].tier,
            from_snapshot.viewers_by_placement[0].tier
        );
    }

    #[test]
    fn silent_links_are_lagging() {
        let plan = plan();
        let list = [(1, Some(hb(1, 3, 0, 0))), (2, None)];
        let links = link_health(&peers(&list, &plan));
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].silent_ms, Some(5_000));
        assert!(links[0].lagging);
    }

    #[tokio::test]
    async fn exposition_has_every_family_once() {
        let state = AppState::new(crate::config::Config::default());
        state.create_channel("a-b", 1000).expect("channel");
        let text = render(&state).await;
        for name in [
            "p2p_dcms",
            "p2p_viewers",
            "p2p_received_bytes_total",
            "p2p_origin_egress_bytes_total",
            "p2p_heartbeats_total",
            "p2p_congestion_events_total",
            "p2p_repairs_total",
            "p2p_dcm_failovers_total",
            "p2p_reconnects_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} in\n{text}"
            );
        }
        assert!(
            text.contains("p2p_viewers{channel=\"a-b\",region=\"default\",tier=\"multitree\"} 0")
        );
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
