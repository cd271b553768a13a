//! Rebuilding a multi-tree from the links peers report, for a delivery coordinator manager that
//! takes over a channel after its predecessor failed.
//!
//! The new manager knows only the heartbeats: each peer names its parent per substream and its
//! upload capacity. Peers keep relaying on their old instructions meanwhile, so the rebuilt tree
//! must keep every link that can be kept: then the plans it would send are the ones the peers
//! already run, and only the peers around inconsistent or missing links hear from it.
//!
//! # Which links are kept
//!
//! A peer's interior tree is the one in which others name it as their parent (it forwards in one
//! tree only; when claimed in several, the tree with the most claimants wins, ties to the lowest
//! index). A forwarder nobody names gets the tree a join would give it: its plan has no children
//! anywhere, so any tree reproduces it. A claimed link `child -> parent` in tree `t` is kept when
//! the parent reported too, forwards in `t`, and the claim is within the parent's fan-out
//! (claimants that forward in `t` first, since they carry subtrees, then by id). The links kept
//! this way give every peer at most one parent per tree; they are adopted top-down from the
//! origin, so depths are known as they go. What is not reached from the origin hangs under a peer
//! whose own link was dropped (its subtree is kept and moves with it) or in a cycle (cut at its
//! smallest id). Those roots, and peers with no usable link, are placed as joins would place them
//! except that they never take an existing leaf's place: that would break a link that was fine.
//!
//! Links to the origin are always kept, also beyond its slots per tree: the origin is the parent
//! of last resort and the incremental operations leave such overflow feeds in place too (see
//! [`MultiTree::origin_overflow`]). As after every leave, leaves the origin feeds are then moved
//! under free slots; a tree rebuilt from a consistent report has none to move.
//!
//! Everything is keyed by peer id, never by input order, so the result does not depend on the
//! order in which heartbeats arrived.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protocol::{PeerId, Source};

use super::{Changes, Link, MultiTree, MultiTreeConfig, Node, Parent};

/// One peer as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPeer {
    pub peer: PeerId,
    pub upload_kbps: u32,
    /// (substream, where the peer receives it from).
    pub parents: Vec<(u32, Source)>,
}

/// A reported parent: `None` is the origin.
type Claim = Option<PeerId>;

/// One peer's report, cleaned up: its upload and, per tree, its claimed parent (`None` when the
/// report names none, or contradicts itself, or names the peer itself).
type Report = (u32, Vec<Option<Claim>>);

/// Of one tree: the peers that name each peer as their parent, ascending.
type Claimants = BTreeMap<PeerId, Vec<PeerId>>;

impl MultiTree {
    /// Rebuilds a tree from observed links. Keeps every link that is consistent (parent known
    /// and present, the parent interior in that tree, no cycle, within the parent's fan-out;
    /// every peer interior in at most one tree); peers or substreams whose observed link is
    /// inconsistent or missing are placed as joins would be (see the module documentation).
    ///
    /// Returns the tree and the peers whose plan differs from what they reported: they need new
    /// instructions, everyone else already runs the restored plan. A peer's reported children
    /// are taken to be the peers that name it as parent (the report carries no children), so a
    /// parent whose child fell silent is not named.
    ///
    /// A peer listed twice keeps the greater of its entries (by upload, then parents), so the
    /// result never depends on the order of `observed`. Substreams ≥ k are ignored.
    pub fn restore(cfg: MultiTreeConfig, observed: &[ObservedPeer]) -> (MultiTree, Changes) {
        MultiTree::new(cfg).restored(observed)
    }

    /// Like [`MultiTree::restore`], for a tree set up like `self` (an empty tree whose origin
    /// slots per tree, preference for them, known classes and blocked pairs are set): a
    /// cluster's tree, whose "origin" is its feeders. Members of `self` are dropped.
    pub fn restore_like(&self, observed: &[ObservedPeer]) -> (MultiTree, Changes) {
        let mut m = MultiTree::new(self.cfg);
        m.origin_fanouts.clone_from(&self.origin_fanouts);
        m.prefer_origin = self.prefer_origin;
        m.nat.clone_from(&self.nat);
        m.class_unknown.clone_from(&self.class_unknown);
        m.blocked.clone_from(&self.blocked);
        m.restored(observed)
    }

