//! What an operator, the dashboard and tests see of a DCM: the topology, each peer's plan and
//! heartbeat, recent congestion and repairs.

use protocol::{Heartbeat, PeerId};
use serde::Serialize;

use super::planner::{HierarchyView, Push};
use super::{split, view, Dcm};

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
    /// The NAT class it reported (issue 15); absent when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<protocol::Connectivity>,
    /// A waypoint server the operator runs (FIG. 1, 3).
    pub waypoint: bool,
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

/// What the server's metrics sample of a channel every second ([`Dcm::census`]): each peer's
/// counters and lagging links, and the viewers per region and tier. Nothing per peer is
/// copied but a few numbers: a [`TopologySnapshot`] of 20 000 peers copies every plan and
/// heartbeat (tens of MB, built on the DCM's thread between heartbeats).
#[derive(Debug, Clone, Default)]
pub struct Census {
    /// Sorted by id.
    pub peers: Vec<CensusPeer>,
    /// Viewers per placement: `None` on a flat channel, else (region name, tier).
    pub placements: Vec<(Option<(String, protocol::TierName)>, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CensusPeer {
    pub id: PeerId,
    /// The cumulative counters of its last heartbeat; `None` before its first.
    pub counters: Option<HeartbeatCounters>,
    /// Links it receives from (as its last heartbeat lists them) that had delivered nothing
    /// for the census's threshold when it wrote the heartbeat, or, never having delivered,
    /// belong to a peer that has been around that long (`seq` heartbeats of about a second).
    pub lagging_links: u32,
}

/// The cumulative counters a heartbeat reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeartbeatCounters {
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    pub origin_fallbacks: u64,
}

impl HeartbeatCounters {
    pub fn of(hb: &Heartbeat) -> Self {
        HeartbeatCounters {
            bytes_from_peers: hb.bytes_from_peers,
            bytes_from_origin: hb.bytes_from_origin,
            bytes_up: hb.bytes_up,
            origin_fallbacks: hb.origin_fallbacks,
        }
    }
}

/// Whether a link a heartbeat lists is lagging: silent for more than `after_ms` when the
/// heartbeat was written, or, never having delivered, listed by a peer that has sent heartbeats
/// for longer than that (at about one a second).
pub fn link_lagging(hb: &Heartbeat, last_ts_ms: Option<u64>, after_ms: u64) -> bool {
    match last_ts_ms {
        Some(t) => hb.local_ts_ms.saturating_sub(t) > after_ms,
        None => hb.seq.saturating_mul(1000) > after_ms,
    }
}

impl Dcm {
    /// The channel's [`Census`], with links silent for more than `lagging_after_ms` counted
    /// as lagging.
    pub fn census(&self, lagging_after_ms: u64) -> Census {
        let mut peers: Vec<CensusPeer> = self
            .peers
            .keys()
            .map(|&id| {
                let hb = self.view.get(id).map(|s| &s.heartbeat);
                CensusPeer {
                    id,
                    counters: hb.map(HeartbeatCounters::of),
                    lagging_links: hb.map_or(0, |hb| {
                        hb.parents
                            .iter()
                            .filter(|l| link_lagging(hb, l.last_ts_ms, lagging_after_ms))
                            .count() as u32
                    }),
                }
            })
            .collect();
        peers.sort_unstable_by_key(|p| p.id);
        let mut by: std::collections::BTreeMap<_, u32> = std::collections::BTreeMap::new();
        for p in &peers {
            *by.entry(self.planner.placement(p.id)).or_default() += 1;
        }
        let placements = by
            .into_iter()
            .map(|(place, n)| {
                let place = place.map(|(region, tier)| (self.planner.region_name(region), tier));
                (place, n)
            })
            .collect();
        Census { peers, placements }
    }

    pub fn snapshot(&self, now: u64) -> TopologySnapshot {
        let views = self
            .peers
            .keys()
            .filter_map(|id| self.peer_view(*id, now))
            .collect();
        self.snapshot_of(views)
    }

    pub(super) fn peer_view(&self, id: PeerId, now: u64) -> Option<PeerView> {
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
            connectivity: e.connectivity,
            waypoint: e.waypoint,
        })
    }

    /// The snapshot made of `peers`' views (sorted here).
    pub(super) fn snapshot_of(&self, mut peers: Vec<PeerView>) -> TopologySnapshot {
        peers.sort_by_key(|p| p.id);
        TopologySnapshot {
            channel: self.name.clone(),
            substreams: self.k,
            stream_kbps: self.stream_kbps,
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
