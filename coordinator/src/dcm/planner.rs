//! The topology a DCM drives: a flat multi-tree (one cluster, every peer a viewer of the same `k`
//! trees), or the channel's three-tier hierarchy (regions, a flooding mesh of preferred nodes, an
//! erasure-coded middle tier, plain bottom clusters). Both are pure; this module only turns their
//! plans into the wire's [`ServerMsg::Instructions`](protocol::ServerMsg) and tells the DCM what
//! the origin must push to whom.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::{FecSpec, Feed, PeerId, Source, SubstreamPlan, TierName, TierPlan};
use serde::Serialize;

use crate::topology::cluster::{ClusterKind, MeshNodeOrPeer};
use crate::topology::hierarchy::{
    Algorithm, Hierarchy, HierarchyConfig, HierarchyReport, ObservedMember, PeerPlan, Tier,
};
use crate::topology::mesh::{select_preferred, Candidate, History, MeshConfig, MeshNode};
use crate::topology::region::{Region, TopologyConfig};
use crate::topology::{Changes, MultiTree, MultiTreeConfig};

/// What the origin pushes on a peer's control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "push", rename_all = "snake_case")]
pub enum Push {
    /// Every packet: the peer is the origin's neighbour in the top-tier mesh.
    Full,
    /// Packets with `seq mod k = substream` (a plain tree, or a data shard of a coded one).
    Data { substream: u32 },
    /// Parity shard `index` (≥ k) of every group, coded with `n` parity shards.
    Parity { index: u32, n: u32 },
}

/// A peer's instructions in wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePlan {
    pub substreams: Vec<SubstreamPlan>,
    pub tier: Option<TierPlan>,
}

impl WirePlan {
    /// Everything the origin must push to the peer under this plan.
    pub fn origin_pushes(&self, k: u32) -> Vec<Push> {
        let mut out = Vec::new();
        if let Some(t) = &self.tier {
            if t.mesh.contains(&Source::Origin) {
                // The full stream covers every substream; nothing else is needed.
                return vec![Push::Full];
            }
        }
        let fec = self.tier.as_ref().and_then(|t| t.fec);
        for s in &self.substreams {
            if s.parent != Source::Origin {
                continue;
            }
            match fec {
                Some(f) if s.index >= k => out.push(Push::Parity {
                    index: s.index,
                    n: f.n,
                }),
                _ => out.push(Push::Data { substream: s.index }),
            }
        }
        out
    }

    /// Whether `other` is one of the peer's neighbours (signaling is allowed between them).
    pub fn links_to(&self, other: PeerId) -> bool {
        let peer = Source::Peer { id: other };
        self.substreams
            .iter()
            .any(|s| s.parent == peer || s.children.contains(&other))
            || self
                .tier
                .as_ref()
                .is_some_and(|t| t.mesh.contains(&peer) || t.feeds.iter().any(|f| f.to == other))
    }
}

/// The three-tier state of a channel and what it needs beside the pure [`Hierarchy`].
pub struct Tiered {
    h: Hierarchy,
    topo: Arc<TopologyConfig>,
    regions: FxHashMap<PeerId, Region>,
    /// Recruited relays: re-placed as relays, never as viewers.
    relays: rustc_hash::FxHashSet<PeerId>,
}

pub enum Planner {
    Flat(MultiTree),
    Tiered(Box<Tiered>),
}

impl Planner {
    /// The hierarchy's summary ([`Hierarchy::report`]); `None` for a flat channel.
    pub fn hierarchy_report(&self) -> Option<HierarchyReport> {
        match self {
            Planner::Tiered(t) => Some(t.h.report()),
            Planner::Flat(_) => None,
        }
    }

    pub fn flat(cfg: MultiTreeConfig) -> Self {
        Planner::Flat(MultiTree::new(cfg))
    }

