//! A cluster of the middle or bottom tier (patent FIG. 4, 5, 7): the unit a DCM manages.
//!
//! A cluster is a [`MultiTree`] whose "origin" is not the real origin but the cluster's *feeders*:
//! the nodes of the tier above that hand it the stream (preferred nodes for a region's middle
//! cluster, middle-tier nodes for a bottom cluster, the origin or a waypoint when the tier above
//! is empty). Each feeder contributes a number of root feeds ("slots"); the tree's
//! `origin_fanout` is their sum divided over the trees, and roots beyond it are fed by the real
//! origin as a last resort (the peers' HTTP fallback) and count as *underfed*.
//!
//! * **Middle** clusters run the multi-tree with Reed-Solomon coding: `k + n` trees, tree `i`
//!   carrying coded shard `i` of every group of `k` packets ([`protocol::fec`]). A node is at full
//!   rate when at least `k` of its `k + n` substreams are fed within capacity.
//! * **Bottom** clusters run the plain multi-tree of `k` substreams.

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};

use protocol::{Connectivity, PeerId, Source};
use serde::Serialize;

use super::mesh::MeshNode;
use super::multitree::{Changes, MultiTree, MultiTreeConfig, ObservedPeer};
use super::region::Region;

/// Logical id of a cluster: the id of the DCM that manages it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ClusterId(pub u64);

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dcm{}", self.0)
    }
}

/// The tier a cluster belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Erasure-coded: `k + n` trees, any `k` suffice.
    Middle { k: u32, n: u32 },
    /// Plain multi-tree of `k` substreams.
    Bottom { k: u32 },
}

impl ClusterKind {
    pub fn trees(&self) -> u32 {
        match *self {
            ClusterKind::Middle { k, n } => k + n,
            ClusterKind::Bottom { k } => k,
        }
    }

    /// Substreams a node may miss and still rebuild the full rate.
    pub fn tolerance(&self) -> u32 {
        match *self {
            ClusterKind::Middle { n, .. } => n,
            ClusterKind::Bottom { .. } => 0,
        }
    }
}

/// Who feeds a cluster's roots, and how many root feeds (over all trees) it can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feeder {
    pub node: MeshNodeOrPeer,
    pub slots: u32,
    /// The feeder's NAT class when it is a peer that cannot pair with everyone; `None` for an
    /// open peer, an unknown one, or a server.
    pub nat: Option<Connectivity>,
}

/// A feeder is a tier-above peer, or a server (origin, waypoint) of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshNodeOrPeer {
    Peer(PeerId),
    Server(MeshNode),
}

/// One cluster: its tree and its feeders.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub id: ClusterId,
    pub region: Region,
    pub kind: ClusterKind,
    tree: MultiTree,
    feeders: Vec<Feeder>,
    /// Declared upload of each member, to move members between clusters.
    uploads: BTreeMap<PeerId, u32>,
    /// The NAT class of members that cannot pair with everyone: the trees link only pairs
    /// that connect, also when members move between clusters.
    nat: BTreeMap<PeerId, Connectivity>,
    /// The feeder of each root, per tree; a root not listed is fed by the origin. Kept across
    /// changes ([`Cluster::sync_roots`]): a root keeps its feeder while both stay and the
    /// feeder's share of that tree's slots holds, so one root coming or going moves no other.
    assigned: Vec<FxHashMap<PeerId, MeshNodeOrPeer>>,
    /// Each tree's origin epoch when `assigned` was last brought up to date.
    synced: Vec<u64>,
}

impl Cluster {
    /// `stream_kbps` is the plain stream rate; a middle cluster's trees each carry one coded
    /// shard per group, i.e. `stream / k` like a plain substream.
    pub fn new(
        id: ClusterId,
        region: Region,
        kind: ClusterKind,
        stream_kbps: u32,
        max_fanout: u32,
    ) -> Self {
        let trees = kind.trees().max(1);
        let k = match kind {
            ClusterKind::Middle { k, .. } | ClusterKind::Bottom { k } => k.max(1),
        };
        let cfg = MultiTreeConfig {
            k: trees,
            // Per-tree rate = stream / k in both kinds, so fan-outs are in the same unit.
            stream_kbps: (u64::from(stream_kbps) * u64::from(trees) / u64::from(k)) as u32,
            origin_fanout: 0,
            max_fanout,
        };
        let mut tree = MultiTree::new(cfg);
        // A bottom cluster's "origin" is its feeders, middle nodes with upload to spare.
        tree.set_prefer_origin(matches!(kind, ClusterKind::Bottom { .. }));
        Cluster {
            id,
            region,
            kind,
            tree,
            feeders: Vec::new(),
            uploads: BTreeMap::new(),
            nat: BTreeMap::new(),
            assigned: vec![FxHashMap::default(); trees as usize],
            synced: vec![u64::MAX; trees as usize],
        }
    }

