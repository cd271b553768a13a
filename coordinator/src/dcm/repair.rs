//! Heartbeats in, repairs out: each heartbeat goes into the view and the congestion detector; a
//! congested link, a peer gone silent, a departure or a pair that cannot connect re-homes the
//! children concerned; capped peers regain capacity over time.

use bytes::Bytes;
use protocol::{Heartbeat, PeerId};

use super::snapshot::{CongestionRecord, RepairRecord};
use super::{placement_kbps, view, Dcm, Event, OutMsg, Output, LOG_KEEP};

impl Dcm {
    pub(super) fn remove_peer(&mut self, peer: PeerId, reason: &str, now: u64) {
        self.deferred_joins
            .retain(|e| !matches!(e, Event::Join { peer: p, .. } if *p == peer));
        if self.peers.remove(&peer).is_none() {
            return;
        }
        self.view.remove(peer);
        self.reports.forget(peer);
        self.plausible.left(peer, now);
        self.detector.forget_peer(peer);
        self.edge_every.remove(&peer);
        self.offered.remove(&peer);
        self.history.left(peer);
        self.splits.remove(&peer);
        self.last_moved.remove(&peer);
        // Links where it was the parent are rewritten when its children get new instructions.
        self.link_since.remove(&peer);
        if self.origin_fed.remove(&peer).is_some() {
            self.outputs.push_back(Output::OriginFed {
                peer,
                pushes: Vec::new(),
                epoch: self.epoch,
            });
        }
        self.bridges.remove(peer);
        let changes = self.planner.leave(peer);
        tracing::debug!(channel = %self.name, %peer, reason, affected = changes.affected.len(), "peer removed");
        if !changes.affected.is_empty() {
            self.log_repair(peer, reason, changes.affected.len(), now);
        }
        self.send_instructions(changes.affected, now);
    }

    pub(super) fn log_repair(&mut self, peer: PeerId, reason: &str, affected: usize, now: u64) {
        self.stats.repairs += 1;
        self.repairing = true;
        self.repair_log.push_back(RepairRecord {
            at_ms: now,
            reason: reason.to_string(),
            peer,
            affected,
        });
        while self.repair_log.len() > LOG_KEEP {
            self.repair_log.pop_front();
        }
    }

