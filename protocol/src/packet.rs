//! The media packet: a fixed 24-byte header followed by a slice of the fragmented-MP4 byte
//! stream. Packets are relayed verbatim, so a peer never re-encodes what it forwards.
//!
//! ```text
//! 0      1        2      3         4            8              16               24
//! | 'P'  | ver=1  | flags| reserved| payload_len | seq (u64 BE) | created_ms (BE) | payload…
//! ```

use thiserror::Error;

/// Largest packet on the wire, header included.
pub const MAX_PACKET_SIZE: usize = 16 * 1024;
/// Size of [`PacketHeader`] on the wire.
pub const HEADER_SIZE: usize = 24;
/// Largest payload that fits in one packet.
pub const MAX_PAYLOAD: usize = MAX_PACKET_SIZE - HEADER_SIZE;

const MAGIC: u8 = b'P';
const VERSION: u8 = 1;

/// Flag: the payload begins a media fragment (moof) that starts with a keyframe, so a joiner
/// can start decoding here.
pub const FLAG_RANDOM_ACCESS: u8 = 0b0000_0001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub seq: u64,
    pub flags: u8,
    /// Origin wall-clock time (ms since the Unix epoch) when the packet was cut.
    pub created_ms: u64,
}

impl PacketHeader {
    pub fn is_random_access(&self) -> bool {
        self.flags & FLAG_RANDOM_ACCESS != 0
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than the {HEADER_SIZE}-byte header")]
    TooShort(usize),
    #[error("packet of {0} bytes exceeds the {MAX_PACKET_SIZE}-byte limit")]
    TooLong(usize),
    #[error("bad packet magic/version {0:#04x}/{1}")]
    BadMagic(u8, u8),
    #[error("header says {declared} payload bytes but {actual} follow")]
    LengthMismatch { declared: usize, actual: usize },
}

/// A decoded packet borrowing its payload from the buffer it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: PacketHeader,
    pub payload: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses and validates a packet; never panics on arbitrary input.
    pub fn decode(buf: &'a [u8]) -> Result<Self, PacketError> {
        if buf.len() < HEADER_SIZE {
            return Err(PacketError::TooShort(buf.len()));
        }
        if buf.len() > MAX_PACKET_SIZE {
            return Err(PacketError::TooLong(buf.len()));
        }
        if buf[0] != MAGIC || buf[1] != VERSION {
            return Err(PacketError::BadMagic(buf[0], buf[1]));
        }
        let flags = buf[2];
        let declared = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        let payload = &buf[HEADER_SIZE..];
        if declared != payload.len() {
            return Err(PacketError::LengthMismatch {
                declared,
                actual: payload.len(),
            });
        }
        let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap_or_default());
        let created_ms = u64::from_be_bytes(buf[16..24].try_into().unwrap_or_default());
        Ok(Packet {
            header: PacketHeader {
                seq,
                flags,
                created_ms,
            },
            payload,
        })
    }
}

/// Encodes a packet. Panics only on a programming error (payload larger than [`MAX_PAYLOAD`]),
/// which the packetizer rules out.
pub fn encode(header: &PacketHeader, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= MAX_PAYLOAD, "payload too large");
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.push(MAGIC);
    out.push(VERSION);
    out.push(header.flags);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.created_ms.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads only the sequence number, for hot paths that forward without parsing further.
pub fn peek_seq(buf: &[u8]) -> Option<u64> {
    buf.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_every_field() {
        let h = PacketHeader {
            seq: 123_456_789_012,
            flags: FLAG_RANDOM_ACCESS,
            created_ms: 1_700_000_000_123,
        };
        let bytes = encode(&h, b"hello");
        assert_eq!(bytes.len(), HEADER_SIZE + 5);
        let p = Packet::decode(&bytes).unwrap();
        assert_eq!(p.header, h);
        assert!(p.header.is_random_access());
        assert_eq!(p.payload, b"hello");
        assert_eq!(peek_seq(&bytes), Some(h.seq));
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!(Packet::decode(b"short"), Err(PacketError::TooShort(5)));
        let mut bytes = encode(
            &PacketHeader {
                seq: 1,
                flags: 0,
                created_ms: 0,
            },
            b"abc",
        );
        bytes.push(0);
        assert!(matches!(
            Packet::decode(&bytes),
            Err(PacketError::LengthMismatch { .. })
        ));
        bytes[0] = b'X';
        assert!(matches!(
            Packet::decode(&bytes),
            Err(PacketError::BadMagic(..))
        ));
        assert!(matches!(
            Packet::decode(&vec![0u8; MAX_PACKET_SIZE + 1]),
            Err(PacketError::TooLong(_))
        ));
    }
}
