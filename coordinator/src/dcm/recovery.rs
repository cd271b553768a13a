//! Restore after failover (FIG. 7): a DCM that takes over a channel whose DCM failed adopts its
//! sessions and the origin's push list, collects one round of heartbeats, and rebuilds the
//! topology from the links they report, keeping every consistent one.

use protocol::{PeerId, Source};

use super::planner::Planner;
use super::{placement_kbps, Dcm, Output};
use crate::topology::multitree::ObservedPeer;

impl Dcm {
    /// Rebuilds the topology from the heartbeats received since taking over. Peers whose
    /// reported links are all consistent get no message; the others are placed and told.
    pub(super) fn finish_recovery(&mut self, now: u64) {
        if self.recovering_until.take().is_none() {
            return;
        }
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort();
        let changes = match &mut self.planner {
            Planner::Flat(tree) => {
                let observed: Vec<ObservedPeer> = ids
                    .iter()
                    .filter_map(|p| {
                        let state = self.view.get(*p)?;
                        let declared = self.peers.get(p).map_or(0, |e| e.upload_kbps);
                        Some(ObservedPeer {
                            peer: *p,
                            upload_kbps: placement_kbps(
                                self.history.effective_kbps(*p).unwrap_or(declared),
                            ),
                            parents: state
                                .heartbeat
                                .parents
                                .iter()
                                .map(|l| (l.substream, l.parent))
                                .collect(),
                        })
                    })
                    .collect();
                let (restored, mut changes) =
                    crate::topology::MultiTree::restore(*tree.config(), &observed);
                *tree = restored;
                // Sessions that sent no heartbeat in time are placed like joiners.
                for p in &ids {
                    if self.view.get(*p).is_none() {
                        let declared = self.peers.get(p).map_or(0, |e| e.upload_kbps);
                        changes
                            .affected
                            .extend(tree.join(*p, placement_kbps(declared)).affected);
                    }
                }
                changes
            }
            Planner::Tiered(_) => {
                // The hierarchy is re-placed from scratch (restoring it link by link is future
                // work): every peer gets new instructions.
                let mut changes = crate::topology::Changes::default();
                for p in &ids {
                    let Some(e) = self.peers.get(p) else {
                        continue;
                    };
                    let (region, kbps, relay) = (e.region, placement_kbps(e.upload_kbps), e.relay);
                    let placed = if relay {
                        self.planner.join_relay(*p, region, kbps)
                    } else {
                        let ranking = self.ranking(*p, now);
                        self.planner.join(*p, region, kbps, ranking)
                    };
                    changes.affected.extend(placed.affected);
                }
                changes
            }
        };
        // Links kept count as created now: they are judged only after the settle time.
        self.link_since.clear();
        let before = std::mem::take(&mut self.origin_fed);
        self.bridges.clear();
        for p in &ids {
            if let Some(wire) = self.planner.plan(*p) {
                let pushes = wire.origin_pushes(self.k);
                if !pushes.is_empty() {
                    self.origin_fed.insert(*p, pushes);
                }
                let links: Vec<(PeerId, u32, u64)> = wire
                    .substreams
                    .iter()
                    .filter_map(|sp| match sp.parent {
                        Source::Peer { id } => Some((id, sp.index, now)),
                        Source::Origin => None,
                    })
                    .collect();
                if !links.is_empty() {
                    self.link_since.insert(*p, links);
                }
            }
        }
        // Tell the driver what the origin pushes now, where it changed.
        for (peer, pushes) in &self.origin_fed {
            if before.get(peer) != Some(pushes) {
                self.outputs.push_back(Output::OriginFed {
                    peer: *peer,
                    pushes: pushes.clone(),
                    epoch: self.epoch,
                });
            }
        }
        for peer in before.keys() {
            if !self.origin_fed.contains_key(peer) {
                self.outputs.push_back(Output::OriginFed {
                    peer: *peer,
                    pushes: Vec::new(),
                    epoch: self.epoch,
                });
            }
        }
        tracing::info!(channel = %self.name, peers = ids.len(), instructed = changes.affected.len(), "DCM took over: topology rebuilt from heartbeats");
        self.send_instructions(changes.affected, now);
        for ev in std::mem::take(&mut self.deferred_joins) {
            self.handle(ev, now);
        }
    }
}