    fn restored(self, observed: &[ObservedPeer]) -> (MultiTree, Changes) {
        let mut m = self;
        let k = m.trees.len();
        let reports = canonical_reports(observed, k);

        // Per tree, who names whom as parent: only present parents, claimants ascending.
        let mut claimants: Vec<Claimants> = vec![BTreeMap::new(); k];
        for (&p, (_, claims)) in &reports {
            for (t, claim) in claims.iter().enumerate() {
                if let Some(Some(q)) = claim {
                    if reports.contains_key(q) {
                        claimants[t].entry(*q).or_default().push(p);
                    }
                }
            }
        }

        m.nodes = reports
            .iter()
            .map(|(&p, &(upload, _))| {
                let node = Node {
                    fanout: m.cfg.fanout_for(upload),
                    interior: None,
                    links: vec![
                        Link {
                            parent: Parent::Detached,
                            depth: 0,
                        };
                        k
                    ],
                    children: Vec::new(),
                    leaf_children: 0,
                };
                (p, node)
            })
            .collect();
        m.assign_interior_trees(&reports, &claimants);

        // The primitives record whom they touch; restore compares with the reports instead.
        let mut scratch = BTreeSet::new();
        for (t, of_tree) in claimants.iter().enumerate() {
            m.restore_tree(t, &reports, of_tree, &mut scratch);
        }

        let mut affected = BTreeSet::new();
        for (&p, (_, claims)) in &reports {
            let Some(n) = m.nodes.get(&p) else { continue };
            let differs = (0..k).any(|t| {
                let parent = match n.links[t].parent {
                    Parent::Peer(q) => Some(Some(q)),
                    Parent::Origin => Some(None),
                    Parent::Detached => None,
                };
                let mut now = if n.interior == Some(t as u32) {
                    n.children.clone()
                } else {
                    Vec::new()
                };
                now.sort_unstable();
                let was = claimants[t].get(&p).map_or(&[][..], |v| v.as_slice());
                parent != claims[t] || now != was
            });
            if differs {
                affected.insert(p);
            }
        }
        (m, Changes { affected })
    }

    /// Gives every peer with fan-out its interior tree and adds its fan-out to that tree's
    /// capacity.
    fn assign_interior_trees(
        &mut self,
        reports: &BTreeMap<PeerId, Report>,
        claimants: &[Claimants],
    ) {
        let k = self.trees.len();
        let mut unclaimed = Vec::new();
        for (&p, n) in &mut self.nodes {
            if n.fanout == 0 {
                continue; // claims naming it are inconsistent: it cannot forward
            }
            let best = (0..k)
                .map(|t| (claimants[t].get(&p).map_or(0, Vec::len), t))
                .filter(|(count, _)| *count > 0)
                .min_by_key(|&(count, t)| (std::cmp::Reverse(count), t));
            match best {
                Some((_, t)) => {
                    n.interior = Some(t as u32);
                    self.trees[t].capacity += u64::from(n.fanout);
                }
                None => unclaimed.push((std::cmp::Reverse(n.fanout), p)),
            }
        }
        // Forwarders without children: the tree a join would choose, strongest first as in
        // `build`. Roots count as in `least_spare_tree`: here, the forwarders that report the
        // origin as their parent in their tree.
        let mut roots = vec![0u64; k];
        for (p, n) in &self.nodes {
            if let Some(t) = n.interior {
                let origin_fed = reports.get(p).and_then(|(_, c)| c.get(t as usize).copied())
                    == Some(Some(None));
                roots[t as usize] += u64::from(origin_fed);
            }
        }
        unclaimed.sort_unstable();
        for (std::cmp::Reverse(fanout), p) in unclaimed {
            let t = (0..k)
                .min_by_key(|t| (self.trees[*t].capacity + roots[*t], *t))
                .unwrap_or(0);
            self.trees[t].capacity += u64::from(fanout);
            if let Some(n) = self.nodes.get_mut(&p) {
                n.interior = Some(t as u32);
            }
            let origin_fed =
                reports.get(&p).and_then(|(_, c)| c.get(t).copied()) == Some(Some(None));
            roots[t] += u64::from(origin_fed);
        }
    }

