//! The simulated origin: synthetic fragments at a configured bitrate, cut into packets with the
//! same header and the same size pattern as `control-server/src/origin/packetizer.rs` (each
//! fragment into the fewest multiple of `k` equal packets of at most `MAX_PAYLOAD` bytes; the
//! first packet of a fragment flagged as a random-access point). This is a stand-in for the
//! real packetizer, which lives in control-server; the coordinator crate may expose it later.
//!
//! Each packet is built once and shared (`Rc` for the peers, `Bytes` for the coordinator's
//! pushes); its payload hash is kept so every peer's verified range can be checked against the
//! origin without touching the bytes again.

use std::rc::Rc;

use bytes::Bytes;
use protocol::hash::{packet_hash, RangeHash};
use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS, MAX_PAYLOAD};

use crate::dist::Rng;

#[derive(Debug, Clone, Copy)]
pub struct OriginConfig {
    pub stream_kbps: u32,
    /// Media duration of one fragment (one keyframe interval), ms.
    pub fragment_ms: u32,
    /// Substreams: every fragment is cut into a multiple of `k` packets.
    pub k: u32,
    /// Packets kept for fallback fetches (the server's `window_packets`).
    pub window: u64,
    /// Release a fragment's packets evenly over the next `fragment_ms` instead of all at once
    /// (what an origin pacing its output, or chunked encoding, would do). Off: the real
    /// origin's behaviour.
    pub pace: bool,
}

pub struct OriginPacket {
    pub rc: Rc<Vec<u8>>,
    pub bytes: Bytes,
    pub hash: u64,
    pub created_ms: u64,
}

/// What a fallback fetch of one sequence number finds.
pub enum Fetched<'a> {
    Packet(&'a OriginPacket),
    NotYet,
    Gone,
}

pub struct SyntheticOrigin {
    pub cfg: OriginConfig,
    packets: Vec<OriginPacket>,
    /// First sequence number of each fragment, in order.
    fragment_starts: Vec<u64>,
    /// Packets released so far (visible to fetches, Welcomes and the coordinator).
    released: u64,
    rng: Rng,
}

impl SyntheticOrigin {
    pub fn new(cfg: OriginConfig, seed: u64) -> Self {
        SyntheticOrigin {
            cfg,
            packets: Vec::new(),
            fragment_starts: Vec::new(),
            released: 0,
            rng: Rng::stream(seed, 0x0819),
        }
    }

    /// Bytes of one fragment at the configured rate.
    pub fn fragment_bytes(&self) -> usize {
        (u64::from(self.cfg.stream_kbps) * u64::from(self.cfg.fragment_ms) / 8).max(1) as usize
    }

    /// Packets per fragment (what [`Self::cut`] produces for a fragment of that size).
    pub fn packets_per_fragment(&self) -> u64 {
        let k = (self.cfg.k as usize).max(1);
        let len = self.fragment_bytes();
        (len.div_ceil(MAX_PAYLOAD).div_ceil(k) * k).min(len) as u64
    }

    /// Cuts the next fragment, stamped `created_ms`; returns its packets' sequence numbers.
    pub fn cut(&mut self, created_ms: u64) -> std::ops::Range<u64> {
        let len = self.fragment_bytes();
        let mut fragment = vec![0u8; len];
        for chunk in fragment.chunks_mut(8) {
            let r = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let first = self.packets.len() as u64;
        let n = self.packets_per_fragment() as usize;
        let (base, longer) = (len / n, len % n);
        let mut at = 0;
        for i in 0..n {
            let size = base + usize::from(i < longer);
            let payload = &fragment[at..at + size];
            at += size;
            let header = PacketHeader {
                seq: first + i as u64,
                flags: if i == 0 { FLAG_RANDOM_ACCESS } else { 0 },
                created_ms,
            };
            let wire = encode(&header, payload);
            self.packets.push(OriginPacket {
                hash: packet_hash(payload),
                bytes: Bytes::from(wire.clone()),
                rc: Rc::new(wire),
                created_ms,
            });
        }
        self.fragment_starts.push(first);
        if !self.cfg.pace {
            self.released = first + n as u64;
        }
        first..first + n as u64
    }

    /// Makes packets up to `seq` visible (paced origin).
    pub fn release(&mut self, seq: u64) {
        self.released = self.released.max((seq + 1).min(self.packets.len() as u64));
    }

    pub fn packet(&self, seq: u64) -> Option<&OriginPacket> {
        self.packets.get(usize::try_from(seq).ok()?)
    }

    /// `(start_seq, live_start_seq, live_seq)` for a Welcome, as the server's
    /// `Channel::join_position` gives them: one fragment behind the newest random-access point
    /// (the oldest one while there is only one), the newest random-access point, and the newest
    /// packet; `None` before the first fragment.
    pub fn live_position(&self) -> Option<(u64, u64, u64)> {
        let live = self.released.checked_sub(1)?;
        let mut released = self.fragment_starts.iter().rev().filter(|s| **s <= live);
        let newest = *released.next()?;
        let start = released.next().copied().unwrap_or(newest);
        Some((start, newest, live))
    }

    pub fn fetch(&self, seq: u64) -> Fetched<'_> {
        let produced = self.released;
        if seq >= produced {
            return Fetched::NotYet;
        }
        if seq + self.cfg.window < produced {
            return Fetched::Gone;
        }
        self.packet(seq).map_or(Fetched::NotYet, Fetched::Packet)
    }