    /// A hierarchy with the topology config's parameters. The mesh keeps its default number of
    /// preferred nodes per region; `max_fanout` caps a bottom node's fan-out in units.
    pub fn tiered(
        topo: Arc<TopologyConfig>,
        stream_kbps: u32,
        max_fanout: u32,
        cluster_max: usize,
    ) -> Self {
        let cfg = HierarchyConfig {
            k: topo.k,
            stream_kbps,
            mesh: MeshConfig {
                c: topo.mesh_c,
                stream_kbps,
                origin_shortcuts: topo.origin_shortcuts,
                ..MeshConfig::default()
            },
            fec_n: topo.fec_n,
            cluster_min: (cluster_max / 4).max(1),
            cluster_max,
            max_fanout,
            ..HierarchyConfig::default()
        };
        let h = Hierarchy::new(cfg);
        Planner::Tiered(Box::new(Tiered {
            h,
            topo,
            regions: FxHashMap::default(),
            relays: Default::default(),
        }))
    }

    pub fn is_tiered(&self) -> bool {
        matches!(self, Planner::Tiered(_))
    }

    /// Places (or re-places) a peer with `upload_kbps` of usable capacity. Its record
    /// (`history`: uptime, delivered share, measured upload) ranks it for the top and middle
    /// tiers of a hierarchy.
    pub fn join(
        &mut self,
        peer: PeerId,
        region: Region,
        upload_kbps: u32,
        history: History,
    ) -> Changes {
        match self {
            Planner::Flat(t) => t.join(peer, upload_kbps),
            Planner::Tiered(t) => {
                t.regions.insert(peer, region);
                t.h.set_region_settings(region, t.topo.settings(region));
                if t.relays.contains(&peer) {
                    t.h.join_relay(peer, region, history.effective_upload_kbps(upload_kbps))
                } else {
                    t.h.join(peer, region, upload_kbps, history)
                }
            }
        }
    }

    /// Rebuilds a hierarchy from what its peers report after a failover
    /// ([`Hierarchy::restore`]); returns the peers it did not place, for the caller to place as
    /// joiners. A flat channel is restored from the parents alone: every peer is returned.
    pub fn restore_tiered(&mut self, observed: &[ObservedMember]) -> Vec<PeerId> {
        match self {
            Planner::Flat(_) => observed.iter().map(|o| o.peer).collect(),
            Planner::Tiered(t) => {
                for o in observed {
                    t.regions.insert(o.peer, o.region);
                    if o.relay {
                        t.relays.insert(o.peer);
                    }
                    t.h.set_region_settings(o.region, t.topo.settings(o.region));
                }
                t.h.restore(observed)
            }
        }
    }

    /// Places a recruited relay: it forwards this channel without playing it (claims 19, 43).
    /// A flat channel has no relays; the peer is placed like a viewer.
    pub fn join_relay(&mut self, peer: PeerId, region: Region, upload_kbps: u32) -> Changes {
        match self {
            Planner::Flat(t) => t.join(peer, upload_kbps),
            Planner::Tiered(t) => {
                t.regions.insert(peer, region);
                t.relays.insert(peer);
                t.h.set_region_settings(region, t.topo.settings(region));
                t.h.join_relay(peer, region, upload_kbps)
            }
        }
    }

    /// Regions whose bottom clusters lack forwarding capacity, with the deficit in units of
    /// `stream / k`; always empty on a flat channel.
    pub fn deficits(&self) -> BTreeMap<Region, u64> {
        match self {
            Planner::Flat(_) => BTreeMap::new(),
            Planner::Tiered(t) => t.h.deficits(),
        }
    }

    /// Upload a plan asks of its peer, kbit/s: a full stream per mesh neighbour, a substream
    /// per tree child and per feed.
    pub fn used_kbps(plan: &WirePlan, stream_kbps: u32, k: u32) -> u32 {
        let unit = u64::from(stream_kbps) / u64::from(k.max(1));
        let children: u64 = plan
            .substreams
            .iter()
            .map(|s| s.children.len() as u64)
            .sum();
        let (mesh, feeds) = plan.tier.as_ref().map_or((0, 0), |t| {
            (
                t.mesh.iter().filter(|s| **s != Source::Origin).count() as u64,
                t.feeds.len() as u64,
            )
        });
        ((children + feeds) * unit + mesh * u64::from(stream_kbps)).min(u64::from(u32::MAX)) as u32
    }