    /// `peer`'s NAT class: set before it joins, it places the joiner by it; for a member, the
    /// links its class cannot hold are re-placed now (roots and feeders named as
    /// [`Cluster::join_fed`] does).
    pub fn set_connectivity(&mut self, peer: PeerId, conn: Option<Connectivity>) -> Changes {
        match conn.filter(|c| c.is_restrictive()) {
            Some(c) => self.nat.insert(peer, c),
            None => self.nat.remove(&peer),
        };
        if !self.contains(peer) {
            return Changes::default();
        }
        let mut ch = self.tree.set_connectivity(peer, conn);
        ch.affected.extend(self.sync_roots(true));
        ch
    }

    pub fn tree(&self) -> &MultiTree {
        &self.tree
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    pub fn contains(&self, peer: PeerId) -> bool {
        self.uploads.contains_key(&peer)
    }

    pub fn members(&self) -> impl Iterator<Item = (PeerId, u32)> + '_ {
        self.uploads.iter().map(|(p, u)| (*p, *u))
    }

    pub fn feeders(&self) -> &[Feeder] {
        &self.feeders
    }

    /// Root feeds per tree the feeders give (the smallest over the trees: see
    /// [`Cluster::root_slots_of`]).
    pub fn root_slots(&self) -> u32 {
        self.tree.config().origin_fanout
    }

    /// Root feeds the feeders give in tree `t`.
    pub fn root_slots_of(&self, t: u32) -> u32 {
        self.tree.origin_slots(t as usize)
    }

    /// Forwarding slots minus demand, over all trees: below zero the cluster cannot feed every
    /// member every substream and some are underfed (the origin tops up).
    pub fn spare(&self) -> i64 {
        let trees = self.kind.trees();
        let roots: i64 = (0..trees).map(|t| i64::from(self.root_slots_of(t))).sum();
        self.tree.total_fanout() as i64 + roots - self.len() as i64 * i64::from(trees)
    }