    /// A heartbeat that reached the server at `arrived` (server ms), applied at `now`.
    pub(super) fn on_heartbeat_at(&mut self, peer: PeerId, hb: Heartbeat, arrived: u64, now: u64) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        self.stats.heartbeats += 1;
        let mut hb = hb;
        let bounds = super::plausible::Bounds {
            substreams: self.k
                + if self.planner.is_tiered() {
                    u32::from(protocol::fec::MAX_PARITY_SHARDS)
                } else {
                    0
                },
            stream_kbps: self.stream_kbps,
            upload_kbps: self.peers.get(&peer).map_or(0, |p| p.upload_kbps),
        };
        let peers = &self.peers;
        // While peers resume one by one after a failover, a link may name a parent that has not
        // resumed yet: the rebuild keeps only links between present peers anyway.
        let recovering = self.recovering_until.is_some();
        if self
            .plausible
            .check(peer, &mut hb, arrived, bounds, |id| {
                recovering || peers.contains_key(&id)
            })
            .is_err()
        {
            return;
        }
        if !self.bridges.is_empty() {
            self.bridges.on_heartbeat(peer, &hb.parents);
        }
        if self.recovery_deadline.is_some() {
            // Taking over from another server, which knew whom the origin fed: the peers say
            // it. The origin feeds them again at once, not only once the trees are rebuilt:
            // the whole stream to the origin's mesh neighbours, the data and parity shards of
            // the trees whose parent is the origin (a middle node's trees beyond `k` are its
            // cluster's parity trees).
            use super::planner::Push;
            let trees = hb.parents.len() as u32;
            let pushes: Vec<Push> = if hb.place.is_some_and(|p| p.origin_full) {
                vec![Push::Full]
            } else {
                hb.parents
                    .iter()
                    .filter(|l| l.parent == protocol::Source::Origin)
                    .filter_map(|l| {
                        if l.substream < self.k {
                            Some(Push::Data {
                                substream: l.substream,
                            })
                        } else {
                            let middle = hb
                                .place
                                .is_some_and(|p| p.tier == protocol::TierName::Middle);
                            (middle && l.substream < trees).then_some(Push::Parity {
                                index: l.substream,
                                n: trees - self.k,
                            })
                        }
                    })
                    .collect()
            };
            // What the origin sent it before the move and this server has not: the packets of
            // each newly fed tree past the newest one the peer reports from that tree.
            let before = self.origin_fed.get(&peer);
            let mut subs: Vec<u32> = Vec::new();
            for push in pushes
                .iter()
                .filter(|p| before.is_none_or(|b| !b.contains(p)))
            {
                match *push {
                    Push::Data { substream } => subs.push(substream),
                    Push::Full => subs.extend(0..self.k),
                    // A parity shard is one of several ways to a group: not resent.
                    Push::Parity { .. } => {}
                }
            }
            subs.sort_unstable();
            subs.dedup();
            let mut missed: Vec<Bytes> = Vec::new();
            for sub in subs {
                let after = hb
                    .parents
                    .iter()
                    .filter(|l| l.substream == sub)
                    .filter_map(|l| l.last_seq)
                    .max();
                missed.extend(self.origin.since(sub, after));
            }
            if pushes.is_empty() {
                self.origin_fed.remove(&peer);
            } else {
                self.origin_fed.insert(peer, pushes);
            }
            // Oldest first, as the origin made them.
            missed.sort_by_key(|b| protocol::packet::peek_seq(b).unwrap_or(0));
            for bytes in missed {
                self.stats.origin_push_bytes += bytes.len() as u64;
                self.stats.resent_after_move += 1;
                self.send(peer, OutMsg::Packet(bytes));
            }
        }
        self.view.ingest(hb, arrived);
        if self.recovering() {
            // Collecting the view only; links are judged once the topology is rebuilt.
            return;
        }
        let link_since = &self.link_since;
        let since = |p: PeerId, c: PeerId, s: u32| {
            link_since
                .get(&c)
                .and_then(|v| v.iter().find(|l| l.0 == p && l.1 == s))
                .map(|l| l.2)
        };
        let mut found =
            self.detector
                .on_heartbeat(&self.view, &self.production, self.k, peer, since);
        let fed = self.planner.fed_roots(peer);
        if !fed.is_empty() {
            found.extend(self.detector.on_feeder_heartbeat(
                &self.view,
                &self.production,
                self.k,
                peer,
                &fed,
                since,
            ));
        }
        if self.detector.last_behind() {
            self.edge_every.insert(peer);
        } else {
            self.edge_every.remove(&peer);
        }
        for link in found {
            self.on_congestion(link, now);
        }
    }

    /// A congested link. If the parent itself reports a stuck uplink, its capacity is capped at
    /// what its heartbeats show it actually uploads and the tree re-homes the children it can no
    /// longer feed. If only the child complains, only the child is moved: a peer's report can
    /// never lower another peer's standing.
    pub(super) fn on_congestion(&mut self, link: view::Congested, now: u64) {
        self.stats.congestion_events += 1;
        self.congestion_log
            .push_back(CongestionRecord { at_ms: now, link });
        while self.congestion_log.len() > LOG_KEEP {
            self.congestion_log.pop_front();
        }
        tracing::info!(channel = %self.name, parent = %link.parent, child = %link.child, substream = link.substream, behind = link.behind, parent_side = link.parent_side, "congested link");
        let silent_parent = !link.parent_side
            && self.corroborated_silence(link.parent, link.child, link.substream, now);
        let (peer, kbps, reason) = if silent_parent {
            // Demoted by history to no upload: every child re-homed, none given until the
            // record recovers (and again if it keeps failing them).
            let Some(cap) = self.history.congested(link.parent, Some(0.0), now) else {
                return;
            };
            self.stats.silent_demoted += 1;
            (
                link.parent,
                cap,
                "claims to send what its children never get",
            )
        } else if link.parent_side {
            let measured = self
                .view
                .get(link.parent)
                .and_then(|s| s.measured_upload_kbps);
            // None: capped a moment ago; the move is under way.
            let Some(cap) = self.history.congested(link.parent, measured, now) else {
                return;
            };
            (link.parent, cap, "congested uplink")
        } else if self.planner.is_feed(link.parent, link.child) {
            // A bottom cluster's root complaining of the middle node feeding it: that feed is
            // dealt to other feeders (re-placing the root within its cluster would leave it).
            let changes = self.planner.block(link.child, link.parent);
            self.detector
                .forget_link(link.parent, link.child, link.substream);
            self.log_repair(link.child, "congested feed", changes.affected.len(), now);
            self.send_instructions(changes.affected, now);
            return;
        } else {
            if self
                .last_moved
                .get(&link.child)
                .is_some_and(|t| now.saturating_sub(*t) < 2_000)
            {
                return;
            }
            self.last_moved.insert(link.child, now);
            let Some(kbps) = self.history.effective_kbps(link.child) else {
                return;
            };
            (link.child, kbps, "congested link")
        };
        if !self.peers.contains_key(&peer) {
            return;
        }
        let ranking = self.ranking(peer, now);
        let mut changes = self.planner.rejoin(peer, placement_kbps(kbps), ranking);
        let same_parent = self.planner.plan(link.child).is_some_and(|p| {
            p.substreams.iter().any(|s| {
                s.index == link.substream && s.parent == protocol::Source::Peer { id: link.parent }
            })
        });
        if !link.parent_side && !silent_parent && same_parent {
            // Placed under the same parent again (a small cluster has no other): the two are
            // not paired again, as after a link that never opened.
            let blocked = self.planner.block(link.child, link.parent);
            changes.affected.extend(blocked.affected);
        }
        self.detector.forget_peer(peer);
        self.log_repair(peer, reason, changes.affected.len(), now);
        self.send_instructions(changes.affected, now);
    }

    /// `reporter` could not open a data channel with `peer`: the planner blocks the pair and
    /// re-places a child of theirs; the moved child is bridged by the origin as after any move.
    pub(super) fn link_failed(&mut self, reporter: PeerId, peer: PeerId, now: u64) {
        if reporter == peer
            || !self.peers.contains_key(&reporter)
            || !self.peers.contains_key(&peer)
        {
            return;
        }
        self.stats.link_failures += 1;
        let changes = self.planner.block(reporter, peer);
        tracing::debug!(channel = %self.name, %reporter, %peer, affected = changes.affected.len(), "data channel never opened; pair blocked");
        if !changes.affected.is_empty() {
            self.log_repair(reporter, "unreachable pair", changes.affected.len(), now);
        }
        self.send_instructions(changes.affected, now);
    }
}
