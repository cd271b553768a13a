//! Pairs of peers that cannot connect (FIG. 7: the topology is computed from "the connectivity
//! to the Internet (e.g., what kind of NAT/firewall the client is behind)"). Two peers behind
//! endpoint-dependent NATs, or one whose UDP is blocked, never open a data channel; when one of
//! them reports the failure, the pair is blocked: they are never parent and child again in any
//! tree, and the child of a blocked link is re-placed at once.
//!
//! A report only ever moves the link between the reporter and the peer it names, so a peer that
//! reports every link as failed hurts only itself (it ends up fed by the origin), never the
//! standing of a parent that serves others.

use std::collections::BTreeSet;

use protocol::PeerId;

use super::{Changes, MultiTree, Parent, MAX_SCAN};

/// Most blocks kept per peer: beyond this many a peer is as good as unreachable, and the
/// origin (always reachable) is where it ends up anyway.
pub const MAX_BLOCKS_PER_PEER: usize = 64;

impl MultiTree {
    /// `a` and `b` cannot connect: they are never linked again, and if one is the other's
    /// parent in some tree now, the child is re-placed. Unknown peers and a peer paired with
    /// itself change nothing.
    pub fn block(&mut self, a: PeerId, b: PeerId) -> Changes {
        let mut aff = BTreeSet::new();
        if a == b || !self.nodes.contains_key(&a) || !self.nodes.contains_key(&b) {
            return Changes::default();
        }
        if self.is_blocked(a, b) {
            return Changes::default();
        }
        for (x, y) in [(a, b), (b, a)] {
            let set = self.blocked.entry(x).or_default();
            if set.len() >= MAX_BLOCKS_PER_PEER {
                // The oldest is forgotten first (ids grow with time).
                if let Some(first) = set.iter().next().copied() {
                    set.remove(&first);
                    if let Some(other) = self.blocked.get_mut(&first) {
                        other.remove(&x);
                        if other.is_empty() {
                            self.blocked.remove(&first);
                        }
                    }
                }
            }
            self.blocked.entry(x).or_default().insert(y);
        }
        for t in 0..self.trees.len() {
            for (child, parent) in [(a, b), (b, a)] {
                let linked = self
                    .nodes
                    .get(&child)
                    .is_some_and(|n| n.links[t].parent == Parent::Peer(parent));
                if !linked {
                    continue;
                }
                self.detach(t, child, &mut aff);
                if self.is_interior(child, t) {
                    self.place_interior(t, child, true, &mut aff);
                } else {
                    self.place_leaf(t, child, &mut aff);
                }
            }
            self.refill(t, &mut aff);
        }
        Changes { affected: aff }
    }

    /// Whether `a` and `b` are known not to connect.
    pub fn is_blocked(&self, a: PeerId, b: PeerId) -> bool {
        self.blocked.get(&a).is_some_and(|s| s.contains(&b))
    }

    /// Pairs blocked now (each counted once).
    pub fn blocked_pairs(&self) -> usize {
        self.blocked.values().map(BTreeSet::len).sum::<usize>() / 2
    }

    /// A departed peer's blocks go with it.
    pub(super) fn forget_blocks(&mut self, peer: PeerId) {
        if let Some(set) = self.blocked.remove(&peer) {
            for other in set {
                if let Some(s) = self.blocked.get_mut(&other) {
                    s.remove(&peer);
                    if s.is_empty() {
                        self.blocked.remove(&other);
                    }
                }
            }
        }
    }

    /// The shallowest interior node of tree `t` with a free slot that `x` may hang under.
    pub(super) fn first_free_for(&self, t: usize, x: PeerId) -> Option<PeerId> {
        let free = &self.trees[t].free;
        if !self.blocked.contains_key(&x) {
            return free.first().map(|(_, q)| *q);
        }
        free.iter()
            .take(MAX_SCAN)
            .find(|(_, q)| !self.is_blocked(x, *q))
            .map(|(_, q)| *q)
    }

    /// A leaf the origin feeds in tree `t` and a free slot to move it under, if any pair may
    /// connect.
    pub(super) fn refill_pair(&self, t: usize) -> Option<(PeerId, PeerId)> {
        let tree = &self.trees[t];
        let leaf = *tree.origin_leaves.first()?;
        let &(_, q) = tree.free.first()?;
        if self.blocked.is_empty() || !self.is_blocked(leaf, q) {
            return Some((leaf, q));
        }
        tree.origin_leaves
            .iter()
            .take(MAX_SCAN)
            .find_map(|l| self.first_free_for(t, *l).map(|q| (*l, q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::MultiTreeConfig;

    fn tree() -> MultiTree {
        MultiTree::new(MultiTreeConfig {
            k: 4,
            stream_kbps: 400,
            origin_fanout: 1,
            max_fanout: 16,
        })
    }

    fn parent_of(m: &MultiTree, child: PeerId, t: u32) -> Option<protocol::Source> {
        m.plan(child)?
            .into_iter()
            .find(|s| s.index == t)
            .map(|s| s.parent)
    }

    #[test]
    fn a_blocked_child_is_re_placed_and_never_linked_with_that_parent_again() {
        let mut m = tree();
        let mut rng = protocol::rng::XorShift::seeded(3);
        for id in 1..=60 {
            m.join(PeerId(id), [0, 300, 800, 2000][rng.below(4) as usize]);
        }
        // Every link that exists now is reported failed by its child, one after another.
        let mut blocked = Vec::new();
        for id in 1..=60u64 {
            let plan = m.plan(PeerId(id)).expect("plan");
            for s in plan {
                if let protocol::Source::Peer { id: p } = s.parent {
                    if blocked.len() < 40 {
                        let changes = m.block(PeerId(id), p);
                        blocked.push((PeerId(id), p));
                        assert!(changes.affected.contains(&PeerId(id)));
                    }
                }
            }
            m.check_invariants().expect("invariants");
        }
        assert_eq!(m.blocked_pairs(), blocked.len());
        // Joins and leaves keep every blocked pair apart.
        for id in 61..=90 {
            m.join(PeerId(id), [0, 300, 800, 2000][rng.below(4) as usize]);
        }
        for id in (2..=40).step_by(7) {
            m.leave(PeerId(id));
        }
        m.check_invariants().expect("invariants");
        for (a, b) in blocked {
            for t in 0..4 {
                for (x, y) in [(a, b), (b, a)] {
                    assert_ne!(
                        parent_of(&m, x, t),
                        Some(protocol::Source::Peer { id: y }),
                        "{x} under {y} in tree {t} though blocked"
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_go_with_the_peer_that_leaves_and_are_bounded_per_peer() {
        let mut m = tree();
        for id in 1..=(MAX_BLOCKS_PER_PEER as u64 + 10) {
            m.join(PeerId(id), 2000);
        }
        for id in 2..=(MAX_BLOCKS_PER_PEER as u64 + 10) {
            m.block(PeerId(1), PeerId(id));
        }
        assert!(m.blocked.get(&PeerId(1)).map_or(0, BTreeSet::len) <= MAX_BLOCKS_PER_PEER);
        assert_eq!(m.blocked_pairs(), MAX_BLOCKS_PER_PEER);
        m.leave(PeerId(1));
        assert_eq!(m.blocked_pairs(), 0);
        assert!(m.blocked.is_empty());
        // Unknown peers and self-pairs are ignored.
        assert!(m.block(PeerId(999), PeerId(2)).affected.is_empty());
        assert!(m.block(PeerId(2), PeerId(2)).affected.is_empty());
        assert_eq!(m.blocked_pairs(), 0);
    }
}
