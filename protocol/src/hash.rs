//! Content hashes the origin and the peers compute identically, so reassembled bytes can be
//! compared with the origin's without shipping the bytes (FNV-1a, folded in sequence order).
//! Not cryptographic: it detects corruption and reordering, not forgery.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over one packet's payload.
pub fn packet_hash(payload: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in payload {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Order-dependent fold of per-packet hashes over a contiguous range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeHash {
    pub first_seq: u64,
    /// Number of packets folded in; the range is `first_seq .. first_seq + count`.
    pub count: u64,
    pub value: u64,
}

impl RangeHash {
    pub fn new(first_seq: u64) -> Self {
        RangeHash {
            first_seq,
            count: 0,
            value: FNV_OFFSET,
        }
    }

    /// Folds in the next packet of the range.
    pub fn push(&mut self, packet_hash: u64) {
        self.value = (self.value.rotate_left(5) ^ packet_hash).wrapping_mul(FNV_PRIME);
        self.count += 1;
    }

    /// Hex form, because JavaScript numbers cannot hold a u64.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_content_both_matter() {
        let a = packet_hash(b"a");
        let b = packet_hash(b"b");
        let mut x = RangeHash::new(0);
        x.push(a);
        x.push(b);
        let mut y = RangeHash::new(0);
        y.push(b);
        y.push(a);
        assert_ne!(x.value, y.value);
        assert_ne!(packet_hash(b"ab"), packet_hash(b"ba"));
        assert_eq!(x.count, 2);
        assert_eq!(x.hex().len(), 16);
    }
}
