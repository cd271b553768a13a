//! A child's request to a new parent for packets of one substream that it lacks: the joiner's
//! catch-up on the newest fragment (issue 14).
//!
//! A joiner starts one fragment behind the live edge and fetches that older fragment from the
//! origin at once. The newest fragment, which existed before its links did, is what its parents
//! hold: a parent primes a new child with its newest packet of the tree, which on the demo clip
//! (one 16 KiB packet a substream a fragment) is all of it, but a 3 Mbit/s stream's 4 s fragment
//! is 13 packets a substream. So the joiner asks each new parent for its substream's packets of
//! that fragment, and the parent sends what it still holds from spare upload. What does not come
//! in time is fetched from the origin as before.
//!
//! The frame has a packet's 24-byte shape so all three travel on one data channel and are told
//! apart by the first byte (`'P'` packet, `'F'` parity, `'W'` want):
//!
//! ```text
//! 0     1       2          4                  8                16              24
//! | 'W' | ver=1 | reserved | substream (u32 BE) | from_seq (u64 BE) | to_seq (u64 BE) |
//! ```

use thiserror::Error;

/// First byte of a want frame.
pub const WANT_MAGIC: u8 = b'W';
/// Version of the want frame layout.
pub const WANT_VERSION: u8 = 1;
/// Size of a want frame.
pub const WANT_LEN: usize = 24;
/// Most packets one want may span (`to_seq - from_seq + 1`): a parent keeps a few fragments,
/// and a bigger range asks for more than any parent holds.
pub const MAX_WANT_SPAN: u64 = 4096;

/// Packets `from_seq..=to_seq` of `substream` (only those of that substream are meant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub substream: u32,
    pub from_seq: u64,
    pub to_seq: u64,
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WantError {
    #[error("want frame of {0} bytes, expected {WANT_LEN}")]
    BadLength(usize),
    #[error("bad want magic/version {0:#04x}/{1}")]
    BadMagic(u8, u8),
    #[error("want range {from}..={to} is empty or spans more than {MAX_WANT_SPAN} packets")]
    BadRange { from: u64, to: u64 },
}

/// True when `buf` is a want frame (by its first byte); the rest is checked by [`Want::decode`].
pub fn is_want(buf: &[u8]) -> bool {
    buf.first() == Some(&WANT_MAGIC)
}

impl Want {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WANT_LEN);
        out.extend_from_slice(&[WANT_MAGIC, WANT_VERSION, 0, 0]);
        out.extend_from_slice(&self.substream.to_be_bytes());
        out.extend_from_slice(&self.from_seq.to_be_bytes());
        out.extend_from_slice(&self.to_seq.to_be_bytes());
        out
    }

    /// Parses and validates a want frame; never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<Want, WantError> {
        let b: &[u8; WANT_LEN] = buf
            .try_into()
            .map_err(|_| WantError::BadLength(buf.len()))?;
        if b[0] != WANT_MAGIC || b[1] != WANT_VERSION {
            return Err(WantError::BadMagic(b[0], b[1]));
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        let substream = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let (from, to) = (u64_at(8), u64_at(16));
        if to < from || to - from >= MAX_WANT_SPAN {
            return Err(WantError::BadRange { from, to });
        }
        Ok(Want {
            substream,
            from_seq: from,
            to_seq: to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_every_field() {
        let w = Want {
            substream: 3,
            from_seq: 1_000_000_007,
            to_seq: 1_000_000_120,
        };
        let bytes = w.encode();
        assert_eq!(bytes.len(), WANT_LEN);
        assert!(is_want(&bytes));
        assert!(!crate::fec::is_parity_frame(&bytes));
        assert!(crate::Packet::decode(&bytes).is_err());
        assert_eq!(Want::decode(&bytes), Ok(w));
    }

    #[test]
    fn bad_frames_are_refused_with_the_reason() {
        let w = Want {
            substream: 0,
            from_seq: 10,
            to_seq: 20,
        }
        .encode();
        assert_eq!(Want::decode(&w[..23]), Err(WantError::BadLength(23)));
        let mut long = w.clone();
        long.push(0);
        assert_eq!(Want::decode(&long), Err(WantError::BadLength(25)));
        let mut v2 = w.clone();
        v2[1] = 2;
        assert_eq!(Want::decode(&v2), Err(WantError::BadMagic(b'W', 2)));
        let backwards = Want {
            substream: 0,
            from_seq: 20,
            to_seq: 10,
        }
        .encode();
        assert_eq!(
            Want::decode(&backwards),
            Err(WantError::BadRange { from: 20, to: 10 })
        );
        let huge = Want {
            substream: 0,
            from_seq: 0,
            to_seq: MAX_WANT_SPAN,
        }
        .encode();
        assert!(matches!(
            Want::decode(&huge),
            Err(WantError::BadRange { .. })
        ));
        let widest = Want {
            substream: 0,
            from_seq: 0,
            to_seq: MAX_WANT_SPAN - 1,
        };
        assert_eq!(Want::decode(&widest.encode()), Ok(widest));
    }
}
