//! One channel's three-tier hierarchy (patent FIG. 3-7): state in, plan out.
//!
//! * **Top**: preferred nodes of every region (and waypoints for regions without a capable
//!   client) with the origin in a c-connected flooding [`Mesh`].
//! * **Middle**: per region, one erasure-coded [`Cluster`] of high-capacity nodes, its roots fed by
//!   the region's preferred nodes (≥ 2 when the region has them).
//! * **Bottom**: per region, clusters of bounded size running the plain multi-tree, each fed by
//!   several middle nodes (`feeders_per_cluster`); a cluster in deficit attracts more feeders,
//!   and so does one whose roots the origin feeds or whose trees have no root slot left, while
//!   the region has middle nodes feeding nobody (`feed_from_idle`). A bottom cluster's trees
//!   fill their feeders' slots before hanging a joiner under a member
//!   ([`MultiTree::set_prefer_origin`](super::MultiTree::set_prefer_origin)): the middle tier
//!   has upload to spare, the bottom members have little, and every hop over a weak uplink
//!   delays a whole fragment. Roots keep their feeder across changes
//!   ([`Cluster::root_sources`]), so one root coming or going moves no other root.
//!   Clusters split above `cluster_max` and merge below `cluster_min`.
//!
//! A whole channel is placed at once by [`Hierarchy::build`] (the `build` submodule): tiers and
//! clusters per region strongest first, then the middle tier's root feeds matched to the bottom
//! clusters' needs, a strong node's feeds split over several clusters, and a region short of
//! upload **borrowing** root feeds from the middle tier of the region with the most to spare.
//! A middle node that feeds a cluster of another region is planned like any feeder; when that
//! region empties, its lenders are released. Peers arriving later go through
//! [`Hierarchy::join`], which touches O(k log n) state: the cluster's trees, and the cluster's
//! roots and feeders only in the trees whose set of roots changed.
//!
//! Every cluster is one DCM's state (its [`ClusterId`] is the DCM's logical id); a DCM task
//! drives [`Hierarchy::join`] / [`Hierarchy::leave`] and sends new instructions
//! ([`Hierarchy::plan`]) to the peers named in the returned [`Changes`].
//!
//! Capacities are in *units* of one substream, `stream / k` (a coded shard has the same rate).
//! A preferred node spends `(degree − 1)` streams on the mesh and offers the rest as middle-tier
//! root feeds; a middle node forwards at most `k + n` units in its middle tree (what it takes)
//! and offers the rest as root feeds of the bottom cluster(s) it feeds. A feeder's root feeds
//! are dealt over the trees of the cluster ([`Cluster::set_feeders`]), so a feeder with, say, 13
//! units for 8 trees feeds 2 roots in 5 trees and 1 in the other 3 instead of wasting 5.
//! Peers whose upload is more than `max_fanout` units are middle nodes: the bottom tier could not
//! use their surplus.

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};

use protocol::{Connectivity, PeerId};
use serde::Serialize;

use super::cluster::{Cluster, ClusterId, ClusterKind, Feeder, MeshNodeOrPeer};
use super::mesh::{History, Mesh, MeshConfig, MeshNode};
use super::multitree::Changes;
use super::region::Region;
pub use super::region::RegionSettings;
pub use restore::ObservedMember;

/// Idle middle nodes handed to one bottom cluster per change at most (see
/// `Hierarchy::feed_from_idle`), which bounds the work of one join.
const IDLE_FEEDERS_PER_CHANGE: usize = 4;

/// The feeder of each root of a cluster's tree, worked out once per batch of plans.
type RootFeeders = FxHashMap<(ClusterId, u32), FxHashMap<PeerId, MeshNodeOrPeer>>;

/// Parameters of a channel's hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HierarchyConfig {
    /// Substreams of the plain multi-tree, and data shards per FEC group.
    pub k: u32,
    pub stream_kbps: u32,
    pub mesh: MeshConfig,
    /// Default parity shards `n` of a middle cluster (per region: [`RegionSettings`]).
    pub fec_n: u32,
    pub cluster_min: usize,
    pub cluster_max: usize,
    /// Middle nodes feeding each bottom cluster (at least 2, so a feeder's departure is not an
    /// outage); a cluster short of capacity takes up to twice as many.
    pub feeders_per_cluster: usize,
    /// Cap on a bottom node's fan-out, in units.
    pub max_fanout: u32,
    /// Root feeds per tree the origin or a waypoint gives a cluster it has to feed itself.
    pub server_slots: u32,
}

impl Default for HierarchyConfig {
    fn default() -> Self {
        HierarchyConfig {
            k: 8,
            stream_kbps: 1000,
            mesh: MeshConfig::default(),
            fec_n: 2,
            cluster_min: 64,
            cluster_max: 512,
            feeders_per_cluster: 2,
            max_fanout: 64,
            server_slots: 2,
        }
    }
}

/// The tier of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Preferred,
    Middle,
    Bottom,
}

/// The algorithm used on a link (claim 7), named as the peer expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "algorithm", rename_all = "snake_case")]
pub enum Algorithm {
    /// Flooding with duplicate elimination (top tier).
    Flood,
    /// Plain multi-tree substream (bottom tier).
    Multitree,
    /// Reed-Solomon coded substream: shard `substream` of each group of `k` packets.
    MultitreeFec { k: u32, n: u32 },
}

/// One end of a link in a plan.
pub type Endpoint = MeshNodeOrPeer;

/// One link of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub peer: Endpoint,
    /// `None` for flooding (every packet).
    pub substream: Option<u32>,
    pub algorithm: Algorithm,
}

/// What a peer is told: its place, what it receives from whom, what it sends to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub tier: Tier,
    pub region: Region,
    /// DCM managing the peer (`None` for preferred nodes: the top tier's single DCM).
    pub cluster: Option<ClusterId>,
    /// `false` for recruited relays: they forward a channel they do not play (claim 19).
    pub plays: bool,
    pub receive: Vec<Link>,
    pub send: Vec<Link>,
}

#[derive(Debug, Clone)]
struct PeerInfo {
    region: Region,
    /// Effective upload (declared, capped by measurements).
    upload: u32,
    tier: Tier,
    /// Middle nodes: the bottom clusters they feed (usually one; the bulk build splits a strong
    /// node's feeds over several, possibly in other regions) and the root feeds allotted to each.
    feeds: Vec<(ClusterId, u32)>,
    /// Bottom nodes: their cluster.
    cluster: Option<ClusterId>,
    relay: bool,
}

#[derive(Debug, Clone)]
struct RegionState {
    preferred: BTreeSet<PeerId>,
    /// The server standing in while the region has no client preferred node.
    waypoint: Option<MeshNode>,
    middle: ClusterId,
    fec_n: u32,
    bottom: BTreeSet<ClusterId>,
    /// Middle nodes feeding no bottom cluster yet.
    idle_middle: BTreeSet<PeerId>,
    /// Middle nodes feeding each bottom cluster.
    feeders: BTreeMap<ClusterId, BTreeSet<PeerId>>,
}

