//! The multi-tree overlay (claim 1, FIG. 6).
//!
//! The stream is split into `k` substreams (packet `seq mod k`) and each substream travels down
//! its own tree, all rooted at the origin. Every peer is *interior* (a forwarder) in at most one
//! tree and a *leaf* in all the others. That is what makes the overlay resilient and fair:
//!
//! * a peer's departure cuts at most one substream for its descendants (the other `k - 1` keep
//!   flowing while the tree is repaired), and
//! * a peer uploads at most the full stream rate (fan-out × stream/k), because it forwards only
//!   the one substream of its interior tree.
//!
//! A peer's fan-out is `floor(upload / (stream / k))`, capped at `max_fanout`; peers that cannot
//! upload even one substream are leaves everywhere. The origin has `origin_fanout` slots per tree
//! and is also the parent of last resort ("overflow") when the peers lack capacity.
//!
//! # Algorithm
//!
//! Greedy and incremental: a join or leave touches only the links it must, never rebuilds.
//!
//! * **Join.** A peer with fan-out goes interior in the tree with the least spare capacity (ties:
//!   lowest index). There it takes the shallowest free slot of an interior node, or, when a leaf
//!   sits shallower, that leaf's place (adopting the leaf), so forwarders stay near the root and
//!   leaves sink to the bottom. A forwarder shallower than that place whose fan-out is at most
//!   half the joiner's gives it its place instead: the joiner feeds it and its children (a
//!   forwarder filled to its cap passes a fragment to its last child a fragment's duration
//!   late, so slow uplinks belong low in the tree, and the first to join would otherwise stay
//!   on top); not while the joiner's NAT class is unknown. Then it adopts leaves the origin
//!   feeds directly, so the origin
//!   ideally feeds only the tree roots. In every other tree the peer becomes a leaf under the
//!   shallowest interior node with a free slot, else under the origin.
//! * **Leave.** The peer is unlinked everywhere. If it forwarded to other forwarders, the deepest
//!   *bottom* forwarder of that tree (one feeding only leaves) takes its exact place and adopts
//!   its children, so their subtrees keep their depths and the trees do not deepen with churn;
//!   the bottom forwarder's former leaves, and children that do not fit, are re-homed: subtrees
//!   at the shallowest free slot outside themselves (or a free origin slot, or a shallow leaf's
//!   place, else the origin), leaves at the shallowest free slot, else the origin. Freed slots in
//!   every tree are then refilled with leaves the origin was feeding.
//!
//! * **Bulk build.** [`MultiTree::build`] lays out many peers at once in the shape greedy joins
//!   aim at (forwarders balanced over the trees, breadth first, leaves below), for a
//!   hierarchy's initial build.
//! * **Restore.** [`MultiTree::restore`] rebuilds the trees from the parents peers report in
//!   their heartbeats, for a DCM taking over a channel: every consistent link is kept, so peers
//!   that run a consistent plan hear nothing, and the rest is placed as joins would place it
//!   (`multitree/restore.rs`).
//!
//! Per tree, ordered indexes of interior nodes keyed by depth (with a free slot, with a leaf
//! child, feeding only leaves) make "shallowest free slot", "shallowest leaf" and "deepest
//! bottom forwarder" O(log n) look-ups. A join costs O(k log n); a leave O(k log n + fan-out log
//! n), plus renumbering the depths of a subtree in the rare case one has to move.
//! (100k joins then 100k mixed joins/leaves run in about a second in release builds; see the
//! ignored `scale_to_100k_peers_with_churn` test.)

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use protocol::{Connectivity, PeerId, Source, SubstreamPlan};

mod blocked;
mod restore;
#[cfg(test)]
mod restore_tests;

pub use restore::ObservedPeer;

/// Candidates examined when looking for a slot outside a subtree that is being moved; beyond
/// this the subtree goes to the origin rather than make a leave expensive.
const MAX_SCAN: usize = 256;

/// Forwarders of one fan-out tried for a joiner that may not link with every peer
/// ([`MultiTree::weaker_forwarder`]).
const TAKE_OVER_SCAN: usize = 16;

/// Parameters of a channel's multi-tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiTreeConfig {
    /// Number of substreams and trees (values below 1 are treated as 1).
    pub k: u32,
    /// Nominal stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Children the origin feeds per tree before counting as overflow.
    pub origin_fanout: u32,
    /// Cap on any peer's fan-out in its interior tree.
    pub max_fanout: u32,
}

impl Default for MultiTreeConfig {
    fn default() -> Self {
        MultiTreeConfig {
            k: 4,
            stream_kbps: 1000,
            origin_fanout: 4,
            max_fanout: 8,
        }
    }
}

impl MultiTreeConfig {
    /// Children a peer with this upload capacity can feed one substream to:
    /// `floor(upload / (stream / k))`, capped at `max_fanout`.
    pub fn fanout_for(&self, upload_kbps: u32) -> u32 {
        let k = u64::from(self.k.max(1));
        let f = match u64::from(self.stream_kbps) {
            0 => u64::from(self.max_fanout),
            stream => u64::from(upload_kbps) * k / stream,
        };
        f.min(u64::from(self.max_fanout)) as u32
    }
}

/// Peers whose parent or children changed in some tree: they need new instructions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub affected: BTreeSet<PeerId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parent {
    Origin,
    Peer(PeerId),
    /// Transiently, while a leave re-attaches orphans (and before a joiner is placed).
    Detached,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    parent: Parent,
    /// Origin's children have depth 1; 0 means "not placed yet".
    depth: u32,
}

#[derive(Debug, Clone)]
struct Node {
    fanout: u32,
    interior: Option<u32>,
    /// One link per tree.
    links: Vec<Link>,
    /// Children in the interior tree (a peer has children nowhere else).
    children: Vec<PeerId>,
    /// How many of `children` are leaves of the interior tree.
    leaf_children: u32,
}

#[derive(Debug, Clone, Default)]
struct Tree {
    /// Interior nodes the origin feeds (the roots).
    origin_interior: BTreeSet<PeerId>,
    /// Leaves the origin feeds: the first to be adopted by peers with spare slots.
    origin_leaves: BTreeSet<PeerId>,
    /// Interior nodes with a free slot, shallowest first.
    free: BTreeSet<(u32, PeerId)>,
    /// Interior nodes with at least one leaf child, shallowest first.
    with_leaf: BTreeSet<(u32, PeerId)>,
    /// Interior nodes whose children are all leaves ("bottom forwarders"), deepest first.
    bottom: BTreeSet<(Reverse<u32>, PeerId)>,
    /// Every placed interior node by fan-out, then depth: the weakest shallow forwarders a
    /// strong joiner takes the place of ([`MultiTree::weaker_forwarder`]).
    by_fanout: BTreeSet<(u32, u32, PeerId)>,
    /// Sum of the fan-outs of the interior nodes.
    capacity: u64,
    /// Number of peers at each depth.
    depth_counts: Vec<u64>,
    /// Bumped whenever the origin gains or loses a child ([`MultiTree::origin_epoch`]).
    origin_epoch: u64,
}

#[derive(Debug, Clone, Copy)]
enum Index {
    Free,
    WithLeaf,
}

/// The `k` trees of one channel.
#[derive(Debug, Clone)]
pub struct MultiTree {
    cfg: MultiTreeConfig,
    nodes: BTreeMap<PeerId, Node>,
    trees: Vec<Tree>,
    /// Per-tree origin slots when they differ between trees ([`MultiTree::set_origin_fanouts`]);
    /// empty: `cfg.origin_fanout` in every tree.
    origin_fanouts: Vec<u32>,
    /// Pairs of peers that cannot connect (symmetric): never parent and child in any tree
    /// ([`MultiTree::block`], `multitree/blocked.rs`).
    blocked: BTreeMap<PeerId, BTreeSet<PeerId>>,
    /// The connectivity of peers that cannot pair with everyone (behind NATs, UDP blocked):
    /// two peers whose classes cannot connect are never linked ([`MultiTree::set_connectivity`]).
    nat: BTreeMap<PeerId, Connectivity>,
    /// Peers whose class is not known yet ([`MultiTree::set_connectivity`] with `None`): they
    /// take no forwarder's place, since the children they would take over might turn out to
    /// be peers they cannot reach.
    class_unknown: BTreeSet<PeerId>,
    /// Joiners take a free origin slot before any peer's ([`MultiTree::set_prefer_origin`]).
    prefer_origin: bool,
}

impl MultiTree {
    pub fn new(cfg: MultiTreeConfig) -> Self {
        let cfg = MultiTreeConfig {
            k: cfg.k.max(1),
            ..cfg
        };
        MultiTree {
            cfg,
            nodes: BTreeMap::new(),
            trees: vec![Tree::default(); cfg.k as usize],
            origin_fanouts: Vec::new(),
            blocked: BTreeMap::new(),
            nat: BTreeMap::new(),
            class_unknown: BTreeSet::new(),
            prefer_origin: false,
        }
    }

    /// Whether joiners take a free origin slot before a free slot under a peer. Off (the
    /// default), the origin feeds as few peers as it can: the origin of a flat channel is the
    /// server. On, for a cluster whose "origin" is its feeders (middle-tier peers with upload
    /// to spare): every slot they offer is used before a member's own uplink, so the trees
    /// are as shallow as the feeders allow and the weaker members forward less.
    pub fn set_prefer_origin(&mut self, on: bool) {
        self.prefer_origin = on;
    }

    pub fn config(&self) -> &MultiTreeConfig {
        &self.cfg
    }

    /// Plans joins and re-placements from now on at this stream rate (the origin's measured
    /// one). Peers already placed keep their fan-out until re-placed: see
    /// [`crate::dcm::Dcm`]'s re-plan after a rate change.
    pub fn set_stream_kbps(&mut self, kbps: u32) {
        self.cfg.stream_kbps = kbps.max(1);
    }

