//! The media packet header (`protocol::packet`): any bytes a peer relays are decoded without a
//! panic, and what decodes re-encodes to the same bytes (the reserved byte aside, which encode
//! writes as 0), so a relayed packet is never altered by a decode/encode round. The other frames
//! of a data channel (parity, catch-up wants) are decoded from the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::packet::{self, Packet, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let seq = packet::peek_seq(data);
    // Peers tell packets from parity frames by the first byte; both decoders see everything.
    let _ = protocol::fec::ParityFrame::decode(data);
    if let Ok(w) = protocol::want::Want::decode(data) {
        assert!(w.from_seq <= w.to_seq);
        assert_eq!(protocol::want::Want::decode(&w.encode()), Ok(w));
    }
    let Ok(p) = Packet::decode(data) else {
        return;
    };
    assert_eq!(seq, Some(p.header.seq), "peek_seq disagrees with decode");
    assert_eq!(p.payload.len() + HEADER_SIZE, data.len());
    let again = packet::encode(&p.header, p.payload);
    assert_eq!(again.len(), data.len());
    for (i, (a, b)) in again.iter().zip(data).enumerate() {
        if i != 3 {
            assert_eq!(a, b, "byte {i} differs after a decode/encode round");
        }
    }
    assert_eq!(Packet::decode(&again), Ok(p));
});
