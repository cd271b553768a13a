//! The origin's bounded memory of recent packets.
//!
//! Joiners start at the newest random-access point and peers fetch packets the swarm failed to
//! deliver in time, so the origin keeps the last `capacity` packets, indexed by sequence number in
//! O(1). Separately it keeps a much longer log of per-packet content hashes (8 bytes each instead
//! of up to 16 KiB), so tests can verify what a viewer reassembled long after the packets
//! themselves left the window.

use std::collections::VecDeque;

use bytes::Bytes;
use protocol::hash::{packet_hash, RangeHash};
use protocol::packet::{Packet, PacketError};
use thiserror::Error;

/// Default length of the hash log: at ~60 packets/s, over nine hours of stream in 16 MB.
pub const DEFAULT_HASH_CAPACITY: usize = 2_000_000;

/// Result of looking a sequence number up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Bytes),
    /// Not produced yet (newer than the newest packet).
    NotYet,
    /// Gone for good: older than the window, or skipped by a gap in the numbering.
    Evicted,
}

#[derive(Debug, PartialEq, Eq, Error)]
pub enum WindowError {
    #[error("packet {seq} is not newer than the latest packet {latest}")]
    NotIncreasing { seq: u64, latest: u64 },
    #[error("packet pushed as {seq} carries sequence number {actual}")]
    SeqMismatch { seq: u64, actual: u64 },
    #[error("invalid packet: {0}")]
    BadPacket(#[from] PacketError),
}

/// A run of slots indexed by sequence number: `items[i]` belongs to `first + i`; `None` marks a
/// number that was skipped.
#[derive(Debug, Clone)]
struct SeqRing<T> {
    first: u64,
    items: VecDeque<Option<T>>,
    capacity: usize,
}

impl<T> SeqRing<T> {
    fn new(capacity: usize) -> Self {
        SeqRing {
            first: 0,
            items: VecDeque::new(),
            capacity,
        }
    }

    /// One past the newest slot.
    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }

    /// Appends `item` at `seq` (> every earlier seq), evicting from the front beyond capacity.
    /// Returns the sequence numbers evicted, as a range.
    fn push(&mut self, seq: u64, item: T) -> std::ops::Range<u64> {
        let evicted_from = self.first;
        if self.capacity == 0 {
            self.first = seq + 1;
            self.items.clear();
            return evicted_from..self.first;
        }
        let gap = seq.saturating_sub(self.end());
        if self.items.is_empty() || gap >= self.capacity as u64 {
            // Nothing worth keeping would survive the gap: start over at `seq`.
            self.items.clear();
            self.first = seq;
        } else {
            self.items.extend((0..gap).map(|_| None));
        }
        self.items.push_back(Some(item));
        while self.items.len() > self.capacity {
            self.items.pop_front();
            self.first += 1;
        }
        evicted_from..self.first
    }

    fn get(&self, seq: u64) -> Option<&T> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.items.get(i)?.as_ref()
    }
}

/// Bounded window of encoded packets plus a longer log of their payload hashes.
#[derive(Debug, Clone)]
pub struct PacketWindow {
    packets: SeqRing<Bytes>,
    hashes: SeqRing<u64>,
    /// Random-access packets still in `packets`, ascending.
    random_access: VecDeque<u64>,
    latest: Option<u64>,
}

impl PacketWindow {
    /// Keeps the newest `capacity` packets and the newest `hash_capacity` payload hashes
    /// (see [`DEFAULT_HASH_CAPACITY`]).
    pub fn new(capacity: usize, hash_capacity: usize) -> Self {
        PacketWindow {
            packets: SeqRing::new(capacity),
            hashes: SeqRing::new(hash_capacity),
            random_access: VecDeque::new(),
            latest: None,
        }
    }

    /// Appends an encoded packet. Sequence numbers must increase strictly; gaps are allowed and
    /// the skipped numbers read as [`Lookup::Evicted`]. The packet must decode, and its header
    /// must carry `seq`, so fallback fetches can never serve the wrong bytes.
    pub fn push(
        &mut self,
        seq: u64,
        packet: Bytes,
        random_access: bool,
    ) -> Result<(), WindowError> {
        if let Some(latest) = self.latest {
            if seq <= latest {
                return Err(WindowError::NotIncreasing { seq, latest });
            }
        }
        let hash = {
            let decoded = Packet::decode(&packet)?;
            if decoded.header.seq != seq {
                return Err(WindowError::SeqMismatch {
                    seq,
                    actual: decoded.header.seq,
                });
            }
            packet_hash(decoded.payload)
        };
        self.latest = Some(seq);
        self.hashes.push(seq, hash);
        self.packets.push(seq, packet);
        let oldest = self.packets.first;
        while self.random_access.front().is_some_and(|s| *s < oldest) {
            self.random_access.pop_front();
        }
        if random_access && self.packets.get(seq).is_some() {
            self.random_access.push_back(seq);
        }
        Ok(())
    }

    pub fn get(&self, seq: u64) -> Lookup {
        match self.packets.get(seq) {
            Some(p) => Lookup::Found(p.clone()),
            None if self.latest.is_none_or(|l| seq > l) => Lookup::NotYet,
            None => Lookup::Evicted,
        }
    }

    /// Bytes of the encoded packets held: a per-channel cost, bounded by the capacity, that
    /// grows while a young channel fills its window.
    pub fn held_bytes(&self) -> usize {
        self.packets.items.iter().flatten().map(Bytes::len).sum()
    }

    /// Newest packet pushed (it may already be evicted when the capacity is 0).
    pub fn latest_seq(&self) -> Option<u64> {
        self.latest
    }