    /// Claims 10, 18: re-evaluates the top tier from the peers' records. Per region, the best
    /// candidates (capable of the mesh's upload, ranked by capacity × delivered share × uptime)
    /// become the preferred nodes, but an incumbent keeps its place unless a challenger beats it
    /// by the mesh's hysteresis margin, so the tier does not flap; a region that lost a
    /// preferred node gets one back. `candidates`: every viewer (relays are never preferred).
    pub fn reevaluate_preferred(&mut self, candidates: &[Candidate<Region>]) -> Changes {
        let Planner::Tiered(t) = self else {
            return Changes::default();
        };
        let candidates: Vec<Candidate<Region>> = candidates
            .iter()
            .filter(|c| {
                !t.relays.contains(&c.peer) && t.h.tier(c.peer).is_some() && !t.h.limited(c.peer)
            })
            .cloned()
            .collect();
        let current: std::collections::BTreeSet<PeerId> = candidates
            .iter()
            .filter(|c| t.h.tier(c.peer) == Some(Tier::Preferred))
            .map(|c| c.peer)
            .collect();
        let chosen: std::collections::BTreeSet<PeerId> =
            select_preferred(&t.h.config().mesh, &current, &candidates)
                .into_values()
                .flatten()
                .collect();
        let demote: Vec<&Candidate<Region>> = candidates
            .iter()
            .filter(|c| current.contains(&c.peer) && !chosen.contains(&c.peer))
            .collect();
        let promote: Vec<&Candidate<Region>> = candidates
            .iter()
            .filter(|c| chosen.contains(&c.peer) && !current.contains(&c.peer))
            .collect();
        let mut aff = Changes::default();
        // Out first, so the promoted find room; the demoted come back below the top tier.
        for c in &demote {
            aff.affected.extend(t.h.step_out(c.peer).affected);
        }
        for c in promote.iter().chain(&demote) {
            aff.affected.extend(
                t.h.join(c.peer, c.region, c.upload_kbps, c.history)
                    .affected,
            );
        }
        aff
    }

    /// Re-places a peer already known, in its region and role (after a capacity change).
    pub fn rejoin(&mut self, peer: PeerId, upload_kbps: u32, history: History) -> Changes {
        let region = match self {
            Planner::Flat(_) => Region::V4([0, 0]),
            Planner::Tiered(t) => match t.regions.get(&peer) {
                Some(r) => *r,
                None => return Changes::default(),
            },
        };
        self.join(peer, region, upload_kbps, history)
    }

    pub fn leave(&mut self, peer: PeerId) -> Changes {
        match self {
            Planner::Flat(t) => t.leave(peer),
            Planner::Tiered(t) => {
                t.regions.remove(&peer);
                t.relays.remove(&peer);
                t.h.leave(peer)
            }
        }
    }

    /// The peer's instructions, or `None` for a peer the topology does not know.
    pub fn plan(&self, peer: PeerId) -> Option<WirePlan> {
        match self {
            Planner::Flat(t) => t.plan(peer).map(|substreams| WirePlan {
                substreams,
                tier: None,
            }),
            Planner::Tiered(t) => t.h.plan(peer).map(|p| t.to_wire(p)),
        }
    }

    /// The region (by name) and tier of `peer` on a hierarchical channel, without building its
    /// plan; `None` on a flat channel or for a peer it does not place.
    pub fn placement(&self, peer: PeerId) -> Option<(Region, protocol::TierName)> {
        let Planner::Tiered(t) = self else {
            return None;
        };
        let (region, tier) = t.h.placement(peer)?;
        let tier = match tier {
            Tier::Preferred => protocol::TierName::Preferred,
            Tier::Middle => protocol::TierName::Middle,
            Tier::Bottom => protocol::TierName::Bottom,
        };
        Some((region, tier))
    }

    /// The display name of a region (hierarchical channels; empty on a flat one).
    pub fn region_name(&self, region: Region) -> String {
        match self {
            Planner::Tiered(t) => t.topo.name(region),
            Planner::Flat(_) => String::new(),
        }
    }