    /// Links every peer into tree `t`: kept links top-down from the origin, then the subtrees
    /// whose root lost its link, then cycles; finally refills free slots with origin-fed leaves.
    fn restore_tree(
        &mut self,
        t: usize,
        reports: &BTreeMap<PeerId, Report>,
        claimants: &Claimants,
        aff: &mut BTreeSet<PeerId>,
    ) {
        // Kept links of this tree, child -> parent and parent -> children (ascending ids).
        let mut kept_parent: BTreeMap<PeerId, PeerId> = BTreeMap::new();
        let mut kept_children: BTreeMap<PeerId, Vec<PeerId>> = BTreeMap::new();
        for (&q, cs) in claimants {
            let Some(qn) = self.nodes.get(&q) else {
                continue;
            };
            if qn.interior != Some(t as u32) {
                continue;
            }
            let mut cs = cs.clone();
            // Over fan-out: keep forwarders first (they carry subtrees), then lower ids.
            cs.sort_by_key(|c| (!self.is_interior(*c, t), *c));
            cs.truncate(qn.fanout as usize);
            cs.sort_unstable();
            for c in &cs {
                kept_parent.insert(*c, q);
            }
            kept_children.insert(q, cs);
        }
        let origin_fed: Vec<PeerId> = reports
            .iter()
            .filter(|(_, (_, c))| c.get(t).copied() == Some(Some(None)))
            .map(|(p, _)| *p)
            .collect();

        let mut queue = VecDeque::new();
        for p in origin_fed {
            self.attach(t, p, None, aff);
            queue.push_back(p);
        }
        self.adopt(t, &mut queue, &kept_children, aff);

        // Peers whose own link was dropped: forwarders first, strongest first, so their slots
        // exist before the leaves are placed.
        let mut loose: Vec<(bool, std::cmp::Reverse<u32>, PeerId)> = self
            .nodes
            .iter()
            .filter(|(p, n)| n.links[t].parent == Parent::Detached && !kept_parent.contains_key(p))
            .map(|(p, n)| {
                (
                    n.interior != Some(t as u32),
                    std::cmp::Reverse(n.fanout),
                    *p,
                )
            })
            .collect();
        loose.sort_unstable();
        for (_, _, p) in loose {
            self.place_restored(t, p, kept_children.contains_key(&p), aff);
            queue.push_back(p);
            self.adopt(t, &mut queue, &kept_children, aff);
        }

        // What is left hangs in cycles of kept links (or below one). Cut each cycle at its
        // smallest id; the walk from the smallest detached peer always ends in a cycle.
        let left: Vec<PeerId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.links[t].parent == Parent::Detached)
            .map(|(p, _)| *p)
            .collect();
        for start in left {
            if self
                .nodes
                .get(&start)
                .is_none_or(|n| n.links[t].parent != Parent::Detached)
            {
                continue; // adopted with an earlier cycle
            }
            let mut path = vec![start];
            let mut seen = BTreeSet::from([start]);
            let mut x = start;
            let cut = loop {
                match kept_parent.get(&x) {
                    Some(&q)
                        if self
                            .nodes
                            .get(&q)
                            .is_some_and(|n| n.links[t].parent == Parent::Detached) =>
                    {
                        if !seen.insert(q) {
                            let from = path.iter().position(|y| *y == q).unwrap_or(0);
                            break path[from..].iter().copied().min().unwrap_or(q);
                        }
                        path.push(q);
                        x = q;
                    }
                    // Cannot happen (an attached parent would have adopted `x`); placing `x`
                    // keeps the loop finite all the same.
                    _ => break x,
                }
            };
            self.place_restored(t, cut, kept_children.contains_key(&cut), aff);
            queue.push_back(cut);
            self.adopt(t, &mut queue, &kept_children, aff);
        }
        self.refill(t, aff);
    }

    /// Breadth first from the peers in `queue` (already attached in tree `t`): attaches their
    /// kept children that are still detached.
    fn adopt(
        &mut self,
        t: usize,
        queue: &mut VecDeque<PeerId>,
        kept_children: &BTreeMap<PeerId, Vec<PeerId>>,
        aff: &mut BTreeSet<PeerId>,
    ) {
        while let Some(x) = queue.pop_front() {
            for &c in kept_children.get(&x).map_or(&[][..], |v| v.as_slice()) {
                // A cycle's cut peer is attached already: its old parent does not get it back.
                let detached = self
                    .nodes
                    .get(&c)
                    .is_some_and(|n| n.links[t].parent == Parent::Detached);
                if detached {
                    self.attach(t, c, Some(x), aff);
                    queue.push_back(c);
                }
            }
        }
    }

    /// Places a detached peer of tree `t` whose reported link was not kept, before its kept
    /// subtree (if `has_subtree`) is adopted under it. Like a join or a repair, except that it
    /// never takes a leaf's place: that leaf's link was consistent and stays.
    fn place_restored(
        &mut self,
        t: usize,
        x: PeerId,
        has_subtree: bool,
        aff: &mut BTreeSet<PeerId>,
    ) {
        if !self.is_interior(x, t) {
            self.place_leaf(t, x, aff);
            return;
        }
        // A subtree keeps its depth best under a free origin slot (as in `place_interior`).
        let parent = if has_subtree && self.origin_has_slot(t) {
            None
        } else {
            self.trees[t].free.first().map(|(_, q)| *q)
        };
        self.attach(t, x, parent, aff);
    }
}

/// One report per peer, independent of input order: duplicates keep their greatest entry.
fn canonical_reports(observed: &[ObservedPeer], k: usize) -> BTreeMap<PeerId, Report> {
    let mut out: BTreeMap<PeerId, Report> = BTreeMap::new();
    for o in observed {
        let mut claims: Vec<Option<Claim>> = vec![None; k];
        let mut conflicting = vec![false; k];
        for &(s, src) in &o.parents {
            let Some(slot) = claims.get_mut(s as usize) else {
                continue; // no such substream
            };
            let claim = match src {
                Source::Origin => None,
                Source::Peer { id } => Some(id),
            };
            match slot {
                None => *slot = Some(claim),
                Some(c) if *c != claim => conflicting[s as usize] = true,
                Some(_) => {}
            }
        }
        for (t, claim) in claims.iter_mut().enumerate() {
            if conflicting[t] || *claim == Some(Some(o.peer)) {
                *claim = None;
            }
        }
        let entry = (o.upload_kbps, claims);
        match out.get(&o.peer) {
            Some(prev) if *prev >= entry => {}
            _ => {
                out.insert(o.peer, entry);
            }
        }
    }
    out
}
