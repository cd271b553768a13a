//! Make-before-break repair: origin bridges.
//!
//! When a repair (a departed, silent or congested parent) moves a peer's substream to a new
//! peer parent, or any re-plan moves one the origin fed, the new link needs a WebRTC data
//! channel, which takes 0.3 to
//! 1.5 s to open in a loaded browser. Meanwhile the child would live off its buffer and HTTP
//! fallback fetches. Instead the origin *bridges* the gap: it pushes that substream to the child
//! over the child's control socket, which is already open, from the moment of the move (with the
//! newest packet at once) until the child's heartbeat shows the new parent delivering, the plan
//! changes again, or [`BRIDGE_MAX_MS`] pass. The child accepts whichever copy comes first and
//! relays it down its own subtree, so the repair covers the whole subtree.
//!
//! A re-plan that is no repair (joins, re-evaluations) and moves a child away from a peer parent
//! that stays is not bridged: that parent keeps feeding the child until the new one delivers
//! (make-before-break in the engine, `peer-wasm/src/engine/handover.rs`). The DCM decides which
//! moves to hand here (`Dcm::send_instructions`).
//!
//! The cost is origin egress for about one link set-up per move, 1/k of the stream per bridged
//! substream; the number of bridges open at once is bounded ([`Bridges::new`]), and beyond it a
//! move falls back to the old behaviour (the child waits for its new parent). Pure state: the
//! DCM asks it what to push and tells it what heartbeats say.

use protocol::{ParentLink, PeerId, Source, SubstreamPlan};
use rustc_hash::FxHashMap;

/// A bridge never outlives this (server ms): a new parent that has not delivered by then is
/// the congestion detector's business, and the child's fallback fetches cover it meanwhile.
pub const BRIDGE_MAX_MS: u64 = 6_000;

/// Bridges open at once per channel, by default (a root with a full fan-out that departs
/// orphans a few dozen children; each bridge costs the origin 1/k of the stream).
pub const DEFAULT_MAX_BRIDGES: usize = 256;

/// One bridged substream of one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bridge {
    pub substream: u32,
    /// The new parent whose first packets the bridge waits for.
    pub parent: PeerId,
    /// Server ms after which the bridge closes regardless.
    pub until: u64,
}

#[derive(Debug)]
pub struct Bridges {
    by_child: FxHashMap<PeerId, Vec<Bridge>>,
    open: usize,
    max: usize,
    /// Bridges opened so far (for the counters).
    pub opened: u64,
    /// Moves that found every bridge slot taken.
    pub refused: u64,
}

impl Bridges {
    pub fn new(max: usize) -> Self {
        Bridges {
            by_child: FxHashMap::default(),
            open: 0,
            max,
            opened: 0,
            refused: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.open == 0
    }

    /// Bridges open now.
    pub fn len(&self) -> usize {
        self.open
    }

    /// The child got new instructions. `before` says, per substream, whether the child had a
    /// source for it until now and which peer parent (`None` for the origin); `plan` is the new
    /// plan, of which only the data trees (`index < k`) are bridged: parity is redundancy, and a
    /// coded child rebuilds without it. Bridges whose substream no longer goes to their parent
    /// close; a substream newly given to a peer parent it did not have opens one. Returns the
    /// substreams newly bridged (the DCM primes each with its newest packet).
    pub fn replan(
        &mut self,
        child: PeerId,
        before: &[(u32, Option<PeerId>)],
        plan: &[SubstreamPlan],
        k: u32,
        now: u64,
    ) -> Vec<u32> {
        let parent_of = |sub: u32| plan.iter().find(|s| s.index == sub).map(|s| s.parent);
        let mut kept: Vec<Bridge> = self.by_child.remove(&child).unwrap_or_default();
        let had = kept.len();
        kept.retain(|b| b.until > now && parent_of(b.substream) == Some(peer(b.parent)));
        self.open -= had - kept.len();
        let mut new = Vec::new();
        for s in plan.iter().filter(|s| s.index < k) {
            let Source::Peer { id } = s.parent else {
                continue;
            };
            let Some((_, old)) = before.iter().find(|(sub, _)| *sub == s.index) else {
                // The child had no source for it (it just joined): nothing to bridge.
                continue;
            };
            if *old == Some(id) || kept.iter().any(|b| b.substream == s.index) {
                continue;
            }
            if self.open >= self.max {
                self.refused += 1;
                continue;
            }
            kept.push(Bridge {
                substream: s.index,
                parent: id,
                until: now + BRIDGE_MAX_MS,
            });
            self.open += 1;
            self.opened += 1;
            new.push(s.index);
        }
        if !kept.is_empty() {
            self.by_child.insert(child, kept);
        }
        new
    }

    /// A heartbeat of `child`: a bridge closes once its new parent has delivered.
    pub fn on_heartbeat(&mut self, child: PeerId, parents: &[ParentLink]) {
        let Some(bs) = self.by_child.get_mut(&child) else {
            return;
        };
        let had = bs.len();
        bs.retain(|b| {
            !parents.iter().any(|l| {
                l.substream == b.substream && l.parent == peer(b.parent) && l.last_seq.is_some()
            })
        });
        self.open -= had - bs.len();
        if bs.is_empty() {
            self.by_child.remove(&child);
        }
    }

    /// Closes the bridges past their deadline.
    pub fn expire(&mut self, now: u64) {
        let open = &mut self.open;
        self.by_child.retain(|_, bs| {
            let had = bs.len();
            bs.retain(|b| b.until > now);
            *open -= had - bs.len();
            !bs.is_empty()
        });
    }

    /// The child left.
    pub fn remove(&mut self, child: PeerId) {
        if let Some(bs) = self.by_child.remove(&child) {
            self.open -= bs.len();
        }
    }

    /// Everything that closes at once (a DCM taking over starts with none).
    pub fn clear(&mut self) {
        self.by_child.clear();
        self.open = 0;
    }

    /// The substreams bridged to `child`.
    pub fn of(&self, child: PeerId) -> impl Iterator<Item = &Bridge> {
        self.by_child.get(&child).into_iter().flatten()
    }

    /// Every child with its bridges.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Vec<Bridge>)> {
        self.by_child.iter()
    }
}

