//! Parity frames on the wire, and the receiver's group assembler.
//!
//! Data shards are not framed at all: shard `i` of group `g` is the ordinary wire packet with
//! `seq = g·k + i`, header included, so the data trees of a coded tier carry exactly the bytes a
//! plain tree would. Only the `n` parity shards need a frame of their own, with a 24-byte header
//! shaped like a packet's so both can share a channel and be told apart by the first byte:
//!
//! ```text
//! 0     1       2    3    4              8              16                24
//! | 'F' | ver=1 | k  | n  | body_len (BE) | group (u64 BE) | created_ms (BE) | body…
//! ```
//!
//! `body` is the shard exactly as [`Fec::encode`] produced it: its own 4-byte
//! `[k, n, index, version]` header, then the Reed-Solomon body. A receiver rebuilds the padded
//! data shards it holds (`len u32 LE ‖ packet ‖ zeros`, see the module docs) from the parity
//! body's length, so nothing else travels with the group.

use std::collections::BTreeMap;

use super::{Fec, FecError, FecParams, LEN_PREFIX, SHARD_HEADER_LEN, VERSION};
use crate::packet::{Packet, MAX_PACKET_SIZE};

/// First byte of a parity frame (packets start with `'P'`).
pub const PARITY_MAGIC: u8 = b'F';
/// Version of the parity frame layout.
pub const PARITY_VERSION: u8 = 1;
/// Bytes before a parity frame's body.
pub const PARITY_HEADER_LEN: usize = 24;
/// Largest parity frame: a shard of the largest packet plus the two headers and the length
/// prefix fits with room to spare.
pub const MAX_PARITY_FRAME: usize = MAX_PACKET_SIZE + 64;
/// Groups a [`GroupAssembler`] keeps by default: with k = 4 and 20 packets a second, about
/// 12 s of stream, longer than any peer waits before fetching from the origin.
pub const DEFAULT_GROUP_WINDOW: u64 = 64;

/// True when `buf` is a parity frame (by its first byte); the rest is checked by
/// [`ParityFrame::decode`].
pub fn is_parity_frame(buf: &[u8]) -> bool {
    buf.first() == Some(&PARITY_MAGIC)
}

/// Codes one group and frames its parity shards.
///
/// `packets` are the `k` full wire packets of group `group` in sequence order; `created_ms` is
/// the newest one's creation time. Element `j` of the result is the frame of shard `k + j`.
pub fn encode_parity_frames(
    fec: &Fec,
    group: u64,
    created_ms: u64,
    packets: &[&[u8]],
) -> Result<Vec<Vec<u8>>, FecError> {
    if let Some(p) = packets.iter().find(|p| p.len() > MAX_PACKET_SIZE) {
        return Err(FecError::PacketTooLarge { len: p.len() });
    }
    let params = fec.params();
    let k = params.k() as usize;
    let shards = fec.encode(packets)?;
    Ok(shards
        .into_iter()
        .skip(k)
        .map(|shard| {
            let mut f = Vec::with_capacity(PARITY_HEADER_LEN + shard.len());
            f.push(PARITY_MAGIC);
            f.push(PARITY_VERSION);
            f.push(params.k);
            f.push(params.n);
            // Bounded by MAX_PACKET_SIZE + 8 (checked above), so it fits a u32.
            f.extend_from_slice(&(shard.len() as u32).to_be_bytes());
            f.extend_from_slice(&group.to_be_bytes());
            f.extend_from_slice(&created_ms.to_be_bytes());
            f.extend_from_slice(&shard);
            f
        })
        .collect())
}

/// A decoded parity frame borrowing its shard from the buffer it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityFrame<'a> {
    pub group: u64,
    /// Creation time of the group's newest packet at the origin (ms since the Unix epoch).
    pub created_ms: u64,
    pub k: u8,
    pub n: u8,
    /// Shard index, `k..k + n`: the coded tree (substream) this frame travels down.
    pub index: u8,
    /// The shard as [`Fec::encode`] produced it, its 4-byte header included.
    pub shard: &'a [u8],
}

