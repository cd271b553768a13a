//! The DCM's invariants, checked from the outside: what every peer was told must form, per
//! substream, a forest rooted at the origin in which each peer has exactly one parent, parents
//! and children agree, nobody forwards in more than one tree of its cluster, and the origin
//! pushes exactly what the plans say. For tests and the simulator (O(n·k)).

use std::collections::HashMap;

use protocol::{PeerId, Source};

use super::Dcm;

impl Dcm {
    /// Checks every invariant of the channel's topology and of the plans the DCM sent; the
    /// first violation found is described in the error.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.recovering() {
            // Adopted sessions are placed once the round of heartbeats is in.
            return Ok(());
        }
        self.planner.check_invariants()?;
        let mut plans = HashMap::with_capacity(self.peers.len());
        for peer in self.peers.keys() {
            let plan = self
                .planner
                .plan(*peer)
                .ok_or_else(|| format!("{peer} is a peer of the DCM but has no plan"))?;
            plans.insert(*peer, plan);
        }
        for (peer, plan) in &plans {
            let mut seen = Vec::with_capacity(plan.substreams.len());
            let mut interior = 0;
            for sp in &plan.substreams {
                if seen.contains(&sp.index) {
                    return Err(format!("{peer} has two parents in substream {}", sp.index));
                }
                seen.push(sp.index);
                if !sp.children.is_empty() {
                    interior += 1;
                }
                if let Source::Peer { id } = sp.parent {
                    let parent = plans.get(&id).ok_or_else(|| {
                        format!("{peer}'s parent {id} in substream {} is gone", sp.index)
                    })?;
                    // A child in the parent's own cluster, or a root the parent feeds from
                    // another tier.
                    let lists = parent
                        .substreams
                        .iter()
                        .any(|p| p.index == sp.index && p.children.contains(peer))
                        || parent.tier.as_ref().is_some_and(|t| {
                            t.feeds
                                .iter()
                                .any(|f| f.to == *peer && f.substream == sp.index)
                        });
                    if !lists {
                        return Err(format!(
                            "{peer}'s parent {id} does not list it in substream {}",
                            sp.index
                        ));
                    }
                }
                for c in &sp.children {
                    let child = plans.get(c).ok_or_else(|| {
                        format!("{peer}'s child {c} in substream {} is gone", sp.index)
                    })?;
                    let names = child
                        .substreams
                        .iter()
                        .any(|s| s.index == sp.index && s.parent == Source::Peer { id: *peer });
                    if !names {
                        return Err(format!(
                            "{peer} lists {c} as a child in substream {} but {c} has another parent",
                            sp.index
                        ));
                    }
                }
            }
            if interior > 1 {
                return Err(format!("{peer} is interior in {interior} trees"));
            }
            let pushes = plan.origin_pushes(self.k);
            let fed = self.origin_fed.get(peer).cloned().unwrap_or_default();
            if pushes != fed {
                return Err(format!(
                    "the origin pushes {fed:?} to {peer}, its plan says {pushes:?}"
                ));
            }
        }
        if let Some(p) = self.origin_fed.keys().find(|p| !plans.contains_key(p)) {
            return Err(format!("the origin pushes to {p}, who is gone"));
        }
        // No cycles: from every peer, each substream's parents lead to the origin.
        for (peer, plan) in &plans {
            for sp in &plan.substreams {
                let mut at = sp.parent;
                let mut steps = 0;
                while let Source::Peer { id } = at {
                    steps += 1;
                    if steps > plans.len() {
                        return Err(format!(
                            "substream {} from {peer} loops without reaching the origin",
                            sp.index
                        ));
                    }
                    at = plans
                        .get(&id)
                        .and_then(|p| p.substreams.iter().find(|s| s.index == sp.index))
                        .map_or(Source::Origin, |s| s.parent);
                }
            }
        }
        Ok(())
    }

    /// The peers the DCM steers, in id order.
    pub fn peers(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self.peers.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