/// Summary for benchmarks and the topology page.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HierarchyReport {
    pub peers: usize,
    pub regions: usize,
    pub preferred: usize,
    pub waypoints: usize,
    pub middle: usize,
    pub bottom: usize,
    pub bottom_clusters: usize,
    pub relays: usize,
    pub mesh_connectivity: u32,
    pub max_depth_middle: u32,
    pub max_depth_bottom: u32,
    /// Peers receiving the full rate within the peers' (and servers' allotted) capacity.
    pub full_rate: usize,
    /// Upload the plans use / effective upload of all peers.
    pub upload_used_kbps: u64,
    pub upload_total_kbps: u64,
    /// Root feeds (a root in one tree) the middle tier's peers give the bottom clusters, and
    /// those the origin gives because no feeder had a slot left, in bottom and middle clusters.
    pub bottom_root_feeds_by_peers: u64,
    pub bottom_roots_fed_by_origin: u64,
    pub middle_roots_fed_by_origin: u64,
    /// Middle nodes feeding no bottom cluster.
    pub idle_middle: usize,
}

/// A channel's hierarchy.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    cfg: HierarchyConfig,
    mesh: Mesh,
    settings: BTreeMap<Region, RegionSettings>,
    regions: BTreeMap<Region, RegionState>,
    clusters: BTreeMap<ClusterId, Cluster>,
    peers: FxHashMap<PeerId, PeerInfo>,
    /// NAT classes of peers that cannot pair with everyone ([`Hierarchy::set_connectivity`]).
    nat: FxHashMap<PeerId, Connectivity>,
    next_cluster: u64,
}

impl Hierarchy {
    pub fn new(cfg: HierarchyConfig) -> Self {
        let cfg = HierarchyConfig {
            k: cfg.k.max(1),
            feeders_per_cluster: cfg.feeders_per_cluster.max(2),
            cluster_max: cfg.cluster_max.max(2),
            cluster_min: cfg.cluster_min.min(cfg.cluster_max.max(2) / 2),
            mesh: MeshConfig {
                stream_kbps: cfg.stream_kbps,
                ..cfg.mesh
            },
            ..cfg
        };
        Hierarchy {
            mesh: Mesh::new(cfg.mesh),
            cfg,
            settings: BTreeMap::new(),
            regions: BTreeMap::new(),
            clusters: BTreeMap::new(),
            peers: FxHashMap::default(),
            nat: FxHashMap::default(),
            next_cluster: 1,
        }
    }

