//! Invariants of a run, checked on the coordinator's snapshot and on what the peers delivered.

use protocol::{PeerId, Source, TierName};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::control::PeerSnap;
use crate::world::World;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Invariants {
    /// Live placed peers without exactly one parent per substream.
    pub wrong_parent_count: usize,
    /// Trees in which following parents from some peer loops.
    pub cycles: usize,
    /// Peers that delivered a payload differing from the origin's (each compared byte for
    /// byte as it was delivered).
    pub mismatched_viewers: usize,
    /// Peers that verified nothing at all.
    pub viewers_without_data: usize,
    /// Staying peers that skipped a gap or whose verified range stops short of what the
    /// origin made up to `tail_ms` before the end.
    pub incomplete_viewers: usize,
    /// The first violation `Dcm::check_invariants` found (one parent per substream, parents
    /// and children agree, interior in one tree, no cycles, pushes as planned, mesh
    /// c-connected), if any.
    pub coordinator: Option<String>,
}

/// Exactly one parent per substream for each placed tree member, and no loop in any tree.
/// The hierarchy's top tier (preferred nodes) gets the stream from its flooding mesh, not
/// from trees, so it is left to the coordinator's own check.
pub fn tree_invariants(snap: &[PeerSnap], k: u32) -> (usize, usize) {
    let mut wrong = 0;
    let mut parent: Vec<FxHashMap<PeerId, Option<PeerId>>> = vec![FxHashMap::default(); k as usize];
    for p in snap.iter().filter(|p| p.tier != Some(TierName::Preferred)) {
        let mut seen = vec![0u32; k as usize];
        for s in &p.plan {
            if let Some(c) = seen.get_mut(s.index as usize) {
                *c += 1;
            }
            if let Some(m) = parent.get_mut(s.index as usize) {
                m.insert(
                    p.id,
                    match s.parent {
                        Source::Origin => None,
                        Source::Peer { id } => Some(id),
                    },
                );
            }
        }
        if seen.iter().any(|c| *c != 1) {
            wrong += 1;
        }
    }
    let mut cycles = 0;
    for tree in &parent {
        let mut looped = false;
        for start in tree.keys() {
            let mut at = *start;
            let mut steps = 0;
            while let Some(Some(up)) = tree.get(&at) {
                at = *up;
                steps += 1;
                if steps > tree.len() {
                    looped = true;
                    break;
                }
            }
            if looped {
                break;
            }
        }
        cycles += usize::from(looped);
    }
    (wrong, cycles)
}

/// Byte-exactness of every peer against the origin, and completeness of the staying ones:
/// their verified range must reach what the origin made `tail_ms` before the end.
pub fn delivery_invariants(w: &World, tail_ms: f64) -> Invariants {
    let mut inv = Invariants::default();
    let end_ms = w.now_ms();
    let due = (0..w.origin.produced())
        .rev()
        .find(|s| {
            w.origin
                .packet(*s)
                .is_some_and(|p| (p.created_ms as f64) <= end_ms - tail_ms)
        })
        .unwrap_or(0);
    for p in &w.peers {
        if p.engine.is_none() && p.stats.is_none() {
            continue;
        }
        let st = p.stats();
        let Some(v) = st.verified.filter(|v| v.count > 0) else {
            if p.alive && p.joined_at + 5_000_000 < w.q.now() {
                inv.viewers_without_data += 1;
            }
            continue;
        };
        if p.mismatched > 0 {
            inv.mismatched_viewers += 1;
        }
        if p.alive && !p.leaves {
            let reached = v.first_seq + v.count;
            // A skipped gap restarts the verified range after it.
            if reached <= due || Some(v.first_seq) != p.start_seq {
                inv.incomplete_viewers += 1;
            }
        }
    }
    let k = w.cfg.origin.k;
    let snap = w.control.snapshot(w.now_ms() as u64);
    let live: Vec<PeerSnap> = snap
        .into_iter()
        .filter(|s| {
            crate::peer::index_of(s.id)
                .and_then(|i| w.peers.get(i))
                .is_some_and(|p| p.alive)
        })
        .collect();
    let (wrong, cycles) = tree_invariants(&live, k);
    inv.wrong_parent_count = wrong;
    inv.cycles = cycles;
    inv.coordinator = w.control.check_invariants().err();
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::SubstreamPlan;

    fn snap(id: u64, parents: &[Option<u64>]) -> PeerSnap {
        PeerSnap {
            id: PeerId(id),
            plan: parents
                .iter()
                .enumerate()
                .map(|(i, p)| SubstreamPlan {
                    index: i as u32,
                    parent: p.map_or(Source::Origin, |id| Source::Peer { id: PeerId(id) }),
                    children: Vec::new(),
                })
                .collect(),
            tier: None,
        }
    }

    #[test]
    fn a_loop_and_a_missing_parent_are_found() {
        let ok = [snap(1, &[None, Some(2)]), snap(2, &[Some(1), None])];
        assert_eq!(tree_invariants(&ok, 2), (0, 0));
        let looped = [snap(1, &[Some(2), None]), snap(2, &[Some(1), None])];
        assert_eq!(tree_invariants(&looped, 2), (0, 1));
        let short = [snap(1, &[None])];
        assert_eq!(tree_invariants(&short, 2), (1, 0));
    }
}
