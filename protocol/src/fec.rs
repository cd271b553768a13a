//! Reed-Solomon coding of packet groups for the erasure-coded middle tier (patent FIG. 4/7).
//!
//! The middle tier splits the stream into `k + n` substreams instead of `k`: each group of `k`
//! consecutive packets (`seq = k·j … k·j + k − 1`) becomes `k + n` coded *shards*, substream `i`
//! carries shard `i` of every group, and any `k` of the `k + n` shards rebuild the group. A
//! middle-tier peer therefore loses nothing while at most `n` of its parents fail at once.
//!
//! The coding itself is the `reed-solomon-erasure` crate (GF(2^8), systematic: shards `0..k` are
//! the data, `k..k+n` the parity). This module only adds what packets need around it:
//!
//! * **Variable lengths.** Packets in a group differ in size, Reed-Solomon needs equal shards: each
//!   data shard's body is `len (u32 LE) ‖ packet ‖ zero padding` up to the longest packet. The
//!   length prefix is part of the coded data, so a rebuilt data shard brings its length back too.
//! * **Self-describing shards.** Every shard starts with a 4-byte header `[k, n, index, version]`,
//!   so a receiver needs no side channel to place a shard and can refuse shards that disagree.
//!
//! Shard layout: `k (u8) | n (u8) | index (u8) | version (u8) | body`.
//!
//! On the wire ([`encode_parity_frames`], [`ParityFrame`]): data shard `i` of group `g` is simply
//! the full wire packet `seq = g·k + i` (header included), relayed as is down data tree `i`.
//! Parity shard `k + j` travels down tree `k + j` as a parity frame, a 24-byte packet-shaped
//! header (`'F'`, version, `k`, `n`, body length, group, created_ms) followed by the shard. A
//! receiver feeds both to a [`GroupAssembler`], which keeps a bounded window of recent groups and
//! hands back the missing packets of a group as soon as any `k` of its shards are in, so a
//! middle-tier peer that loses up to `n` parents at once still has every packet without asking
//! the origin.

use reed_solomon_erasure::galois_8::ReedSolomon;
use thiserror::Error;

mod parity;

pub use parity::{
    encode_parity_frames, is_parity_frame, GroupAssembler, ParityFrame, Recovered,
    DEFAULT_GROUP_WINDOW, MAX_PARITY_FRAME, PARITY_HEADER_LEN, PARITY_MAGIC, PARITY_VERSION,
};

/// Largest number of data shards (packets per group).
pub const MAX_DATA_SHARDS: u8 = 32;
/// Largest number of parity shards per group.
pub const MAX_PARITY_SHARDS: u8 = 16;
/// Largest `k + n`: one substream per shard, and peers keep one link per substream.
pub const MAX_TOTAL_SHARDS: u8 = 64;
/// Bytes before a shard's body.
pub const SHARD_HEADER_LEN: usize = 4;
/// Bytes of the length prefix inside each data shard's body.
const LEN_PREFIX: usize = 4;
const VERSION: u8 = 1;

/// Why a group could not be coded or rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FecError {
    #[error(
        "FEC parameters k={k} n={n} out of range (k in 1..={MAX_DATA_SHARDS}, \
         n in 0..={MAX_PARITY_SHARDS}, k+n <= {MAX_TOTAL_SHARDS})"
    )]
    OutOfRange { k: u32, n: u32 },
    #[error("a group has exactly k={expected} packets, got {got}")]
    WrongGroupSize { expected: usize, got: usize },
    #[error("packet of {len} bytes is too large to code")]
    PacketTooLarge { len: usize },
    #[error("need {need} distinct shards of the group to rebuild it, have {have}")]
    TooFewShards { need: usize, have: usize },
    #[error("inconsistent shards: {0}")]
    Inconsistent(&'static str),
    #[error("malformed parity frame: {0}")]
    MalformedFrame(&'static str),
}

/// The `(k, n)` of a region's middle tier: `k` data shards, `n` parity shards per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FecParams {
    k: u8,
    n: u8,
}