    /// The plans of many peers, for one re-plan (see [`Hierarchy::plans`]).
    pub fn plans(
        &self,
        peers: impl IntoIterator<Item = PeerId>,
    ) -> Vec<(PeerId, Option<WirePlan>)> {
        match self {
            Planner::Flat(_) => peers.into_iter().map(|p| (p, self.plan(p))).collect(),
            Planner::Tiered(t) => {
                t.h.plans(peers)
                    .map(|(p, plan)| (p, plan.map(|x| t.to_wire(x))))
                    .collect()
            }
        }
    }

    /// Lowers a peer's capacity without moving anyone (flat multi-tree only); false when its
    /// current children need more, or on a hierarchy (re-placement there is future work).
    pub fn lower_capacity(&mut self, peer: PeerId, upload_kbps: u32) -> bool {
        match self {
            Planner::Flat(t) => t.lower_fanout(peer, upload_kbps),
            Planner::Tiered(_) => false,
        }
    }

    pub fn interior_tree(&self, peer: PeerId) -> Option<u32> {
        match self {
            Planner::Flat(t) => t.interior_tree(peer),
            Planner::Tiered(t) => {
                let plan = t.h.plan(peer)?;
                plan.send
                    .iter()
                    .find(|l| !matches!(l.algorithm, Algorithm::Flood))
                    .and_then(|l| l.substream)
            }
        }
    }

    pub fn max_depth(&self) -> u32 {
        match self {
            Planner::Flat(t) => t.max_depth(),
            Planner::Tiered(t) => {
                t.h.clusters()
                    .map(|c| c.tree().max_depth())
                    .max()
                    .unwrap_or(0)
            }
        }
    }

    /// Whether the link from `parent` to `child` is a feed between tiers (a middle node feeding
    /// a bottom cluster's root): re-placing the child does not move it, [`Planner::block`] does.
    pub fn is_feed(&self, parent: PeerId, child: PeerId) -> bool {
        match self {
            Planner::Flat(_) => false,
            Planner::Tiered(t) => t.h.feeds_cluster_of(parent, child),
        }
    }

    /// The stream rate flat trees are planned at, and whether a peer placed with `upload_kbps`
    /// has a larger fan-out than that rate allows now (`None`: a hierarchy, whose clusters keep
    /// the rate they were made with).
    pub fn over_capacity(&self, peer: PeerId, upload_kbps: u32) -> Option<bool> {
        match self {
            Planner::Flat(t) => {
                let now = t.fanout(peer)?;
                Some(t.config().fanout_for(upload_kbps) < now)
            }
            Planner::Tiered(_) => None,
        }
    }

    /// Plans at `kbps` from now on (flat trees; a hierarchy keeps its rate). Returns whether
    /// anything changed.
    pub fn set_stream_kbps(&mut self, kbps: u32) -> bool {
        match self {
            Planner::Flat(t) if t.config().stream_kbps != kbps => {
                t.set_stream_kbps(kbps);
                true
            }
            _ => false,
        }
    }

    /// Roots of other clusters `peer` feeds, with the tree of each feed (none on a flat channel).
    pub fn fed_roots(&self, peer: PeerId) -> Vec<(PeerId, u32)> {
        match self {
            Planner::Flat(_) => Vec::new(),
            Planner::Tiered(t) => t.h.fed_roots(peer),
        }
    }

    /// `peer`'s NAT class (`None`: unknown): it is linked only with peers it can reach, and
    /// links it cannot hold are re-placed now. Before its join, it places the joiner by it.
    /// A hierarchy places by class within its clusters and keeps peers that reach few others
    /// in the bottom tier ([`Hierarchy::set_connectivity`]).
    pub fn set_connectivity(
        &mut self,
        peer: PeerId,
        connectivity: Option<protocol::Connectivity>,
    ) -> Changes {
        match self {
            Planner::Flat(t) => t.set_connectivity(peer, connectivity),
            Planner::Tiered(t) => t.h.set_connectivity(peer, connectivity),
        }
    }