    pub fn config(&self) -> &HierarchyConfig {
        &self.cfg
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Settings of a region (applied when the region next becomes active).
    pub fn set_region_settings(&mut self, region: Region, s: RegionSettings) {
        self.settings.insert(region, s);
    }

    fn unit(&self) -> u64 {
        (u64::from(self.cfg.stream_kbps) / u64::from(self.cfg.k)).max(1)
    }

    fn units(&self, kbps: u32) -> u32 {
        (u64::from(kbps) / self.unit()).min(u64::from(u32::MAX)) as u32
    }

    /// Adds a viewer (re-adding first removes it).
    pub fn join(
        &mut self,
        peer: PeerId,
        region: Region,
        upload_kbps: u32,
        history: History,
    ) -> Changes {
        self.join_as(
            peer,
            region,
            history.effective_upload_kbps(upload_kbps),
            false,
        )
    }

    /// Adds a recruited relay (claims 19, 43): a peer of another channel that forwards this one
    /// without playing it. It joins the middle tier when it can take the full rate, and is
    /// never a preferred node.
    pub fn join_relay(&mut self, peer: PeerId, region: Region, upload_kbps: u32) -> Changes {
        self.join_as(peer, region, upload_kbps, true)
    }

    fn join_as(&mut self, peer: PeerId, region: Region, upload: u32, relay: bool) -> Changes {
        let mut aff = if self.peers.contains_key(&peer) {
            // Re-placed: what is known of its connectivity still holds.
            self.step_out(peer)
        } else {
            Changes::default()
        };
        self.ensure_region(region);
        let stream = self.cfg.stream_kbps;
        let Some(rs) = self.regions.get(&region) else {
            return aff;
        };
        // A peer that cannot reach endpoint-independent NATs (most peers) is not made a node
        // that others across the tiers must reach: it stays in the bottom tier.
        let limited = self.limited(peer);
        let tier = if limited {
            Tier::Bottom
        } else if !relay
            && upload >= self.cfg.mesh.min_upload_kbps()
            && (rs.preferred.len() as u32) < self.cfg.mesh.per_region
        {
            Tier::Preferred
        } else if upload >= stream
            && (relay
                || self.units(upload) > self.cfg.max_fanout
                || self.cluster_wanting_feeder(region).is_some())
        {
            Tier::Middle
        } else {
            Tier::Bottom
        };
        self.peers.insert(
            peer,
            PeerInfo {
                region,
                upload,
                tier,
                feeds: Vec::new(),
                cluster: None,
                relay,
            },
        );
        match tier {
            Tier::Preferred => self.add_preferred(peer, region, &mut aff),
            Tier::Middle => self.add_middle(peer, region, &mut aff),
            Tier::Bottom => self.add_bottom(peer, region, &mut aff),
        }
        aff.affected.insert(peer);
        aff
    }

    /// Takes `peer` out to place it again (a demoted preferred node): like
    /// [`Hierarchy::leave`], but what is known of its connectivity stays.
    pub fn step_out(&mut self, peer: PeerId) -> Changes {
        let nat = self.nat.get(&peer).copied();
        let aff = self.leave(peer);
        if let Some(c) = nat {
            self.nat.insert(peer, c);
        }
        aff
    }

    /// Whether `peer`'s class cannot reach endpoint-independent NATs (symmetric NAT, UDP
    /// blocked): it is kept in the bottom tier.
    pub fn limited(&self, peer: PeerId) -> bool {
        self.nat.get(&peer).is_some_and(|c| !c.reaches_most())
    }

    /// `peer`'s NAT class (`None`: unknown). Set before its join, it places the joiner by it;
    /// for a placed peer, the links of its cluster that the class cannot hold are re-placed,
    /// and a peer that turns out to reach few others leaves the top and middle tiers. The links
    /// between tiers (the mesh, feeds of a cluster's roots) are not chosen by class: a feed
    /// that fails is reported and dropped ([`Hierarchy::block`]).
    pub fn set_connectivity(&mut self, peer: PeerId, conn: Option<Connectivity>) -> Changes {
        match conn.filter(|c| c.is_restrictive()) {
            Some(c) => {
                if self.nat.insert(peer, c) == Some(c) {
                    return Changes::default();
                }
            }
            None => {
                if self.nat.remove(&peer).is_none() {
                    return Changes::default();
                }
            }
        }
        let Some(info) = self.peers.get(&peer) else {
            return Changes::default();
        };
        if info.tier != Tier::Bottom && self.limited(peer) {
            let (region, upload, relay) = (info.region, info.upload, info.relay);
            return self.join_as(peer, region, upload, relay);
        }
        // The clusters it feeds match their restricted roots to feeders by class.
        let (tier, region) = (info.tier, info.region);
        let fed: Vec<ClusterId> = info.feeds.iter().map(|f| f.0).collect();
        let mut aff = Changes::default();
        for f in fed {
            self.refresh_bottom_feeders(f, &mut aff);
        }
        if tier == Tier::Preferred {
            self.refresh_middle_feeders(region, &mut aff);
        }
        if let Some(cid) = self.cluster_of(peer) {
            if let Some(c) = self.clusters.get_mut(&cid) {
                aff.affected.extend(c.set_connectivity(peer, conn).affected);
            }
        }
        aff
    }

    /// Removes a peer; unknown peers change nothing.
    pub fn leave(&mut self, peer: PeerId) -> Changes {
        self.nat.remove(&peer);
        let mut aff = Changes::default();
        let Some(info) = self.peers.remove(&peer) else {
            return aff;
        };
        let region = info.region;
        match info.tier {
            Tier::Preferred => {
                extend_mesh(&mut aff, self.mesh.remove(MeshNode::Peer(peer)));
                if let Some(rs) = self.regions.get_mut(&region) {
                    rs.preferred.remove(&peer);
                }
                self.promote_preferred(region, &mut aff);
                self.refresh_middle_feeders(region, &mut aff);
            }
            Tier::Middle => {
                if let Some(mid) = self.regions.get(&region).map(|r| r.middle) {
                    if let Some(c) = self.clusters.get_mut(&mid) {
                        aff.affected.extend(c.leave_fed(peer).affected);
                    }
                }
                if let Some(rs) = self.regions.get_mut(&region) {
                    rs.idle_middle.remove(&peer);
                }
                for (f, _) in info.feeds {
                    let Some(fr) = self.region_of_cluster(f) else {
                        continue;
                    };
                    if let Some(set) = self
                        .regions
                        .get_mut(&fr)
                        .and_then(|r| r.feeders.get_mut(&f))
                    {
                        set.remove(&peer);
                    }
                    // Hand the cluster an idle middle node, if any, then re-plan its roots.
                    let idle = self
                        .regions
                        .get(&fr)
                        .and_then(|r| r.idle_middle.first().copied());
                    if let Some(m) = idle {
                        self.assign_feeder(m, f);
                    }
                    self.refresh_bottom_feeders(f, &mut aff);
                }
            }
            Tier::Bottom => {
                if let Some(cid) = info.cluster {
                    if let Some(c) = self.clusters.get_mut(&cid) {
                        aff.affected.extend(c.leave_fed(peer).affected);
                    }
                    self.maybe_merge(cid, &mut aff);
                }
            }
        }
        self.drop_region_if_empty(region, &mut aff);
        aff.affected.remove(&peer);
        aff
    }

    /// Two peers that cannot connect (or whose link failed twice): when they share a cluster,
    /// they are never parent and child there again ([`Cluster::block_fed`]). When one is a
    /// middle node feeding the other's bottom cluster, it stops feeding that cluster: an idle
    /// middle node of the region takes its place if there is one, and the cluster's roots are
    /// re-dealt over its feeders (the region's server when none is left). Other links between
    /// tiers (preferred nodes feeding the middle tier, mesh neighbours) are not re-planned by a
    /// block yet.
    pub fn block(&mut self, a: PeerId, b: PeerId) -> Changes {
        let (Some(ca), Some(cb)) = (self.cluster_of(a), self.cluster_of(b)) else {
            return Changes::default();
        };
        if ca != cb {
            let mut aff = Changes::default();
            if !self.drop_feeder(a, cb, &mut aff) {
                self.drop_feeder(b, ca, &mut aff);
            }
            return aff;
        }
        self.clusters
            .get_mut(&ca)
            .map(|c| c.block_fed(a, b))
            .unwrap_or_default()
    }

    /// Whether `feeder` is a middle node feeding the bottom cluster of `root`: a link between
    /// them is a feed between tiers, which moving `root` within its cluster would not change.
    pub fn feeds_cluster_of(&self, feeder: PeerId, root: PeerId) -> bool {
        let Some(cid) = self
            .peers
            .get(&root)
            .filter(|i| i.tier == Tier::Bottom)
            .and_then(|i| i.cluster)
        else {
            return false;
        };
        self.peers
            .get(&feeder)
            .is_some_and(|i| i.tier == Tier::Middle && i.feeds.iter().any(|f| f.0 == cid))
    }

    /// The roots `feeder` feeds in other clusters, with the tree of each feed (parity trees
    /// included): links its heartbeat does not list, since they are not in its own trees.
    pub fn fed_roots(&self, feeder: PeerId) -> Vec<(PeerId, u32)> {
        let Some(info) = self.peers.get(&feeder) else {
            return Vec::new();
        };
        let clusters: Vec<ClusterId> = match info.tier {
            Tier::Preferred => self
                .regions
                .get(&info.region)
                .map(|r| r.middle)
                .into_iter()
                .collect(),
            Tier::Middle => info.feeds.iter().map(|f| f.0).collect(),
            Tier::Bottom => Vec::new(),
        };
        let me = MeshNodeOrPeer::Peer(feeder);
        let mut out = Vec::new();
        for cid in clusters {
            let Some(c) = self.clusters.get(&cid) else {
                continue;
            };
            for t in 0..c.kind.trees() {
                out.extend(
                    c.root_sources(t)
                        .into_iter()
                        .filter(|(_, f)| *f == me)
                        .map(|(root, _)| (root, t)),
                );
            }
        }
        out
    }

    /// `feeder` stops feeding bottom cluster `cid` (false: it did not feed it). It becomes idle
    /// if it feeds nothing else; an idle middle node of the cluster's region, another one, is
    /// assigned in its place; the cluster's roots are re-planned.
    fn drop_feeder(&mut self, feeder: PeerId, cid: ClusterId, aff: &mut Changes) -> bool {
        let Some(info) = self.peers.get_mut(&feeder) else {
            return false;
        };
        let Some(i) = info.feeds.iter().position(|f| f.0 == cid) else {
            return false;
        };
        info.feeds.swap_remove(i);
        let idle_now = info.feeds.is_empty();
        let own = info.region;
        let Some(cr) = self.region_of_cluster(cid) else {
            return false;
        };
        if let Some(set) = self
            .regions
            .get_mut(&cr)
            .and_then(|r| r.feeders.get_mut(&cid))
        {
            set.remove(&feeder);
        }
        let stand_in = self
            .regions
            .get(&cr)
            .and_then(|r| r.idle_middle.iter().find(|m| **m != feeder).copied());
        if let Some(m) = stand_in {
            self.assign_feeder(m, cid);
        }
        if idle_now {
            if let Some(rs) = self.regions.get_mut(&own) {
                rs.idle_middle.insert(feeder);
            }
        }
        self.refresh_bottom_feeders(cid, aff);
        aff.affected.insert(feeder);
        true
    }

    /// The cluster whose trees `peer` belongs to (`None` for a preferred node).
    fn cluster_of(&self, peer: PeerId) -> Option<ClusterId> {
        let info = self.peers.get(&peer)?;
        match info.tier {
            Tier::Preferred => None,
            Tier::Middle => self.regions.get(&info.region).map(|r| r.middle),
            Tier::Bottom => info.cluster,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Tiers
    // -----------------------------------------------------------------------------------------

    fn ensure_region(&mut self, region: Region) {
        if self.regions.contains_key(&region) {
            return;
        }
        let s = self.settings.get(&region).copied().unwrap_or_default();
        let fec_n = s.fec_n.unwrap_or(self.cfg.fec_n);
        let id = self.fresh_id();
        let kind = ClusterKind::Middle {
            k: self.cfg.k,
            n: fec_n,
        };
        // A middle node forwards at most what it receives (k + n units): the rest of its upload
        // feeds the bottom tier.
        let cluster = Cluster::new(id, region, kind, self.cfg.stream_kbps, kind.trees());
        self.clusters.insert(id, cluster);
        let waypoint = s.waypoint.map_or(MeshNode::Origin, MeshNode::Waypoint);
        self.mesh.insert(waypoint);
        self.regions.insert(
            region,
            RegionState {
                preferred: BTreeSet::new(),
                waypoint: Some(waypoint),
                middle: id,
                fec_n,
                bottom: BTreeSet::new(),
                idle_middle: BTreeSet::new(),
                feeders: BTreeMap::new(),
            },
        );
        let mut aff = Changes::default();
        self.refresh_middle_feeders(region, &mut aff);
    }

    fn drop_region_if_empty(&mut self, region: Region, aff: &mut Changes) {
        let Some(rs) = self.regions.get(&region) else {
            return;
        };
        let empty = rs.preferred.is_empty()
            && self.clusters.get(&rs.middle).is_none_or(Cluster::is_empty)
            && rs
                .bottom
                .iter()
                .all(|c| self.clusters.get(c).is_none_or(Cluster::is_empty));
        if !empty {
            return;
        }
        if let Some(rs) = self.regions.remove(&region) {
            self.clusters.remove(&rs.middle);
            for c in rs.bottom {
                self.clusters.remove(&c);
            }
            // Middle nodes of other regions that lent this region root feeds are free again.
            for (c, set) in rs.feeders {
                for p in set {
                    let Some(info) = self.peers.get_mut(&p) else {
                        continue;
                    };
                    info.feeds.retain(|f| f.0 != c);
                    if info.feeds.is_empty() && info.tier == Tier::Middle {
                        let own = info.region;
                        if let Some(r) = self.regions.get_mut(&own) {
                            r.idle_middle.insert(p);
                        }
                    }
                    aff.affected.insert(p);
                }
            }
            if let Some(w @ MeshNode::Waypoint(_)) = rs.waypoint {
                if !self.regions.values().any(|r| r.waypoint == Some(w)) {
                    extend_mesh(aff, self.mesh.remove(w));
                }
            }
        }
    }

    fn fresh_id(&mut self) -> ClusterId {
        let id = ClusterId(self.next_cluster);
        self.next_cluster += 1;
        id
    }

    /// Units a preferred node has left after flooding: its middle-tier root feeds.
    fn preferred_slots(&self, upload: u32) -> u32 {
        let mesh = u64::from(self.cfg.mesh.degree() - 1) * u64::from(self.cfg.stream_kbps);
        self.units(
            u64::from(upload)
                .saturating_sub(mesh)
                .min(u64::from(u32::MAX)) as u32,
        )
    }

    /// Units a middle node has left after its middle tree: its bottom-tier root feeds.
    fn middle_slots(&self, peer: PeerId, info: &PeerInfo) -> u32 {
        let used = self
            .regions
            .get(&info.region)
            .and_then(|r| self.clusters.get(&r.middle))
            .and_then(|c| c.tree().fanout(peer))
            .unwrap_or(0);
        self.units(info.upload).saturating_sub(used)
    }

    fn add_preferred(&mut self, peer: PeerId, region: Region, aff: &mut Changes) {
        extend_mesh(aff, self.mesh.insert(MeshNode::Peer(peer)));
        let mut old_waypoint = None;
        if let Some(rs) = self.regions.get_mut(&region) {
            rs.preferred.insert(peer);
            old_waypoint = rs.waypoint.take();
        }
        // A capable client replaces the waypoint: servers cost the operator.
        if let Some(w @ MeshNode::Waypoint(_)) = old_waypoint {
            if !self.regions.values().any(|r| r.waypoint == Some(w)) {
                extend_mesh(aff, self.mesh.remove(w));
            }
        }
        self.refresh_middle_feeders(region, aff);
    }

    /// After a preferred node left: the strongest eligible middle node moves up, else the
    /// region falls back to its waypoint.
    fn promote_preferred(&mut self, region: Region, aff: &mut Changes) {
        let Some(rs) = self.regions.get(&region) else {
            return;
        };
        if !rs.preferred.is_empty() {
            return;
        }
        let min = self.cfg.mesh.min_upload_kbps();
        let best = self
            .clusters
            .get(&rs.middle)
            .into_iter()
            .flat_map(Cluster::members)
            .filter(|(p, u)| *u >= min && self.peers.get(p).is_some_and(|i| !i.relay))
            .max_by_key(|(p, u)| (*u, std::cmp::Reverse(*p)));
        if let Some((p, _)) = best {
            self.remove_middle(p, region, aff);
            if let Some(info) = self.peers.get_mut(&p) {
                info.tier = Tier::Preferred;
            }
            self.add_preferred(p, region, aff);
        } else {
            let s = self.settings.get(&region).copied().unwrap_or_default();
            let w = s.waypoint.map_or(MeshNode::Origin, MeshNode::Waypoint);
            extend_mesh(aff, self.mesh.insert(w));
            if let Some(rs) = self.regions.get_mut(&region) {
                rs.waypoint = Some(w);
            }
        }
    }

    /// Takes a middle node out of the middle cluster and its feeding duty (for a promotion).
    fn remove_middle(&mut self, peer: PeerId, region: Region, aff: &mut Changes) {
        let Some(rs) = self.regions.get_mut(&region) else {
            return;
        };
        rs.idle_middle.remove(&peer);
        let mid = rs.middle;
        if let Some(c) = self.clusters.get_mut(&mid) {
            aff.affected.extend(c.leave_fed(peer).affected);
        }
        let feeds = self
            .peers
            .get_mut(&peer)
            .map(|i| std::mem::take(&mut i.feeds))
            .unwrap_or_default();
        for (f, _) in feeds {
            if let Some(set) = self
                .region_of_cluster(f)
                .and_then(|fr| self.regions.get_mut(&fr))
                .and_then(|r| r.feeders.get_mut(&f))
            {
                set.remove(&peer);
            }
            self.refresh_bottom_feeders(f, aff);
        }
    }

    /// A bottom cluster of the region that needs a feeder: fewer than `feeders_per_cluster`, or
    /// short of capacity and fewer than twice that.
    fn cluster_wanting_feeder(&self, region: Region) -> Option<ClusterId> {
        let rs = self.regions.get(&region)?;
        let f = self.cfg.feeders_per_cluster;
        let count = |c: &ClusterId| rs.feeders.get(c).map_or(0, BTreeSet::len);
        rs.bottom
            .iter()
            .find(|c| count(c) < f)
            .or_else(|| {
                rs.bottom.iter().find(|c| {
                    count(c) < 2 * f && self.clusters.get(c).is_some_and(|x| x.spare() < 0)
                })
            })
            .copied()
    }

    fn add_middle(&mut self, peer: PeerId, region: Region, aff: &mut Changes) {
        let Some(mid) = self.regions.get(&region).map(|r| r.middle) else {
            return;
        };
        let upload = self.peers.get(&peer).map_or(0, |i| i.upload);
        let nat = self.nat.get(&peer).copied();
        if let Some(c) = self.clusters.get_mut(&mid) {
            c.set_connectivity(peer, nat);
            aff.affected.extend(c.join_fed(peer, upload).affected);
        }
        match self.cluster_wanting_feeder(region) {
            Some(target) => {
                self.assign_feeder(peer, target);
                self.refresh_bottom_feeders(target, aff);
            }
            None => {
                if let Some(rs) = self.regions.get_mut(&region) {
                    rs.idle_middle.insert(peer);
                }
                let bottom: Vec<ClusterId> = self
                    .regions
                    .get(&region)
                    .map(|r| r.bottom.iter().copied().collect())
                    .unwrap_or_default();
                for cid in bottom {
                    self.feed_from_idle(cid, aff);
                }
            }
        }
    }

    /// Makes `peer` feed `cluster` with all its root feeds not yet allotted elsewhere.
    fn assign_feeder(&mut self, peer: PeerId, cluster: ClusterId) {
        let Some(info) = self.peers.get(&peer) else {
            return;
        };
        let allotted: u32 = info.feeds.iter().map(|f| f.1).sum();
        let slots = self.middle_slots(peer, info).saturating_sub(allotted);
        self.allot_feeder(peer, cluster, slots);
    }

    /// Makes `peer` feed `cluster` with `slots` more root feeds.
    fn allot_feeder(&mut self, peer: PeerId, cluster: ClusterId, slots: u32) {
        let Some(cr) = self.region_of_cluster(cluster) else {
            return;
        };
        let Some(info) = self.peers.get_mut(&peer) else {
            return;
        };
        match info.feeds.iter_mut().find(|f| f.0 == cluster) {
            Some(f) => f.1 += slots,
            None => info.feeds.push((cluster, slots)),
        }
        let own = info.region;
        if let Some(rs) = self.regions.get_mut(&own) {
            rs.idle_middle.remove(&peer);
        }
        if let Some(rs) = self.regions.get_mut(&cr) {
            rs.feeders.entry(cluster).or_default().insert(peer);
        }
    }

    /// Moves `peer`'s feeds of cluster `from` to cluster `to` (a split or a merge).
    fn move_feeds(&mut self, peer: PeerId, from: ClusterId, to: ClusterId) {
        let Some(info) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(i) = info.feeds.iter().position(|f| f.0 == from) else {
            return;
        };
        let (_, slots) = info.feeds.swap_remove(i);
        if let Some(cr) = self.region_of_cluster(from) {
            if let Some(set) = self
                .regions
                .get_mut(&cr)
                .and_then(|r| r.feeders.get_mut(&from))
            {
                set.remove(&peer);
            }
        }
        self.allot_feeder(peer, to, slots);
    }

    fn region_of_cluster(&self, cid: ClusterId) -> Option<Region> {
        self.clusters.get(&cid).map(|c| c.region)
    }

    /// A feeder's NAT class, when it restricts whom the feeder can pair with.
    fn feeder_nat(&self, peer: PeerId) -> Option<Connectivity> {
        self.nat.get(&peer).copied().filter(|c| c.is_restrictive())
    }

    /// Root feeds `peer` gives cluster `cid`.
    fn feed_slots(&self, peer: PeerId, cid: ClusterId) -> u32 {
        self.peers
            .get(&peer)
            .and_then(|i| i.feeds.iter().find(|f| f.0 == cid))
            .map_or(0, |f| f.1)
    }

    fn add_bottom(&mut self, peer: PeerId, region: Region, aff: &mut Changes) {
        let upload = self.peers.get(&peer).map_or(0, |i| i.upload);
        let cid = match self.pick_bottom_cluster(region, upload) {
            Some(c) => c,
            None => self.new_bottom_cluster(region),
        };
        if let Some(info) = self.peers.get_mut(&peer) {
            info.cluster = Some(cid);
        }
        let nat = self.nat.get(&peer).copied();
        let Some(c) = self.clusters.get_mut(&cid) else {
            return;
        };
        c.set_connectivity(peer, nat);
        aff.affected.extend(c.join_fed(peer, upload).affected);
        if self
            .clusters
            .get(&cid)
            .is_some_and(|c| c.len() > self.cfg.cluster_max)
        {
            self.split(cid, aff);
        }
        if let Some(now_in) = self.peers.get(&peer).and_then(|i| i.cluster) {
            self.feed_from_idle(now_in, aff);
        }
    }

    /// Hands bottom cluster `cid` idle middle nodes of its region while the origin feeds roots
    /// that one of them could take (any idle node for ordinary roots, an open one for roots
    /// behind symmetric NATs, which reach only open peers), or while a tree has no root slot
    /// left, so that the next joiner would hang under a member. The middle tier's spare upload
    /// otherwise stays unused while the origin carries those roots or the bottom trees deepen
    /// over the members' weaker uplinks.
    fn feed_from_idle(&mut self, cid: ClusterId, aff: &mut Changes) {
        let Some(region) = self.region_of_cluster(cid) else {
            return;
        };
        let need = |h: &Self| match h.clusters.get(&cid) {
            Some(c) if matches!(c.kind, ClusterKind::Bottom { .. }) => {
                let (restricted, others) = c.roots_fed_by_origin();
                (restricted, others, c.trees_without_free_root_slot())
            }
            _ => (0, 0, 0),
        };
        let mut before = need(self);
        for _ in 0..IDLE_FEEDERS_PER_CHANGE {
            let (restricted, others, full) = before;
            if restricted == 0 && others == 0 && full == 0 {
                return;
            }
            let Some(rs) = self.regions.get(&region) else {
                return;
            };
            let open = |m: &&PeerId| self.feeder_nat(**m).is_none();
            let pick = if restricted > 0 {
                rs.idle_middle.iter().find(open)
            } else {
                None
            }
            .or_else(|| {
                // Ordinary roots: a restricted idle node first, to keep open ones for the roots
                // that need them.
                (others > 0 || full > 0).then(|| {
                    rs.idle_middle
                        .iter()
                        .find(|m| !open(m))
                        .or_else(|| rs.idle_middle.first())
                })?
            })
            .copied();
            let Some(m) = pick else {
                return;
            };
            self.assign_feeder(m, cid);
            self.refresh_bottom_feeders(cid, aff);
            aff.affected.insert(m);
            let now = need(self);
            if now.0 + now.1 >= restricted + others && now.2 >= full {
                // The node had nothing to give these roots: leave the rest to the origin.
                return;
            }
            before = now;
        }
    }

    /// Balances capacity: a joiner that needs more than it gives goes where spare is largest, a
    /// contributor where it is smallest; full clusters only when all are full.
    fn pick_bottom_cluster(&self, region: Region, upload: u32) -> Option<ClusterId> {
        let rs = self.regions.get(&region)?;
        let mut best: Option<(i64, ClusterId)> = None;
        for id in &rs.bottom {
            let Some(c) = self.clusters.get(id) else {
                continue;
            };
            if c.len() >= self.cfg.cluster_max {
                continue;
            }
            let give = c.net_contribution(upload) >= 0;
            let key = if give { -c.spare() } else { c.spare() };
            if best.is_none_or(|(k, _)| key > k) {
                best = Some((key, *id));
            }
        }
        best.map(|(_, id)| id)
            .or_else(|| rs.bottom.iter().next().copied())
    }

    /// A new, empty bottom cluster of `region`, without feeders.
    fn empty_bottom_cluster(&mut self, region: Region) -> ClusterId {
        let id = self.fresh_id();
        self.bottom_cluster_with_id(region, id);
        id
    }

    /// Adds an empty bottom cluster `id` (a fresh id, or one restored after a failover) to
    /// `region`, without feeders.
    fn bottom_cluster_with_id(&mut self, region: Region, id: ClusterId) {
        let c = Cluster::new(
            id,
            region,
            ClusterKind::Bottom { k: self.cfg.k },
            self.cfg.stream_kbps,
            self.cfg.max_fanout,
        );
        self.clusters.insert(id, c);
        if let Some(rs) = self.regions.get_mut(&region) {
            rs.bottom.insert(id);
        }
    }

    fn new_bottom_cluster(&mut self, region: Region) -> ClusterId {
        let id = self.empty_bottom_cluster(region);
        // Idle middle nodes feed the new cluster at once.
        let f = self.cfg.feeders_per_cluster;
        let idle: Vec<PeerId> = self
            .regions
            .get(&region)
            .map(|r| r.idle_middle.iter().take(f).copied().collect())
            .unwrap_or_default();
        for m in idle {
            self.assign_feeder(m, id);
        }
        let mut aff = Changes::default();
        self.refresh_bottom_feeders(id, &mut aff);
        id
    }

    fn split(&mut self, cid: ClusterId, aff: &mut Changes) {
        let new_id = self.fresh_id();
        let (stream, maxf) = (self.cfg.stream_kbps, self.cfg.max_fanout);
        let Some(c) = self.clusters.get_mut(&cid) else {
            return;
        };
        let region = c.region;
        let (other, changes) = c.split(new_id, stream, maxf);
        aff.affected.extend(changes.affected);
        for p in other.members().map(|(p, _)| p) {
            if let Some(i) = self.peers.get_mut(&p) {
                i.cluster = Some(new_id);
            }
        }
        self.clusters.insert(new_id, other);
        // Half of the feeders move along; idle middle nodes top both up.
        let moving: Vec<PeerId> = self
            .regions
            .get(&region)
            .and_then(|r| r.feeders.get(&cid))
            .map(|s| s.iter().skip(1).step_by(2).copied().collect())
            .unwrap_or_default();
        if let Some(rs) = self.regions.get_mut(&region) {
            rs.bottom.insert(new_id);
        }
        for m in moving {
            self.move_feeds(m, cid, new_id);
        }
        for target in [cid, new_id] {
            while self.regions.get(&region).is_some_and(|r| {
                r.feeders.get(&target).map_or(0, BTreeSet::len) < self.cfg.feeders_per_cluster
            }) {
                let Some(m) = self
                    .regions
                    .get(&region)
                    .and_then(|r| r.idle_middle.first().copied())
                else {
                    break;
                };
                self.assign_feeder(m, target);
            }
            self.refresh_bottom_feeders(target, aff);
        }
    }

    fn maybe_merge(&mut self, cid: ClusterId, aff: &mut Changes) {
        let Some(c) = self.clusters.get(&cid) else {
            return;
        };
        if c.len() >= self.cfg.cluster_min {
            return;
        }
        let region = c.region;
        let Some(rs) = self.regions.get(&region) else {
            return;
        };
        // Into the smallest sibling; a region's last cluster stays, however small.
        let Some(into) = rs
            .bottom
            .iter()
            .filter(|x| **x != cid)
            .min_by_key(|x| self.clusters.get(x).map_or(usize::MAX, Cluster::len))
            .copied()
        else {
            if c.is_empty() {
                aff.affected.extend(self.feeder_peers(cid));
            }
            return;
        };
        let Some(gone) = self.clusters.remove(&cid) else {
            return;
        };
        for p in gone.members().map(|(p, _)| p) {
            if let Some(i) = self.peers.get_mut(&p) {
                i.cluster = Some(into);
            }
        }
        let (stream, maxf) = (self.cfg.stream_kbps, self.cfg.max_fanout);
        if let Some(target) = self.clusters.get_mut(&into) {
            aff.affected
                .extend(target.absorb(gone, stream, maxf).affected);
        }
        let moved: Vec<PeerId> = self
            .regions
            .get_mut(&region)
            .map(|r| {
                r.bottom.remove(&cid);
                r.feeders
                    .remove(&cid)
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        for m in moved {
            let slots = self.peers.get_mut(&m).map_or(0, |i| {
                let s = i.feeds.iter().filter(|f| f.0 == cid).map(|f| f.1).sum();
                i.feeds.retain(|f| f.0 != cid);
                s
            });
            self.allot_feeder(m, into, slots);
        }
        self.refresh_bottom_feeders(into, aff);
        if self
            .clusters
            .get(&into)
            .is_some_and(|c| c.len() > self.cfg.cluster_max)
        {
            self.split(into, aff);
        }
    }

    fn feeder_peers(&self, cid: ClusterId) -> Vec<PeerId> {
        self.clusters
            .get(&cid)
            .into_iter()
            .flat_map(|c| c.feeders())
            .filter_map(|f| match f.node {
                MeshNodeOrPeer::Peer(p) => Some(p),
                MeshNodeOrPeer::Server(_) => None,
            })
            .collect()
    }

    /// The server feeding a region's tier when no peer can: its waypoint, else the origin.
    fn server_of(&self, region: Region) -> MeshNode {
        self.regions
            .get(&region)
            .and_then(|r| r.waypoint)
            .unwrap_or(MeshNode::Origin)
    }

    fn refresh_middle_feeders(&mut self, region: Region, aff: &mut Changes) {
        let Some(rs) = self.regions.get(&region) else {
            return;
        };
        let trees = self.cfg.k + rs.fec_n;
        let mut feeders: Vec<Feeder> = rs
            .preferred
            .iter()
            .map(|p| Feeder {
                node: MeshNodeOrPeer::Peer(*p),
                slots: self.preferred_slots(self.peers.get(p).map_or(0, |i| i.upload)),
                nat: self.feeder_nat(*p),
            })
            .collect();
        if feeders.iter().all(|f| f.slots < trees) {
            feeders.push(Feeder {
                node: MeshNodeOrPeer::Server(self.server_of(region)),
                slots: self.cfg.server_slots * trees,
                nat: None,
            });
        }
        let mid = rs.middle;
        let orphans: Vec<ClusterId> = rs
            .bottom
            .iter()
            .filter(|cid| rs.feeders.get(cid).is_none_or(BTreeSet::is_empty))
            .copied()
            .collect();
        if let Some(c) = self.clusters.get_mut(&mid) {
            aff.affected.extend(c.set_feeders(feeders).affected);
        }
        // The preferred nodes also feed the bottom clusters no middle node feeds.
        for cid in orphans {
            self.refresh_bottom_feeders(cid, aff);
        }
    }

    fn refresh_bottom_feeders(&mut self, cid: ClusterId, aff: &mut Changes) {
        let Some(region) = self.clusters.get(&cid).map(|c| c.region) else {
            return;
        };
        let mut feeders: Vec<Feeder> = self
            .regions
            .get(&region)
            .and_then(|r| r.feeders.get(&cid))
            .into_iter()
            .flatten()
            .map(|p| Feeder {
                node: MeshNodeOrPeer::Peer(*p),
                slots: self.feed_slots(*p, cid),
                nat: self.feeder_nat(*p),
            })
            .collect();
        if feeders.is_empty() {
            // No middle node feeds it: the region's preferred nodes do (a waypoint standing in
            // for a region of weak viewers, FIG. 3), the server where they lack the capacity.
            if let Some(rs) = self.regions.get(&region) {
                feeders.extend(rs.preferred.iter().map(|p| Feeder {
                    node: MeshNodeOrPeer::Peer(*p),
                    slots: self.preferred_slots(self.peers.get(p).map_or(0, |i| i.upload)),
                    nat: self.feeder_nat(*p),
                }));
            }
            if feeders.iter().map(|f| f.slots).sum::<u32>() < self.cfg.k {
                feeders.push(Feeder {
                    node: MeshNodeOrPeer::Server(self.server_of(region)),
                    slots: self.cfg.server_slots * self.cfg.k,
                    nat: None,
                });
            }
        }
        if let Some(c) = self.clusters.get_mut(&cid) {
            aff.affected.extend(c.update_feeders(feeders).affected);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Plans
    // -----------------------------------------------------------------------------------------

    /// The algorithm on a link towards `child` (claim 4: it depends on the child's region, whose
    /// middle tier has its own redundancy).
    pub fn algorithm_for(&self, child: PeerId) -> Option<Algorithm> {
        let info = self.peers.get(&child)?;
        Some(match info.tier {
            Tier::Preferred => Algorithm::Flood,
            Tier::Middle => Algorithm::MultitreeFec {
                k: self.cfg.k,
                n: self
                    .regions
                    .get(&info.region)
                    .map_or(self.cfg.fec_n, |r| r.fec_n),
            },
            Tier::Bottom => Algorithm::Multitree,
        })
    }

    pub fn tier(&self, peer: PeerId) -> Option<Tier> {
        self.peers.get(&peer).map(|i| i.tier)
    }

    /// The region and tier of `peer`, without building its plan.
    pub fn placement(&self, peer: PeerId) -> Option<(Region, Tier)> {
        self.peers.get(&peer).map(|i| (i.region, i.tier))
    }

    /// Everything `peer` must do: tier, DCM, sources per substream, children, algorithm per link.
    pub fn plan(&self, peer: PeerId) -> Option<PeerPlan> {
        self.plan_with(peer, None)
    }

    /// The plans of many peers at once, as a re-plan sends them: the feeders of each cluster
    /// tree's roots are worked out once for the batch instead of once per root (a re-plan of a
    /// cluster's roots cost the square of their number: 35 % of the coordinator's time at
    /// 10 000 simulated peers).
    pub fn plans<'a>(
        &'a self,
        peers: impl IntoIterator<Item = PeerId> + 'a,
    ) -> impl Iterator<Item = (PeerId, Option<PeerPlan>)> + 'a {
        let mut cache = RootFeeders::default();
        peers
            .into_iter()
            .map(move |p| (p, self.plan_with(p, Some(&mut cache))))
    }

    /// `cache`: the batch's root feeders; `None` for one plan, which asks for its roots only.
    fn plan_with(&self, peer: PeerId, mut cache: Option<&mut RootFeeders>) -> Option<PeerPlan> {
        let info = self.peers.get(&peer)?;
        let rs = self.regions.get(&info.region)?;
        let mut plan = PeerPlan {
            tier: info.tier,
            region: info.region,
            cluster: None,
            plays: !info.relay,
            receive: Vec::new(),
            send: Vec::new(),
        };
        let me = MeshNodeOrPeer::Peer(peer);
        match info.tier {
            Tier::Preferred => {
                for n in self.mesh.neighbours(MeshNode::Peer(peer)) {
                    let end = match n {
                        MeshNode::Peer(p) => MeshNodeOrPeer::Peer(*p),
                        other => MeshNodeOrPeer::Server(*other),
                    };
                    let link = Link {
                        peer: end,
                        substream: None,
                        algorithm: Algorithm::Flood,
                    };
                    plan.receive.push(link.clone());
                    plan.send.push(link);
                }
                self.push_root_sends(rs.middle, me, &mut plan);
                // Bottom clusters no middle node feeds take their roots from the preferred
                // nodes (a waypoint in a region of weak viewers, FIG. 3).
                for cid in &rs.bottom {
                    if rs.feeders.get(cid).is_none_or(BTreeSet::is_empty) {
                        self.push_root_sends(*cid, me, &mut plan);
                    }
                }
            }
            Tier::Middle => {
                plan.cluster = Some(rs.middle);
                self.push_tree_links(rs.middle, peer, &mut plan, cache.as_deref_mut());
                for (f, _) in &info.feeds {
                    self.push_root_sends(*f, me, &mut plan);
                }
            }
            Tier::Bottom => {
                let cid = info.cluster?;
                plan.cluster = Some(cid);
                self.push_tree_links(cid, peer, &mut plan, cache);
            }
        }
        Some(plan)
    }

    fn push_tree_links(
        &self,
        cid: ClusterId,
        peer: PeerId,
        plan: &mut PeerPlan,
        mut cache: Option<&mut RootFeeders>,
    ) {
        let Some(c) = self.clusters.get(&cid) else {
            return;
        };
        let Some(alg) = self.algorithm_for(peer) else {
            return;
        };
        let Some(subs) = c.tree().plan(peer) else {
            return;
        };
        for s in subs {
            let from = match s.parent {
                protocol::Source::Peer { id } => MeshNodeOrPeer::Peer(id),
                protocol::Source::Origin => match cache.as_deref_mut() {
                    Some(cache) => cache
                        .entry((cid, s.index))
                        .or_insert_with(|| c.root_sources(s.index).into_iter().collect())
                        .get(&peer)
                        .copied(),
                    None => c.root_source(s.index, peer),
                }
                .unwrap_or(MeshNodeOrPeer::Server(MeshNode::Origin)),
            };
            plan.receive.push(Link {
                peer: from,
                substream: Some(s.index),
                algorithm: alg,
            });
            // A cluster's members share one tier, so its children share `alg`.
            plan.send.extend(s.children.into_iter().map(|child| Link {
                peer: MeshNodeOrPeer::Peer(child),
                substream: Some(s.index),
                algorithm: alg,
            }));
        }
    }

    /// Roots of cluster `cid` that `feeder` feeds.
    fn push_root_sends(&self, cid: ClusterId, feeder: MeshNodeOrPeer, plan: &mut PeerPlan) {
        let Some(c) = self.clusters.get(&cid) else {
            return;
        };
        for t in 0..c.kind.trees() {
            for (root, f) in c.root_sources(t) {
                if f == feeder {
                    plan.send.push(Link {
                        peer: MeshNodeOrPeer::Peer(root),
                        substream: Some(t),
                        algorithm: self.algorithm_for(root).unwrap_or(Algorithm::Multitree),
                    });
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Recruited relays (claims 19, 43) and reports
    // -----------------------------------------------------------------------------------------

    /// Regions whose bottom clusters together lack forwarding capacity, with the deficit in units.
    pub fn deficits(&self) -> BTreeMap<Region, u64> {
        let mut out = BTreeMap::new();
        for c in self.clusters.values() {
            if matches!(c.kind, ClusterKind::Bottom { .. }) && c.spare() < 0 {
                *out.entry(c.region).or_insert(0) += c.spare().unsigned_abs();
            }
        }
        out
    }

    /// For each region short of capacity, asks `registry` for spare peers of *other* channels
    /// and makes them relays here: middle nodes that feed the neediest cluster and play nothing.
    pub fn recruit_relays(&mut self, channel: u32, registry: &mut RelayRegistry) -> Changes {
        let mut aff = Changes::default();
        for (region, deficit) in self.deficits() {
            let mut missing = deficit.saturating_mul(self.unit());
            while missing > 0 {
                let Some((peer, kbps)) = registry.recruit(channel, region, self.cfg.stream_kbps)
                else {
                    break;
                };
                aff.affected
                    .extend(self.join_as(peer, region, kbps, true).affected);
                missing = missing.saturating_sub(u64::from(kbps));
            }
        }
        aff
    }

    /// Counts, depths, full-rate peers and upload use. O(peers · k): for benchmarks and the
    /// topology page, not for every event.
    pub fn report(&self) -> HierarchyReport {
        let mut r = HierarchyReport {
            peers: self.peers.len(),
            regions: self.regions.len(),
            mesh_connectivity: self.mesh.connectivity(),
            ..HierarchyReport::default()
        };
        let unit = self.unit();
        let mut starved: BTreeSet<PeerId> = BTreeSet::new();
        let mut feeds_used: FxHashMap<MeshNodeOrPeer, u64> = FxHashMap::default();
        // Middle clusters first: bottom clusters inherit their feeders' shortfall.
        let mut ordered: Vec<&Cluster> = self.clusters.values().collect();
        ordered.sort_by_key(|c| matches!(c.kind, ClusterKind::Bottom { .. }));
        for c in ordered {
            let bottom = matches!(c.kind, ClusterKind::Bottom { .. });
            let depth = c.tree().max_depth();
            if bottom {
                r.max_depth_bottom = r.max_depth_bottom.max(depth);
                r.bottom_clusters += 1;
            } else {
                r.max_depth_middle = r.max_depth_middle.max(depth);
            }
            let feeders_starved = c.feeders().iter().any(|f| match f.node {
                MeshNodeOrPeer::Peer(p) => starved.contains(&p),
                MeshNodeOrPeer::Server(_) => false,
            });
            if feeders_starved {
                starved.extend(c.members().map(|(p, _)| p));
            } else {
                starved.extend(c.underfed());
            }
            for t in 0..c.kind.trees() {
                for (_, f) in c.root_sources(t) {
                    *feeds_used.entry(f).or_insert(0) += 1;
                    match (bottom, f) {
                        (true, MeshNodeOrPeer::Peer(_)) => r.bottom_root_feeds_by_peers += 1,
                        (true, MeshNodeOrPeer::Server(MeshNode::Origin)) => {
                            r.bottom_roots_fed_by_origin += 1
                        }
                        (false, MeshNodeOrPeer::Server(MeshNode::Origin)) => {
                            r.middle_roots_fed_by_origin += 1
                        }
                        _ => {}
                    }
                }
            }
            for (p, _) in c.members() {
                *feeds_used.entry(MeshNodeOrPeer::Peer(p)).or_insert(0) +=
                    c.tree().children(p).len() as u64;
            }
        }
        for (p, info) in &self.peers {
            r.upload_total_kbps += u64::from(info.upload);
            let mut used = feeds_used
                .get(&MeshNodeOrPeer::Peer(*p))
                .copied()
                .unwrap_or(0)
                * unit;
            match info.tier {
                Tier::Preferred => {
                    r.preferred += 1;
                    let links = self.mesh.neighbours(MeshNode::Peer(*p)).len() as u64;
                    used += links.saturating_sub(1) * u64::from(self.cfg.stream_kbps);
                }
                Tier::Middle => r.middle += 1,
                Tier::Bottom => r.bottom += 1,
            }
            r.relays += usize::from(info.relay);
            r.upload_used_kbps += used.min(u64::from(info.upload));
        }
        r.waypoints = self
            .mesh
            .members()
            .iter()
            .filter(|n| matches!(n, MeshNode::Waypoint(_)))
            .count();
        r.full_rate = self.peers.len() - starved.len();
        r.idle_middle = self.regions.values().map(|rs| rs.idle_middle.len()).sum();
        r
    }

    /// Checks the structure: every cluster's trees, tier bookkeeping, mesh membership. For tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        for c in self.clusters.values() {
            c.tree()
                .check_invariants()
                .map_err(|e| format!("{}: {e}", c.id))?;
            if matches!(c.kind, ClusterKind::Bottom { .. }) && c.feeders().is_empty() {
                return Err(format!("{} has no feeder", c.id));
            }
        }
        for (p, info) in &self.peers {
            let rs = self
                .regions
                .get(&info.region)
                .ok_or_else(|| format!("{p}: region missing"))?;
            let in_mid = self
                .clusters
                .get(&rs.middle)
                .is_some_and(|c| c.contains(*p));
            let in_bottom = info
                .cluster
                .and_then(|c| self.clusters.get(&c))
                .is_some_and(|c| c.contains(*p));
            let in_mesh = self.mesh.contains(MeshNode::Peer(*p));
            let ok = match info.tier {
                Tier::Preferred => in_mesh && !in_mid && rs.preferred.contains(p),
                Tier::Middle => in_mid && !in_mesh && info.cluster.is_none(),
                Tier::Bottom => in_bottom && !in_mid && !in_mesh,
            };
            if !ok {
                return Err(format!("{p}: tier {:?} bookkeeping broken", info.tier));
            }
            let mut allotted = 0u32;
            for (f, slots) in &info.feeds {
                let listed = self
                    .region_of_cluster(*f)
                    .and_then(|fr| self.regions.get(&fr))
                    .and_then(|r| r.feeders.get(f))
                    .is_some_and(|s| s.contains(p));
                if !listed {
                    return Err(format!("{p}: feeds {f} but is not listed"));
                }
                allotted += slots;
            }
            if allotted > self.middle_slots(*p, info) {
                return Err(format!(
                    "{p}: {allotted} root feeds allotted over its capacity"
                ));
            }
            if info.tier == Tier::Middle && info.feeds.is_empty() != rs.idle_middle.contains(p) {
                return Err(format!("{p}: idle bookkeeping broken"));
            }
        }
        let members: usize = self.clusters.values().map(Cluster::len).sum::<usize>()
            + self
                .regions
                .values()
                .map(|r| r.preferred.len())
                .sum::<usize>();
        if members != self.peers.len() {
            return Err(format!("{members} placed != {} peers", self.peers.len()));
        }
        Ok(())
    }
}

fn extend_mesh(aff: &mut Changes, changed: BTreeSet<MeshNode>) {
    aff.affected
        .extend(changed.into_iter().filter_map(|n| match n {
            MeshNode::Peer(p) => Some(p),
            _ => None,
        }));
}

/// Spare upload of peers of all channels, so a channel short of capacity in a region can recruit
/// relays watching something else (claims 19, 43). Shared by the channels' DCMs.
#[derive(Debug, Clone, Default)]
pub struct RelayRegistry {
    /// (region, peer) → (channel it watches, spare upload kbit/s).
    spare: BTreeMap<(Region, PeerId), (u32, u32)>,
}

impl RelayRegistry {
    /// A peer of `channel` in `region` can upload `spare_kbps` more than its channel needs.
    pub fn offer(&mut self, channel: u32, region: Region, peer: PeerId, spare_kbps: u32) {
        self.spare.insert((region, peer), (channel, spare_kbps));
    }

    pub fn withdraw(&mut self, region: Region, peer: PeerId) {
        self.spare.remove(&(region, peer));
    }

    /// The peer with the most spare upload (at least `min_kbps`) in `region` watching another
    /// channel than `for_channel`; it leaves the pool.
    pub fn recruit(
        &mut self,
        for_channel: u32,
        region: Region,
        min_kbps: u32,
    ) -> Option<(PeerId, u32)> {
        let (&key, &(_, kbps)) = self
            .spare
            .range((region, PeerId(0))..=(region, PeerId(u64::MAX)))
            .filter(|(_, (ch, kbps))| *ch != for_channel && *kbps >= min_kbps)
            .max_by_key(|(k, (_, kbps))| (*kbps, std::cmp::Reverse(k.1)))?;
        self.spare.remove(&key);
        Some((key.1, kbps))
    }
}

/// Splits a peer's capacity between a live channel and a file download (claim 1: two contents
/// at once): live is served first up to its demand, the file gets what is left. Used for upload
/// (the relaying a peer is asked for in each hierarchy) and download alike.
pub fn split_capacity(capacity_kbps: u32, live_kbps: u32, file_kbps: u32) -> (u32, u32) {
    let live = capacity_kbps.min(live_kbps);
    (live, (capacity_kbps - live).min(file_kbps))
}

mod build;
mod restore;
#[cfg(test)]
mod restore_tests;
#[cfg(test)]
mod tests;