    /// Builds the trees of many peers at once: the shape greedy joins strongest first aim at,
    /// in O(n·k + n log n) without the incremental indexes' per-join cost.
    ///
    /// Peers are taken by fan-out, largest first (ties: lower id). Each forwarder is interior in
    /// the tree with the least capacity so far (longest-processing-time balancing, as
    /// [`MultiTree::join`] does). In each tree the first forwarder is the root; the other
    /// forwarders, then the leaves, fill the free slots breadth first, so forwarders sit
    /// above leaves and every tree is as shallow as its fan-outs allow. Leaves left without a
    /// slot hang off the origin. A peer listed twice keeps its last entry.
    pub fn build(cfg: MultiTreeConfig, peers: &[(PeerId, u32)]) -> Self {
        let mut m = MultiTree::new(cfg);
        let k = m.trees.len();
        let mut latest: BTreeMap<PeerId, u32> = BTreeMap::new();
        for (p, u) in peers {
            latest.insert(*p, m.cfg.fanout_for(*u));
        }
        let mut order: Vec<(u32, PeerId)> = latest.iter().map(|(p, f)| (*f, *p)).collect();
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut interior: Vec<Vec<PeerId>> = vec![Vec::new(); k];
        let mut load = vec![0u64; k];
        let mut of = BTreeMap::new();
        for &(f, p) in &order {
            if f == 0 {
                continue;
            }
            // Same key as `least_spare_tree`: capacity plus interior roots (one per used tree).
            let t = (0..k).min_by_key(|t| (load[*t], *t)).unwrap_or(0);
            if interior[t].is_empty() {
                load[t] += 1;
            }
            load[t] += u64::from(f);
            interior[t].push(p);
            of.insert(p, t as u32);
        }
        m.nodes = latest
            .iter()
            .map(|(p, f)| {
                let node = Node {
                    fanout: *f,
                    interior: of.get(p).copied(),
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
                (*p, node)
            })
            .collect();
        for (t, forwarders) in interior.iter().enumerate() {
            let leaves = order
                .iter()
                .map(|x| x.1)
                .filter(|p| of.get(p) != Some(&(t as u32)));
            // Breadth first: `open` holds placed forwarders with free slots, shallowest first.
            let mut open: std::collections::VecDeque<(PeerId, u32, u32)> = Default::default();
            for p in forwarders.iter().copied().chain(leaves) {
                let is_fwd = of.get(&p) == Some(&(t as u32));
                while open.front().is_some_and(|o| o.2 == 0) {
                    open.pop_front();
                }
                let (parent, depth) = match open.front_mut() {
                    Some(o) => {
                        o.2 -= 1;
                        (Parent::Peer(o.0), o.1 + 1)
                    }
                    None => (Parent::Origin, 1),
                };
                let fanout = m.nodes.get(&p).map_or(0, |n| n.fanout);
                if let Some(n) = m.nodes.get_mut(&p) {
                    n.links[t] = Link { parent, depth };
                }
                match parent {
                    Parent::Peer(q) => {
                        if let Some(qn) = m.nodes.get_mut(&q) {
                            qn.children.push(p);
                            qn.leaf_children += u32::from(!is_fwd);
                        }
                    }
                    _ if is_fwd => {
                        m.trees[t].origin_interior.insert(p);
                    }
                    _ => {
                        m.trees[t].origin_leaves.insert(p);
                    }
                }
                let counts = &mut m.trees[t].depth_counts;
                if counts.len() <= depth as usize {
                    counts.resize(depth as usize + 1, 0);
                }
                counts[depth as usize] += 1;
                if is_fwd {
                    m.trees[t].capacity += u64::from(fanout);
                    open.push_back((p, depth, fanout));
                }
            }
            for p in forwarders {
                let key = m.index_key(t, *p);
                m.insert_keys(t, *p, key);
            }
        }
        m
    }

    /// Adds a peer (re-adding a present peer first removes it, e.g. to change its capacity).
    pub fn join(&mut self, peer: PeerId, upload_kbps: u32) -> Changes {
        let mut aff = if self.nodes.contains_key(&peer) {
            self.remove(peer).affected
        } else {
            BTreeSet::new()
        };
        let k = self.trees.len();
        let fanout = if self.reaches_nobody(peer) {
            0
        } else {
            self.cfg.fanout_for(upload_kbps)
        };
        let interior = (fanout > 0).then(|| self.least_spare_tree());
        self.nodes.insert(
            peer,
            Node {
                fanout,
                interior: interior.map(|t| t as u32),
                links: vec![
                    Link {
                        parent: Parent::Detached,
                        depth: 0,
                    };
                    k
                ],
                children: Vec::new(),
                leaf_children: 0,
            },
        );
        if let Some(t) = interior {
            self.trees[t].capacity += u64::from(fanout);
            self.place_interior(t, peer, false, &mut aff);
            self.refill(t, &mut aff);
        }
        for t in (0..k).filter(|t| Some(*t) != interior) {
            self.place_leaf(t, peer, &mut aff);
        }
        aff.insert(peer);
        Changes { affected: aff }
    }

    /// Removes a peer; unknown peers change nothing. Its blocked pairs and class go with it.
    pub fn leave(&mut self, peer: PeerId) -> Changes {
        let changes = self.remove(peer);
        self.forget_blocks(peer);
        changes
    }

    /// Takes a peer out of the trees, keeping what is known of its connectivity (a re-placed
    /// peer's blocked pairs and class still hold).
    fn remove(&mut self, peer: PeerId) -> Changes {
        let mut aff = BTreeSet::new();
        let Some((interior, fanout)) = self.nodes.get(&peer).map(|n| (n.interior, n.fanout)) else {
            return Changes::default();
        };
        // Where the peer hung in its interior tree: its replacement goes there.
        let old_parent = interior.and_then(|t| {
            match self.nodes.get(&peer).map(|n| n.links[t as usize].parent) {
                Some(Parent::Peer(q)) => Some(Some(q)),
                Some(Parent::Origin) => Some(None),
                Some(Parent::Detached) | None => None,
            }
        });
        for t in 0..self.trees.len() {
            self.detach(t, peer, &mut aff);
        }
        let mut orphans = Vec::new();
        if let Some(t) = interior.map(|t| t as usize) {
            self.unindex(t, peer);
            self.trees[t].capacity -= u64::from(fanout);
            if let Some(n) = self.nodes.get_mut(&peer) {
                orphans = std::mem::take(&mut n.children);
                n.leaf_children = 0;
            }
            for c in &orphans {
                if let Some(cn) = self.nodes.get_mut(c) {
                    cn.links[t].parent = Parent::Detached;
                }
                aff.insert(*c);
            }
        }
        if let Some(n) = self.nodes.remove(&peer) {
            for (tree, link) in self.trees.iter_mut().zip(&n.links) {
                if let Some(c) = tree.depth_counts.get_mut(link.depth as usize) {
                    *c = c.saturating_sub(u64::from(link.depth > 0));
                }
            }
        }
        if let (Some(t), Some(old_parent)) = (interior.map(|t| t as usize), old_parent) {
            self.repair(t, old_parent, orphans, &mut aff);
        }
        for t in 0..self.trees.len() {
            self.refill(t, &mut aff);
        }
        aff.remove(&peer);
        Changes { affected: aff }
    }

    /// Re-attaches the children of a departed forwarder of tree `t`, which hung under
    /// `old_parent` (`None`: the origin).
    ///
    /// When it forwarded to other forwarders, the deepest *bottom* forwarder (one that feeds only
    /// leaves) takes its exact place and adopts its children: their subtrees keep their depths,
    /// so nothing needs renumbering and the tree does not grow deeper with churn. The bottom
    /// forwarder's own leaves, and any child that does not fit, are re-homed like joiners.
    fn repair(
        &mut self,
        t: usize,
        old_parent: Option<PeerId>,
        orphans: Vec<PeerId>,
        aff: &mut BTreeSet<PeerId>,
    ) {
        let (mut forwarders, leaves): (Vec<PeerId>, Vec<PeerId>) =
            orphans.into_iter().partition(|c| self.is_interior(*c, t));
        // Bigger forwarders first: they should end up higher.
        forwarders.sort_by_key(|c| (Reverse(self.nodes.get(c).map_or(0, |n| n.fanout)), *c));
        let mut displaced = Vec::new();
        let mut replacement = None;
        if !forwarders.is_empty() {
            let f = self
                .bottom_forwarder(t, forwarders.len(), old_parent)
                .filter(|f| old_parent.is_none_or(|q| !self.is_blocked(*f, q)));
            if let Some(f) = f {
                forwarders.retain(|c| *c != f);
                // `f` moves with its leaves still attached; it gives up only as many of them as
                // it needs slots for the orphaned forwarders (which have subtrees, so they come
                // first). A leaf it keeps keeps its data channel: every re-homed leaf needs a new
                // WebRTC connection to its new parent, seconds on a loaded browser.
                let slots = self.nodes.get(&f).map_or(0, |n| n.fanout as usize);
                let adopt = forwarders.len().min(slots);
                let f_children = self
                    .nodes
                    .get(&f)
                    .map(|n| n.children.clone())
                    .unwrap_or_default();
                let give_up = (f_children.len() + adopt).saturating_sub(slots);
                for l in f_children.into_iter().take(give_up) {
                    self.detach(t, l, aff);
                    displaced.push(l);
                }
                self.detach(t, f, aff);
                self.attach(t, f, old_parent, aff);
                // Adopted children keep their depth: `attach` renumbers nothing.
                forwarders.retain(|c| {
                    if self.has_room(t, f) && !self.is_blocked(*c, f) {
                        self.attach(t, *c, Some(f), aff);
                        false
                    } else {
                        true
                    }
                });
                replacement = Some(f);
            }
        }
        for c in forwarders {
            self.place_interior(t, c, true, aff);
        }
        for c in leaves.into_iter().chain(displaced) {
            self.place_orphan_leaf(t, c, replacement, aff);
        }
    }

    /// Re-homes a leaf of tree `t` that lost its parent, under a peer it already has a link
    /// with when one can take it, else under `replacement` (the forwarder that took its old
    /// parent's place) if it has room, else like a joiner ([`MultiTree::place_leaf`]).
    ///
    /// Its parents in the other trees are interior there, so never in `t`; but its own children
    /// (in the tree where it is interior) are interior in other trees, possibly in `t`. Such a
    /// child can adopt it without a cycle (a leaf of `t` has no descendants in `t`), and the
    /// data channel between them is already open, so the substream resumes without a new
    /// connection. The shallowest such child with a free slot wins. Its depth is at most one
    /// below an existing forwarder's, so leaves never push the trees deeper than their
    /// forwarders.
    fn place_orphan_leaf(
        &mut self,
        t: usize,
        x: PeerId,
        replacement: Option<PeerId>,
        aff: &mut BTreeSet<PeerId>,
    ) {
        let neighbour = self.nodes.get(&x).and_then(|n| {
            n.children
                .iter()
                .filter(|c| {
                    self.has_room(t, **c)
                        && !self.is_blocked(x, **c)
                        && self.reaches_origin_avoiding(t, **c, x)
                })
                .filter_map(|c| Some((self.nodes.get(c)?.links[t].depth, *c)))
                .min()
        });
        match (neighbour, replacement) {
            (Some((_, q)), _) => self.attach(t, x, Some(q), aff),
            (None, Some(f)) if self.has_room(t, f) && !self.is_blocked(x, f) => {
                self.attach(t, x, Some(f), aff)
            }
            (None, _) => self.place_leaf(t, x, aff),
        }
    }

    /// The deepest forwarder of tree `t` that feeds only leaves, preferring one with room for
    /// `need` children among the deepest few; never `exclude` (the departed peer's parent, which
    /// may have just become a bottom forwarder).
    ///
    /// Among equally deep ones, the one with the most free slots: it gives up the fewest of its
    /// own leaves (each one a new connection), and if its uplink turns out to be bad it strands
    /// the fewest. That matters after congestion: the forwarders under a congested parent were
    /// starved, so a bad uplink among them has not shown yet.
    fn bottom_forwarder(&self, t: usize, need: usize, exclude: Option<PeerId>) -> Option<PeerId> {
        self.trees[t]
            .bottom
            .iter()
            .filter(|(_, id)| Some(*id) != exclude)
            .take(16)
            .filter_map(|(Reverse(depth), id)| {
                let n = self.nodes.get(id)?;
                let room = (n.fanout as usize).saturating_sub(n.children.len());
                Some(((n.fanout as usize >= need, *depth, room, Reverse(*id)), *id))
            })
            .max_by_key(|(key, _)| *key)
            .map(|(_, id)| id)
    }

    /// For each substream: where the peer receives it from and whom it forwards it to.
    pub fn plan(&self, peer: PeerId) -> Option<Vec<SubstreamPlan>> {
        let n = self.nodes.get(&peer)?;
        Some(
            n.links
                .iter()
                .enumerate()
                .map(|(t, link)| SubstreamPlan {
                    index: t as u32,
                    parent: match link.parent {
                        Parent::Peer(id) => Source::Peer { id },
                        Parent::Origin | Parent::Detached => Source::Origin,
                    },
                    children: if n.interior == Some(t as u32) {
                        self.forwarders_first(t, &n.children)
                    } else {
                        Vec::new()
                    },
                })
                .collect(),
        )
    }

    /// `children` of a node of tree `t`, the forwarders of `t` first, those with more children
    /// before those with fewer. A peer sends each packet to its children in this order, and its
    /// uplink serializes them: a forwarder served first passes the packet on while the leaves
    /// are still being served, so each hop adds one packet's time on the way down instead of
    /// one per sibling, and the biggest subtrees get it soonest.
    fn forwarders_first(&self, t: usize, children: &[PeerId]) -> Vec<PeerId> {
        let mut v = children.to_vec();
        v.sort_by_key(|c| {
            let fed = self
                .nodes
                .get(c)
                .filter(|n| n.interior == Some(t as u32))
                .map_or(0, |n| n.children.len());
            (!self.is_interior(*c, t), Reverse(fed))
        });
        v
    }

    /// Hops from the origin to `peer` in tree `substream` (the origin's children have depth 1).
    pub fn depth(&self, peer: PeerId, substream: u32) -> Option<u32> {
        let link = self.nodes.get(&peer)?.links.get(substream as usize)?;
        (link.depth > 0).then_some(link.depth)
    }

    /// Largest depth of any peer in any tree (0 when empty).
    pub fn max_depth(&self) -> u32 {
        self.trees
            .iter()
            .filter_map(|t| t.depth_counts.iter().rposition(|c| *c > 0))
            .max()
            .unwrap_or(0) as u32
    }

    /// Peers the origin feeds substream `substream` to, ascending.
    pub fn origin_children(&self, substream: u32) -> Vec<PeerId> {
        let Some(tree) = self.trees.get(substream as usize) else {
            return Vec::new();
        };
        let mut v: Vec<PeerId> = tree
            .origin_interior
            .iter()
            .chain(&tree.origin_leaves)
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Total number of (peer, substream) feeds the origin serves.
    pub fn origin_load(&self) -> usize {
        self.trees
            .iter()
            .map(|t| t.origin_interior.len() + t.origin_leaves.len())
            .sum()
    }

    /// Feeds the origin serves beyond its `origin_fanout` slots, summed over the trees.
    pub fn origin_overflow(&self) -> usize {
        self.trees
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (t.origin_interior.len() + t.origin_leaves.len())
                    .saturating_sub(self.origin_slots(i) as usize)
            })
            .sum()
    }