    /// The NAT class recorded for `peer`, where the planner uses one (restrictive classes).
    pub fn connectivity(&self, peer: PeerId) -> Option<protocol::Connectivity> {
        match self {
            Planner::Flat(t) => t.connectivity(peer),
            Planner::Tiered(_) => None,
        }
    }

    /// `a` and `b` cannot connect (one of them reported a data channel that never opened): they
    /// are never parent and child again, and a child of theirs is re-placed now.
    pub fn block(&mut self, a: PeerId, b: PeerId) -> Changes {
        match self {
            Planner::Flat(t) => t.block(a, b),
            Planner::Tiered(t) => t.h.block(a, b),
        }
    }

    /// The topology's own structural invariants (every tree's, tier bookkeeping) and, on a
    /// hierarchy, that the top-tier mesh has the connectivity it promises. For tests and the
    /// simulator: O(n·k).
    pub fn check_invariants(&self) -> Result<(), String> {
        match self {
            Planner::Flat(t) => t.check_invariants(),
            Planner::Tiered(t) => {
                t.h.check_invariants()?;
                let mesh = t.h.mesh();
                let c = mesh.connectivity();
                if mesh.len() > c as usize
                    && !crate::topology::mesh::is_c_connected(mesh.adjacency(), c)
                {
                    return Err(format!(
                        "the mesh of {} nodes is not {c}-connected",
                        mesh.len()
                    ));
                }
                Ok(())
            }
        }
    }

    /// The hierarchy's shape for the topology API (`None` on a flat channel).
    pub fn hierarchy_view(&self) -> Option<HierarchyView> {
        let Planner::Tiered(t) = self else {
            return None;
        };
        let mut regions: BTreeMap<Region, RegionView> = BTreeMap::new();
        for c in t.h.clusters() {
            let r = regions.entry(c.region).or_insert_with(|| RegionView {
                name: t.topo.name(c.region),
                preferred: Vec::new(),
                clusters: Vec::new(),
            });
            let (kind, fec) = match c.kind {
                ClusterKind::Middle { k, n } => ("middle", Some(FecSpec { k, n })),
                ClusterKind::Bottom { .. } => ("bottom", None),
            };
            let mut members: Vec<PeerId> = c.members().map(|(p, _)| p).collect();
            members.sort();
            let mut feeders: Vec<String> =
                c.feeders().iter().map(|f| endpoint_name(f.node)).collect();
            feeders.dedup();
            r.clusters.push(ClusterView {
                id: c.id.0,
                tier: kind,
                fec,
                members,
                feeders,
                max_depth: c.tree().max_depth(),
            });
        }
        let mut mesh_links = Vec::new();
        for (node, ns) in t.h.mesh().adjacency() {
            if let MeshNode::Peer(p) = node {
                if let Some(r) = t.regions.get(p) {
                    let name = t.topo.name(*r);
                    let entry = regions.entry(*r).or_insert_with(|| RegionView {
                        name,
                        preferred: Vec::new(),
                        clusters: Vec::new(),
                    });
                    entry.preferred.push(*p);
                }
            }
            for n in ns {
                if node < n {
                    mesh_links.push((mesh_name(*node), mesh_name(*n)));
                }
            }
        }
        // Every link with the algorithm it runs (claim 7), receiver side.
        let mut peers: Vec<PeerId> = t.regions.keys().copied().collect();
        peers.sort();
        let mut links = Vec::new();
        for p in peers {
            let Some(plan) = t.h.plan(p) else {
                continue;
            };
            for l in plan.receive {
                links.push(LinkView {
                    from: endpoint_name(l.peer),
                    to: p,
                    substream: l.substream,
                    algorithm: l.algorithm,
                });
            }
        }
        Some(HierarchyView {
            links,
            regions: regions.into_values().collect(),
            mesh_c: t.h.mesh().config().c,
            mesh_connectivity: t.h.mesh().connectivity(),
            mesh_links,
            report: t.h.report(),
        })
    }
}

fn mesh_name(n: MeshNode) -> String {
    match n {
        MeshNode::Origin => "origin".into(),
        MeshNode::Peer(p) => p.0.to_string(),
        MeshNode::Waypoint(i) => format!("waypoint#{i}"),
    }
}

