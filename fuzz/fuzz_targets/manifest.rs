//! The signed stream's manifest (`protocol::manifest`), which every peer decodes from the control
//! socket: any frame decodes or errs without a panic, and a decoded one re-encodes to the same
//! bytes. A peer's book with the channel's key takes the frame only if the origin signed it;
//! and what the origin signs for packets from any sequence number, the book takes back.
//!
//! Input: a frame; its first 8 bytes also serve as a sequence number and its rest as packets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::manifest::{packet_digest, Manifest, ManifestBook, ManifestSigner};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        // Decode refuses non-zero reserved bytes and ranges past u64::MAX, so a decoded frame
        // has one encoding and a range that fits.
        assert_eq!(m.encode(), data, "decode/encode changed the frame");
        let _ = m.digest_of(m.first_seq);
        assert_eq!(m.seqs().count(), m.hashes.len());
    }
    let mut signer = ManifestSigner::new(&[7; 32], "demo");
    let mut book = ManifestBook::new(signer.public_key(), "demo");
    // Forged frames are refused (a fuzzer does not forge ed25519).
    assert!(book.add(data).is_err(), "an unsigned frame was taken");

    let Some((seq, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let first_seq = u64::from_be_bytes(*seq);
    let packets: Vec<&[u8]> = rest.chunks(7).collect();
    // The origin numbers packets from 0; ranges past u64::MAX overflow in `ManifestBook::add`.
    if first_seq.checked_add(packets.len() as u64 + 1).is_none() {
        return;
    }
    for m in signer.sign(first_seq, &packets) {
        book.add(&m.encode()).expect("the origin's manifest is taken");
    }
    for (i, p) in packets.iter().enumerate() {
        assert_eq!(book.digest(first_seq + i as u64), Some(&packet_digest(p)));
    }
});
