//! The middle tier's FEC group assembler (`protocol::fec`, `fec/parity.rs`): real groups coded
//! by the origin's encoder, delivered in part, in any order and possibly damaged, mixed with
//! raw packets, raw parity frames and raw shards. Never a panic; and an undamaged group of
//! which any `k` of its `k + n` shards arrive is rebuilt byte-exact by an assembler of its own,
//! each missing packet exactly once.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use protocol::fec::{encode_parity_frames, Fec, FecParams, GroupAssembler, ParityFrame};
use protocol::packet::{self, PacketHeader};

#[derive(Debug, Arbitrary)]
struct Input {
    k: u8,
    n: u8,
    window: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A group coded by the origin's encoder, `gap` groups after the previous one; `keep`
    /// selects which of its `k + n` items (packets, then parity frames) arrive, `order`
    /// shuffles them, `flip` damages one byte.
    Group {
        gap: u16,
        lens: Vec<u16>,
        keep: u64,
        order: u32,
        flip: Option<(u16, u8)>,
    },
    /// Any bytes presented as packet `seq`.
    Packet { seq: u16, bytes: Vec<u8> },
    /// Any bytes arriving on a parity tree.
    Frame { bytes: Vec<u8> },
    /// Any shards handed to the decoder.
    Shards { shards: Vec<Vec<u8>> },
}

fuzz_target!(|input: Input| {
    // Mostly small groups (k <= 8, as deployed): building a coder costs O(k^3), and inputs
    // with k up to 32 stay reachable (one byte value in eight).
    let k = if input.k < 224 {
        input.k % 8
    } else {
        input.k % 32
    };
    let Ok(params) = FecParams::new(u32::from(k) + 1, u32::from(input.n % 17)) else {
        return;
    };
    let fec = Fec::new(params).expect("valid params build a coder");
    let window = u64::from(input.window % 70);
    let mut shared = GroupAssembler::new(params, window).expect("assembler");
    let k = params.k() as usize;
    // The oracle's assembler sees each group alone: groups only go up, and it keeps one.
    // (Building a coder inverts a matrix, the costliest step here: one per input, not per op.)
    let mut solo = GroupAssembler::new(params, 1).expect("assembler");
    let mut group = 0u64;
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Group {
                gap,
                lens,
                keep,
                order,
                flip,
            } => {
                group += 1 + u64::from(gap);
                let packets: Vec<Vec<u8>> = (0..k)
                    .map(|i| {
                        let len = lens.get(i).map_or(i, |l| usize::from(*l) % 1400);
                        let header = PacketHeader {
                            seq: params.first_seq(group) + i as u64,
                            flags: u8::from(i == 0),
                            created_ms: 1_700_000_000_000,
                        };
                        packet::encode(&header, &vec![(i as u8) ^ (len as u8); len])
                    })
                    .collect();
                let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
                let frames = encode_parity_frames(&fec, group, 7, &refs).expect("encode");
                assert_eq!(frames.len(), params.n() as usize);
                let mut items: Vec<(usize, Vec<u8>)> = packets
                    .iter()
                    .chain(&frames)
                    .cloned()
                    .enumerate()
                    .filter(|(i, _)| keep & (1 << (i % 64)) != 0)
                    .collect();
                // A deterministic shuffle from `order`.
                let mut x = order | 1;
                for i in (1..items.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    items.swap(i, x as usize % (i + 1));
                }
                let damaged = match flip {
                    Some((at, v)) if !items.is_empty() && v != 0 => {
                        let n = items.len();
                        let item = &mut items[usize::from(at) % n].1;
                        let at = usize::from(at) % item.len();
                        item[at] ^= v;
                        true
                    }
                    _ => false,
                };
                let mut rebuilt = BTreeMap::new();
                let mut solo_failed = false;
                let mut arrived = Vec::new();
                for (i, bytes) in &items {
                    arrived.push(*i);
                    let (a, b) = if *i < k {
                        let seq = params.first_seq(group) + *i as u64;
                        (solo.add_packet(seq, bytes), shared.add_packet(seq, bytes))
                    } else {
                        match ParityFrame::decode(bytes) {
                            Ok(f) => (solo.add_parity(&f), shared.add_parity(&f)),
                            Err(e) => {
                                assert!(damaged, "an undamaged parity frame fails: {e}");
                                continue;
                            }
                        }
                    };
                    let _ = b;
                    match a {
                        Ok(got) => {
                            for r in got {
                                let pos = r.seq.wrapping_sub(params.first_seq(group)) as usize;
                                assert!(
                                    !arrived.contains(&pos),
                                    "seq {} arrived, then rebuilt",
                                    r.seq
                                );
                                assert!(
                                    rebuilt.insert(r.seq, r.packet).is_none(),
                                    "seq {} rebuilt twice",
                                    r.seq
                                );
                            }
                        }
                        Err(e) => {
                            assert!(damaged, "an undamaged group fails: {e}");
                            solo_failed = true;
                        }
                    }
                }
                if damaged || solo_failed {
                    // A damaged frame may have claimed any group (one far ahead pushes the
                    // next groups out of the window): the oracle starts afresh.
                    solo = GroupAssembler::new(params, 1).expect("assembler");
                    continue;
                }
                let have: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
                let enough = have.len() >= k;
                for (i, p) in packets.iter().enumerate() {
                    let seq = params.first_seq(group) + i as u64;
                    if rebuilt.contains_key(&seq) || !have.contains(&i) && enough {
                        assert_eq!(rebuilt.get(&seq), Some(p), "seq {seq} not rebuilt exactly");
                    } else if !enough {
                        assert!(rebuilt.is_empty(), "rebuilt from fewer than k shards");
                    }
                }
            }
            Op::Packet { seq, bytes } => {
                let _ = shared.add_packet(u64::from(seq), &bytes);
            }
            Op::Frame { bytes } => {
                if let Ok(f) = ParityFrame::decode(&bytes) {
                    let _ = f.last_seq();
                    let _ = shared.add_parity(&f);
                }
            }
            Op::Shards { shards } => {
                if let Ok(packets) = fec.decode(&shards) {
                    assert_eq!(packets.len(), k);
                }
            }
        }
    }
});