impl FecParams {
    /// Checks the ranges: `k` in `1..=32`, `n` in `0..=16`, `k + n <= 64`.
    pub fn new(k: u32, n: u32) -> Result<Self, FecError> {
        let ok = (1..=u32::from(MAX_DATA_SHARDS)).contains(&k)
            && n <= u32::from(MAX_PARITY_SHARDS)
            && k + n <= u32::from(MAX_TOTAL_SHARDS);
        if !ok {
            return Err(FecError::OutOfRange { k, n });
        }
        Ok(FecParams {
            k: k as u8,
            n: n as u8,
        })
    }

    pub fn k(&self) -> u32 {
        u32::from(self.k)
    }

    pub fn n(&self) -> u32 {
        u32::from(self.n)
    }

    /// `k + n`: the number of substreams (and trees) of the coded tier.
    pub fn total(&self) -> u32 {
        self.k() + self.n()
    }

    /// The group of packet `seq` and its position in that group (the shard index it is coded
    /// into, as data shards come first).
    pub fn group_of(&self, seq: u64) -> (u64, u32) {
        let k = u64::from(self.k);
        (seq / k, (seq % k) as u32)
    }

    /// First sequence number of group `group`.
    pub fn first_seq(&self, group: u64) -> u64 {
        group.saturating_mul(u64::from(self.k))
    }
}

/// Encoder/decoder for one `(k, n)`; building the coding matrix costs, so keep one per region.
#[derive(Debug)]
pub struct Fec {
    params: FecParams,
    /// `None` when `n == 0`: no parity, shards are the data (the crate refuses zero parity).
    rs: Option<ReedSolomon>,
}

impl Fec {
    pub fn new(params: FecParams) -> Result<Self, FecError> {
        let rs = if params.n == 0 {
            None
        } else {
            Some(
                ReedSolomon::new(usize::from(params.k), usize::from(params.n)).map_err(|_| {
                    FecError::OutOfRange {
                        k: params.k(),
                        n: params.n(),
                    }
                })?,
            )
        };
        Ok(Fec { params, rs })
    }

    pub fn params(&self) -> FecParams {
        self.params
    }