impl<'a> ParityFrame<'a> {
    /// Parses and validates a frame; never panics on arbitrary input.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FecError> {
        let bad = FecError::MalformedFrame;
        if buf.len() < PARITY_HEADER_LEN {
            return Err(bad("shorter than its header"));
        }
        if buf.len() > MAX_PARITY_FRAME {
            return Err(bad("longer than MAX_PARITY_FRAME"));
        }
        if buf[0] != PARITY_MAGIC || buf[1] != PARITY_VERSION {
            return Err(bad("bad magic or version"));
        }
        let (k, n) = (buf[2], buf[3]);
        let params = FecParams::new(u32::from(k), u32::from(n))?;
        if params.n == 0 {
            return Err(bad("a tier without parity has no parity frames"));
        }
        let be = |r: std::ops::Range<usize>| {
            buf.get(r)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let body_len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        let group = be(8..16).ok_or(bad("truncated header"))?;
        let created_ms = be(16..24).ok_or(bad("truncated header"))?;
        let shard = &buf[PARITY_HEADER_LEN..];
        if shard.len() != body_len {
            return Err(bad("body length differs from the header's"));
        }
        if shard.len() < SHARD_HEADER_LEN + LEN_PREFIX {
            return Err(bad("shard shorter than its header"));
        }
        if shard[0] != k || shard[1] != n || shard[3] != VERSION {
            return Err(bad("shard of another (k, n) or version than its frame"));
        }
        let index = shard[2];
        if index < k || u32::from(index) >= params.total() {
            return Err(bad("not a parity shard index"));
        }
        if group.checked_mul(u64::from(k)).is_none() {
            return Err(bad("group number beyond the sequence space"));
        }
        Ok(ParityFrame {
            group,
            created_ms,
            k,
            n,
            index,
            shard,
        })
    }

    /// Sequence number of the group's last packet: a parity tree's progress in the unit the
    /// control center compares heartbeats in.
    pub fn last_seq(&self) -> u64 {
        // decode checked that group * k does not overflow.
        self.group * u64::from(self.k) + u64::from(self.k) - 1
    }
}

/// A data packet the assembler rebuilt from parity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub seq: u64,
    /// The full wire packet, header included, byte-identical to the origin's.
    pub packet: Vec<u8>,
}

#[derive(Debug, Default)]
struct Group {
    /// Full wire packets by position in the group.
    data: Vec<Option<Vec<u8>>>,
    /// Parity shards (with their 4-byte shard header) by `index − k`.
    parity: Vec<Option<Vec<u8>>>,
    /// Every data packet is here (received or rebuilt): later shards are ignored.
    done: bool,
}

/// Collects the shards of recent groups and rebuilds missing data packets as soon as any `k`
/// of a group's `k + n` shards are present. Sans-IO and bounded: it keeps the newest `window`
/// groups and forgets older ones (their packets are past the point where recovery helps).
#[derive(Debug)]
pub struct GroupAssembler {
    fec: Fec,
    window: u64,
    groups: BTreeMap<u64, Group>,
    newest: Option<u64>,
}

impl GroupAssembler {
    /// An assembler for `(k, n)` keeping `window` groups (at least 1).
    pub fn new(params: FecParams, window: u64) -> Result<Self, FecError> {
        Ok(GroupAssembler {
            fec: Fec::new(params)?,
            window: window.max(1),
            groups: BTreeMap::new(),
            newest: None,
        })
    }

    pub fn params(&self) -> FecParams {
        self.fec.params()
    }

    /// The group slot for `group`, or `None` when it is older than the window or finished.
    fn slot(&mut self, group: u64) -> Option<&mut Group> {
        let newest = self.newest.map_or(group, |n| n.max(group));
        if newest - group >= self.window {
            return None;
        }
        self.newest = Some(newest);
        let oldest_kept = newest.saturating_sub(self.window - 1);
        // Bounded: the window slides past everything older, a far-ahead group included.
        while let Some(entry) = self.groups.first_entry() {
            if *entry.key() >= oldest_kept {
                break;
            }
            entry.remove();
        }
        let (k, n) = (self.fec.params().k(), self.fec.params().n());
        let g = self.groups.entry(group).or_insert_with(|| Group {
            data: vec![None; k as usize],
            parity: vec![None; n as usize],
            done: false,
        });
        (!g.done).then_some(g)
    }