fn peer(id: PeerId) -> Source {
    Source::Peer { id }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(parents: &[Source]) -> Vec<SubstreamPlan> {
        parents
            .iter()
            .enumerate()
            .map(|(i, p)| SubstreamPlan {
                index: i as u32,
                parent: *p,
                children: Vec::new(),
            })
            .collect()
    }

    fn link(sub: u32, parent: u64, last_seq: Option<u64>) -> ParentLink {
        ParentLink {
            substream: sub,
            parent: peer(PeerId(parent)),
            last_seq,
            last_ts_ms: last_seq,
        }
    }

    #[test]
    fn a_moved_substream_is_bridged_until_its_new_parent_delivers() {
        let mut b = Bridges::new(8);
        let child = PeerId(9);
        let before = [(0, Some(PeerId(1))), (1, Some(PeerId(2))), (2, None)];
        // Substream 0 moves from 1 to 3; 1 stays with 2; 2 moves from the origin to 4.
        let new = b.replan(
            child,
            &before,
            &plan(&[peer(PeerId(3)), peer(PeerId(2)), peer(PeerId(4))]),
            4,
            1_000,
        );
        assert_eq!(new, vec![0, 2]);
        assert_eq!(b.len(), 2);
        // A heartbeat from before the new parents delivered changes nothing.
        b.on_heartbeat(child, &[link(0, 3, None), link(2, 4, None)]);
        assert_eq!(b.len(), 2);
        // The old parent's progress does not close the bridge either.
        b.on_heartbeat(child, &[link(0, 1, Some(50))]);
        assert_eq!(b.len(), 2);
        b.on_heartbeat(child, &[link(0, 3, Some(52)), link(2, 4, None)]);
        assert_eq!(
            b.of(child).map(|x| x.substream).collect::<Vec<_>>(),
            vec![2]
        );
        b.on_heartbeat(child, &[link(2, 4, Some(54))]);
        assert!(b.is_empty());
        assert_eq!(b.opened, 2);
    }

    #[test]
    fn joiners_parity_and_unchanged_links_are_not_bridged_and_moves_again_replace_bridges() {
        let mut b = Bridges::new(8);
        let child = PeerId(9);
        // A joiner had no source.
        assert!(b
            .replan(child, &[], &plan(&[peer(PeerId(1))]), 4, 0)
            .is_empty());
        // Parity tree 4 (k = 4) is not bridged; data tree 0 is.
        let parents = [
            peer(PeerId(1)),
            Source::Origin,
            Source::Origin,
            Source::Origin,
            peer(PeerId(5)),
        ];
        let before: Vec<(u32, Option<PeerId>)> = (0..5).map(|i| (i, Some(PeerId(7)))).collect();
        assert_eq!(b.replan(child, &before, &plan(&parents), 4, 0), vec![0]);
        // Substream 0 moves again before 1 delivered: the bridge now waits for 6.
        let before: Vec<(u32, Option<PeerId>)> = vec![(0, Some(PeerId(1)))];
        assert_eq!(
            b.replan(child, &before, &plan(&[peer(PeerId(6))]), 4, 10),
            vec![0]
        );
        assert_eq!(b.of(child).next().map(|x| x.parent), Some(PeerId(6)));
        assert_eq!(b.len(), 1);
        // Handed to the origin: the origin's own push covers it, the bridge closes.
        assert!(b
            .replan(child, &before, &plan(&[Source::Origin]), 4, 20)
            .is_empty());
        assert!(b.is_empty());
    }

    #[test]
    fn bridges_are_bounded_expire_and_leave_with_their_child() {
        let mut b = Bridges::new(2);
        let before: Vec<(u32, Option<PeerId>)> = (0..4).map(|i| (i, None)).collect();
        let all = plan(&[peer(PeerId(1)); 4]);
        assert_eq!(b.replan(PeerId(9), &before, &all, 4, 0).len(), 2);
        assert_eq!(b.refused, 2);
        assert!(b.replan(PeerId(8), &before, &all, 4, 0).is_empty());
        b.remove(PeerId(9));
        assert!(b.is_empty());
        assert_eq!(b.replan(PeerId(8), &before, &all, 4, 100).len(), 2);
        b.expire(100 + BRIDGE_MAX_MS - 1);
        assert_eq!(b.len(), 2);
        b.expire(100 + BRIDGE_MAX_MS);
        assert!(b.is_empty());
    }
}
