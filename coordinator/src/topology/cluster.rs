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

use std::collections::BTreeMap;

use protocol::{Connectivity, PeerId};
use serde::Serialize;

use super::mesh::MeshNode;
use super::multitree::{Changes, MultiTree, MultiTreeConfig};
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
        Cluster {
            id,
            region,
            kind,
            tree: MultiTree::new(cfg),
            feeders: Vec::new(),
            uploads: BTreeMap::new(),
            nat: BTreeMap::new(),
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
        let before = self.origin_epochs();
        let mut ch = self.tree.set_connectivity(peer, conn);
        self.name_root_changes(&before, &mut ch);
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

    pub fn join(&mut self, peer: PeerId, upload_kbps: u32) -> Changes {
        self.uploads.insert(peer, upload_kbps);
        self.tree
            .set_connectivity(peer, self.nat.get(&peer).copied());
        self.tree.join(peer, upload_kbps)
    }

    pub fn leave(&mut self, peer: PeerId) -> Changes {
        self.uploads.remove(&peer);
        self.nat.remove(&peer);
        self.tree.leave(peer)
    }

    /// Adds many members at once: an empty cluster's trees are laid out in one pass
    /// ([`MultiTree::build`]); a non-empty one takes them one by one, strongest first.
    pub fn fill(&mut self, members: &[(PeerId, u32)]) {
        if self.is_empty() {
            let slots: Vec<u32> = (0..self.kind.trees())
                .map(|t| self.tree.origin_slots(t as usize))
                .collect();
            self.tree = MultiTree::build(*self.tree.config(), members);
            self.tree.set_origin_fanouts(&slots);
            self.uploads.extend(members.iter().copied());
            // The bulk layout does not know classes: links they cannot hold move now.
            for (p, c) in &self.nat {
                self.tree.set_connectivity(*p, Some(*c));
            }
            return;
        }
        let mut order = members.to_vec();
        order.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (p, u) in order {
            self.join(p, u);
        }
    }

    /// Like [`Cluster::join`], also naming the roots and feeders whose root feeds may have
    /// changed: in each tree whose set of roots changed, every root and its feeder (roots are
    /// dealt to feeders in order, so one new root can shift the others). Trees whose roots did
    /// not change cost nothing: O(k log n) in the common case.
    pub fn join_fed(&mut self, peer: PeerId, upload_kbps: u32) -> Changes {
        let before = self.origin_epochs();
        let mut ch = self.join(peer, upload_kbps);
        self.name_root_changes(&before, &mut ch);
        ch
    }

    /// Two members that cannot connect ([`MultiTree::block`]), naming the roots and feeders as
    /// [`Cluster::join_fed`] does.
    pub fn block_fed(&mut self, a: PeerId, b: PeerId) -> Changes {
        let before = self.origin_epochs();
        let mut ch = self.tree.block(a, b);
        self.name_root_changes(&before, &mut ch);
        ch
    }

    /// Like [`Cluster::leave`], naming the roots and feeders as [`Cluster::join_fed`] does.
    pub fn leave_fed(&mut self, peer: PeerId) -> Changes {
        let before = self.origin_epochs();
        let mut ch = self.leave(peer);
        self.name_root_changes(&before, &mut ch);
        ch.affected.remove(&peer);
        ch
    }

    fn origin_epochs(&self) -> Vec<u64> {
        (0..self.kind.trees())
            .map(|t| self.tree.origin_epoch(t))
            .collect()
    }

    /// Names every root and every feeder peer of the trees whose roots changed (a feeder may
    /// have lost its last root there, so the feeders are named whether they feed one now).
    fn name_root_changes(&self, before: &[u64], ch: &mut Changes) {
        let mut any = false;
        for (t, e) in before.iter().enumerate() {
            if self.tree.origin_epoch(t as u32) != *e {
                any = true;
                ch.affected.extend(self.tree.roots(t as u32));
            }
        }
        if any {
            ch.affected
                .extend(self.feeders.iter().filter_map(|f| match f.node {
                    MeshNodeOrPeer::Peer(p) => Some(p),
                    MeshNodeOrPeer::Server(_) => None,
                }));
        }
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
        aff.affected.extend(self.all_roots());
        aff
    }

    /// Like [`Cluster::set_feeders`] when only some feeders changed: returns the feeders that
    /// changed and the roots whose source changed, not every root.
    pub fn update_feeders(&mut self, feeders: Vec<Feeder>) -> Changes {
        let trees = self.kind.trees();
        let before: Vec<Vec<(PeerId, MeshNodeOrPeer)>> =
            (0..trees).map(|t| self.root_sources(t)).collect();
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
        for (t, old) in before.iter().enumerate() {
            let new = self.root_sources(t as u32);
            if &new == old {
                continue;
            }
            for (r, f) in old.iter().chain(&new) {
                if !(old.contains(&(*r, *f)) && new.contains(&(*r, *f))) {
                    aff.affected.insert(*r);
                    if let MeshNodeOrPeer::Peer(p) = f {
                        aff.affected.insert(*p);
                    }
                }
            }
        }
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

    /// Which feeder feeds each root of tree `t`, in slot order; roots beyond the slots are fed
    /// by the origin (fallback). Feeders' slots are dealt over the trees (see
    /// [`Cluster::set_feeders`]).
    pub fn root_sources(&self, t: u32) -> Vec<(PeerId, MeshNodeOrPeer)> {
        self.root_sources_iter(t).collect()
    }

    /// Which feeder feeds `root` in tree `t` ([`Cluster::root_sources`] without building the
    /// whole list: a plan asks this once per origin-fed substream of every root it computes).
    pub fn root_source(&self, t: u32, root: PeerId) -> Option<MeshNodeOrPeer> {
        self.root_sources_iter(t)
            .find(|(r, _)| *r == root)
            .map(|(_, f)| f)
    }

    fn root_sources_iter(&self, t: u32) -> impl Iterator<Item = (PeerId, MeshNodeOrPeer)> + '_ {
        let trees = self.kind.trees().max(1);
        let mut start = 0;
        let mut quota: Vec<(MeshNodeOrPeer, u32)> = Vec::with_capacity(self.feeders.len());
        for f in &self.feeders {
            quota.push((f.node, dealt(start, f.slots, t, trees)));
            start += f.slots;
        }
        // Tree t starts with feeder t mod F: when feeders have more slots than roots to feed,
        // the trees are spread over all of them instead of the first one feeding every tree, so
        // a member does not depend on a single feeder (the middle tier is fed by ≥ 2 preferred
        // nodes, and the code absorbs the loss of a feeder carrying ≤ n of a member's trees).
        if !quota.is_empty() {
            let r = t as usize % quota.len();
            quota.rotate_left(r);
        }
        let mut next = 0;
        self.tree.roots(t).map(move |r| {
            // A root behind a symmetric NAT (or with UDP blocked) reaches few of the peers
            // that feed clusters: the origin feeds it.
            if self.reaches_few(r) {
                return (r, MeshNodeOrPeer::Server(MeshNode::Origin));
            }
            while next < quota.len() && quota[next].1 == 0 {
                next += 1;
            }
            match quota.get_mut(next) {
                Some(q) => {
                    q.1 -= 1;
                    (r, q.0)
                }
                None => (r, MeshNodeOrPeer::Server(MeshNode::Origin)),
            }
        })
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
        }
    }

    #[test]
    fn one_root_s_feeder_is_the_one_the_whole_list_gives() {
        for (members, feeders, k) in [
            (6u64, vec![feeder(100, 4), feeder(101, 2)], 2u32),
            (3, vec![feeder(100, 3), feeder(101, 3)], 2),
            (9, vec![feeder(100, 5), feeder(101, 1), feeder(102, 7)], 4),
            (5, vec![], 3),
        ] {
            let mut c = Cluster::new(
                ClusterId(1),
                Region::V4([10, 0]),
                ClusterKind::Bottom { k },
                1000,
                4,
            );
            for i in 0..members {
                c.join(PeerId(i), 0);
            }
            // A symmetric-NAT root among them: the origin feeds it, the feeders skip it.
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
