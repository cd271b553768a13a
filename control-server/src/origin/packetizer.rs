//! Cuts media fragments into numbered packets.
//!
//! The overlay relays fixed-size-bounded packets rather than whole fragments so that every hop
//! can forward a piece as soon as it has it (a one-second fragment is tens of kilobytes; waiting
//! for all of it at every level of a tree would add a fragment's transfer time per hop), and so
//! the stream splits evenly into `k` substreams by `seq mod k`. Evenly per fragment, not only on
//! average: a fragment is cut into a multiple of `k` packets of equal size (±1 byte), so every
//! tree carries `1/k` of every fragment. Cut into maximal packets plus a remainder, one tree
//! would get two full packets of a large fragment and another a sliver, and a forwarder placed
//! for `1/k` of the stream would have to upload twice that in one burst (its children late, the
//! DCM seeing congestion on a healthy peer). Packets are cut on byte boundaries, ignoring MP4
//! structure: a receiver simply concatenates payloads in `seq` order.
//! Only the first packet of a keyframe fragment carries [`FLAG_RANDOM_ACCESS`], marking where a
//! joiner can start appending to its `SourceBuffer`.

use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS, MAX_PAYLOAD};

/// Assigns consecutive sequence numbers across fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packetizer {
    next_seq: u64,
    /// Substreams `k`: every fragment is cut into a multiple of `k` packets.
    k: usize,
}

impl Packetizer {
    /// `first_seq` lets a restarted origin continue where an earlier one stopped; `k` is the
    /// channel's number of substreams (1: cut for size only).
    pub fn new(first_seq: u64, k: u32) -> Self {
        Packetizer {
            next_seq: first_seq,
            k: (k as usize).max(1),
        }
    }

    /// Encodes `fragment` as packets of at most [`MAX_PAYLOAD`] payload bytes with consecutive
    /// sequence numbers, all stamped `created_ms`: the fewest multiple of `k` packets that fit,
    /// of equal size (the first ones one byte longer), or one packet per byte of a fragment
    /// shorter than `k` bytes. An empty fragment yields no packets and uses no sequence numbers.
    pub fn packetize(
        &mut self,
        fragment: &[u8],
        random_access: bool,
        created_ms: u64,
    ) -> Vec<Vec<u8>> {
        let len = fragment.len();
        let n = (len.div_ceil(MAX_PAYLOAD).div_ceil(self.k) * self.k).min(len);
        let (base, longer) = (
            len.checked_div(n).unwrap_or(0),
            len.checked_rem(n).unwrap_or(0),
        );
        let mut at = 0;
        (0..n)
            .map(|i| {
                let size = base + usize::from(i < longer);
                let payload = &fragment[at..at + size];
                at += size;
                (i, payload)
            })
            .map(|(i, payload)| {
                let flags = if i == 0 && random_access {
                    FLAG_RANDOM_ACCESS
                } else {
                    0
                };
                let header = PacketHeader {
                    seq: self.next_seq,
                    flags,
                    created_ms,
                };
                self.next_seq += 1;
                encode(&header, payload)
            })
            .collect()
    }

    /// Sequence number the next packet will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use protocol::packet::{Packet, MAX_PACKET_SIZE};

    #[test]
    fn packets_are_bounded_consecutive_and_reassemble() {
        let fragment: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut p = Packetizer::new(10, 1);
        let packets = p.packetize(&fragment, true, 1234);
        assert_eq!(packets.len(), fragment.len().div_ceil(MAX_PAYLOAD));
        let mut joined = Vec::new();
        for (i, bytes) in packets.iter().enumerate() {
            assert!(bytes.len() <= MAX_PACKET_SIZE);
            assert!(bytes.len() <= 16 * 1024);
            let packet = Packet::decode(bytes).unwrap();
            assert_eq!(packet.header.seq, 10 + i as u64);
            assert_eq!(packet.header.created_ms, 1234);
            assert_eq!(packet.header.is_random_access(), i == 0);
            joined.extend_from_slice(packet.payload);
        }
        assert_eq!(joined, fragment);
        assert_eq!(p.next_seq(), 10 + packets.len() as u64);
    }

    #[test]
    fn non_keyframe_fragments_carry_no_flag_and_numbering_continues() {
        let mut p = Packetizer::new(0, 1);
        let a = p.packetize(&[1; MAX_PAYLOAD], false, 0);
        assert_eq!(a.len(), 1);
        assert!(!Packet::decode(&a[0]).unwrap().header.is_random_access());
        let b = p.packetize(&[2; MAX_PAYLOAD + 1], true, 0);
        assert_eq!(b.len(), 2);
        let first = Packet::decode(&b[0]).unwrap();
        let second = Packet::decode(&b[1]).unwrap();
        assert_eq!((first.header.seq, second.header.seq), (1, 2));
        assert!(first.header.is_random_access());
        assert!(!second.header.is_random_access());
        // Equal halves, not a full packet and a one-byte remainder.
        assert_eq!(
            (first.payload.len(), second.payload.len()),
            (MAX_PAYLOAD / 2 + 1, MAX_PAYLOAD / 2)
        );
        assert!(p.packetize(&[], true, 0).is_empty());
        assert_eq!(p.next_seq(), 3);
    }

    #[test]
    fn every_substream_carries_a_kth_of_every_fragment() {
        let k = 4u32;
        let mut p = Packetizer::new(3, k);
        // A fragment of five maximal packets' worth: cut as 8, two per substream.
        for len in [5 * MAX_PAYLOAD - 7, 56_000, 4 * MAX_PAYLOAD, 1_000, 10] {
            let fragment: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let packets = p.packetize(&fragment, false, 0);
            assert_eq!(packets.len() % k as usize, 0, "{len}: {}", packets.len());
            let mut per_sub = [0usize; 4];
            let mut joined = Vec::new();
            for bytes in &packets {
                assert!(bytes.len() <= MAX_PACKET_SIZE);
                let packet = Packet::decode(bytes).unwrap();
                per_sub[protocol::substream_of(packet.header.seq, k) as usize] +=
                    packet.payload.len();
                joined.extend_from_slice(packet.payload);
            }
            assert_eq!(joined, fragment);
            let (lo, hi) = (per_sub.iter().min().unwrap(), per_sub.iter().max().unwrap());
            assert!(hi - lo <= packets.len() / k as usize, "{len}: {per_sub:?}");
        }
        // Shorter than k bytes: one packet per byte.
        assert_eq!(p.packetize(&[1, 2, 3], false, 0).len(), 3);
    }
}
