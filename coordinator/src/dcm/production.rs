//! The origin's production log: when each recent packet was made, and when a healthy tree owes
//! it, to know what a peer should have by now.
//!
//! A live source hands the origin a whole fragment at once, and every packet of it is stamped
//! with the same creation time. A forwarder whose uplink is a little faster than its share of
//! the stream passes such a burst on over most of the fragment's duration D: at 1.5 times its
//! share, the last packet leaves 2/3 D after the first. The congestion detector's grace was
//! measured on fragments of up to [`WHOLE_FRAGMENT_MS`] arriving whole; a longer fragment's
//! packets are taken to be due spread over the excess, as if the source had made them at an
//! even pace, so that a 4 s fragment passing through a busy but healthy forwarder is not taken
//! for congestion on every fragment (issue 14: 72-156 links reported on 2-4 s fragments, none on
//! the 1 s demo clip). The duration is read off the gap between the last two fragments' creation
//! times (a live source cuts them as it goes); the first fragment is not spread.

use std::collections::VecDeque;

/// The fragment duration the detector's grace covers for a fragment arriving whole (ms): the
/// demo clip's, on which it was measured. Only what a fragment lasts beyond this is spread.
pub const WHOLE_FRAGMENT_MS: u64 = 1_000;

/// The longest spread (ms): a source that paused for a minute does not make the next fragment
/// owed a minute late.
pub const MAX_SPREAD_MS: u64 = 10_000;

/// One recent packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Made {
    seq: u64,
    /// Creation time stamped by the origin (server ms).
    created_ms: u64,
    /// When a healthy tree owes it (server ms): `created_ms` plus its share of the spread.
    due_ms: u64,
}

/// Recent packets of the origin, oldest first.
#[derive(Debug, Default)]
pub struct ProductionLog {
    recent: VecDeque<Made>,
}

impl ProductionLog {
    const KEEP: usize = 512;

    /// Records one packet due when it was made (no spread).
    pub fn record(&mut self, seq: u64, created_ms: u64) {
        self.push(Made {
            seq,
            created_ms,
            due_ms: created_ms,
        });
    }

    /// Records a batch of new packets, in order. Packets stamped with one creation time are one
    /// fragment: its packets are due evenly over what the fragment lasts beyond
    /// [`WHOLE_FRAGMENT_MS`], its duration taken from the gap to the previous fragment.
    pub fn record_batch(&mut self, packets: &[(u64, u64)]) {
        let mut i = 0;
        while i < packets.len() {
            let created = packets[i].1;
            let n = packets[i..]
                .iter()
                .take_while(|(_, c)| *c == created)
                .count();
            let spread = self
                .recent
                .back()
                .map(|m| m.created_ms)
                .filter(|prev| *prev < created)
                .map_or(0, |prev| {
                    (created - prev)
                        .saturating_sub(WHOLE_FRAGMENT_MS)
                        .min(MAX_SPREAD_MS)
                });
            for (j, &(seq, created_ms)) in packets[i..i + n].iter().enumerate() {
                // Packet j of n is due once j+1 n-ths of the spread have passed: the last one
                // at the end of it.
                let share = spread * (j as u64 + 1) / n as u64;
                self.push(Made {
                    seq,
                    created_ms,
                    due_ms: created_ms + share,
                });
            }
            i += n;
        }
    }

    fn push(&mut self, made: Made) {
        self.recent.push_back(made);
        while self.recent.len() > Self::KEEP {
            self.recent.pop_front();
        }
    }

    fn get(&self, seq: u64) -> Option<&Made> {
        let first = self.recent.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        match self.recent.get(i) {
            Some(m) if m.seq == seq => Some(m),
            // Not contiguous (a restart of the numbering): search.
            _ => self.recent.iter().find(|m| m.seq == seq),
        }
    }

    /// When packet `seq` is owed by a healthy tree, if it is among the recent ones.
    pub fn due(&self, seq: u64) -> Option<u64> {
        self.get(seq).map(|m| m.due_ms)
    }