    /// A data packet `seq` arrived (or was fetched). Returns the packets of its group this
    /// completes by rebuilding (usually none).
    pub fn add_packet(&mut self, seq: u64, packet: &[u8]) -> Result<Vec<Recovered>, FecError> {
        let (group, pos) = self.fec.params().group_of(seq);
        let Some(g) = self.slot(group) else {
            return Ok(Vec::new());
        };
        let slot = &mut g.data[pos as usize];
        if slot.is_none() {
            *slot = Some(packet.to_vec());
        }
        self.try_rebuild(group)
    }

    /// A parity frame arrived. Frames of another `(k, n)` are refused.
    pub fn add_parity(&mut self, frame: &ParityFrame<'_>) -> Result<Vec<Recovered>, FecError> {
        let params = self.fec.params();
        if frame.k != params.k || frame.n != params.n {
            return Err(FecError::Inconsistent("parity frame of another (k, n)"));
        }
        // The fields are public, so a hand-built frame gets the checks `decode` would make.
        let j = match frame.index.checked_sub(frame.k) {
            Some(j) if j < frame.n => usize::from(j),
            _ => return Err(FecError::MalformedFrame("not a parity shard index")),
        };
        if frame.shard.len() < SHARD_HEADER_LEN + LEN_PREFIX {
            return Err(FecError::MalformedFrame("shard shorter than its header"));
        }
        let Some(g) = self.slot(frame.group) else {
            return Ok(Vec::new());
        };
        if let Some(slot) = g.parity.get_mut(j) {
            if slot.is_none() {
                *slot = Some(frame.shard.to_vec());
            }
        }
        self.try_rebuild(frame.group)
    }

