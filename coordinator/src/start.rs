//! Where a joiner of a live channel starts: one fragment behind the newest, or at the newest.
//!
//! The fragments that exist when a peer joins reach it only from the origin (a fallback
//! fetch) or from its new parents (a catch-up, `peer-wasm/src/engine/catch_up.rs`); the trees
//! carry only what is cut after. Starting one fragment behind the newest gives the player a
//! fragment of cushion at once, and that older fragment is fetched from the origin: one
//! fragment's worth of stream per joiner, which in a crowd of a thousand joins a second is the
//! origin's whole egress (docs/benchmarks.md, flash crowd). Starting at the newest fragment,
//! which the parents hand over, costs the origin nothing but waits for the next fragment before
//! the player has its start-up cushion.
//!
//! So the start is chosen per joiner ([`StartPolicy::choose`]):
//! * a joiner that comes late in a fragment ([`StartConfig::newest_after`] of it or more has
//!   passed since the newest was cut) starts at the newest: the next fragment is near;
//! * the others start one behind while the origin's start budget lasts
//!   ([`StartConfig::budget_streams`]: streams of origin egress spent on older fragments, a
//!   token bucket one second deep), and at the newest beyond it.

/// Defaults: see [`StartConfig`].
pub const DEFAULT_NEWEST_AFTER: f64 = 0.5;
pub const DEFAULT_BUDGET_STREAMS: f64 = 200.0;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StartConfig {
    /// Share of a fragment's duration after its cut from which a joiner starts at the newest
    /// fragment (above 1: never on this ground).
    pub newest_after: f64,
    /// Streams' worth of origin egress a second for joiners' older fragments (one fragment of
    /// duration `D` costs `D` seconds of stream); 0: every joiner starts at the newest.
    pub budget_streams: f64,
}

impl Default for StartConfig {
    fn default() -> Self {
        StartConfig {
            newest_after: DEFAULT_NEWEST_AFTER,
            budget_streams: DEFAULT_BUDGET_STREAMS,
        }
    }
}

/// What the origin knows when a peer joins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartCandidates {
    /// The random-access point one fragment behind the newest (equal to `newest` while only
    /// one fragment exists).
    pub older: u64,
    /// The newest fragment's first packet.
    pub newest: u64,
    /// When the newest fragment was cut (ms, the origin's clock, as `now_ms`).
    pub newest_cut_ms: u64,
    /// The stream's fragment duration (ms).
    pub fragment_ms: f64,
}

/// Which start a joiner got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// One fragment behind the newest (the origin serves that fragment).
    Older(u64),
    /// The newest fragment, because the next one is near.
    NewestLate(u64),
    /// The newest fragment, because the start budget is spent.
    NewestBudget(u64),
}

impl Start {
    pub fn seq(self) -> u64 {
        match self {
            Start::Older(s) | Start::NewestLate(s) | Start::NewestBudget(s) => s,
        }
    }
}

/// One channel's start policy (sans-IO: the caller gives the time).
#[derive(Debug, Clone)]
pub struct StartPolicy {
    cfg: StartConfig,
    /// Stream-seconds the budget has left, and when it was last filled.
    tokens: f64,
    filled_ms: Option<u64>,
}

impl StartPolicy {
    pub fn new(cfg: StartConfig) -> Self {
        StartPolicy {
            cfg,
            tokens: cfg.budget_streams.max(0.0),
            filled_ms: None,
        }
    }

    pub fn config(&self) -> StartConfig {
        self.cfg
    }

    /// Where a peer that joins at `now_ms` starts.
    pub fn choose(&mut self, now_ms: u64, c: StartCandidates) -> Start {
        let budget = self.cfg.budget_streams.max(0.0);
        if let Some(at) = self.filled_ms {
            let dt = now_ms.saturating_sub(at) as f64 / 1000.0;
            self.tokens = (self.tokens + dt * budget).min(budget);
        }
        self.filled_ms = Some(now_ms);
        if c.older >= c.newest {
            return Start::Older(c.newest);
        }
        let fragment_ms = if c.fragment_ms.is_finite() && c.fragment_ms > 0.0 {
            c.fragment_ms
        } else {
            1000.0
        };
        let since_cut = now_ms.saturating_sub(c.newest_cut_ms) as f64;
        if since_cut >= self.cfg.newest_after * fragment_ms {
            return Start::NewestLate(c.newest);
        }
        // A fragment costs its duration in stream-seconds; a budget smaller than one fragment
        // still lets one through each time it is full.
        let cost = (fragment_ms / 1000.0).min(budget);
        if budget > 0.0 && self.tokens >= cost {
            self.tokens -= cost;
            return Start::Older(c.older);
        }
        Start::NewestBudget(c.newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(newest_cut_ms: u64) -> StartCandidates {
        StartCandidates {
            older: 8,
            newest: 16,
            newest_cut_ms,
            fragment_ms: 1000.0,
        }
    }

    #[test]
    fn a_joiner_late_in_a_fragment_starts_at_the_newest() {
        let mut p = StartPolicy::new(StartConfig::default());
        assert_eq!(p.choose(10_100, at(10_000)), Start::Older(8));
        assert_eq!(p.choose(10_499, at(10_000)), Start::Older(8));
        assert_eq!(p.choose(10_500, at(10_000)), Start::NewestLate(16));
        // Only one fragment so far: that one.
        let one = StartCandidates {
            older: 16,
            ..at(10_000)
        };
        assert_eq!(p.choose(10_100, one), Start::Older(16));
    }

    #[test]
    fn the_origin_serves_older_fragments_within_its_budget() {
        let mut p = StartPolicy::new(StartConfig {
            newest_after: 2.0,
            budget_streams: 3.0,
        });
        // A crowd at one instant: three older fragments (1 s each), then the newest.
        let got: Vec<Start> = (0..5).map(|_| p.choose(10_000, at(10_000))).collect();
        assert_eq!(got[..3], [Start::Older(8); 3]);
        assert_eq!(got[3..], [Start::NewestBudget(16); 2]);
        // Refilled at 3 streams a second: one more 1 s fragment after a third of a second.
        assert_eq!(p.choose(10_200, at(10_000)), Start::NewestBudget(16));
        assert_eq!(p.choose(10_340, at(10_000)), Start::Older(8));
        // Long fragments cost more: a 4 s fragment is 4 stream-seconds, more than the
        // 3-stream bucket holds, so one gets through whenever it is full.
        let long = StartCandidates {
            fragment_ms: 4000.0,
            ..at(10_000)
        };
        assert_eq!(p.choose(11_400, long), Start::Older(8));
        assert_eq!(p.choose(11_400, long), Start::NewestBudget(16));
    }

    #[test]
    fn no_budget_starts_everyone_at_the_newest() {
        let mut p = StartPolicy::new(StartConfig {
            newest_after: 1.0,
            budget_streams: 0.0,
        });
        assert_eq!(p.choose(10_000, at(10_000)), Start::NewestBudget(16));
        assert_eq!(p.choose(20_000, at(10_000)), Start::NewestLate(16));
    }
}