    /// How much later than its creation packet `seq` is owed (ms; 0 when not spread or not
    /// known): the time its forwarder is allowed beyond the grace for the burst before it.
    pub fn spread(&self, seq: u64) -> u64 {
        self.get(seq).map_or(0, |m| m.due_ms - m.created_ms)
    }

    /// The spread of the newest fragment (ms): how much longer than [`WHOLE_FRAGMENT_MS`] the
    /// stream's fragments last now, which a forwarder's upload backlog may reach in passing.
    pub fn current_spread(&self) -> u64 {
        self.recent.back().map_or(0, |m| m.due_ms - m.created_ms)
    }

    /// Newest packet of `substream` owed at or before `t_ms`: (seq, due_ms).
    pub fn newest_before(&self, substream: u32, k: u32, t_ms: u64) -> Option<(u64, u64)> {
        self.recent
            .iter()
            .rev()
            .find(|m| m.due_ms <= t_ms && protocol::substream_of(m.seq, k) == substream)
            .map(|m| (m.seq, m.due_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(first: u64, n: u64, created: u64) -> Vec<(u64, u64)> {
        (first..first + n).map(|s| (s, created)).collect()
    }

    #[test]
    fn one_second_fragments_are_due_when_made() {
        let mut log = ProductionLog::default();
        log.record_batch(&fragment(0, 4, 10_000));
        log.record_batch(&fragment(4, 4, 11_000));
        for seq in 0..8 {
            assert_eq!(log.spread(seq), 0, "seq {seq}");
        }
        assert_eq!(log.due(5), Some(11_000));
        assert_eq!(log.newest_before(1, 4, 10_999), Some((1, 10_000)));
    }

    #[test]
    fn a_long_fragment_is_due_over_its_excess() {
        let mut log = ProductionLog::default();
        log.record_batch(&fragment(0, 8, 10_000));
        // 4 s after the one before: its 8 packets are due over 3 s, the last at the end.
        log.record_batch(&fragment(8, 8, 14_000));
        assert_eq!(log.due(8), Some(14_000 + 375));
        assert_eq!(log.due(15), Some(17_000));
        assert_eq!(log.spread(15), 3_000);
        // The first fragment had nothing before it to measure.
        assert_eq!(log.spread(7), 0);
        // At 15.5 s, substream 1 (k = 4) owes seq 9 (due 14 750), not seq 13 (due 16 250).
        assert_eq!(log.newest_before(1, 4, 15_500), Some((9, 14_750)));
        assert_eq!(log.newest_before(1, 4, 16_250), Some((13, 16_250)));
        // Due times never run backwards, fragment to fragment.
        log.record_batch(&fragment(16, 8, 18_000));
        let dues: Vec<u64> = (0..24).filter_map(|s| log.due(s)).collect();
        assert!(dues.windows(2).all(|w| w[0] <= w[1]), "{dues:?}");
    }

    #[test]
    fn a_paused_source_spreads_no_more_than_the_cap() {
        let mut log = ProductionLog::default();
        log.record_batch(&fragment(0, 2, 0));
        log.record_batch(&fragment(2, 2, 60_000));
        assert_eq!(log.spread(3), MAX_SPREAD_MS);
    }

    #[test]
    fn a_batch_may_hold_several_fragments() {
        let mut log = ProductionLog::default();
        let mut batch = fragment(0, 2, 1_000);
        batch.extend(fragment(2, 2, 3_000));
        log.record_batch(&batch);
        assert_eq!(log.due(2), Some(3_500));
        assert_eq!(log.due(3), Some(4_000));
    }

    #[test]
    fn the_log_keeps_the_recent_packets_only() {
        let mut log = ProductionLog::default();
        for seq in 0..600 {
            log.record(seq, seq);
        }
        assert_eq!(log.due(0), None);
        assert_eq!(log.due(599), Some(599));
    }
}
