//! The hierarchy's periodic work: the top tier re-chosen from the peers' records (claims 10, 18)
//! and relay rounds for the board the channels share (claims 19, 43).

use rustc_hash::FxHashSet;

use super::planner::Planner;
use super::{placement_kbps, Dcm, Output, RelayRound};
use crate::topology::region::Region;

impl Dcm {
    /// Claims 10, 18: the top tier re-chosen from history, with hysteresis (see
    /// [`Planner::reevaluate_preferred`]).
    pub(super) fn reevaluate_preferred(&mut self, now: u64) {
        let candidates: Vec<crate::topology::mesh::Candidate<Region>> = self
            .peers
            .iter()
            .map(|(peer, e)| crate::topology::mesh::Candidate {
                peer: *peer,
                region: e.region,
                upload_kbps: placement_kbps(
                    self.history.effective_kbps(*peer).unwrap_or(e.upload_kbps),
                ),
                history: self.ranking(*peer, now),
            })
            .collect();
        let changes = self.planner.reevaluate_preferred(&candidates);
        if !changes.affected.is_empty() {
            tracing::info!(channel = %self.name, affected = changes.affected.len(), "top tier re-evaluated");
            self.send_instructions(changes.affected, now);
        }
    }

    /// Claims 19, 43: which of this channel's peers have upload to spare for the other channels
    /// of their region, and which regions here are short of capacity. The driver takes the
    /// round to the board the channels share.
    pub(super) fn relay_round(&mut self) {
        let stream = self.stream_kbps;
        let mut round = RelayRound {
            need_kbps: stream.saturating_mul(3) / 2,
            ..RelayRound::default()
        };
        let mut offered = FxHashSet::default();
        for (peer, e) in &self.peers {
            let capacity =
                placement_kbps(self.history.effective_kbps(*peer).unwrap_or(e.upload_kbps));
            // Only a peer that could spare a whole stream is worth building a plan for: with a
            // million peers, every plan every round would cost seconds.
            if capacity < stream || e.relay {
                continue;
            }
            let Some(plan) = self.planner.plan(*peer) else {
                continue;
            };
            // Relays of this channel are not offered to a third one.
            if plan.tier.as_ref().is_some_and(|t| !t.plays) {
                continue;
            }
            let spare = capacity.saturating_sub(Planner::used_kbps(&plan, stream, self.k));
            if spare >= stream {
                round.offers.push((*peer, e.region, spare));
                offered.insert(*peer);
            }
        }
        // Withdrawn: offered last round, not now (peers that left are off the board already).
        round.withdrawals = self
            .offered
            .iter()
            .filter(|p| !offered.contains(*p) && self.peers.contains_key(*p))
            .copied()
            .collect();
        self.offered = offered;
        // Deterministic order, whatever the map's.
        round.offers.sort_by_key(|o| o.0);
        round.withdrawals.sort();
        // Middle-tier relays take k + n shards: at least one and a half streams.
        round.deficits = self.planner.deficits().into_keys().collect();
        self.outputs.push_back(Output::Relays(round));
    }
}
