//! Restore after failover (FIG. 7): a DCM that takes over a channel whose DCM failed adopts its
//! sessions and the origin's push list, collects one round of heartbeats, and rebuilds the
//! topology from the links they report, keeping every consistent one.

use std::collections::BTreeSet;

use protocol::{ParentLink, PeerId, Source, TierName};
use rustc_hash::FxHashMap;

use super::planner::Planner;
use super::{placement_kbps, Dcm, Output};
use crate::topology::cluster::ClusterId;
use crate::topology::hierarchy::{ObservedMember, Tier};
use crate::topology::multitree::ObservedPeer;
use crate::topology::region::Region;

/// How long, at most, a DCM that took a channel over across servers waits for its peers to
/// resume, in heartbeat intervals from the first resume: peers reconnect with a jittered backoff
/// after their server failed.
const RESUME_WINDOW_INTERVALS: u64 = 4;

impl Dcm {
    /// A peer reconnected with a valid resume token ([`super::Event::Resume`]).
    pub(super) fn resume(
        &mut self,
        peer: PeerId,
        upload_kbps: u32,
        region: Region,
        relay: bool,
        now: u64,
    ) {
        let interval = self.heartbeat_ms.max(100);
        if !self.recovering() {
            if !self.peers.is_empty() {
                // The channel runs here already: the peer is placed like any joiner (its
                // counters still run from its join on the failed server).
                self.join(peer, upload_kbps, region, relay, now);
                self.plausible.resumed(peer);
                return;
            }
            // The first peer back after a failover: collect heartbeats before placing anyone.
            tracing::warn!(channel = %self.name, "DCM taking over from another server; rebuilding the topology from heartbeats");
            self.recovering_until = Some(now + interval * 3 / 2);
            self.recovery_deadline = Some(now + interval * RESUME_WINDOW_INTERVALS);
        }
        self.admit(peer, upload_kbps, region, relay, now);
        // Its counters run from its join on the failed server.
        self.plausible.resumed(peer);
        self.stats.resumes += 1;
        // Its first heartbeat is due within an interval (it sends one at once): wait for it.
        if let (Some(until), Some(deadline)) = (self.recovering_until, self.recovery_deadline) {
            self.recovering_until = Some(until.max(now + interval * 3 / 2).min(deadline));
        }
    }

    /// A peer's control connection was replaced by a new one ([`super::Event::Reconnect`]).
    pub(super) fn reconnect(&mut self, peer: PeerId, now: u64) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        self.stats.reconnects += 1;
        // Its first heartbeat on the new connection comes at once; until then it is not silent.
        self.view.touch(peer, now);
        self.send_manifests_to(peer);
        // While recovering, the rebuild tells every peer what changed.
        if !self.recovering() {
            self.send_instructions(std::collections::BTreeSet::from([peer]), now);
        }
    }

    /// Rebuilds the topology from the heartbeats received since taking over. Peers whose
    /// reported links are all consistent get no message; the others are placed and told.
    pub(super) fn finish_recovery(&mut self, now: u64) {
        if self.recovering_until.take().is_none() {
            return;
        }
        self.recovery_deadline = None;
        self.stats.recoveries += 1;
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
                let (mut restored, mut changes) =
                    crate::topology::MultiTree::restore(*tree.config(), &observed);
                // The classes the peers announced when they resumed carry over.
                for p in &ids {
                    if let Some(c) = tree.connectivity(*p) {
                        changes
                            .affected
                            .extend(restored.set_connectivity(*p, Some(c)).affected);
                    }
                }
                for o in &observed {
                    for (t, parent) in &o.parents {
                        self.stats.links_reported += 1;
                        let kept = restored.plan(o.peer).is_some_and(|w| {
                            w.iter().any(|sp| sp.index == *t && sp.parent == *parent)
                        });
                        if kept {
                            self.stats.links_kept += 1;
                        }
                    }
                }
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
            Planner::Tiered(_) => self.restore_hierarchy(&ids, now),
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

    /// The hierarchy's part of [`Dcm::finish_recovery`]: tiers, clusters, feeds and trees
    /// rebuilt from the places and parents the heartbeats report ([`Hierarchy::restore`]);
    /// peers it cannot place (no heartbeat, a place they no longer qualify for) are placed as
    /// joiners. Peers whose plan digest matches what they report are told nothing.
    ///
    /// [`Hierarchy::restore`]: crate::topology::hierarchy::Hierarchy::restore
    fn restore_hierarchy(&mut self, ids: &[PeerId], now: u64) -> crate::topology::Changes {
        let mut observed = Vec::new();
        for p in ids {
            let (Some(state), Some(e)) = (self.view.get(*p), self.peers.get(p)) else {
                continue;
            };
            let Some(place) = state.heartbeat.place else {
                continue;
            };
            observed.push(ObservedMember {
                peer: *p,
                region: e.region,
                // What a join places it by (the ranking's measured upload is never set).
                upload_kbps: placement_kbps(e.upload_kbps),
                relay: e.relay,
                tier: match place.tier {
                    TierName::Preferred => Tier::Preferred,
                    TierName::Middle => Tier::Middle,
                    TierName::Bottom => Tier::Bottom,
                },
                cluster: place.cluster.map(ClusterId),
                parents: state
                    .heartbeat
                    .parents
                    .iter()
                    .map(|l| (l.substream, l.parent))
                    .collect(),
            });
        }
        let seen: BTreeSet<PeerId> = observed.iter().map(|o| o.peer).collect();
        let mut unplaced: BTreeSet<PeerId> =
            self.planner.restore_tiered(&observed).into_iter().collect();
        unplaced.extend(ids.iter().filter(|p| !seen.contains(p)));
        for p in &unplaced {
            let Some(e) = self.peers.get(p) else {
                continue;
            };
            let (region, kbps, relay) = (e.region, placement_kbps(e.upload_kbps), e.relay);
            if relay {
                self.planner.join_relay(*p, region, kbps);
            } else {
                let ranking = self.ranking(*p, now);
                self.planner.join(*p, region, kbps, ranking);
            }
        }
        // Who must hear from us: peers whose plan differs from the one they follow.
        let mut changes = crate::topology::Changes::default();
        let reported: FxHashMap<PeerId, (u64, &[ParentLink])> = ids
            .iter()
            .filter_map(|p| {
                let hb = &self.view.get(*p)?.heartbeat;
                Some((*p, (hb.place?.digest, hb.parents.as_slice())))
            })
            .collect();
        for (p, wire) in self.planner.plans(ids.iter().copied()) {
            let Some(wire) = wire else { continue };
            let digest = protocol::plan_digest(&wire.substreams, wire.tier.as_ref());
            let Some((was, parents)) = reported.get(&p) else {
                changes.affected.insert(p);
                continue;
            };
            if *was != digest {
                changes.affected.insert(p);
            }
            for l in *parents {
                self.stats.links_reported += 1;
                let kept = wire
                    .substreams
                    .iter()
                    .any(|sp| sp.index == l.substream && sp.parent == l.parent);
                if kept {
                    self.stats.links_kept += 1;
                }
            }
        }
        changes
    }
}