    /// Root feeds, over all trees, the feeders must give so that no tree has more roots than
    /// root slots as the trees stand (feeds are dealt over the trees in order, see
    /// [`Cluster::set_feeders`]): `trees · (m − 1) + (last tree with m roots) + 1`, `m` the
    /// largest root count of a tree.
    pub fn root_feeds_needed(&self) -> u32 {
        let trees = self.kind.trees();
        let counts: Vec<u32> = (0..trees)
            .map(|t| self.tree.origin_children_count(t) as u32)
            .collect();
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return 0;
        }
        let last = counts.iter().rposition(|c| *c == m).unwrap_or(0) as u32;
        trees * (m - 1) + last + 1
    }

    /// Slots a member with this upload adds to [`Cluster::spare`] (negative: it needs more than
    /// it gives).
    pub fn net_contribution(&self, upload_kbps: u32) -> i64 {
        i64::from(self.tree.config().fanout_for(upload_kbps)) - i64::from(self.kind.trees())
    }

    /// Adds a member; the changes name the peers whose links in the trees changed, not the
    /// roots whose feeders changed ([`Cluster::join_fed`] does).
    pub fn join(&mut self, peer: PeerId, upload_kbps: u32) -> Changes {
        self.join_synced(peer, upload_kbps).0
    }

    /// Removes a member (see [`Cluster::join`] for what the changes name).
    pub fn leave(&mut self, peer: PeerId) -> Changes {
        self.leave_synced(peer).0
    }

    /// A join, then the roots' feeders brought up to date: the tree's changes, and the peers
    /// whose root feeds changed ([`Cluster::sync_roots`]).
    fn join_synced(&mut self, peer: PeerId, upload_kbps: u32) -> (Changes, BTreeSet<PeerId>) {
        self.uploads.insert(peer, upload_kbps);
        self.tree
            .set_connectivity(peer, self.nat.get(&peer).copied());
        let ch = self.tree.join(peer, upload_kbps);
        (ch, self.sync_roots(false))
    }

    /// Like [`Cluster::join_synced`], for a departure.
    fn leave_synced(&mut self, peer: PeerId) -> (Changes, BTreeSet<PeerId>) {
        self.uploads.remove(&peer);
        self.nat.remove(&peer);
        let ch = self.tree.leave(peer);
        (ch, self.sync_roots(false))
    }

    /// Adds many members at once: an empty cluster's trees are laid out in one pass
    /// ([`MultiTree::build`]); a non-empty one takes them one by one, strongest first.
    pub fn fill(&mut self, members: &[(PeerId, u32)]) {
        if self.is_empty() {
            let slots: Vec<u32> = (0..self.kind.trees())
                .map(|t| self.tree.origin_slots(t as usize))
                .collect();
            let prefer = matches!(self.kind, ClusterKind::Bottom { .. });
            self.tree = MultiTree::build(*self.tree.config(), members);
            self.tree.set_prefer_origin(prefer);
            self.tree.set_origin_fanouts(&slots);
            self.uploads.extend(members.iter().copied());
            // The bulk layout does not know classes: links they cannot hold move now.
            for (p, c) in &self.nat {
                self.tree.set_connectivity(*p, Some(*c));
            }
            self.sync_roots(true);
            return;
        }
        let mut order = members.to_vec();
        order.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (p, u) in order {
            self.join(p, u);
        }
    }

    /// Records a member about to be restored ([`Cluster::restore`]) without placing it.
    pub fn reserve_member(&mut self, peer: PeerId, upload_kbps: u32) {
        self.uploads.insert(peer, upload_kbps);
    }

    /// Rebuilds an empty cluster from what its members report (a DCM taking a channel over
    /// after its server failed): the trees keep every consistent link
    /// ([`MultiTree::restore_like`], with this cluster's root slots, so the feeders' slots are
    /// filled as before), and each root keeps the feeder it names while that feeder still feeds
    /// the cluster and has a slot for it in that tree ([`Cluster::sync_roots`]). A parent that
    /// is not a member is a feeder; the origin, the cluster's server feeder if it has one. Set
    /// the feeders and the members' classes first.
    pub fn restore(&mut self, observed: &[ObservedPeer]) {
        let trees = self.kind.trees().max(1) as usize;
        let members: BTreeSet<PeerId> = observed.iter().map(|o| o.peer).collect();
        let server = self
            .feeders
            .iter()
            .map(|f| f.node)
            .find(|n| matches!(n, MeshNodeOrPeer::Server(_)))
            .unwrap_or(MeshNodeOrPeer::Server(MeshNode::Origin));
        let mut hints: Vec<FxHashMap<PeerId, MeshNodeOrPeer>> = vec![FxHashMap::default(); trees];
        let mapped: Vec<ObservedPeer> = observed
            .iter()
            .map(|o| ObservedPeer {
                peer: o.peer,
                upload_kbps: o.upload_kbps,
                parents: o
                    .parents
                    .iter()
                    .map(|&(t, src)| {
                        let feeder = match src {
                            Source::Peer { id } if members.contains(&id) => return (t, src),
                            Source::Peer { id } => MeshNodeOrPeer::Peer(id),
                            Source::Origin => server,
                        };
                        if let Some(h) = hints.get_mut(t as usize) {
                            h.insert(o.peer, feeder);
                        }
                        (t, Source::Origin)
                    })
                    .collect(),
            })
            .collect();
        let (tree, _) = self.tree.restore_like(&mapped);
        self.tree = tree;
        self.uploads = observed.iter().map(|o| (o.peer, o.upload_kbps)).collect();
        // Links the members' classes cannot hold move now, as after a bulk layout.
        for (p, c) in &self.nat {
            if self.uploads.contains_key(p) {
                self.tree.set_connectivity(*p, Some(*c));
            }
        }
        self.assigned = hints;
        self.synced = vec![u64::MAX; trees];
        self.sync_roots(true);
    }

    /// Like [`Cluster::join`], also naming the roots whose feeder changed and those feeders.
    /// Trees whose roots did not change cost nothing: O(k log n) in the common case.
    pub fn join_fed(&mut self, peer: PeerId, upload_kbps: u32) -> Changes {
        let (mut ch, fed) = self.join_synced(peer, upload_kbps);
        ch.affected.extend(fed);
        ch
    }

    /// Two members that cannot connect ([`MultiTree::block`]), naming the roots and feeders as
    /// [`Cluster::join_fed`] does.
    pub fn block_fed(&mut self, a: PeerId, b: PeerId) -> Changes {
        let mut ch = self.tree.block(a, b);
        ch.affected.extend(self.sync_roots(false));
        ch
    }

    /// Like [`Cluster::leave`], naming the roots and feeders as [`Cluster::join_fed`] does.
    pub fn leave_fed(&mut self, peer: PeerId) -> Changes {
        let (mut ch, fed) = self.leave_synced(peer);
        ch.affected.extend(fed);
        ch.affected.remove(&peer);
        ch
    }

    /// Replaces the feeders; returns the peers whose sources or children changed: the old and
    /// new feeder peers and the roots.
    ///
    /// The feeders' slots are dealt over the trees in order, as one sequence of root feeds
    /// (feed `j` goes to tree `j mod trees`, the first feeder's feeds first): a feeder whose
    /// slots are not a multiple of the tree count still uses every one of them, and every tree
    /// gets within one root feed of the others.
    pub fn set_feeders(&mut self, feeders: Vec<Feeder>) -> Changes {
        let mut aff = Changes::default();
        for f in self.feeders.iter().chain(&feeders) {
            if let MeshNodeOrPeer::Peer(p) = f.node {
                aff.affected.insert(p);
            }
        }
        self.feeders = feeders;
        self.apply_root_slots();
        self.sync_roots(true);
        aff.affected.extend(self.all_roots());
        aff
    }

    /// Like [`Cluster::set_feeders`] when only some feeders changed: returns the feeders that
    /// changed and the roots whose source changed, not every root.
    pub fn update_feeders(&mut self, feeders: Vec<Feeder>) -> Changes {
        let mut aff = Changes::default();
        for f in &self.feeders {
            if !feeders.contains(f) {
                if let MeshNodeOrPeer::Peer(p) = f.node {
                    aff.affected.insert(p);
                }
            }
        }
        for f in &feeders {
            if !self.feeders.contains(f) {
                if let MeshNodeOrPeer::Peer(p) = f.node {
                    aff.affected.insert(p);
                }
            }
        }
        self.feeders = feeders;
        self.apply_root_slots();
        aff.affected.extend(self.sync_roots(true));
        aff
    }

    fn apply_root_slots(&mut self) {
        let trees = self.kind.trees().max(1);
        let total: u32 = self.feeders.iter().map(|f| f.slots).sum();
        let per_tree: Vec<u32> = (0..trees).map(|t| dealt(0, total, t, trees)).collect();
        self.tree.set_origin_fanouts(&per_tree);
    }

    fn all_roots(&self) -> Vec<PeerId> {
        (0..self.kind.trees())
            .flat_map(|t| self.tree.roots(t))
            .collect()
    }

    /// Which feeder feeds each root of tree `t`, in root order; roots beyond the feeders'
    /// slots are fed by the origin (fallback). See [`Cluster::sync_roots`] for how roots and
    /// feeders are matched.
    pub fn root_sources(&self, t: u32) -> Vec<(PeerId, MeshNodeOrPeer)> {
        let origin = MeshNodeOrPeer::Server(MeshNode::Origin);
        let assigned = self.assigned.get(t as usize);
        self.tree
            .roots(t)
            .map(|r| {
                (
                    r,
                    assigned.and_then(|a| a.get(&r)).copied().unwrap_or(origin),
                )
            })
            .collect()
    }

    /// Which feeder feeds `root` in tree `t` (one entry of [`Cluster::root_sources`]); `None`
    /// when `root` is not a root of that tree.
    pub fn root_source(&self, t: u32, root: PeerId) -> Option<MeshNodeOrPeer> {
        if self.tree.depth(root, t) != Some(1) {
            return None;
        }
        Some(
            self.assigned
                .get(t as usize)
                .and_then(|a| a.get(&root))
                .copied()
                .unwrap_or(MeshNodeOrPeer::Server(MeshNode::Origin)),
        )
    }

    /// Brings the matching of roots to feeders up to date after a change (every tree when
    /// `all`, else the trees whose set of roots changed) and returns the peers whose feeds
    /// changed: the roots and both their old and new feeders.
    ///
    /// Each feeder's slots are dealt over the trees in order, as one sequence of root feeds
    /// (see [`Cluster::set_feeders`]); that is its quota in each tree. A root keeps its feeder
    /// while both stay, the feeder's quota holds and they can pair. Roots without a feeder
    /// then take one: first those behind symmetric NATs (or with UDP blocked), which reach
    /// few of the peers that feed clusters, each from a feeder it can pair with (taking the
    /// slot of an unrestricted root if need be), then the others, each from the feeder with the
    /// most slots left in that tree. Roots left over are fed by the origin.
    fn sync_roots(&mut self, all: bool) -> BTreeSet<PeerId> {
        let trees = self.kind.trees().max(1);
        self.assigned.resize(trees as usize, FxHashMap::default());
        self.synced.resize(trees as usize, u64::MAX);
        let mut aff = BTreeSet::new();
        for t in 0..trees {
            let epoch = self.tree.origin_epoch(t);
            if !all && self.synced[t as usize] == epoch {
                continue;
            }
            self.synced[t as usize] = epoch;
            // Quotas of this tree, and where each feeder is in the list.
            let mut start = 0;
            let mut left: Vec<u32> = Vec::with_capacity(self.feeders.len());
            let mut index: FxHashMap<MeshNodeOrPeer, usize> = FxHashMap::default();
            for (i, f) in self.feeders.iter().enumerate() {
                left.push(dealt(start, f.slots, t, trees));
                start += f.slots;
                index.entry(f.node).or_insert(i);
            }
            let restricted = |r: &PeerId| self.nat.get(r).filter(|c| !c.reaches_most()).copied();
            let fits = |class: Option<Connectivity>, f: &Feeder| match (class, f.node) {
                (None, _) | (_, MeshNodeOrPeer::Server(_)) => true,
                (Some(c), MeshNodeOrPeer::Peer(_)) => Connectivity::can_pair(Some(c), f.nat),
            };
            let old = std::mem::take(&mut self.assigned[t as usize]);
            let mut new: FxHashMap<PeerId, MeshNodeOrPeer> = FxHashMap::default();
            let mut unassigned: Vec<PeerId> = Vec::new();
            let mut roots: Vec<PeerId> = self.tree.roots(t).collect();
            roots.sort_unstable();
            for r in &roots {
                let kept = old.get(r).and_then(|f| index.get(f).map(|i| (*f, *i)));
                match kept {
                    Some((f, i)) if left[i] > 0 && fits(restricted(r), &self.feeders[i]) => {
                        left[i] -= 1;
                        new.insert(*r, f);
                    }
                    _ => unassigned.push(*r),
                }
            }
            let (few, mut others): (Vec<PeerId>, Vec<PeerId>) = unassigned
                .into_iter()
                .partition(|r| restricted(r).is_some());
            for r in few {
                let class = restricted(&r);
                let best = (0..self.feeders.len())
                    .filter(|i| left[*i] > 0 && fits(class, &self.feeders[*i]))
                    .max_by_key(|i| (left[*i], std::cmp::Reverse(*i)));
                if let Some(i) = best {
                    left[i] -= 1;
                    new.insert(r, self.feeders[i].node);
                    continue;
                }
                // Take the slot of an unrestricted root at a feeder this one can pair with;
                // that root looks for another feeder below.
                let swap = roots.iter().copied().find(|o| {
                    restricted(o).is_none()
                        && new.get(o).is_some_and(|f| {
                            index.get(f).is_some_and(|i| fits(class, &self.feeders[*i]))
                        })
                });
                if let Some(o) = swap.and_then(|o| new.remove(&o).map(|f| (o, f))) {
                    new.insert(r, o.1);
                    others.push(o.0);
                }
            }
            for r in others {
                let best = (0..self.feeders.len())
                    .filter(|i| left[*i] > 0)
                    .max_by_key(|i| (left[*i], std::cmp::Reverse(*i)));
                if let Some(i) = best {
                    left[i] -= 1;
                    new.insert(r, self.feeders[i].node);
                }
            }
            // What changed: roots whose feeder differs, and both feeders.
            for r in old.keys().chain(new.keys()).chain(&roots) {
                let (a, b) = (old.get(r), new.get(r));
                if a == b {
                    continue;
                }
                aff.insert(*r);
                for f in [a, b].into_iter().flatten() {
                    if let MeshNodeOrPeer::Peer(p) = f {
                        aff.insert(*p);
                    }
                }
            }
            self.assigned[t as usize] = new;
        }
        aff
    }

    /// Trees whose root slots are all taken: a joiner goes under a member there, not a feeder.
    pub fn trees_without_free_root_slot(&self) -> u32 {
        (0..self.kind.trees())
            .filter(|t| {
                self.tree.origin_children_count(*t) >= self.tree.origin_slots(*t as usize) as usize
            })
            .count() as u32
    }

    /// Roots, over all trees, that the origin feeds because no feeder has a slot left for them
    /// (none when the server is one of the feeders): `(restricted, others)`, the first those
    /// behind symmetric NATs that need an open feeder.
    pub fn roots_fed_by_origin(&self) -> (u32, u32) {
        let origin = MeshNodeOrPeer::Server(MeshNode::Origin);
        let mut out = (0, 0);
        if self.feeders.iter().any(|f| f.node == origin) {
            return out;
        }
        for t in 0..self.kind.trees() {
            for (r, f) in self.root_sources(t) {
                if f != origin {
                    continue;
                }
                if self.reaches_few(r) {
                    out.0 += 1;
                } else {
                    out.1 += 1;
                }
            }
        }
        out
    }

    /// Whether member `peer`'s class cannot reach endpoint-independent NATs.
    fn reaches_few(&self, peer: PeerId) -> bool {
        self.nat.get(&peer).is_some_and(|c| !c.reaches_most())
    }

    /// Members that miss more substreams than the kind tolerates, fed within capacity.
    pub fn underfed(&self) -> impl Iterator<Item = PeerId> + '_ {
        let tol = self.kind.tolerance();
        self.tree
            .underfed()
            .into_iter()
            .filter(move |(_, missing)| *missing > tol)
            .map(|(p, _)| p)
    }

    /// Splits off about half of the members into a new cluster (alternating by upload, so both
    /// halves keep similar spare capacity); the caller gives the new one feeders. Both halves are
    /// rebuilt strongest-first (the patent's greedy heuristic): leaves erode the balance of
    /// forwarding capacity between trees, and a rebuild restores it at the same cost as moving.
    pub fn split(
        &mut self,
        id: ClusterId,
        stream_kbps: u32,
        max_fanout: u32,
    ) -> (Cluster, Changes) {
        let mut by_upload: Vec<(u32, PeerId)> =
            self.uploads.iter().map(|(p, u)| (*u, *p)).collect();
        by_upload.sort_unstable_by(|a, b| b.cmp(a));
        let mut aff = Changes::default();
        aff.affected.extend(self.uploads.keys().copied());
        let mut keep = Cluster::new(self.id, self.region, self.kind, stream_kbps, max_fanout);
        let mut other = Cluster::new(id, self.region, self.kind, stream_kbps, max_fanout);
        for (i, (u, p)) in by_upload.into_iter().enumerate() {
            let half = if i % 2 == 0 { &mut keep } else { &mut other };
            if let Some(c) = self.nat.get(&p) {
                half.nat.insert(p, *c);
            }
            half.join(p, u);
        }
        keep.set_feeders(std::mem::take(&mut self.feeders));
        *self = keep;
        (other, aff)
    }

    /// Merges `other`'s members into this cluster, rebuilding it strongest-first (see
    /// [`Cluster::split`]); `other`'s feeders are the caller's to re-home.
    pub fn absorb(&mut self, other: Cluster, stream_kbps: u32, max_fanout: u32) -> Changes {
        let mut by_upload: Vec<(u32, PeerId)> = self
            .uploads
            .iter()
            .chain(&other.uploads)
            .map(|(p, u)| (*u, *p))
            .collect();
        by_upload.sort_unstable_by(|a, b| b.cmp(a));
        let mut merged = Cluster::new(self.id, self.region, self.kind, stream_kbps, max_fanout);
        merged.nat = std::mem::take(&mut self.nat);
        merged.nat.extend(other.nat.iter().map(|(p, c)| (*p, *c)));
        let mut aff = Changes::default();
        for (u, p) in by_upload {
            merged.join(p, u);
            aff.affected.insert(p);
        }
        aff.affected.extend(
            merged
                .set_feeders(std::mem::take(&mut self.feeders))
                .affected,
        );
        *self = merged;
        aff
    }
}

