//! A tiny deterministic pseudo-random generator (xorshift64*), shared by tests, simulations
//! and benchmarks so that a seed reproduces a run exactly, without a dependency. Not for
//! anything that must be unpredictable.

#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// A generator from any seed (zero included: the raw state must never be zero).
    pub fn seeded(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = XorShift::seeded(7);
        let mut b = XorShift::seeded(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs[0], xs[1]);
        assert_eq!(XorShift::seeded(0).below(0), 0);
        assert!((0..100).all(|_| a.below(10) < 10));
    }
}
