//! Distributions the network model draws from, and the seeded generator behind them.

use protocol::rng::XorShift;
use serde::{Deserialize, Serialize};

/// A one-dimensional distribution of a non-negative quantity (ms, kbit/s, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dist {
    Const {
        value: f64,
    },
    Uniform {
        lo: f64,
        hi: f64,
    },
    /// Uniform in the logarithm: as many values in 1-10 as in 10-100 (capacities and delays
    /// spread over orders of magnitude).
    LogUniform {
        lo: f64,
        hi: f64,
    },
    /// One of several distributions, chosen with the given weights.
    Mix {
        parts: Vec<(f64, Dist)>,
    },
}

impl Dist {
    pub fn constant(value: f64) -> Dist {
        Dist::Const { value }
    }

    pub fn uniform(lo: f64, hi: f64) -> Dist {
        Dist::Uniform { lo, hi }
    }

    pub fn log_uniform(lo: f64, hi: f64) -> Dist {
        Dist::LogUniform { lo, hi }
    }

    pub fn sample(&self, rng: &mut Rng) -> f64 {
        match self {
            Dist::Const { value } => *value,
            Dist::Uniform { lo, hi } => lo + (hi - lo) * rng.unit(),
            Dist::LogUniform { lo, hi } => {
                let (a, b) = (lo.max(1e-9).ln(), hi.max(1e-9).ln());
                (a + (b - a) * rng.unit()).exp()
            }
            Dist::Mix { parts } => {
                let total: f64 = parts.iter().map(|p| p.0.max(0.0)).sum();
                let mut x = rng.unit() * total;
                for (w, d) in parts {
                    if x < *w {
                        return d.sample(rng);
                    }
                    x -= w.max(0.0);
                }
                parts.last().map_or(0.0, |p| p.1.sample(rng))
            }
        }
    }

    /// Checks the parameters (for configurations read from files or flags).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        let bad = |m: &str| Err(format!("{what}: {m}"));
        match self {
            Dist::Const { value } if !(value.is_finite() && *value >= 0.0) => {
                bad("value must be a finite number >= 0")
            }
            Dist::Uniform { lo, hi } | Dist::LogUniform { lo, hi }
                if !(lo.is_finite() && hi.is_finite() && *lo >= 0.0 && lo <= hi) =>
            {
                bad("needs 0 <= lo <= hi")
            }
            Dist::Mix { parts } if parts.is_empty() || parts.iter().all(|p| p.0 <= 0.0) => {
                bad("a mix needs at least one part with a positive weight")
            }
            Dist::Mix { parts } => parts.iter().try_for_each(|p| p.1.validate(what)),
            _ => Ok(()),
        }
    }
}

/// The simulator's seeded generator (xorshift64* from `protocol::rng`, shared with the other
/// benchmarks), with the few draws the model needs.
#[derive(Debug, Clone)]
pub struct Rng(XorShift);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng(XorShift::seeded(seed))
    }

    /// A generator for one purpose, independent of the order in which others are used: the
    /// same seed and stream give the same draws even if another part of the model changes.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        Rng::seeded(mix(seed ^ mix(stream.wrapping_add(0x5151))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

/// SplitMix64's finaliser: a fixed, well-spread hash of a 64-bit value.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stay_in_range_and_are_reproducible() {
        let d = Dist::Mix {
            parts: vec![
                (1.0, Dist::uniform(10.0, 20.0)),
                (3.0, Dist::log_uniform(100.0, 1000.0)),
            ],
        };
        let mut a = Rng::seeded(3);
        let mut b = Rng::seeded(3);
        let xs: Vec<f64> = (0..1000).map(|_| d.sample(&mut a)).collect();
        assert!(xs
            .iter()
            .all(|x| (10.0..=20.0).contains(x) || (100.0..=1000.0).contains(x)));
        assert_eq!(xs, (0..1000).map(|_| d.sample(&mut b)).collect::<Vec<_>>());
        // Weights: about three quarters from the second part.
        let big = xs.iter().filter(|x| **x >= 100.0).count();
        assert!((650..850).contains(&big), "{big}");
    }

    #[test]
    fn log_uniform_has_its_median_at_the_geometric_mean() {
        let d = Dist::log_uniform(1.0, 10_000.0);
        let mut r = Rng::seeded(9);
        let mut xs: Vec<f64> = (0..4001).map(|_| d.sample(&mut r)).collect();
        xs.sort_by(f64::total_cmp);
        assert!((60.0..160.0).contains(&xs[2000]), "median {}", xs[2000]);
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = Dist::uniform(5.0, 1.0).validate("setup_ms");
        assert!(e.is_err_and(|m| m.starts_with("setup_ms")));
        assert!(Dist::Mix { parts: vec![] }.validate("x").is_err());
        assert!(Dist::constant(3.0).validate("x").is_ok());
    }

    #[test]
    fn streams_are_independent_of_each_other() {
        let a: Vec<u64> = (0..3)
            .map({
                let mut r = Rng::stream(1, 1);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..3)
            .map({
                let mut r = Rng::stream(1, 2);
                move |_| r.next_u64()
            })
            .collect();
        assert_ne!(a, b);
    }
}