    /// Changes the origin's slots per tree (a cluster's feeders come and go). Only the overflow
    /// accounting changes: the trees themselves are not touched.
    pub fn set_origin_fanout(&mut self, origin_fanout: u32) {
        self.cfg.origin_fanout = origin_fanout;
        self.origin_fanouts.clear();
    }

    /// Like [`MultiTree::set_origin_fanout`], with a number of slots per tree (a cluster's
    /// feeders deal their root feeds over the trees, so some trees get one more than others).
    /// `config().origin_fanout` becomes the smallest of them; missing trees get 0.
    pub fn set_origin_fanouts(&mut self, per_tree: &[u32]) {
        let k = self.trees.len();
        self.origin_fanouts = (0..k)
            .map(|t| per_tree.get(t).copied().unwrap_or(0))
            .collect();
        self.cfg.origin_fanout = self.origin_fanouts.iter().copied().min().unwrap_or(0);
    }

    /// Origin slots of tree `t`.
    pub fn origin_slots(&self, t: usize) -> u32 {
        self.origin_fanouts
            .get(t)
            .copied()
            .unwrap_or(self.cfg.origin_fanout)
    }

    /// A counter of tree `substream` that changes whenever the origin gains or loses a child
    /// there: callers that assign the origin's children to feeders compare it before and after a
    /// change to know, in O(1), whether they must re-assign.
    pub fn origin_epoch(&self, substream: u32) -> u64 {
        self.trees
            .get(substream as usize)
            .map_or(0, |t| t.origin_epoch)
    }

    /// Peers the origin feeds in tree `substream` (roots and origin-fed leaves), in O(1).
    pub fn origin_children_count(&self, substream: u32) -> usize {
        self.trees
            .get(substream as usize)
            .map_or(0, |t| t.origin_interior.len() + t.origin_leaves.len())
    }

    /// Peers that receive some substream through an origin feed beyond the origin's slots, with
    /// how many substreams: they do not get the full rate from the slots the origin has. Interior
    /// roots take the slots first (they carry whole subtrees), then leaves in id order; the
    /// subtree of an interior root left without a slot is underfed in that tree. O(underfed).
    pub fn underfed(&self) -> BTreeMap<PeerId, u32> {
        let mut out = BTreeMap::new();
        for (t, tree) in self.trees.iter().enumerate() {
            let slots = self.origin_slots(t) as usize;
            let mut stack: Vec<PeerId> = tree.origin_interior.iter().skip(slots).copied().collect();
            let leaf_slots = slots.saturating_sub(tree.origin_interior.len());
            stack.extend(tree.origin_leaves.iter().skip(leaf_slots).copied());
            while let Some(x) = stack.pop() {
                *out.entry(x).or_insert(0) += 1;
                if let Some(n) = self.nodes.get(&x) {
                    if n.interior == Some(t as u32) {
                        stack.extend(n.children.iter().copied());
                    }
                }
            }
        }
        out
    }

    /// Children `peer` feeds in its interior tree (empty for leaves-everywhere peers).
    pub fn children(&self, peer: PeerId) -> &[PeerId] {
        self.nodes.get(&peer).map_or(&[], |n| n.children.as_slice())
    }

    /// Sum of the interior fan-outs over all trees: forwarding slots the peers offer.
    pub fn total_fanout(&self) -> u64 {
        self.trees.iter().map(|t| t.capacity).sum()
    }

