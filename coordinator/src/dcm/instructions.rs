//! Instructions to peers whose place changed, with what the origin starts pushing them (primes)
//! and the bridges that cover their moved substreams until the new parents deliver.

use std::collections::BTreeSet;

use bytes::Bytes;
use protocol::{PeerId, ServerMsg, Source};

use super::planner::Push;
use super::{Dcm, OutMsg, Output};

impl Dcm {
    pub(super) fn send_instructions(&mut self, affected: BTreeSet<PeerId>, now: u64) {
        let repair = std::mem::take(&mut self.repairing);
        if affected.is_empty() {
            return;
        }
        self.epoch += 1;
        for (peer, wire) in self.planner.plans(affected) {
            let Some(wire) = wire else {
                continue;
            };
            let pushes = wire.origin_pushes(self.k);
            let primes = self.origin_primes(peer, &pushes);
            // What fed each substream until now, for the bridges. A peer parent that is still
            // here and was not repaired away from keeps feeding the child until the new parent
            // delivers (the engine's handover, `peer-wasm/src/engine/handover.rs`): the origin
            // does not bridge such a move too. In the simulator's flash crowd the joins' re-plans
            // opened 3 500 bridges, 100 streams of origin egress a second.
            let mut before: Vec<(u32, Option<PeerId>)> = self
                .link_since
                .get(&peer)
                .into_iter()
                .flatten()
                .filter(|l| repair || !self.peers.contains_key(&l.0))
                .map(|l| (l.1, Some(l.0)))
                .collect();
            for push in self.origin_fed.get(&peer).into_iter().flatten() {
                match *push {
                    Push::Full => before.extend((0..self.k).map(|s| (s, None))),
                    Push::Data { substream } => before.push((substream, None)),
                    Push::Parity { index, .. } => before.push((index, None)),
                }
            }
            let refused = self.bridges.refused;
            let bridged = self
                .bridges
                .replan(peer, &before, &wire.substreams, self.k, now);
            self.stats.bridges_refused += self.bridges.refused.saturating_sub(refused);
            let mut bridge_primes = Vec::new();
            if !bridged.is_empty() {
                tracing::debug!(channel = %self.name, %peer, ?bridged, "origin bridges the moved substreams");
                self.stats.bridges_opened += bridged.len() as u64;
                bridge_primes.extend(bridged.into_iter().filter_map(|s| self.origin.newest_of(s)));
            }
            let fed_before = self.origin_fed.get(&peer);
            if fed_before.map_or(!pushes.is_empty(), |b| *b != pushes) {
                self.outputs.push_back(Output::OriginFed {
                    peer,
                    pushes: pushes.clone(),
                    epoch: self.epoch,
                });
            }
            if pushes.is_empty() {
                self.origin_fed.remove(&peer);
            } else {
                self.origin_fed.insert(peer, pushes);
            }
            let plan = wire.substreams;
            // Remember when each of the peer's parent links appeared (young links are not judged).
            let old = self.link_since.remove(&peer).unwrap_or_default();
            let links: Vec<(PeerId, u32, u64)> = plan
                .iter()
                .filter_map(|sp| match sp.parent {
                    Source::Peer { id } => {
                        let since = old
                            .iter()
                            .find(|l| l.0 == id && l.1 == sp.index)
                            .map_or(now, |l| l.2);
                        Some((id, sp.index, since))
                    }
                    Source::Origin => None,
                })
                .collect();
            if !links.is_empty() {
                self.link_since.insert(peer, links);
            }
            // New links take a moment to deliver: until a heartbeat shows them feeding it,
            // the peer hears of every new packet from the origin.
            self.edge_every.insert(peer);
            let msg = ServerMsg::Instructions {
                epoch: self.epoch,
                substreams: plan,
                tier: wire.tier,
            };
            self.send(peer, OutMsg::Msg(Box::new(msg)));
            // After the instructions on the same socket, so the page counts them as its new
            // parent's (the origin's) or as the bridge's.
            for bytes in primes {
                self.stats.origin_push_bytes += bytes.len() as u64;
                self.send(peer, OutMsg::Packet(bytes));
            }
            for bytes in bridge_primes {
                self.stats.origin_push_bytes += bytes.len() as u64;
                self.stats.origin_bridge_bytes += bytes.len() as u64;
                self.send(peer, OutMsg::Packet(bytes));
            }
        }
    }

    /// The newest packet of each substream the origin starts feeding `peer` with `pushes`: a
    /// new tree root (a repair can make one) would otherwise wait for the substream's next
    /// packet, up to a fragment, while a peer parent primes its new children at once.
    pub(super) fn origin_primes(&self, peer: PeerId, pushes: &[Push]) -> Vec<Bytes> {
        let before = self.origin_fed.get(&peer);
        pushes
            .iter()
            .filter(|p| before.is_none_or(|b| !b.contains(p)))
            .filter_map(|p| match *p {
                Push::Data { substream } => Some(substream),
                // Full streams (mesh) and parity are not primed: one packet or one stale shard
                // is not what those peers wait for.
                Push::Full | Push::Parity { .. } => None,
            })
            .filter_map(|sub| self.origin.newest_of(sub))
            .collect()
    }
}