/// Of the feeds `start .. start + len` of a sequence dealt round-robin over `trees` trees, how
/// many go to tree `t`.
fn dealt(start: u32, len: u32, t: u32, trees: u32) -> u32 {
    let upto = |n: u32| n / trees + u32::from(t < n % trees);
    upto(start + len) - upto(start)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn feeder(p: u64, slots: u32) -> Feeder {
        Feeder {
            node: MeshNodeOrPeer::Peer(PeerId(p)),
            slots,
            nat: None,
        }
    }

    fn weak_cluster(k: u32, members: u64) -> Cluster {
        let mut c = Cluster::new(
            ClusterId(1),
            Region::V4([10, 0]),
            ClusterKind::Bottom { k },
            1000,
            4,
        );
        for i in 0..members {
            c.join(PeerId(i), 0); // nobody forwards: every member is a root in every tree
        }
        c
    }

    #[test]
    fn one_root_s_feeder_is_the_one_the_whole_list_gives() {
        for (members, feeders, k) in [
            (6u64, vec![feeder(100, 4), feeder(101, 2)], 2u32),
            (3, vec![feeder(100, 3), feeder(101, 3)], 2),
            (9, vec![feeder(100, 5), feeder(101, 1), feeder(102, 7)], 4),
            (5, vec![], 3),
        ] {
            let mut c = weak_cluster(k, members);
            // A symmetric-NAT root among them: only a feeder it can pair with feeds it.
            c.set_connectivity(
                PeerId(1),
                Some(Connectivity {
                    class: protocol::NatClass::EndpointDependent,
                    turn: false,
                }),
            );
            c.set_feeders(feeders);
            for t in 0..k {
                for (root, from) in c.root_sources(t) {
                    assert_eq!(c.root_source(t, root), Some(from), "tree {t}, root {root}");
                }
                assert_eq!(c.root_source(t, PeerId(999)), None);
            }
        }
    }

    #[test]
    fn a_root_coming_or_going_moves_no_other_root_to_another_feeder() {
        let mut c = weak_cluster(2, 8);
        c.set_feeders(vec![feeder(100, 6), feeder(101, 4), feeder(102, 2)]);
        let before: Vec<Vec<(PeerId, MeshNodeOrPeer)>> =
            (0..2).map(|t| c.root_sources(t)).collect();
        let ch = c.leave_fed(PeerId(3));
        for t in 0..2u32 {
            let gone = before[t as usize]
                .iter()
                .find(|(r, _)| *r == PeerId(3))
                .unwrap()
                .1;
            for (r, f) in c.root_sources(t) {
                let was = before[t as usize].iter().find(|(x, _)| *x == r).unwrap().1;
                // Only a root the origin fed may take the slot the leaver freed.
                if was != f {
                    assert_eq!(was, MeshNodeOrPeer::Server(MeshNode::Origin), "{r}");
                    assert_eq!(f, gone, "{r}");
                    assert!(ch.affected.contains(&r));
                }
            }
        }
        let untouched = (0..8u64)
            .filter(|i| *i != 3)
            .filter(|i| !ch.affected.contains(&PeerId(*i)))
            .count();
        assert!(untouched >= 5, "{:?}", ch.affected);
        // A newcomer is a root too; it takes a free slot or the origin, the others stay.
        let before: Vec<Vec<(PeerId, MeshNodeOrPeer)>> =
            (0..2).map(|t| c.root_sources(t)).collect();
        c.join_fed(PeerId(50), 0);
        for t in 0..2u32 {
            for (r, f) in c
                .root_sources(t)
                .into_iter()
                .filter(|(r, _)| *r != PeerId(50))
            {
                assert_eq!(
                    Some(&(r, f)),
                    before[t as usize].iter().find(|(x, _)| *x == r)
                );
            }
        }
    }

    #[test]
    fn a_symmetric_nat_root_takes_the_slot_of_a_feeder_it_can_pair_with() {
        use protocol::NatClass::*;
        let mut c = weak_cluster(2, 4);
        let eim = Connectivity {
            class: EndpointIndependent,
            turn: false,
        };
        // Per tree: 4 slots behind a NAT the symmetric root cannot reach, 1 open one.
        c.set_feeders(vec![
            Feeder {
                nat: Some(eim),
                ..feeder(100, 8)
            },
            feeder(101, 2),
        ]);
        for t in 0..2 {
            assert!(c
                .root_sources(t)
                .iter()
                .all(|(_, f)| *f != MeshNodeOrPeer::Server(MeshNode::Origin)));
        }
        // Member 2 turns out to be behind a symmetric NAT; the open slot is someone else's
        // in at least one tree. It takes it, and the other root moves to the NATed feeder.
        let ch = c.set_connectivity(
            PeerId(2),
            Some(Connectivity {
                class: EndpointDependent,
                turn: false,
            }),
        );
        for t in 0..2 {
            assert_eq!(
                c.root_source(t, PeerId(2)),
                Some(MeshNodeOrPeer::Peer(PeerId(101))),
                "tree {t}"
            );
            assert!(c
                .root_sources(t)
                .iter()
                .all(|(_, f)| *f != MeshNodeOrPeer::Server(MeshNode::Origin)));
        }
        assert!(ch.affected.contains(&PeerId(2)));
        assert_eq!(c.roots_fed_by_origin(), (0, 0));
        // A second symmetric root finds no open slot left: the origin feeds it.
        c.set_connectivity(
            PeerId(3),
            Some(Connectivity {
                class: EndpointDependent,
                turn: false,
            }),
        );
        assert_eq!(c.roots_fed_by_origin(), (2, 0));
    }

    #[test]
    fn feeders_fill_root_slots_in_order_then_the_origin_tops_up() {
        let mut c = Cluster::new(
            ClusterId(1),
            Region::V4([10, 0]),
            ClusterKind::Bottom { k: 2 },
            1000,
            4,
        );
        for i in 0..6 {
            c.join(PeerId(i), 0); // nobody forwards: every member is a root in every tree
        }
        let aff = c.set_feeders(vec![feeder(100, 4), feeder(101, 2)]);
        assert!(aff.affected.contains(&PeerId(100)) && aff.affected.contains(&PeerId(0)));
        assert_eq!(c.root_slots(), 3);
        for t in 0..2 {
            let src = c.root_sources(t);
            assert_eq!(src.len(), 6);
            let by = |n: MeshNodeOrPeer| src.iter().filter(|(_, s)| *s == n).count();
            assert_eq!(by(MeshNodeOrPeer::Peer(PeerId(100))), 2);
            assert_eq!(by(MeshNodeOrPeer::Peer(PeerId(101))), 1);
            assert_eq!(by(MeshNodeOrPeer::Server(MeshNode::Origin)), 3);
        }
        assert_eq!(c.underfed().count(), 3);
        assert_eq!(c.spare(), -6);
    }

    #[test]
    fn feeds_are_dealt_over_the_trees_so_none_is_wasted() {
        let mut c = Cluster::new(
            ClusterId(5),
            Region::V4([10, 0]),
            ClusterKind::Bottom { k: 2 },
            1000,
            4,
        );
        for i in 0..3 {
            c.join(PeerId(i), 0); // three roots in each tree
        }
        assert_eq!(c.root_feeds_needed(), 6);
        // 3 + 3 slots: the odd slot of each feeder is not lost, it goes to the other tree.
        c.set_feeders(vec![feeder(100, 3), feeder(101, 3)]);
        assert_eq!((c.root_slots_of(0), c.root_slots_of(1)), (3, 3));
        assert_eq!(c.underfed().count(), 0);
        for t in 0..2 {
            let src = c.root_sources(t);
            assert!(src
                .iter()
                .all(|(_, f)| matches!(f, MeshNodeOrPeer::Peer(_))));
        }
        let by = |n: u64| {
            (0..2)
                .flat_map(|t| c.root_sources(t))
                .filter(|(_, f)| *f == MeshNodeOrPeer::Peer(PeerId(n)))
                .count()
        };
        assert_eq!((by(100), by(101)), (3, 3));
        // Five slots cover tree 0 three times and tree 1 twice: one root of tree 1 is underfed.
        let ch = c.update_feeders(vec![feeder(100, 5)]);
        assert!(ch.affected.contains(&PeerId(101)));
        assert_eq!((c.root_slots_of(0), c.root_slots_of(1)), (3, 2));
        assert_eq!(c.underfed().count(), 1);
    }

    #[test]
    fn fill_lays_out_an_empty_cluster_at_once() {
        let mut c = Cluster::new(
            ClusterId(6),
            Region::V4([1, 2]),
            ClusterKind::Bottom { k: 4 },
            1000,
            8,
        );
        let members: Vec<(PeerId, u32)> = (0..100)
            .map(|i| (PeerId(i), [0, 500, 1000, 3000][i as usize % 4]))
            .collect();
        c.fill(&members);
        c.tree().check_invariants().unwrap();
        assert_eq!(c.len(), 100);
        assert!(c.contains(PeerId(99)));
        // Fan-outs 0, 2, 4, 8 (25 each): 350 slots for 400 feeds; the feeders give the rest.
        let need = c.root_feeds_needed();
        assert!(need <= 60, "needs {need}");
        c.set_feeders(vec![feeder(1000, need / 2), feeder(1001, need - need / 2)]);
        assert_eq!(c.underfed().count(), 0, "spare {}", c.spare());
        let ch = c.join_fed(PeerId(500), 0);
        assert!(ch.affected.contains(&PeerId(500)));
        c.tree().check_invariants().unwrap();
    }

    #[test]
    fn middle_cluster_tolerates_n_missing_substreams() {
        let mut c = Cluster::new(
            ClusterId(2),
            Region::V4([10, 0]),
            ClusterKind::Middle { k: 2, n: 1 },
            1000,
            8,
        );
        assert_eq!(c.tree().config().k, 3);
        c.join(PeerId(1), 0);
        // Slots for two of the three trees: one substream missing, within tolerance.
        c.set_feeders(vec![feeder(9, 2)]);
        assert_eq!(c.root_slots(), 0);
        c.set_feeders(vec![feeder(9, 3)]);
        assert_eq!(c.root_slots(), 1);
        assert_eq!(c.underfed().count(), 0);
    }

    #[test]
    fn split_and_absorb_keep_every_member_fed() {
        let mut c = Cluster::new(
            ClusterId(3),
            Region::V4([1, 2]),
            ClusterKind::Bottom { k: 4 },
            1000,
            8,
        );
        for i in 0..100 {
            c.join(PeerId(i), [0, 500, 1000, 3000][i as usize % 4]);
        }
        c.set_feeders(vec![feeder(1000, 16), feeder(1001, 16)]);
        let (mut d, aff) = c.split(ClusterId(4), 1000, 8);
        d.set_feeders(vec![feeder(1002, 16), feeder(1003, 16)]);
        assert_eq!(c.len() + d.len(), 100);
        assert!(c.len().abs_diff(d.len()) <= 1);
        assert!(!aff.affected.is_empty());
        for x in [&c, &d] {
            x.tree().check_invariants().unwrap();
            assert_eq!(x.underfed().count(), 0, "spare {}", x.spare());
        }
        c.absorb(d, 1000, 8);
        assert_eq!(c.len(), 100);
        // The absorbed cluster's feeders come along (the hierarchy re-homes them).
        c.set_feeders((1000..1004).map(|p| feeder(p, 16)).collect());
        c.tree().check_invariants().unwrap();
        assert_eq!(c.underfed().count(), 0);
    }
}