    /// Peers the origin feeds in tree `substream`, interior roots first (the order slots go in).
    pub fn roots(&self, substream: u32) -> impl Iterator<Item = PeerId> + '_ {
        self.trees
            .get(substream as usize)
            .into_iter()
            .flat_map(|t| t.origin_interior.iter().chain(&t.origin_leaves).copied())
    }

    /// All peers, ascending.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.nodes.keys().copied()
    }

    /// The tree in which `peer` forwards, if any.
    pub fn interior_tree(&self, peer: PeerId) -> Option<u32> {
        self.nodes.get(&peer)?.interior
    }

    /// Lowers a peer's fan-out to what `upload_kbps` allows, in place: no link changes, so its
    /// children are not disturbed; it just stops being offered new ones beyond the new fan-out.
    /// Returns false (and changes nothing) when its current children would not fit, or when
    /// the new fan-out would be 0 for an interior peer (that needs a re-placement).
    pub fn lower_fanout(&mut self, peer: PeerId, upload_kbps: u32) -> bool {
        let want = self.cfg.fanout_for(upload_kbps);
        let Some(n) = self.nodes.get(&peer) else {
            return false;
        };
        if want >= n.fanout {
            return true;
        }
        let Some(t) = n.interior.map(|t| t as usize) else {
            return true;
        };
        if want == 0 || n.children.len() > want as usize {
            return false;
        }
        let before = self.index_key(t, peer);
        let diff = n.fanout - want;
        // Out of the indexes under the old fan-out, back in under the new one.
        self.remove_keys(t, peer, before);
        if let Some(n) = self.nodes.get_mut(&peer) {
            n.fanout = want;
        }
        self.trees[t].capacity -= u64::from(diff);
        let after = self.index_key(t, peer);
        self.insert_keys(t, peer, after);
        true
    }

    /// The peer's fan-out in its interior tree (0 for leaves-everywhere peers).
    pub fn fanout(&self, peer: PeerId) -> Option<u32> {
        self.nodes.get(&peer).map(|n| n.fanout)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Verifies every structural invariant and every index; for tests (O(n·k)).
    pub fn check_invariants(&self) -> Result<(), String> {
        let k = self.trees.len();
        for (t, tree) in self.trees.iter().enumerate() {
            let mut capacity = 0u64;
            let mut free = BTreeSet::new();
            let mut with_leaf = BTreeSet::new();
            let mut bottom = BTreeSet::new();
            let mut by_fanout = BTreeSet::new();
            let mut origin_interior = BTreeSet::new();
            let mut origin_leaves = BTreeSet::new();
            let mut depth_counts: Vec<u64> = Vec::new();
            let mut fed = 0usize;
            for (&id, n) in &self.nodes {
                if n.links.len() != k {
                    return Err(format!("{id} has {} links, want {k}", n.links.len()));
                }
                if n.interior.is_some() != (n.fanout > 0) {
                    return Err(format!(
                        "{id}: fan-out {} but interior {:?}",
                        n.fanout, n.interior
                    ));
                }
                let interior_here = n.interior == Some(t as u32);
                let link = n.links[t];
                match link.parent {
                    Parent::Detached => return Err(format!("{id} has no parent in tree {t}")),
                    Parent::Origin => {
                        if link.depth != 1 {
                            return Err(format!(
                                "{id}: origin child at depth {} in tree {t}",
                                link.depth
                            ));
                        }
                        if interior_here {
                            origin_interior.insert(id);
                        } else {
                            origin_leaves.insert(id);
                        }
                    }
                    Parent::Peer(p) => {
                        let pn = self
                            .nodes
                            .get(&p)
                            .ok_or_else(|| format!("{id}: parent {p} unknown in tree {t}"))?;
                        if pn.interior != Some(t as u32) {
                            return Err(format!("{id}: parent {p} is not interior in tree {t}"));
                        }
                        if !pn.children.contains(&id) {
                            return Err(format!("{id}: parent {p} does not list it in tree {t}"));
                        }
                        if self.is_blocked(id, p) {
                            return Err(format!(
                                "{id}: linked under {p} in tree {t}, a pair that cannot connect"
                            ));
                        }
                        // Depth strictly grows away from the origin, so there is no cycle and
                        // everyone is connected to the origin.
                        if link.depth != pn.links[t].depth + 1 {
                            return Err(format!(
                                "{id}: depth {} under {p} at depth {} in tree {t}",
                                link.depth, pn.links[t].depth
                            ));
                        }
                    }
                }
                let d = link.depth as usize;
                if depth_counts.len() <= d {
                    depth_counts.resize(d + 1, 0);
                }
                depth_counts[d] += 1;
                if interior_here {
                    capacity += u64::from(n.fanout);
                    if n.children.len() > n.fanout as usize {
                        return Err(format!(
                            "{id}: {} children over fan-out {} in tree {t}",
                            n.children.len(),
                            n.fanout
                        ));
                    }
                    let mut leaves = 0;
                    for (i, c) in n.children.iter().enumerate() {
                        if n.children[..i].contains(c) {
                            return Err(format!("{id}: duplicate child {c}"));
                        }
                        let cn = self
                            .nodes
                            .get(c)
                            .ok_or_else(|| format!("{id}: child {c} unknown"))?;
                        if cn.links[t].parent != Parent::Peer(id) {
                            return Err(format!("{id}: child {c} has another parent in tree {t}"));
                        }
                        if cn.interior != Some(t as u32) {
                            leaves += 1;
                        }
                    }
                    fed += n.children.len();
                    if leaves != n.leaf_children {
                        return Err(format!(
                            "{id}: leaf child count {} != {leaves}",
                            n.leaf_children
                        ));
                    }
                    by_fanout.insert((n.fanout, link.depth, id));
                    if n.children.len() < n.fanout as usize {
                        free.insert((link.depth, id));
                    }
                    if leaves > 0 {
                        with_leaf.insert((link.depth, id));
                    }
                    if leaves as usize == n.children.len() {
                        bottom.insert((Reverse(link.depth), id));
                    }
                } else if n.interior.is_some_and(|it| it as usize >= k) {
                    return Err(format!("{id}: interior tree out of range"));
                }
            }
            if fed + origin_interior.len() + origin_leaves.len() != self.nodes.len() {
                return Err(format!(
                    "tree {t}: {fed} fed by peers + origin != {} peers",
                    self.nodes.len()
                ));
            }
            if capacity != tree.capacity {
                return Err(format!(
                    "tree {t}: capacity {} != {capacity}",
                    tree.capacity
                ));
            }
            if free != tree.free
                || with_leaf != tree.with_leaf
                || bottom != tree.bottom
                || by_fanout != tree.by_fanout
            {
                return Err(format!("tree {t}: stale slot indexes"));
            }
            if origin_interior != tree.origin_interior || origin_leaves != tree.origin_leaves {
                return Err(format!("tree {t}: stale origin child sets"));
            }
            let trimmed =
                |v: &[u64]| v[..v.iter().rposition(|c| *c > 0).map_or(0, |i| i + 1)].to_vec();
            if trimmed(&depth_counts) != trimmed(&tree.depth_counts) {
                return Err(format!("tree {t}: stale depth histogram"));
            }
        }
        for (&id, n) in &self.nodes {
            if n.interior.is_none() && (!n.children.is_empty() || n.leaf_children != 0) {
                return Err(format!("{id} has children but is interior nowhere"));
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Placement
    // -----------------------------------------------------------------------------------------

    /// The tree that most needs forwarding capacity. Every peer needs one slot per tree, so a
    /// tree's spare capacity is (sum of fan-outs) + (roots, which use origin slots) − peers; the
    /// peer count is the same for all trees and cancels out.
    fn least_spare_tree(&self) -> usize {
        self.trees
            .iter()
            .enumerate()
            .min_by_key(|(i, t)| (t.capacity + t.origin_interior.len() as u64, *i))
            .map_or(0, |(i, _)| i)
    }

    /// Attaches `x`, interior in tree `t` and currently detached (a joiner, or an orphaned
    /// forwarder with its subtree when `has_subtree`).
    fn place_interior(
        &mut self,
        t: usize,
        x: PeerId,
        has_subtree: bool,
        aff: &mut BTreeSet<PeerId>,
    ) {
        if self.prefer_origin && !has_subtree && self.origin_has_slot(t) {
            self.attach(t, x, None, aff);
            return;
        }
        let free = self.first_valid(t, Index::Free, x, has_subtree);
        let leafy = self.first_valid(t, Index::WithLeaf, x, has_subtree);
        // A moved subtree keeps its depth best under a free origin slot: repairs use the
        // origin's budget rather than push a whole subtree deeper. (A joiner has no subtree, so
        // it never takes one: the origin should feed as few peers as possible.)
        let best_in_tree = match (free, leafy) {
            (Some((df, _)), Some((dl, _))) => Some((df + 1).min(dl + 1)),
            (Some((d, _)), None) | (None, Some((d, _))) => Some(d + 1),
            (None, None) => None,
        };
        if has_subtree && best_in_tree.is_some_and(|d| d > 1) && self.origin_has_slot(t) {
            self.attach(t, x, None, aff);
            return;
        }
        let taken_over = !has_subtree
            && best_in_tree
                .filter(|_| self.trees[t].origin_leaves.is_empty())
                .and_then(|d| self.weaker_forwarder(t, x, d))
                .is_some_and(|q| self.take_place(t, x, q, aff));
        if taken_over {
            return;
        }
        match (free, leafy) {
            (Some((df, q)), leafy) if leafy.is_none_or(|(dl, _)| df <= dl) => {
                self.attach(t, x, Some(q), aff);
            }
            // Leaves hang off the origin: become a root and adopt them (see `refill`).
            _ if !self.trees[t].origin_leaves.is_empty() => self.attach(t, x, None, aff),
            (_, Some((_, q))) => {
                let leaf = self.nodes.get(&q).and_then(|qn| {
                    qn.children
                        .iter()
                        .copied()
                        .find(|c| !self.is_interior(*c, t))
                });
                let Some(leaf) = leaf else {
                    self.attach(t, x, None, aff);
                    return;
                };
                // Take the leaf's place and adopt it (or re-home it if we are already full, or
                // the two cannot connect).
                self.detach(t, leaf, aff);
                self.attach(t, x, Some(q), aff);
                if self.has_room(t, x) && !self.is_blocked(x, leaf) {
                    self.attach(t, leaf, Some(x), aff);
                } else {
                    self.place_leaf(t, leaf, aff);
                }
            }
            _ => self.attach(t, x, None, aff),
        }
    }

    /// The shallowest forwarder of tree `t` above depth `above` that joiner `x` could feed twice
    /// the children of, and that `x` could link with in its place (its parent, itself and its
    /// children); among equally shallow ones the weakest. None while `x`'s class is unknown (a
    /// page joins before it has classified its NAT): a UDP-blocked or symmetric-NAT joiner
    /// would leave the children it took over on links that never open. A look-up per fan-out value below
    /// half the joiner's, each trying [`TAKE_OVER_SCAN`] forwarders at most.
    ///
    /// Each hop of a tree serializes a fragment to the hop's children one after another, so a
    /// forwarder filled to its cap hands its last child the fragment a whole fragment's
    /// duration after its first: on a slow uplink near the root that delay is every
    /// descendant's. Joins take the shallowest free slot, so the first peers, whatever their
    /// uplink, would stay at the top for good; a stronger joiner takes their place instead
    /// (the bulk build orders forwarders the same way, strongest first).
    fn weaker_forwarder(&self, t: usize, x: PeerId, above: u32) -> Option<PeerId> {
        if self.class_unknown.contains(&x) {
            return None;
        }
        let fanout = self.nodes.get(&x)?.fanout;
        let by_fanout = &self.trees[t].by_fanout;
        let mut best: Option<(u32, PeerId)> = None;
        for f in 1..=fanout / 2 {
            let shallower = best.map_or(above, |(d, _)| d);
            let found = by_fanout
                .range((f, 0, PeerId(0))..(f, shallower, PeerId(0)))
                .take(TAKE_OVER_SCAN)
                .find(|(_, _, q)| self.may_take_place(t, x, *q));
            if let Some(&(_, d, q)) = found {
                best = Some((d, q));
            }
        }
        best.map(|(_, q)| q)
    }

    /// Whether `x` can be linked with `q`'s parent, `q` and `q`'s children in tree `t`.
    fn may_take_place(&self, t: usize, x: PeerId, q: PeerId) -> bool {
        let Some(qn) = self.nodes.get(&q) else {
            return false;
        };
        if !self.restricted(x) {
            return true;
        }
        let parent_ok = match qn.links[t].parent {
            Parent::Peer(p) => !self.is_blocked(x, p),
            Parent::Origin => true,
            Parent::Detached => false,
        };
        parent_ok && !self.is_blocked(x, q) && qn.children.iter().all(|c| !self.is_blocked(x, *c))
    }

    /// Detached joiner `x` takes forwarder `q`'s place in tree `t`: `q`'s parent feeds `x`,
    /// and `x` feeds `q`'s children and `q` itself. Their subtrees keep their depths; `q` goes
    /// one hop down with its fan-out free for the next joiners.
    fn take_place(&mut self, t: usize, x: PeerId, q: PeerId, aff: &mut BTreeSet<PeerId>) -> bool {
        let (parent, kids) = match self.nodes.get(&q) {
            Some(qn) => match qn.links[t].parent {
                Parent::Peer(p) => (Some(p), qn.children.clone()),
                Parent::Origin => (None, qn.children.clone()),
                Parent::Detached => return false,
            },
            None => return false,
        };
        for c in &kids {
            self.detach(t, *c, aff);
        }
        self.detach(t, q, aff);
        self.attach(t, x, parent, aff);
        for c in kids {
            self.attach(t, c, Some(x), aff);
        }
        self.attach(t, q, Some(x), aff);
        true
    }

    /// Attaches a detached leaf of tree `t` under the shallowest free slot, else the origin.
    fn place_leaf(&mut self, t: usize, x: PeerId, aff: &mut BTreeSet<PeerId>) {
        // A leaf has no subtree, so any free slot is safe, even one inside a subtree that is
        // itself still being re-attached: its depth is renumbered when that subtree moves.
        let parent = if self.prefer_origin && self.origin_has_slot(t) {
            None
        } else {
            self.first_free_for(t, x)
        };
        self.attach(t, x, parent, aff);
    }

    /// Moves leaves the origin feeds under interior nodes with free slots.
    fn refill(&mut self, t: usize, aff: &mut BTreeSet<PeerId>) {
        loop {
            if self.prefer_origin
                && self.origin_children_count(t as u32) <= self.origin_slots(t) as usize
            {
                return;
            }
            let Some((leaf, q)) = self.refill_pair(t) else {
                return;
            };
            self.detach(t, leaf, aff);
            self.attach(t, leaf, Some(q), aff);
        }
    }

    /// Shallowest entry of an index that can take `x`: not blocked with it and, when `x` moves
    /// with its subtree (`moving`), connected to the origin outside that subtree.
    fn first_valid(
        &self,
        t: usize,
        index: Index,
        x: PeerId,
        moving: bool,
    ) -> Option<(u32, PeerId)> {
        let tree = &self.trees[t];
        let set = match index {
            Index::Free => &tree.free,
            Index::WithLeaf => &tree.with_leaf,
        };
        if !moving && !self.restricted(x) {
            // Only a peer that reaches nobody refuses an unrestricted one.
            if let Some(first) = set.first().filter(|(_, q)| !self.is_blocked(x, *q)) {
                return Some(*first);
            }
        }
        set.iter()
            .take(MAX_SCAN)
            .find(|(_, q)| {
                !self.is_blocked(x, *q) && (!moving || self.reaches_origin_avoiding(t, *q, x))
            })
            .copied()
    }

    /// Whether walking up from `q` reaches the origin without passing `avoid` or a detached node.
    fn reaches_origin_avoiding(&self, t: usize, q: PeerId, avoid: PeerId) -> bool {
        let mut x = q;
        for _ in 0..=self.nodes.len() {
            if x == avoid {
                return false;
            }
            match self.nodes.get(&x).map(|n| n.links[t].parent) {
                Some(Parent::Origin) => return true,
                Some(Parent::Peer(p)) => x = p,
                Some(Parent::Detached) | None => return false,
            }
        }
        false
    }

    // -----------------------------------------------------------------------------------------
    // Link primitives: keep children lists, origin sets, indexes and depths consistent.
    // -----------------------------------------------------------------------------------------

    fn is_interior(&self, id: PeerId, t: usize) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.interior == Some(t as u32))
    }

    fn origin_has_slot(&self, t: usize) -> bool {
        let tree = &self.trees[t];
        tree.origin_interior.len() + tree.origin_leaves.len() < self.origin_slots(t) as usize
    }

    fn has_room(&self, t: usize, id: PeerId) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.interior == Some(t as u32) && n.children.len() < n.fanout as usize)
    }

    /// Unlinks `x` from its parent in tree `t` (its own subtree stays attached to it).
    fn detach(&mut self, t: usize, x: PeerId, aff: &mut BTreeSet<PeerId>) {
        let interior = self.is_interior(x, t);
        let Some(parent) = self.nodes.get(&x).map(|n| n.links[t].parent) else {
            return;
        };
        match parent {
            Parent::Detached => return,
            Parent::Origin => {
                let tree = &mut self.trees[t];
                tree.origin_epoch += 1;
                if interior {
                    tree.origin_interior.remove(&x);
                } else {
                    tree.origin_leaves.remove(&x);
                }
            }
            Parent::Peer(q) => {
                let before = self.index_key(t, q);
                if let Some(qn) = self.nodes.get_mut(&q) {
                    qn.children.retain(|c| *c != x);
                    if !interior {
                        qn.leaf_children = qn.leaf_children.saturating_sub(1);
                    }
                }
                self.reindex(t, q, before);
                aff.insert(q);
            }
        }
        if let Some(n) = self.nodes.get_mut(&x) {
            n.links[t].parent = Parent::Detached;
        }
        aff.insert(x);
    }

    /// Links detached `x` under `parent` (`None`: the origin) in tree `t`, renumbering the depths
    /// of its subtree.
    fn attach(&mut self, t: usize, x: PeerId, parent: Option<PeerId>, aff: &mut BTreeSet<PeerId>) {
        let interior = self.is_interior(x, t);
        let depth = match parent {
            None => {
                let tree = &mut self.trees[t];
                tree.origin_epoch += 1;
                if interior {
                    tree.origin_interior.insert(x);
                } else {
                    tree.origin_leaves.insert(x);
                }
                1
            }
            Some(q) => {
                let before = self.index_key(t, q);
                let mut depth = 1;
                if let Some(qn) = self.nodes.get_mut(&q) {
                    qn.children.push(x);
                    if !interior {
                        qn.leaf_children += 1;
                    }
                    depth = qn.links[t].depth + 1;
                }
                self.reindex(t, q, before);
                aff.insert(q);
                depth
            }
        };
        if let Some(n) = self.nodes.get_mut(&x) {
            n.links[t].parent = parent.map_or(Parent::Origin, Parent::Peer);
        }
        aff.insert(x);
        self.set_subtree_depth(t, x, depth);
    }

    /// Sets `root`'s depth in tree `t` and shifts its whole subtree accordingly.
    fn set_subtree_depth(&mut self, t: usize, root: PeerId, depth: u32) {
        let Some(n) = self.nodes.get_mut(&root) else {
            return;
        };
        if n.links[t].depth == depth {
            return; // the subtree keeps its (relative, hence absolute) depths
        }
        // A leaf of tree `t` (the common case: k - 1 of a joiner's k placements) has no subtree
        // and no index entry: only its depth and the histogram change.
        if n.interior != Some(t as u32) {
            let old = std::mem::replace(&mut n.links[t].depth, depth);
            let counts = &mut self.trees[t].depth_counts;
            if old > 0 {
                if let Some(c) = counts.get_mut(old as usize) {
                    *c = c.saturating_sub(1);
                }
            }
            if counts.len() <= depth as usize {
                counts.resize(depth as usize + 1, 0);
            }
            counts[depth as usize] += 1;
            return;
        }
        let mut stack = vec![(root, depth)];
        while let Some((x, d)) = stack.pop() {
            self.unindex(t, x);
            let Some(n) = self.nodes.get_mut(&x) else {
                continue;
            };
            let old = std::mem::replace(&mut n.links[t].depth, d);
            if n.interior == Some(t as u32) {
                stack.extend(n.children.iter().map(|c| (*c, d + 1)));
            }
            let counts = &mut self.trees[t].depth_counts;
            if old > 0 {
                if let Some(c) = counts.get_mut(old as usize) {
                    *c = c.saturating_sub(1);
                }
            }
            if counts.len() <= d as usize {
                counts.resize(d as usize + 1, 0);
            }
            counts[d as usize] += 1;
            self.index(t, x);
        }
    }

    /// Where `id` sits in tree `t`'s slot indexes: its depth and whether it is in `free`,
    /// `with_leaf` and `bottom` (`None`: in none, not interior here or not placed).
    fn index_key(&self, t: usize, id: PeerId) -> Option<(u32, [bool; 3])> {
        let n = self.nodes.get(&id)?;
        (n.interior == Some(t as u32) && n.links[t].depth > 0).then(|| {
            (
                n.links[t].depth,
                [
                    n.children.len() < n.fanout as usize,
                    n.leaf_children > 0,
                    n.leaf_children as usize == n.children.len(),
                ],
            )
        })
    }

    /// After `id`'s children changed (not its depth), updates only the index entries that
    /// changed since `before` ([`MultiTree::index_key`]): the same result as `unindex` then
    /// `index`, without touching the sets whose membership stayed the same.
    fn reindex(&mut self, t: usize, id: PeerId, before: Option<(u32, [bool; 3])>) {
        let after = self.index_key(t, id);
        let (Some((d0, b)), Some((d1, a))) = (before, after) else {
            if before.is_some() || after.is_some() {
                self.remove_keys(t, id, before);
                self.insert_keys(t, id, after);
            }
            return;
        };
        if d0 != d1 {
            self.remove_keys(t, id, before);
            self.insert_keys(t, id, after);
            return;
        }
        let tree = &mut self.trees[t];
        let key = (d0, id);
        if a[0] != b[0] {
            if a[0] {
                tree.free.insert(key);
            } else {
                tree.free.remove(&key);
            }
        }
        if a[1] != b[1] {
            if a[1] {
                tree.with_leaf.insert(key);
            } else {
                tree.with_leaf.remove(&key);
            }
        }
        if a[2] != b[2] {
            if a[2] {
                tree.bottom.insert((Reverse(d0), id));
            } else {
                tree.bottom.remove(&(Reverse(d0), id));
            }
        }
    }

    fn remove_keys(&mut self, t: usize, id: PeerId, key: Option<(u32, [bool; 3])>) {
        if let Some((d, _)) = key {
            let fanout = self.nodes.get(&id).map_or(0, |n| n.fanout);
            let tree = &mut self.trees[t];
            tree.by_fanout.remove(&(fanout, d, id));
            tree.free.remove(&(d, id));
            tree.with_leaf.remove(&(d, id));
            tree.bottom.remove(&(Reverse(d), id));
        }
    }

    fn insert_keys(&mut self, t: usize, id: PeerId, key: Option<(u32, [bool; 3])>) {
        if let Some((d, [free, leafy, bottom])) = key {
            let fanout = self.nodes.get(&id).map_or(0, |n| n.fanout);
            let tree = &mut self.trees[t];
            tree.by_fanout.insert((fanout, d, id));
            if free {
                tree.free.insert((d, id));
            }
            if leafy {
                tree.with_leaf.insert((d, id));
            }
            if bottom {
                tree.bottom.insert((Reverse(d), id));
            }
        }
    }

    /// Drops `id` from tree `t`'s slot indexes (before its depth or children change).
    fn unindex(&mut self, t: usize, id: PeerId) {
        if let Some(n) = self.nodes.get(&id) {
            if n.interior == Some(t as u32) {
                let key = (n.links[t].depth, id);
                self.trees[t].by_fanout.remove(&(n.fanout, key.0, id));
                self.trees[t].free.remove(&key);
                self.trees[t].with_leaf.remove(&key);
                self.trees[t].bottom.remove(&(Reverse(key.0), id));
            }
        }
    }

    /// Re-adds `id` to tree `t`'s slot indexes according to its current state.
    fn index(&mut self, t: usize, id: PeerId) {
        if let Some(n) = self.nodes.get(&id) {
            if n.interior == Some(t as u32) && n.links[t].depth > 0 {
                let key = (n.links[t].depth, id);
                self.trees[t].by_fanout.insert((n.fanout, key.0, id));
                if n.children.len() < n.fanout as usize {
                    self.trees[t].free.insert(key);
                }
                if n.leaf_children > 0 {
                    self.trees[t].with_leaf.insert(key);
                }
                if n.leaf_children as usize == n.children.len() {
                    self.trees[t].bottom.insert((Reverse(key.0), id));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lower_fanout_keeps_children_and_stops_new_ones() {
        let cfg = MultiTreeConfig {
            k: 2,
            stream_kbps: 1000,
            origin_fanout: 1,
            max_fanout: 16,
        };
        let mut t = MultiTree::new(cfg);
        t.join(PeerId(1), 4000);
        for p in 2..5 {
            t.join(PeerId(p), 0);
        }
        let kids = t.children(PeerId(1)).len();
        assert!(kids >= 1);
        // Too low for its current children: refused, nothing changes.
        assert!(!t.lower_fanout(PeerId(1), (kids as u32 - 1) * 500));
        assert_eq!(t.fanout(PeerId(1)), Some(8));
        assert!(t.lower_fanout(PeerId(1), kids as u32 * 500));
        assert_eq!(t.fanout(PeerId(1)), Some(kids as u32));
        assert_eq!(t.children(PeerId(1)).len(), kids);
        t.check_invariants().unwrap();
        // No free slot left: a joiner is not hung under it.
        t.join(PeerId(9), 0);
        assert!(t.children(PeerId(1)).len() <= kids);
        t.check_invariants().unwrap();
    }

    use protocol::rng::XorShift as Rng;

    #[test]
    fn with_the_origin_preferred_joiners_fill_its_slots_before_any_peer_s() {
        for prefer in [false, true] {
            let mut m = MultiTree::new(cfg(2, 5, 8));
            m.set_prefer_origin(prefer);
            let mut rng = Rng::seeded(3);
            for i in 1..=40u64 {
                m.join(PeerId(i), [0, 500, 1000, 4000][rng.below(4) as usize]);
                m.check_invariants().unwrap();
            }
            for i in (1..=40u64).step_by(6) {
                m.leave(PeerId(i));
                m.check_invariants().unwrap();
            }
            assert_everyone_fed(&m);
            for t in 0..2u32 {
                let fed = m.origin_children_count(t);
                if prefer {
                    // Every slot used, and the leaves the origin carries beyond its slots
                    // moved under peers as before.
                    assert_eq!(fed, 5, "tree {t}");
                } else {
                    assert!(
                        fed < 5,
                        "tree {t}: the origin feeds as few as it can ({fed})"
                    );
                }
            }
        }
    }

    fn cfg(k: u32, origin_fanout: u32, max_fanout: u32) -> MultiTreeConfig {
        MultiTreeConfig {
            k,
            stream_kbps: 1000,
            origin_fanout,
            max_fanout,
        }
    }

    /// Every peer receives every substream, and following parents always reaches the origin.
    fn assert_everyone_fed(m: &MultiTree) {
        let k = m.config().k;
        for p in m.peers() {
            let plan = m.plan(p).unwrap();
            assert_eq!(plan.len(), k as usize);
            for (t, s) in plan.iter().enumerate() {
                assert_eq!(s.index, t as u32);
                let mut x = p;
                let mut hops = 1;
                while let Source::Peer { id } = m.plan(x).unwrap()[t].parent {
                    assert!(m.plan(id).unwrap()[t].children.contains(&x));
                    x = id;
                    hops += 1;
                    assert!(hops <= m.len() + 1, "cycle");
                }
                assert_eq!(m.depth(p, t as u32), Some(hops as u32));
            }
        }
    }

    #[test]
    fn fanout_from_capacity() {
        let c = cfg(4, 4, 8);
        assert_eq!(c.fanout_for(0), 0);
        assert_eq!(c.fanout_for(249), 0);
        assert_eq!(c.fanout_for(250), 1);
        assert_eq!(c.fanout_for(1000), 4);
        assert_eq!(c.fanout_for(u32::MAX), 8);
        let free = MultiTreeConfig {
            stream_kbps: 0,
            ..c
        };
        assert_eq!(free.fanout_for(1), 8);
    }

    #[test]
    fn high_capacity_peers_make_one_root_per_tree() {
        let k = 4;
        let mut m = MultiTree::new(cfg(k, 4, 16));
        for i in 0..8 {
            let changes = m.join(PeerId(i), 10_000);
            assert!(changes.affected.contains(&PeerId(i)));
            m.check_invariants().unwrap();
        }
        assert_eq!(m.origin_load(), k as usize);
        assert_eq!(m.origin_overflow(), 0);
        for t in 0..k {
            let roots = m.origin_children(t);
            assert_eq!(roots.len(), 1);
            assert_eq!(m.interior_tree(roots[0]), Some(t));
        }
        assert!(m.max_depth() <= 2, "max depth {}", m.max_depth());
        assert_everyone_fed(&m);
        for p in m.peers() {
            let interior = m.interior_tree(p).unwrap();
            for s in m.plan(p).unwrap() {
                assert!(s.children.is_empty() || s.index == interior);
            }
        }
    }

    #[test]
    fn a_stronger_joiner_takes_a_weak_forwarders_place_near_the_root() {
        // One tree, one origin slot: the first joiner (fan-out 2) is the root.
        let mut m = MultiTree::new(cfg(1, 1, 16));
        m.join(PeerId(1), 2000);
        m.join(PeerId(2), 2000);
        m.join(PeerId(3), 2000);
        assert_eq!(m.origin_children(0), vec![PeerId(1)]);
        assert_eq!(m.children(PeerId(1)), &[PeerId(2), PeerId(3)]);
        // Fan-out 4 is twice the root's: the joiner takes the root's place and feeds the
        // root and its former children, at the depths they had.
        let changes = m.join(PeerId(9), 4000);
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert_eq!(m.origin_children(0), vec![PeerId(9)]);
        let mut kids = m.children(PeerId(9)).to_vec();
        kids.sort();
        assert_eq!(kids, vec![PeerId(1), PeerId(2), PeerId(3)]);
        assert_eq!(m.depth(PeerId(9), 0), Some(1));
        assert_eq!(m.depth(PeerId(2), 0), Some(2));
        assert_eq!(m.depth(PeerId(1), 0), Some(2));
        for p in [1, 2, 3, 9] {
            assert!(
                changes.affected.contains(&PeerId(p)),
                "{p} needs new instructions"
            );
        }
        // Not twice as strong (fan-out 6 against 4): it takes a free slot below.
        m.join(PeerId(10), 6000);
        m.check_invariants().unwrap();
        assert_eq!(m.origin_children(0), vec![PeerId(9)]);
        assert_eq!(m.depth(PeerId(10), 0), Some(2));
        assert_everyone_fed(&m);
    }

    #[test]
    fn a_joiner_whose_class_is_unknown_takes_no_place() {
        let mut m = MultiTree::new(cfg(1, 1, 16));
        m.join(PeerId(1), 2000);
        m.join(PeerId(2), 2000);
        // The page joins before it has classified its NAT: it might turn out unable to reach
        // the children it would take over.
        m.set_connectivity(PeerId(9), None);
        m.join(PeerId(9), 4000);
        m.check_invariants().unwrap();
        assert_eq!(m.origin_children(0), vec![PeerId(1)]);
        // Known (open), it does.
        let open = Connectivity {
            class: protocol::NatClass::Open,
            turn: false,
        };
        m.set_connectivity(PeerId(10), Some(open));
        m.join(PeerId(10), 4000);
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert_eq!(m.origin_children(0), vec![PeerId(10)]);
    }

    #[test]
    fn a_forwarder_serves_its_biggest_subtrees_first() {
        let mut m = MultiTree::new(cfg(1, 1, 16));
        m.join(PeerId(1), 16_000); // fan-out 16: the root
        m.join(PeerId(2), 1_000); // fan-out 1
        m.join(PeerId(3), 3_000); // fan-out 3
        for i in 10..24 {
            m.join(PeerId(i), 0); // leaves fill the root's slots
        }
        for i in 30..34 {
            m.join(PeerId(i), 0); // one under 2, three under 3
        }
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert_eq!(m.children(PeerId(2)).len(), 1);
        assert_eq!(m.children(PeerId(3)).len(), 3);
        let plan = m.plan(PeerId(1)).unwrap();
        assert_eq!(&plan[0].children[..2], &[PeerId(3), PeerId(2)]);
    }

    #[test]
    fn a_joiner_never_takes_the_place_of_a_forwarder_it_cannot_reach() {
        let mut m = MultiTree::new(cfg(1, 1, 16));
        m.join(PeerId(1), 2000);
        m.join(PeerId(2), 2000);
        // 9 is known to be unable to reach 2 (a failed data channel), then re-placed with
        // more upload, as a congestion repair re-joins a peer: its blocks stay.
        m.join(PeerId(9), 0);
        m.block(PeerId(9), PeerId(2));
        m.join(PeerId(9), 4000);
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert_eq!(m.origin_children(0), vec![PeerId(1)], "9 cannot feed 2");
        assert_ne!(
            m.plan(PeerId(2)).unwrap()[0].parent,
            Source::Peer { id: PeerId(9) }
        );
    }

    #[test]
    fn zero_capacity_peers_are_leaves_everywhere() {
        let mut m = MultiTree::new(cfg(3, 2, 8));
        for i in 0..5 {
            m.join(PeerId(i), 0);
        }
        m.check_invariants().unwrap();
        for p in m.peers() {
            assert_eq!(m.interior_tree(p), None);
            assert_eq!(m.fanout(p), Some(0));
        }
        // Nobody can forward: the origin feeds everyone, partly as overflow.
        assert_eq!(m.origin_load(), 15);
        assert_eq!(m.origin_overflow(), 9);
        // A capable joiner takes over from the origin where it forwards.
        m.join(PeerId(99), 10_000);
        m.check_invariants().unwrap();
        let t = m.interior_tree(PeerId(99)).unwrap();
        assert_eq!(m.origin_children(t), vec![PeerId(99)]);
        assert_everyone_fed(&m);
    }

    #[test]
    fn relaying_peer_leaving_gets_its_children_new_parents() {
        let mut m = MultiTree::new(cfg(2, 1, 3));
        for i in 0..30 {
            m.join(PeerId(i), 1500); // fan-out 3
        }
        m.check_invariants().unwrap();
        // A forwarder with children that is not a root.
        let victim = m
            .peers()
            .find(|p| {
                let t = m.interior_tree(*p).unwrap();
                let plan = m.plan(*p).unwrap();
                !plan[t as usize].children.is_empty() && plan[t as usize].parent != Source::Origin
            })
            .unwrap();
        let t = m.interior_tree(victim).unwrap() as usize;
        let plan = m.plan(victim).unwrap();
        let children = plan[t].children.clone();
        let Source::Peer { id: parent } = plan[t].parent else {
            unreachable!()
        };
        let leaf_parents: Vec<PeerId> = plan
            .iter()
            .filter_map(|s| match s.parent {
                Source::Peer { id } => Some(id),
                Source::Origin => None,
            })
            .collect();
        let changes = m.leave(victim);
        m.check_invariants().unwrap();
        assert!(!changes.affected.contains(&victim));
        assert!(m.plan(victim).is_none());
        for c in &children {
            assert!(changes.affected.contains(c), "{c} not told");
            let new_parent = m.plan(*c).unwrap()[t].parent;
            assert_ne!(new_parent, Source::Peer { id: victim });
        }
        assert!(changes.affected.contains(&parent));
        for p in leaf_parents {
            assert!(changes.affected.contains(&p));
        }
        assert_everyone_fed(&m);
        assert_eq!(m.leave(victim), Changes::default());
    }

    #[test]
    fn root_leaving_promotes_its_subtree() {
        // k = 1: everyone forwards, there are no leaves to displace.
        let mut m = MultiTree::new(cfg(1, 2, 2));
        for i in 0..40 {
            m.join(PeerId(i), 2000);
        }
        m.check_invariants().unwrap();
        let root = m.origin_children(0)[0];
        let depth_before = m.max_depth();
        let changes = m.leave(root);
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert!(!m.origin_children(0).is_empty());
        assert!(!changes.affected.is_empty());
        assert!(m.max_depth() <= depth_before);
    }

    #[test]
    fn random_churn_keeps_invariants() {
        let capacities = [0, 100, 250, 500, 999, 1000, 2000, 5000, 100_000];
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let k = 1 + rng.below(6) as u32;
            let mut m = MultiTree::new(cfg(k, rng.below(3) as u32, 1 + rng.below(8) as u32));
            let mut present: Vec<PeerId> = Vec::new();
            for step in 0..600u64 {
                if present.is_empty() || rng.below(100) < 60 {
                    let id = PeerId(step);
                    let cap = capacities[rng.below(capacities.len() as u64) as usize];
                    let changes = m.join(id, cap);
                    assert!(changes.affected.contains(&id));
                    present.push(id);
                } else if rng.below(10) == 0 {
                    // Re-join with another capacity.
                    let id = present[rng.below(present.len() as u64) as usize];
                    m.join(id, capacities[rng.below(capacities.len() as u64) as usize]);
                } else {
                    let i = rng.below(present.len() as u64) as usize;
                    let id = present.swap_remove(i);
                    let changes = m.leave(id);
                    assert!(!changes.affected.contains(&id));
                }
                if let Err(e) = m.check_invariants() {
                    panic!("seed {seed} step {step}: {e}");
                }
                assert_eq!(m.len(), present.len());
            }
            assert_everyone_fed(&m);
            for id in present {
                m.leave(id);
                m.check_invariants().unwrap();
            }
            assert!(m.is_empty());
            assert_eq!(m.max_depth(), 0);
            assert_eq!(m.origin_load(), 0);
        }
    }

    #[test]
    fn replacement_forwarder_keeps_the_leaves_it_has_room_for() {
        // k = 1: R (fan-out 2) is the root; B (3) and C (2) hang under it; B feeds leaves
        // 4, 5, 6 and C feeds 7, 8.
        let mut m = MultiTree::new(cfg(1, 1, 3));
        m.join(PeerId(1), 2000);
        m.join(PeerId(2), 3000);
        m.join(PeerId(3), 2000);
        for p in 4..9 {
            m.join(PeerId(p), 0);
        }
        let kids = |m: &MultiTree, p: u64| {
            let mut c = m.children(PeerId(p)).to_vec();
            c.sort();
            c
        };
        assert_eq!(kids(&m, 1), vec![PeerId(2), PeerId(3)]);
        assert_eq!(kids(&m, 2), vec![PeerId(4), PeerId(5), PeerId(6)]);
        assert_eq!(kids(&m, 3), vec![PeerId(7), PeerId(8)]);
        // The root leaves: B takes its place and adopts C, which costs it one of its three
        // slots; it gives up one leaf and keeps the other two, whose links do not change.
        let changes = m.leave(PeerId(1));
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        assert_eq!(m.origin_children(0)[0], PeerId(2));
        let b = kids(&m, 2);
        assert_eq!(b.len(), 3);
        assert!(b.contains(&PeerId(3)));
        let kept: Vec<PeerId> = b.into_iter().filter(|c| *c != PeerId(3)).collect();
        assert_eq!(kept.len(), 2);
        for leaf in kept {
            assert!(!changes.affected.contains(&leaf), "{leaf} was told to move");
        }
        assert_eq!(kids(&m, 3), vec![PeerId(7), PeerId(8)]);
    }

    #[test]
    fn the_emptiest_of_equally_deep_bottom_forwarders_takes_the_place() {
        // k = 1: root R; B and C under it (fan-out 3 each); leaf 4 under R, leaves 5, 6, 7
        // under B, leaf 8 under C.
        let mut m = MultiTree::new(cfg(1, 1, 3));
        for p in 1..=3 {
            m.join(PeerId(p), 3000);
        }
        for p in 4..9 {
            m.join(PeerId(p), 0);
        }
        let mut b = m.children(PeerId(2)).to_vec();
        b.sort();
        assert_eq!(b, vec![PeerId(5), PeerId(6), PeerId(7)]);
        assert_eq!(m.children(PeerId(3)), &[PeerId(8)]);
        let changes = m.leave(PeerId(1));
        m.check_invariants().unwrap();
        assert_everyone_fed(&m);
        // C, with two free slots, replaces R rather than the full B; B's leaves hear nothing.
        assert_eq!(m.origin_children(0), vec![PeerId(3)]);
        for leaf in [5, 6, 7] {
            assert!(!changes.affected.contains(&PeerId(leaf)));
        }
        assert_eq!(
            m.plan(PeerId(8)).unwrap()[0].parent,
            Source::Peer { id: PeerId(3) }
        );
    }

    #[test]
    fn orphaned_leaves_go_to_a_neighbour_when_one_has_room() {
        // Whenever a forwarder leaves, each of its leaf children whose own children (in the tree
        // where it forwards) include a forwarder of the lost tree with a free slot must end up
        // under one of them: that link is already open.
        let caps = [0, 500, 1000, 2000, 4000];
        let mut adopted = 0;
        for seed in 1..=4u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut m = MultiTree::new(cfg(4, 1, 4));
            let mut present: Vec<PeerId> = Vec::new();
            for step in 0..800u64 {
                if present.len() < 30 || rng.below(2) == 0 {
                    m.join(PeerId(step), caps[rng.below(caps.len() as u64) as usize]);
                    present.push(PeerId(step));
                    continue;
                }
                let victim = present.swap_remove(rng.below(present.len() as u64) as usize);
                let Some(t) = m.interior_tree(victim) else {
                    m.leave(victim);
                    continue;
                };
                let t = t as usize;
                // Its leaf children in `t`, each with its own children (its neighbours that
                // can be interior in `t`).
                let orphans: Vec<(PeerId, Vec<PeerId>)> = m
                    .children(victim)
                    .iter()
                    .filter(|c| m.interior_tree(**c) != Some(t as u32))
                    .map(|c| {
                        let own: Vec<PeerId> = m
                            .children(*c)
                            .iter()
                            .copied()
                            .filter(|x| *x != victim)
                            .collect();
                        (*c, own)
                    })
                    .collect();
                m.leave(victim);
                if let Err(e) = m.check_invariants() {
                    panic!("seed {seed} step {step}: {e}");
                }
                for (x, neighbours) in orphans {
                    let Source::Peer { id: parent } = m.plan(x).unwrap()[t].parent else {
                        continue;
                    };
                    if neighbours.contains(&parent) {
                        adopted += 1;
                        continue;
                    }
                    for c in neighbours {
                        let room = m.interior_tree(c) == Some(t as u32)
                            && m.children(c).len() < m.fanout(c).unwrap() as usize;
                        assert!(
                            !room,
                            "seed {seed} step {step}: {x} went to {parent}, not {c}"
                        );
                    }
                }
            }
            assert_everyone_fed(&m);
        }
        assert!(adopted >= 20, "only {adopted} adoptions by a neighbour");
    }

    #[test]
    fn changes_name_exactly_the_relinked_peers() {
        let mut rng = Rng(7);
        let mut m = MultiTree::new(cfg(3, 1, 4));
        let mut present = Vec::new();
        for step in 0..300u64 {
            let before: BTreeMap<PeerId, Vec<SubstreamPlan>> =
                m.peers().map(|p| (p, m.plan(p).unwrap())).collect();
            let changes = if present.is_empty() || rng.below(3) > 0 {
                present.push(PeerId(step));
                m.join(PeerId(step), [0, 400, 800, 3000][rng.below(4) as usize])
            } else {
                let id = present.swap_remove(rng.below(present.len() as u64) as usize);
                m.leave(id)
            };
            for p in m.peers() {
                let mut now = m.plan(p).unwrap();
                let mut was = before.get(&p).cloned().unwrap_or_default();
                for s in now.iter_mut().chain(was.iter_mut()) {
                    s.children.sort();
                }
                if now != was {
                    assert!(
                        changes.affected.contains(&p),
                        "step {step}: {p} changed silently"
                    );
                }
            }
        }
    }

    #[test]
    fn depth_stays_logarithmic_for_a_thousand_peers() {
        let mut m = MultiTree::new(cfg(4, 4, 4));
        for i in 0..1000 {
            m.join(PeerId(i), 1000); // fan-out 4
        }
        m.check_invariants().unwrap();
        assert!(m.max_depth() <= 8, "max depth {}", m.max_depth());
        // Capacity equals demand: the origin feeds little more than the roots.
        assert!(m.origin_load() <= 4 * 4, "origin load {}", m.origin_load());
        // Churn: a third leave, others join; depth stays bounded.
        let mut rng = Rng(99);
        for i in 0..1000u64 {
            if rng.below(2) == 0 {
                m.leave(PeerId(rng.below(1000 + i)));
            } else {
                m.join(PeerId(1000 + i), 1000);
            }
        }
        m.check_invariants().unwrap();
        assert!(m.max_depth() <= 10, "max depth {}", m.max_depth());
        assert_everyone_fed(&m);
    }

    #[test]
    fn single_tree_degenerate_configs() {
        let mut m = MultiTree::new(MultiTreeConfig {
            k: 0,
            stream_kbps: 1000,
            origin_fanout: 0,
            max_fanout: 0,
        });
        assert_eq!(m.config().k, 1);
        m.join(PeerId(1), 50_000);
        m.join(PeerId(2), 50_000);
        m.check_invariants().unwrap();
        assert_eq!(m.origin_children(0), vec![PeerId(1), PeerId(2)]);
        assert_eq!(m.origin_children(5), Vec::<PeerId>::new());
        assert_eq!(m.depth(PeerId(1), 1), None);
        assert_eq!(m.origin_overflow(), 2);
    }

    #[test]
    fn bulk_build_matches_the_invariants_and_supports_churn() {
        let capacities = [0, 100, 250, 500, 999, 1000, 2000, 5000, 100_000];
        for seed in 1..=4u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let k = 1 + rng.below(8) as u32;
            let c = cfg(k, rng.below(3) as u32, 1 + rng.below(16) as u32);
            let peers: Vec<(PeerId, u32)> = (0..400u64)
                .map(|i| (PeerId(i), capacities[rng.below(9) as usize]))
                .collect();
            let mut m = MultiTree::build(c, &peers);
            m.check_invariants().unwrap();
            assert_eq!(m.len(), 400);
            assert_everyone_fed(&m);
            // Forwarders above leaves: a tree's origin feeds one root, plus leaves only when the
            // tree's forwarders are all full.
            for t in 0..k {
                let roots = m.origin_children(t);
                let interior = roots.iter().filter(|p| m.interior_tree(**p) == Some(t));
                assert!(interior.count() <= 1, "seed {seed} tree {t}");
            }
            // The incremental operations work on a built tree.
            for i in 0..200u64 {
                if rng.below(2) == 0 {
                    m.join(PeerId(1000 + i), capacities[rng.below(9) as usize]);
                } else {
                    m.leave(PeerId(rng.below(400)));
                }
                m.check_invariants().unwrap();
            }
            assert_everyone_fed(&m);
        }
    }

    #[test]
    fn per_tree_origin_slots_decide_who_is_underfed() {
        let mut m = MultiTree::new(cfg(2, 0, 4));
        for i in 0..4 {
            m.join(PeerId(i), 0);
        }
        m.set_origin_fanouts(&[4, 1]);
        assert_eq!(m.config().origin_fanout, 1);
        assert_eq!(m.origin_slots(0), 4);
        assert_eq!(m.origin_overflow(), 3);
        let under = m.underfed();
        assert_eq!(under.len(), 3);
        assert!(under.values().all(|missing| *missing == 1));
        let e = m.origin_epoch(0);
        m.join(PeerId(9), 0);
        assert_ne!(m.origin_epoch(0), e, "a new origin child changes the epoch");
        m.set_origin_fanout(2);
        assert_eq!(m.origin_slots(0), 2);
    }

    /// `cargo test -p control-server --release -- --ignored --nocapture scale`
    #[test]
    #[ignore = "slow in debug builds; run with --release"]
    fn scale_to_100k_peers_with_churn() {
        let scenarios: [&[u32]; 3] = [
            &[0, 300, 600, 1000, 1500, 3000], // peers lack capacity: the origin covers the deficit
            &[1000],                          // exactly enough
            &[0, 1000, 2000, 3000],           // surplus
        ];
        for caps in scenarios {
            let mut m = MultiTree::new(cfg(4, 1, 8));
            let mut rng = Rng(5);
            let pick = |rng: &mut Rng| caps[rng.below(caps.len() as u64) as usize];
            let start = std::time::Instant::now();
            for i in 0..100_000u64 {
                let c = pick(&mut rng);
                m.join(PeerId(i), c);
            }
            let joined = start.elapsed();
            let (depth, load) = (m.max_depth(), m.origin_load());
            let start = std::time::Instant::now();
            let mut next = 100_000u64;
            let mut total_affected = 0;
            for _ in 0..100_000u64 {
                if rng.below(2) == 0 {
                    total_affected += m.leave(PeerId(rng.below(next))).affected.len();
                } else {
                    let c = pick(&mut rng);
                    total_affected += m.join(PeerId(next), c).affected.len();
                    next += 1;
                }
            }
            let churned = start.elapsed();
            m.check_invariants().unwrap();
            println!(
                "caps {caps:?}: 100k joins {joined:?} (max depth {depth}, origin load {load}); \
                 100k churn events {churned:?}: peers {}, max depth {}, origin load {}, \
                 mean affected {:.1}",
                m.len(),
                m.max_depth(),
                m.origin_load(),
                total_affected as f64 / 100_000.0
            );
            assert!(m.max_depth() <= 24);
        }
    }
}