    /// The range hash the origin's own packets give over `first .. first + count`: what a peer
    /// that delivered that range byte-exactly reports.
    pub fn range_hash(&self, first: u64, count: u64) -> Option<RangeHash> {
        let mut h = RangeHash::new(first);
        for seq in first..first + count {
            h.push(self.packet(seq)?.hash);
        }
        Some(h)
    }

    /// Index of the fragment holding `seq` (all fragments have the same packet count).
    pub fn fragment_of(&self, seq: u64) -> u64 {
        seq / self.packets_per_fragment().max(1)
    }

    /// Whether `seq` is the last packet of its fragment.
    pub fn ends_fragment(&self, seq: u64) -> bool {
        (seq + 1) % self.packets_per_fragment().max(1) == 0
    }

    /// Packets released so far.
    pub fn produced(&self) -> u64 {
        self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Packet;

    fn origin(kbps: u32, k: u32) -> SyntheticOrigin {
        SyntheticOrigin::new(
            OriginConfig {
                stream_kbps: kbps,
                fragment_ms: 1000,
                k,
                window: 4096,
                pace: false,
            },
            1,
        )
    }

    #[test]
    fn fragments_cut_into_equal_multiples_of_k_like_the_packetizer() {
        let mut o = origin(1000, 4);
        // 125 000 bytes: 8 packets (the fewest multiple of 4 of at most 16 360 bytes).
        let r = o.cut(0);
        assert_eq!(r, 0..8);
        let sizes: Vec<usize> = r
            .clone()
            .filter_map(|s| o.packet(s))
            .map(|p| p.rc.len())
            .collect();
        assert!(sizes
            .iter()
            .all(|s| *s <= protocol::packet::MAX_PACKET_SIZE));
        let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1));
        let first = o.packet(0).map(|p| Packet::decode(&p.rc));
        assert!(first.is_some_and(|p| p.is_ok_and(|p| p.header.is_random_access())));
        let second = o.packet(1).map(|p| Packet::decode(&p.rc));
        assert!(second.is_some_and(|p| p.is_ok_and(|p| !p.header.is_random_access())));
        assert_eq!(
            o.live_position(),
            Some((0, 0, 7)),
            "one fragment: its start"
        );
        assert_eq!(o.cut(1000), 8..16);
        // As the server: one fragment behind the newest random-access point.
        assert_eq!(o.live_position(), Some((0, 8, 15)));
        assert_eq!(o.fragment_of(9), 1);
        assert!(o.ends_fragment(15) && !o.ends_fragment(14));
    }

    #[test]
    fn fetch_knows_not_yet_and_gone() {
        let mut o = SyntheticOrigin::new(
            OriginConfig {
                stream_kbps: 400,
                fragment_ms: 1000,
                k: 4,
                window: 4,
                pace: false,
            },
            1,
        );
        o.cut(0);
        o.cut(1000);
        assert!(matches!(o.fetch(100), Fetched::NotYet));
        assert!(matches!(o.fetch(0), Fetched::Gone));
        assert!(matches!(o.fetch(7), Fetched::Packet(_)));
    }

    #[test]
    fn range_hash_matches_a_peer_that_folds_the_payloads() {
        let mut o = origin(800, 2);
        o.cut(0);
        let mut peer = RangeHash::new(1);
        for seq in 1..4 {
            let p = o.packet(seq).map(|p| p.rc.clone()).unwrap_or_default();
            let payload = Packet::decode(&p)
                .map(|p| p.payload.to_vec())
                .unwrap_or_default();
            peer.push(packet_hash(&payload));
        }
        assert_eq!(o.range_hash(1, 3), Some(peer));
        assert_eq!(o.range_hash(1, 1000), None);
    }

    #[test]
    fn a_paced_origin_shows_packets_as_they_are_released() {
        let mut o = SyntheticOrigin::new(
            OriginConfig {
                stream_kbps: 1000,
                fragment_ms: 1000,
                k: 4,
                window: 4096,
                pace: true,
            },
            1,
        );
        assert_eq!(o.cut(0), 0..8);
        assert_eq!(o.live_position(), None);
        assert!(matches!(o.fetch(0), Fetched::NotYet));
        o.release(2);
        assert_eq!(o.live_position(), Some((0, 0, 2)));
        assert!(matches!(o.fetch(2), Fetched::Packet(_)));
        assert!(matches!(o.fetch(3), Fetched::NotYet));
        o.release(100);
        assert_eq!(o.produced(), 8);
    }
}