    /// Oldest packet still in the window.
    pub fn oldest_seq(&self) -> Option<u64> {
        (!self.packets.items.is_empty()).then_some(self.packets.first)
    }

    /// Newest random-access packet still in the window: where a joiner starts.
    pub fn latest_random_access(&self) -> Option<u64> {
        self.random_access.back().copied()
    }

    /// The `n`-th newest random-access point still in the window (0 = newest), or the oldest.
    pub fn random_access_back(&self, n: usize) -> Option<u64> {
        let len = self.random_access.len();
        self.random_access.get(len.saturating_sub(n + 1)).copied()
    }

    /// First random-access packet at or after `seq` still in the window.
    pub fn random_access_at_or_after(&self, seq: u64) -> Option<u64> {
        let i = self.random_access.partition_point(|s| *s < seq);
        self.random_access.get(i).copied()
    }

    /// Payload hash of one packet, while it is in the hash log.
    pub fn hash(&self, seq: u64) -> Option<u64> {
        self.hashes.get(seq).copied()
    }

    /// The [`RangeHash`] of `first_seq .. first_seq + count`, computed exactly as viewers compute
    /// theirs; `None` if any hash in the range has left the log, was skipped, or does not exist
    /// yet.
    pub fn range_hash(&self, first_seq: u64, count: u64) -> Option<RangeHash> {
        let end = first_seq.checked_add(count)?;
        if count > 0 && (first_seq < self.hashes.first || end > self.hashes.end()) {
            return None;
        }
        let mut range = RangeHash::new(first_seq);
        for seq in first_seq..end {
            range.push(*self.hashes.get(seq)?);
        }
        Some(range)
    }

    /// Number of packets in the window (skipped numbers included).
    pub fn len(&self) -> usize {
        self.packets.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS};

    fn packet(seq: u64, ra: bool) -> Bytes {
        let header = PacketHeader {
            seq,
            flags: if ra { FLAG_RANDOM_ACCESS } else { 0 },
            created_ms: 0,
        };
        Bytes::from(encode(&header, format!("payload {seq}").as_bytes()))
    }

    fn fill(w: &mut PacketWindow, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            w.push(s, packet(s, s % 10 == 0), s % 10 == 0).unwrap();
        }
    }

    #[test]
    fn keeps_the_most_recent_packets() {
        let mut w = PacketWindow::new(25, 1000);
        assert_eq!(w.get(0), Lookup::NotYet);
        assert_eq!(w.latest_seq(), None);
        fill(&mut w, 0..100);
        assert_eq!(w.len(), 25);
        assert_eq!(w.oldest_seq(), Some(75));
        assert_eq!(w.latest_seq(), Some(99));
        assert_eq!(w.get(74), Lookup::Evicted);
        assert_eq!(w.get(75), Lookup::Found(packet(75, false)));
        assert_eq!(w.get(99), Lookup::Found(packet(99, false)));
        assert_eq!(w.get(100), Lookup::NotYet);
        assert_eq!(w.latest_random_access(), Some(90));
        assert_eq!(w.random_access_at_or_after(0), Some(80));
        assert_eq!(w.random_access_at_or_after(81), Some(90));
        assert_eq!(w.random_access_at_or_after(91), None);
    }

    #[test]
    fn refuses_non_increasing_and_mislabelled_packets() {
        let mut w = PacketWindow::new(4, 4);
        fill(&mut w, [5]);
        assert_eq!(
            w.push(5, packet(5, false), false),
            Err(WindowError::NotIncreasing { seq: 5, latest: 5 })
        );
        assert_eq!(
            w.push(6, packet(7, false), false),
            Err(WindowError::SeqMismatch { seq: 6, actual: 7 })
        );
        assert!(matches!(
            w.push(6, Bytes::from_static(b"junk"), false),
            Err(WindowError::BadPacket(_))
        ));
        assert_eq!(w.latest_seq(), Some(5));
    }

    #[test]
    fn range_hashes_outlive_the_packets() {
        let mut w = PacketWindow::new(10, 500);
        fill(&mut w, 0..1000);
        let mut expected = RangeHash::new(600);
        for s in 600..700 {
            expected.push(packet_hash(format!("payload {s}").as_bytes()));
        }
        assert_eq!(w.get(600), Lookup::Evicted);
        assert_eq!(w.range_hash(600, 100), Some(expected));
        assert_eq!(w.range_hash(499, 2), None, "left the hash log");
        assert_eq!(w.range_hash(990, 11), None, "not produced yet");
        assert_eq!(w.range_hash(0, 0).map(|r| r.count), Some(0));
        assert_eq!(w.range_hash(u64::MAX, 2), None);
    }

    #[test]
    fn gaps_read_as_evicted_and_break_range_hashes() {
        let mut w = PacketWindow::new(10, 100);
        fill(&mut w, [1, 2, 5, 6]);
        assert_eq!(w.get(3), Lookup::Evicted);
        assert!(matches!(w.get(5), Lookup::Found(_)));
        assert_eq!(w.len(), 6);
        assert!(w.range_hash(5, 2).is_some());
        assert_eq!(w.range_hash(2, 4), None);
        // A gap longer than the window starts it over.
        fill(&mut w, [1000]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.oldest_seq(), Some(1000));
        assert_eq!(w.get(6), Lookup::Evicted);
        assert_eq!(w.latest_random_access(), Some(1000));
    }

    #[test]
    fn zero_capacity_keeps_nothing_but_still_hashes() {
        let mut w = PacketWindow::new(0, 10);
        fill(&mut w, 0..5);
        assert!(w.is_empty());
        assert_eq!(w.get(4), Lookup::Evicted);
        assert_eq!(w.latest_random_access(), None);
        assert!(w.range_hash(0, 5).is_some());
    }
}
