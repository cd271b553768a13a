//! Files distributed through the swarm (patent claim 1: a peer receives a file download and a
//! live channel at once).
//!
//! A *file channel* is a carousel: the origin cuts the file into `pieces` slices of `piece_size`
//! bytes (the last one shorter) and sends them round after round as ordinary packets, packet
//! `seq` carrying piece `seq mod pieces`. A downloader may join at any moment; after `pieces`
//! consecutive packets it has every piece once. Everything else (trees, relaying, fallback,
//! heartbeats) is the same as on a live channel.

use serde::{Deserialize, Serialize};

use crate::hash::{packet_hash, RangeHash};

/// Piece size the origin uses: one piece fills one packet.
pub const PIECE_SIZE: usize = crate::packet::MAX_PAYLOAD;

/// What a downloader is told about the file in its `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Suggested file name for the browser download.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of pieces; packet `seq` carries piece `seq mod pieces`.
    pub pieces: u32,
    /// Bytes per piece (the last piece holds the rest).
    pub piece_size: u32,
    /// [`file_digest`] of the whole file, hex.
    pub digest: String,
}

/// The file's digest: the range hash ([`RangeHash`], FNV-1a based, not cryptographic) of its
/// pieces in order, i.e. the channel's range hash over any `pieces` consecutive packets that
/// start at a multiple of `pieces`. It detects corruption and misordering, not forgery.
pub fn file_digest(bytes: &[u8], piece_size: usize) -> RangeHash {
    let mut h = RangeHash::new(0);
    for piece in bytes.chunks(piece_size.max(1)) {
        h.push(packet_hash(piece));
    }
    h
}

impl FileInfo {
    /// Describes `bytes` as a carousel of pieces of `piece_size` bytes. `None` for an empty
    /// file (nothing to distribute) or one with more than `u32::MAX` pieces.
    pub fn describe(name: &str, bytes: &[u8], piece_size: usize) -> Option<FileInfo> {
        if bytes.is_empty() || piece_size == 0 {
            return None;
        }
        let pieces = u32::try_from(bytes.len().div_ceil(piece_size)).ok()?;
        Some(FileInfo {
            name: name.to_string(),
            size: bytes.len() as u64,
            pieces,
            piece_size: u32::try_from(piece_size).ok()?,
            digest: file_digest(bytes, piece_size).hex(),
        })
    }

    /// Length of piece `index` (every piece is full but the last).
    pub fn piece_len(&self, index: u32) -> Option<usize> {
        if index >= self.pieces {
            return None;
        }
        let start = u64::from(index) * u64::from(self.piece_size);
        Some(
            self.size
                .saturating_sub(start)
                .min(u64::from(self.piece_size)) as usize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_counts_pieces_and_last_piece_is_short() {
        let bytes: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let f = FileInfo::describe("x.bin", &bytes, 1000).unwrap();
        assert_eq!((f.size, f.pieces, f.piece_size), (2500, 3, 1000));
        assert_eq!(f.piece_len(0), Some(1000));
        assert_eq!(f.piece_len(2), Some(500));
        assert_eq!(f.piece_len(3), None);
        assert!(FileInfo::describe("e", &[], 1000).is_none());
    }

    #[test]
    fn digest_equals_the_range_hash_of_one_round_of_packets() {
        let bytes = vec![7u8; 2500];
        let mut round = RangeHash::new(0);
        for p in bytes.chunks(1000) {
            round.push(packet_hash(p));
        }
        assert_eq!(file_digest(&bytes, 1000), round);
        let mut other = bytes.clone();
        other[1500] = 8;
        assert_ne!(file_digest(&other, 1000), round);
    }
}