    fn try_rebuild(&mut self, group: u64) -> Result<Vec<Recovered>, FecError> {
        let params = self.fec.params();
        let k = params.k() as usize;
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(Vec::new());
        };
        let have_data = g.data.iter().filter(|d| d.is_some()).count();
        if have_data == k {
            // Nothing to rebuild; forget the bytes, keep the mark.
            *g = Group {
                done: true,
                ..Group::default()
            };
            return Ok(Vec::new());
        }
        let have_parity = g.parity.iter().filter(|p| p.is_some()).count();
        if have_data + have_parity < k {
            return Ok(Vec::new());
        }
        let Some(shard_len) = g.parity.iter().flatten().map(Vec::len).next() else {
            return Ok(Vec::new());
        };
        let body_len = shard_len - SHARD_HEADER_LEN;
        let mut shards: Vec<Vec<u8>> = Vec::with_capacity(k + params.n() as usize);
        for (i, d) in g.data.iter().enumerate() {
            let Some(p) = d else { continue };
            if LEN_PREFIX + p.len() > body_len {
                // Either this packet or the parity is not of this group; give up on the group.
                g.done = true;
                return Err(FecError::Inconsistent(
                    "packet longer than its group's parity",
                ));
            }
            let mut s = Vec::with_capacity(shard_len);
            s.extend_from_slice(&[params.k, params.n, i as u8, VERSION]);
            s.extend_from_slice(&(p.len() as u32).to_le_bytes());
            s.extend_from_slice(p);
            s.resize(shard_len, 0);
            shards.push(s);
        }
        shards.extend(g.parity.iter().flatten().cloned());
        let decoded = self.fec.decode(&shards);
        let missing: Vec<usize> = (0..k).filter(|i| g.data[*i].is_none()).collect();
        *g = Group {
            done: true,
            ..Group::default()
        };
        let packets = decoded?;
        let first = params.first_seq(group);
        let mut out = Vec::with_capacity(missing.len());
        for i in missing {
            let seq = first + i as u64;
            let packet = packets
                .get(i)
                .ok_or(FecError::Inconsistent("decoder returned too few packets"))?;
            // Parity that does not match the packets (a bug or a corrupt frame) would rebuild
            // garbage; the packet header is the cheap check that it did not.
            match Packet::decode(packet) {
                Ok(p) if p.header.seq == seq => {}
                _ => {
                    return Err(FecError::Inconsistent(
                        "rebuilt packet is not the one missing",
                    ))
                }
            }
            out.push(Recovered {
                seq,
                packet: packet.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::packet::{encode, PacketHeader, MAX_PAYLOAD};
    use crate::rng::XorShift as Rng;

    fn packets(rng: &mut Rng, k: u32, group: u64, max_payload: u64) -> Vec<Vec<u8>> {
        (0..u64::from(k))
            .map(|i| {
                let len = rng.below(max_payload + 1) as usize;
                let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                let header = PacketHeader {
                    seq: group * u64::from(k) + i,
                    flags: (i == 0) as u8,
                    created_ms: 1_700_000_000_000 + i,
                };
                encode(&header, &payload)
            })
            .collect()
    }

    fn frames(fec: &Fec, group: u64, ps: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let refs: Vec<&[u8]> = ps.iter().map(Vec::as_slice).collect();
        encode_parity_frames(fec, group, 42, &refs).unwrap()
    }

    #[test]
    fn frame_header_is_packet_shaped_and_roundtrips() {
        let fec = Fec::new(FecParams::new(3, 2).unwrap()).unwrap();
        let mut rng = Rng::seeded(1);
        let ps = packets(&mut rng, 3, 7, 100);
        let fs = frames(&fec, 7, &ps);
        assert_eq!(fs.len(), 2);
        let shards = fec.encode(&ps).unwrap();
        for (j, f) in fs.iter().enumerate() {
            assert!(is_parity_frame(f));
            assert!(!is_parity_frame(&ps[0]));
            assert_eq!(&f[..4], &[b'F', 1, 3, 2]);
            let pf = ParityFrame::decode(f).unwrap();
            assert_eq!((pf.group, pf.created_ms, pf.k, pf.n), (7, 42, 3, 2));
            assert_eq!(pf.index as usize, 3 + j);
            assert_eq!(pf.shard, shards[3 + j].as_slice());
            assert_eq!(pf.last_seq(), 23);
        }
    }

    #[test]
    fn largest_packets_fit_the_frame_limit() {
        let fec = Fec::new(FecParams::new(2, 1).unwrap()).unwrap();
        let big = encode(
            &PacketHeader {
                seq: 0,
                flags: 0,
                created_ms: 0,
            },
            &vec![9; MAX_PAYLOAD],
        );
        let fs = frames(&fec, 0, &[big.clone(), big]);
        assert!(fs[0].len() <= MAX_PARITY_FRAME);
        ParityFrame::decode(&fs[0]).unwrap();
    }

    /// Any k of the k + n shards (packets and parity frames), in any order, rebuild the group
    /// byte-exact; each missing packet comes back exactly once.
    #[test]
    fn any_k_of_packets_and_parity_frames_rebuild_the_group() {
        let mut rng = Rng::seeded(0xfec);
        for case in 0..300 {
            let k = 1 + rng.below(8) as u32;
            let n = 1 + rng.below(4) as u32;
            let params = FecParams::new(k, n).unwrap();
            let fec = Fec::new(params).unwrap();
            let group = rng.below(1000);
            let ps = packets(&mut rng, k, group, if case % 3 == 0 { 5 } else { 1200 });
            let fs = frames(&fec, group, &ps);
            // Items 0..k are packets, k..k+n parity frames; keep a random k of them.
            let mut items: Vec<usize> = (0..(k + n) as usize).collect();
            rng.shuffle(&mut items);
            items.truncate(k as usize);
            let mut asm = GroupAssembler::new(params, 8).unwrap();
            let mut rebuilt = BTreeMap::new();
            for i in &items {
                let got = if *i < k as usize {
                    let seq = params.first_seq(group) + *i as u64;
                    asm.add_packet(seq, &ps[*i]).unwrap()
                } else {
                    let f = ParityFrame::decode(&fs[*i - k as usize]).unwrap();
                    asm.add_parity(&f).unwrap()
                };
                for r in got {
                    assert!(rebuilt.insert(r.seq, r.packet).is_none(), "case {case}");
                }
            }
            for (i, p) in ps.iter().enumerate() {
                let seq = params.first_seq(group) + i as u64;
                if items.contains(&i) {
                    assert!(!rebuilt.contains_key(&seq), "case {case}: had it");
                } else {
                    assert_eq!(rebuilt.get(&seq), Some(p), "case {case} k={k} n={n}");
                }
            }
            // Shards arriving after the rebuild change nothing.
            for f in &fs {
                let f = ParityFrame::decode(f).unwrap();
                assert!(asm.add_parity(&f).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn complete_groups_need_no_parity_and_old_groups_are_forgotten() {
        let params = FecParams::new(2, 1).unwrap();
        let fec = Fec::new(params).unwrap();
        let mut rng = Rng::seeded(3);
        let mut asm = GroupAssembler::new(params, 4).unwrap();
        let g0 = packets(&mut rng, 2, 0, 50);
        let f0 = frames(&fec, 0, &g0);
        assert!(asm.add_packet(0, &g0[0]).unwrap().is_empty());
        // Four newer groups push group 0 out of the window: its parity no longer helps.
        for g in 1..=4 {
            let ps = packets(&mut rng, 2, g, 50);
            assert!(asm.add_packet(g * 2, &ps[0]).unwrap().is_empty());
        }
        assert!(asm.groups.len() <= 4);
        let f = ParityFrame::decode(&f0[0]).unwrap();
        assert!(asm.add_parity(&f).unwrap().is_empty());
        assert!(!asm.groups.contains_key(&0));
        // A complete group keeps no bytes.
        let g9 = packets(&mut rng, 2, 9, 50);
        asm.add_packet(18, &g9[0]).unwrap();
        asm.add_packet(19, &g9[1]).unwrap();
        assert!(asm.groups[&9].done && asm.groups[&9].data.is_empty());
    }

    #[test]
    fn parity_of_another_group_is_an_error_not_garbage() {
        let params = FecParams::new(2, 1).unwrap();
        let fec = Fec::new(params).unwrap();
        let mut rng = Rng::seeded(4);
        let g3 = packets(&mut rng, 2, 3, 80);
        let g4 = packets(&mut rng, 2, 4, 80);
        // A frame claiming group 3 but coded over group 4's packets.
        let lying = frames(&fec, 3, &g4);
        let mut asm = GroupAssembler::new(params, 8).unwrap();
        asm.add_packet(6, &g3[0]).unwrap();
        let f = ParityFrame::decode(&lying[0]).unwrap();
        assert!(asm.add_parity(&f).is_err());
        let other = Fec::new(FecParams::new(2, 2).unwrap()).unwrap();
        let theirs = frames(&other, 5, &packets(&mut rng, 2, 5, 10));
        let f = ParityFrame::decode(&theirs[0]).unwrap();
        assert!(matches!(asm.add_parity(&f), Err(FecError::Inconsistent(_))));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let fec = Fec::new(FecParams::new(4, 2).unwrap()).unwrap();
        let mut rng = Rng::seeded(5);
        let ps = packets(&mut rng, 4, 11, 300);
        let good = frames(&fec, 11, &ps).remove(0);
        assert!(ParityFrame::decode(&good).is_ok());
        // Every truncation.
        for len in 0..good.len() {
            assert!(ParityFrame::decode(&good[..len]).is_err(), "len {len}");
        }
        // Targeted header damage.
        for (at, v) in [
            (0, b'P'),
            (1, 2),
            (2, 0),
            (2, 40),
            (3, 0),
            (7, 0),
            (24, 3),
            (26, 1),
        ] {
            let mut f = good.clone();
            f[at] = v;
            assert!(ParityFrame::decode(&f).is_err(), "byte {at} = {v}");
        }
        let mut long = good.clone();
        long.resize(MAX_PARITY_FRAME + 1, 0);
        assert!(ParityFrame::decode(&long).is_err());
        // Random garbage and random mutations: any result but a panic.
        for _ in 0..5000 {
            let mut f = if rng.below(2) == 0 {
                good.clone()
            } else {
                let len = rng.below(64) as usize;
                let mut v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                if let Some(b) = v.first_mut() {
                    *b = b'F';
                }
                v
            };
            for _ in 0..=rng.below(4) {
                if !f.is_empty() {
                    let i = rng.below(f.len() as u64) as usize;
                    f[i] = rng.next_u64() as u8;
                }
            }
            if let Ok(pf) = ParityFrame::decode(&f) {
                let _ = pf.last_seq();
                let mut asm = GroupAssembler::new(FecParams::new(4, 2).unwrap(), 4).unwrap();
                let _ = asm.add_packet(44, &ps[0]);
                let _ = asm.add_packet(45, &ps[1]);
                let _ = asm.add_parity(&pf);
            }
        }
    }
}