fn endpoint_name(e: MeshNodeOrPeer) -> String {
    match e {
        MeshNodeOrPeer::Peer(p) => p.0.to_string(),
        MeshNodeOrPeer::Server(n) => mesh_name(n),
    }
}

/// `/api/channels/{id}/topology`'s `hierarchy` member.
#[derive(Debug, Clone, Serialize)]
pub struct HierarchyView {
    pub regions: Vec<RegionView>,
    pub mesh_c: u32,
    pub mesh_connectivity: u32,
    /// Top-tier links (flooding), as pairs of node names (`origin` or a peer id).
    pub mesh_links: Vec<(String, String)>,
    /// Every link, receiver side, with its algorithm (`flood`, `multitree`, `multitree_fec`).
    pub links: Vec<LinkView>,
    pub report: HierarchyReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    /// `origin`, a waypoint, or a peer id.
    pub from: String,
    pub to: PeerId,
    /// `None` on a flooding link (every packet).
    pub substream: Option<u32>,
    #[serde(flatten)]
    pub algorithm: Algorithm,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionView {
    pub name: String,
    pub preferred: Vec<PeerId>,
    pub clusters: Vec<ClusterView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// The logical id of the DCM managing the cluster.
    pub id: u64,
    pub tier: &'static str,
    pub fec: Option<FecSpec>,
    pub members: Vec<PeerId>,
    pub feeders: Vec<String>,
    pub max_depth: u32,
}

impl Tiered {
    /// Servers (origin, waypoints: none run beside the origin yet) become `Source::Origin`: the
    /// origin pushes on the control socket.
    fn to_wire(&self, plan: PeerPlan) -> WirePlan {
        let src = |e: MeshNodeOrPeer| match e {
            MeshNodeOrPeer::Peer(id) => Source::Peer { id },
            MeshNodeOrPeer::Server(_) => Source::Origin,
        };
        let spec = |a: Algorithm| match a {
            Algorithm::MultitreeFec { k, n } => Some(FecSpec { k, n }),
            _ => None,
        };
        let mut trees: BTreeMap<u32, SubstreamPlan> = BTreeMap::new();
        let mut mesh = Vec::new();
        let mut feeds = Vec::new();
        let mut fec = None;
        for l in &plan.receive {
            match (l.algorithm, l.substream) {
                (Algorithm::Flood, _) => mesh.push(src(l.peer)),
                (a, Some(t)) => {
                    fec = fec.or(spec(a));
                    trees
                        .entry(t)
                        .or_insert_with(|| SubstreamPlan {
                            index: t,
                            parent: src(l.peer),
                            children: Vec::new(),
                        })
                        .parent = src(l.peer);
                }
                _ => {}
            }
        }
        for l in &plan.send {
            let (Some(t), MeshNodeOrPeer::Peer(to)) = (l.substream, l.peer) else {
                continue;
            };
            if matches!(l.algorithm, Algorithm::Flood) {
                continue;
            }
            // A middle node's own tree carries coded shards; its plain sends feed bottom roots.
            // A preferred node has no tree of its own: all its sends are feeds.
            let own_tree = match plan.tier {
                Tier::Preferred => false,
                Tier::Middle => spec(l.algorithm).is_some(),
                Tier::Bottom => true,
            };
            if own_tree {
                trees
                    .entry(t)
                    .or_insert_with(|| SubstreamPlan {
                        index: t,
                        parent: Source::Origin,
                        children: Vec::new(),
                    })
                    .children
                    .push(to);
            } else {
                feeds.push(Feed {
                    to,
                    substream: t,
                    fec: spec(l.algorithm),
                });
            }
        }
        let tier = match plan.tier {
            Tier::Preferred => TierName::Preferred,
            Tier::Middle => TierName::Middle,
            Tier::Bottom => TierName::Bottom,
        };
        WirePlan {
            substreams: trees.into_values().collect(),
            tier: Some(TierPlan {
                tier,
                region: self.topo.name(plan.region),
                cluster: plan.cluster.map(|c| c.0),
                plays: plan.plays,
                fec,
                mesh,
                feeds,
            }),
        }
    }
}