    /// Codes a group of exactly `k` packets into `k + n` shards; shard `i` goes on substream `i`.
    pub fn encode<P: AsRef<[u8]>>(&self, packets: &[P]) -> Result<Vec<Vec<u8>>, FecError> {
        let k = usize::from(self.params.k);
        if packets.len() != k {
            return Err(FecError::WrongGroupSize {
                expected: k,
                got: packets.len(),
            });
        }
        let mut longest = 0;
        for p in packets {
            let len = p.as_ref().len();
            if u32::try_from(len).is_err() {
                return Err(FecError::PacketTooLarge { len });
            }
            longest = longest.max(len);
        }
        let body = LEN_PREFIX + longest;
        let total = usize::from(self.params.k + self.params.n);
        let mut shards: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                let mut s = Vec::with_capacity(SHARD_HEADER_LEN + body);
                s.extend_from_slice(&[self.params.k, self.params.n, i as u8, VERSION]);
                s
            })
            .collect();
        for (shard, p) in shards.iter_mut().zip(packets) {
            let p = p.as_ref();
            shard.extend_from_slice(&(p.len() as u32).to_le_bytes());
            shard.extend_from_slice(p);
            shard.resize(SHARD_HEADER_LEN + body, 0);
        }
        for shard in &mut shards[k..] {
            shard.resize(SHARD_HEADER_LEN + body, 0);
        }
        if let Some(rs) = &self.rs {
            let mut bodies: Vec<&mut [u8]> = shards
                .iter_mut()
                .map(|s| &mut s[SHARD_HEADER_LEN..])
                .collect();
            rs.encode(&mut bodies)
                .map_err(|_| FecError::Inconsistent("encoder refused the shard sizes"))?;
        }
        Ok(shards)
    }

    /// Rebuilds the `k` packets of a group from any `k` (or more) of its shards, in any order.
    /// Duplicates are fine when identical; shards of another `(k, n)`, of unequal sizes or with
    /// conflicting contents are refused.
    pub fn decode<S: AsRef<[u8]>>(&self, shards: &[S]) -> Result<Vec<Vec<u8>>, FecError> {
        let (k, n) = (self.params.k, self.params.n);
        let total = usize::from(k + n);
        let mut slots: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut body_len = None;
        for s in shards {
            let s = s.as_ref();
            if s.len() < SHARD_HEADER_LEN + LEN_PREFIX {
                return Err(FecError::Inconsistent("shard shorter than its header"));
            }
            if s[0] != k || s[1] != n || s[3] != VERSION {
                return Err(FecError::Inconsistent("shard of another (k, n) or version"));
            }
            let index = usize::from(s[2]);
            if index >= total {
                return Err(FecError::Inconsistent("shard index out of range"));
            }
            let body = &s[SHARD_HEADER_LEN..];
            if *body_len.get_or_insert(body.len()) != body.len() {
                return Err(FecError::Inconsistent("shards of unequal length"));
            }
            match &slots[index] {
                Some(prev) if prev.as_slice() != body => {
                    return Err(FecError::Inconsistent(
                        "two different shards with one index",
                    ));
                }
                Some(_) => {}
                None => slots[index] = Some(body.to_vec()),
            }
        }
        let have = slots.iter().filter(|s| s.is_some()).count();
        let k = usize::from(k);
        if have < k {
            return Err(FecError::TooFewShards { need: k, have });
        }
        if slots[..k].iter().any(Option::is_none) {
            // Only reached when some data shard is missing, hence n > 0 and `rs` exists.
            let rs = self
                .rs
                .as_ref()
                .ok_or(FecError::TooFewShards { need: k, have })?;
            rs.reconstruct_data(&mut slots)
                .map_err(|_| FecError::Inconsistent("decoder refused the shards"))?;
        }
        slots
            .into_iter()
            .take(k)
            .map(|body| {
                let body = body.ok_or(FecError::Inconsistent("data shard not rebuilt"))?;
                let mut len = [0u8; LEN_PREFIX];
                len.copy_from_slice(&body[..LEN_PREFIX]);
                let len = u32::from_le_bytes(len) as usize;
                body.get(LEN_PREFIX..LEN_PREFIX + len)
                    .map(<[u8]>::to_vec)
                    .ok_or(FecError::Inconsistent("packet length beyond its shard"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use crate::rng::XorShift as Rng;

    fn group(rng: &mut Rng, k: u32, max_len: u64) -> Vec<Vec<u8>> {
        (0..k)
            .map(|_| {
                let len = rng.below(max_len + 1) as usize;
                (0..len).map(|_| rng.next_u64() as u8).collect()
            })
            .collect()
    }

    #[test]
    fn any_k_of_k_plus_n_shards_rebuild_the_group() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for case in 0..400 {
            let k = 1 + rng.below(u64::from(MAX_DATA_SHARDS)) as u32;
            let n = rng.below(u64::from(MAX_PARITY_SHARDS) + 1) as u32;
            let fec = Fec::new(FecParams::new(k, n).unwrap()).unwrap();
            let packets = group(&mut rng, k, if case % 4 == 0 { 3 } else { 1500 });
            let shards = fec.encode(&packets).unwrap();
            assert_eq!(shards.len(), (k + n) as usize);
            for (i, s) in shards.iter().enumerate() {
                assert_eq!(s[2] as usize, i);
            }
            // A random loss pattern keeping between k and k + n shards, delivered in any order.
            let mut kept: Vec<&Vec<u8>> = shards.iter().collect();
            rng.shuffle(&mut kept);
            let keep = k as u64 + rng.below(u64::from(n) + 1);
            kept.truncate(keep as usize);
            assert_eq!(
                fec.decode(&kept).unwrap(),
                packets,
                "case {case} k={k} n={n}"
            );
            // One fewer than k distinct shards is never enough.
            kept.truncate(k as usize - 1);
            assert_eq!(
                fec.decode(&kept),
                Err(FecError::TooFewShards {
                    need: k as usize,
                    have: k as usize - 1
                })
            );
        }
    }

    #[test]
    fn losing_every_data_shard_is_survivable_when_n_equals_k() {
        let fec = Fec::new(FecParams::new(4, 4).unwrap()).unwrap();
        let packets = vec![b"a".to_vec(), Vec::new(), vec![7; 1000], b"last".to_vec()];
        let shards = fec.encode(&packets).unwrap();
        assert_eq!(fec.decode(&shards[4..]).unwrap(), packets);
    }

    #[test]
    fn zero_parity_is_plain_splitting() {
        let fec = Fec::new(FecParams::new(3, 0).unwrap()).unwrap();
        let packets = vec![vec![1, 2], vec![3], vec![]];
        let shards = fec.encode(&packets).unwrap();
        assert_eq!(shards.len(), 3);
        let mut rev = shards.clone();
        rev.reverse();
        assert_eq!(fec.decode(&rev).unwrap(), packets);
        assert!(matches!(
            fec.decode(&shards[..2]),
            Err(FecError::TooFewShards { need: 3, have: 2 })
        ));
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        for (k, n) in [(0, 1), (33, 0), (1, 17), (32, 16 + 1)] {
            assert_eq!(FecParams::new(k, n), Err(FecError::OutOfRange { k, n }));
        }
        assert!(FecParams::new(32, 16).is_ok());
        assert!(FecParams::new(1, 0).is_ok());
        let p = FecParams::new(4, 2).unwrap();
        assert_eq!((p.k(), p.n(), p.total()), (4, 2, 6));
        assert_eq!(p.group_of(9), (2, 1));
        assert_eq!(p.first_seq(2), 8);
    }

    #[test]
    fn wrong_group_sizes_are_refused() {
        let fec = Fec::new(FecParams::new(3, 1).unwrap()).unwrap();
        assert_eq!(
            fec.encode(&[b"x"; 2]),
            Err(FecError::WrongGroupSize {
                expected: 3,
                got: 2
            })
        );
    }

    #[test]
    fn inconsistent_shards_are_refused() {
        let fec = Fec::new(FecParams::new(2, 2).unwrap()).unwrap();
        let shards = fec.encode(&[b"hello".to_vec(), b"w".to_vec()]).unwrap();
        let other = Fec::new(FecParams::new(2, 1).unwrap()).unwrap();
        let theirs = other.encode(&[b"hello".to_vec(), b"w".to_vec()]).unwrap();
        let err = |v: Vec<Vec<u8>>| match fec.decode(&v) {
            Err(FecError::Inconsistent(_)) => {}
            r => panic!("{r:?}"),
        };
        err(vec![shards[0].clone(), theirs[1].clone()]);
        let mut short = shards[1].clone();
        short.pop();
        err(vec![shards[0].clone(), short]);
        let mut flipped = shards[1].clone();
        flipped[6] ^= 1;
        err(vec![shards[1].clone(), flipped]);
        err(vec![vec![2, 2, 0]]);
        let mut bad_index = shards[0].clone();
        bad_index[2] = 9;
        err(vec![bad_index]);
        // A corrupted length prefix cannot make the decoder read past the shard.
        let mut long = shards[0].clone();
        long[SHARD_HEADER_LEN..SHARD_HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        err(vec![long, shards[1].clone()]);
        // Identical duplicates count once.
        assert_eq!(
            fec.decode(&[&shards[3], &shards[3]]),
            Err(FecError::TooFewShards { need: 2, have: 1 })
        );
    }
}
