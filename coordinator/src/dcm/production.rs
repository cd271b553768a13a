//! The origin's production log: when each recent packet was made, and when a healthy tree owes
//! it, to know what a peer should have by now.
//!
//! A live source hands the origin a whole fragment at once, and every packet of it is stamped
//! with the same creation time. A forwarder passes such a burst on over as much of the
//! fragment's duration D as its uplink is filled: the DCM plans the trees of a stream with long
//! fragments so that uplinks are filled to 70 % at most (`LONG_FRAGMENT_HEADROOM` in
//! `dcm/mod.rs`; a peer offering 1.5 times the stream is filled to two thirds). The detector's
//! grace was measured on the demo clip's 1 s fragments; the packets of a fragment of
//! [`SPREAD_FROM_MS`] or longer are taken to be due spread evenly over four fifths of D, as if
//! the source had made them at that pace, so that a 4 s fragment passing through a busy but
//! healthy forwarder is not taken for congestion on every fragment (issue 14: 54-156 links
//! reported on 4 s fragments, none on the 1 s demo clip). Four fifths, not the fill itself: a
//! packet crosses more than one hop, and a forwarder filled to two thirds reached the end of a
//! spread over two thirds at the last packet, so every second join had links reported "one packet
//! behind" (19 in a 90 s run of 12 viewers, 1 with four fifths) and the capped forwarders gave
//! the origin back their children. The peer engine's fallback clock spreads a fragment's gaps
//! over two thirds (`peer-wasm/src/engine/mod.rs`, `burst_spread_ms`): a late packet is fetched
//! sooner than a forwarder is blamed for it. The duration is read off the gap between the last
//! two fragments' creation times (a live source cuts them as it goes); the first fragment is not
//! spread.

use std::collections::VecDeque;

/// Fragments shorter than this (ms) are due whole, when made: the detector's grace covers them
/// (the demo clip's are 1 s). The peer engine spreads from the same duration.
pub const SPREAD_FROM_MS: u64 = 1_500;

/// The share of a long fragment's duration its packets are due over (numerator, denominator).
pub const SPREAD_SHARE: (u64, u64) = (4, 5);

/// The longest spread (ms): a source that paused for a minute does not make the next fragment
/// owed a minute late.
pub const MAX_SPREAD_MS: u64 = 10_000;

/// One recent packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Made {
    pub seq: u64,
    /// Creation time stamped by the origin (server ms): a link created later never carries it.
    pub created_ms: u64,
    /// When a healthy tree owes it (server ms): `created_ms` plus its share of the spread.
    pub due_ms: u64,
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
    /// fragment: when it lasts [`SPREAD_FROM_MS`] or more (the gap to the previous fragment),
    /// its packets are due evenly over [`SPREAD_SHARE`] of its duration.
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
                .map(|prev| created - prev)
                .filter(|d| *d >= SPREAD_FROM_MS)
                .map_or(0, |d| {
                    (d * SPREAD_SHARE.0 / SPREAD_SHARE.1).min(MAX_SPREAD_MS)
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

    /// The spread of the newest fragment (ms): what a forwarder's upload backlog may reach in
    /// passing on a fragment (0 for short ones).
    pub fn current_spread(&self) -> u64 {
        self.recent.back().map_or(0, |m| m.due_ms - m.created_ms)
    }

    /// Newest packet of `substream` owed at or before `t_ms`.
    pub fn newest_before(&self, substream: u32, k: u32, t_ms: u64) -> Option<Made> {
        self.recent
            .iter()
            .rev()
            .find(|m| m.due_ms <= t_ms && protocol::substream_of(m.seq, k) == substream)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(first: u64, n: u64, created: u64) -> Vec<(u64, u64)> {
        (first..first + n).map(|s| (s, created)).collect()
    }

    #[test]
    fn short_fragments_are_due_when_made() {
        let mut log = ProductionLog::default();
        log.record_batch(&fragment(0, 4, 10_000));
        log.record_batch(&fragment(4, 4, 11_000));
        for seq in 0..8 {
            assert_eq!(log.spread(seq), 0, "seq {seq}");
        }
        assert_eq!(log.due(5), Some(11_000));
        let owed = log.newest_before(1, 4, 10_999).map(|m| (m.seq, m.due_ms));
        assert_eq!(owed, Some((1, 10_000)));
    }

    #[test]
    fn a_long_fragment_is_due_over_its_excess() {
        let mut log = ProductionLog::default();
        log.record_batch(&fragment(0, 8, 10_000));
        // 3 s after the one before: its 8 packets are due over 2.4 s, the last at the end.
        log.record_batch(&fragment(8, 8, 13_000));
        assert_eq!(log.due(8), Some(13_300));
        assert_eq!(log.due(15), Some(15_400));
        assert_eq!(log.spread(15), 2_400);
        // The first fragment had nothing before it to measure.
        assert_eq!(log.spread(7), 0);
        // At 14 s, substream 1 (k = 4) owes seq 9 (due 13 600), not seq 13 (due 14 800).
        let owed = |t| {
            log.newest_before(1, 4, t)
                .map(|m| (m.seq, m.created_ms, m.due_ms))
        };
        assert_eq!(owed(14_000), Some((9, 13_000, 13_600)));
        assert_eq!(owed(14_800), Some((13, 13_000, 14_800)));
        // Due times never run backwards, fragment to fragment.
        log.record_batch(&fragment(16, 8, 16_000));
        log.record_batch(&fragment(24, 8, 19_000));
        let dues: Vec<u64> = (0..32).filter_map(|s| log.due(s)).collect();
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
        batch.extend(fragment(2, 2, 4_000));
        log.record_batch(&batch);
        assert_eq!(log.due(2), Some(5_200));
        assert_eq!(log.due(3), Some(6_400));
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
