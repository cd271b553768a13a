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

use protocol::{Connectivity, PeerId};

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
        self.relink_blocked(a, &mut aff);
        Changes { affected: aff }
    }

    /// `peer` connects as `conn` says (`None`: unknown, assumed to connect with anyone): from
    /// now on it is linked only with peers its class can pair with, and each of its links that
    /// the class cannot hold now is re-placed at once.
    /// Set before [`MultiTree::join`], it places the joiner by it (one that reaches no peer
    /// gets no children: a leaf everywhere).
    pub fn set_connectivity(&mut self, peer: PeerId, conn: Option<Connectivity>) -> Changes {
        if conn.is_some() {
            self.class_unknown.remove(&peer);
        } else {
            self.class_unknown.insert(peer);
        }
        match conn.filter(|c| c.is_restrictive()) {
            Some(c) => {
                if self.nat.insert(peer, c) == Some(c) {
                    return Changes::default();
                }
            }
            None => {
                self.nat.remove(&peer);
                return Changes::default();
            }
        }
        if !self.nodes.contains_key(&peer) {
            return Changes::default();
        }
        let mut aff = BTreeSet::new();
        self.relink_blocked(peer, &mut aff);
        Changes { affected: aff }
    }

    /// The connectivity recorded for `peer` (restrictive classes only; `None` for the rest).
    pub fn connectivity(&self, peer: PeerId) -> Option<Connectivity> {
        self.nat.get(&peer).copied()
    }

    /// Re-places every link between `peer` and a peer it may not be linked with, in every tree.
    fn relink_blocked(&mut self, peer: PeerId, aff: &mut BTreeSet<PeerId>) {
        for t in 0..self.trees.len() {
            let mut bad: Vec<(PeerId, PeerId)> = Vec::new();
            if let Some(n) = self.nodes.get(&peer) {
                if let Parent::Peer(q) = n.links[t].parent {
                    if self.is_blocked(peer, q) {
                        bad.push((peer, q));
                    }
                }
                if n.interior == Some(t as u32) {
                    for c in &n.children {
                        if self.is_blocked(peer, *c) {
                            bad.push((*c, peer));
                        }
                    }
                }
            }
            for (child, parent) in bad {
                let linked = self
                    .nodes
                    .get(&child)
                    .is_some_and(|n| n.links[t].parent == Parent::Peer(parent));
                if !linked {
                    continue;
                }
                self.detach(t, child, aff);
                if self.is_interior(child, t) {
                    self.place_interior(t, child, true, aff);
                } else {
                    self.place_leaf(t, child, aff);
                }
            }
            self.refill(t, aff);
        }
    }

    /// Whether `a` and `b` may not be linked: a failure was reported between them, or their
    /// connectivity classes cannot pair.
    pub fn is_blocked(&self, a: PeerId, b: PeerId) -> bool {
        self.blocked.get(&a).is_some_and(|s| s.contains(&b))
            || (!self.nat.is_empty()
                && !Connectivity::can_pair(self.nat.get(&a).copied(), self.nat.get(&b).copied()))
    }

    /// Whether `x` may not be linked with some peers (a reported failure, or its class).
    pub(super) fn restricted(&self, x: PeerId) -> bool {
        self.blocked.contains_key(&x) || self.nat.contains_key(&x)
    }

    /// Pairs blocked now (each counted once).
    pub fn blocked_pairs(&self) -> usize {
        self.blocked.values().map(BTreeSet::len).sum::<usize>() / 2
    }

    /// Whether `peer`'s class reaches no other peer (UDP blocked, no TURN): it forwards nothing.
    pub(super) fn reaches_nobody(&self, peer: PeerId) -> bool {
        self.nat.get(&peer).is_some_and(|c| !c.reaches_any())
    }

    /// A departed peer's blocks go with it.
    pub(super) fn forget_blocks(&mut self, peer: PeerId) {
        self.nat.remove(&peer);
        self.class_unknown.remove(&peer);
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
        if !self.restricted(x) {
            // Only a peer that reaches nobody refuses an unrestricted one.
            if let Some((_, q)) = free.first().filter(|(_, q)| !self.is_blocked(x, *q)) {
                return Some(*q);
            }
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
        if (self.blocked.is_empty() && self.nat.is_empty()) || !self.is_blocked(leaf, q) {
            return Some((leaf, q));
        }
        // A leaf that finds no slot fails for every leaf of its class without blocks of its own
        // (blocks only add refusals), and the scan of the free slots is the same for each: with
        // many leaves of a class no slot accepts (symmetric NATs under a cluster of NATed
        // forwarders), scanning each again made this 256 × 256 checks on every refill.
        let mut hopeless: Vec<Option<Connectivity>> = Vec::new();
        tree.origin_leaves
            .iter()
            .filter(|l| !self.reaches_nobody(**l))
            .take(MAX_SCAN)
            .find_map(|l| {
                let class = self.nat.get(l).copied();
                if hopeless.contains(&class) {
                    return None;
                }
                let found = self.first_free_for(t, *l);
                if found.is_none() && !self.blocked.contains_key(l) {
                    hopeless.push(class);
                }
                found.map(|q| (*l, q))
            })
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

    #[test]
    fn peers_are_linked_only_where_their_nat_classes_connect() {
        use protocol::NatClass::*;
        let mut m = tree();
        let class = |i: u64| match i % 10 {
            0..=2 => None,
            3..=4 => Some(Open),
            5..=7 => Some(EndpointIndependent),
            8 => Some(EndpointDependent),
            _ => Some(UdpBlocked),
        };
        let conn = |i: u64| class(i).map(|class| Connectivity { class, turn: false });
        // Half announce their class before joining, half after (a late ICE gathering).
        for i in 1..=400u64 {
            if i % 2 == 0 {
                m.set_connectivity(PeerId(i), conn(i));
            }
            m.join(PeerId(i), 400 + (i as u32 * 37) % 1600);
            if i % 2 == 1 {
                m.set_connectivity(PeerId(i), conn(i));
            }
            m.check_invariants().unwrap();
        }
        for i in (1..=400u64).step_by(7) {
            m.leave(PeerId(i));
            m.check_invariants().unwrap();
        }
        // No peer hangs under a parent it cannot reach; UDP-blocked peers feed nobody and
        // hang under the origin only.
        for i in (1..=400u64).filter(|i| i % 7 != 1) {
            let p = PeerId(i);
            for s in m.plan(p).unwrap() {
                if let protocol::Source::Peer { id } = s.parent {
                    assert!(
                        Connectivity::can_pair(conn(i), conn(id.0)),
                        "{i} under {id}"
                    );
                }
                if class(i) == Some(UdpBlocked) {
                    assert_eq!(s.parent, protocol::Source::Origin);
                    assert!(s.children.is_empty());
                }
            }
        }
        // Most of the reachable peers still hang under peers, not the origin.
        let under_peers = (1..=400u64)
            .filter(|i| i % 7 != 1 && class(*i) != Some(UdpBlocked))
            .flat_map(|i| m.plan(PeerId(i)).unwrap())
            .filter(|s| matches!(s.parent, protocol::Source::Peer { .. }))
            .count();
        assert!(under_peers > 1000, "{under_peers}");
        // Re-placing a peer (a congestion repair re-joins it) keeps its class and its blocks.
        let edm = (1..=400u64)
            .find(|i| i % 7 != 1 && class(*i) == Some(EndpointDependent))
            .unwrap();
        m.block(PeerId(edm), PeerId(edm + 1));
        m.join(PeerId(edm), 3000);
        assert_eq!(m.connectivity(PeerId(edm)), conn(edm));
        assert!(m.is_blocked(PeerId(edm), PeerId(edm + 1)));
        m.check_invariants().unwrap();
        // A class learnt late re-places the links it cannot hold.
        let eim = (1..=400u64)
            .find(|i| i % 7 != 1 && class(*i) == Some(EndpointIndependent))
            .unwrap();
        m.set_connectivity(
            PeerId(eim),
            Some(Connectivity {
                class: EndpointDependent,
                turn: false,
            }),
        );
        m.check_invariants().unwrap();
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
