//! Where a joiner of a live channel starts: one fragment behind the newest, at the newest, or
//! at the next fragment.
//!
//! The fragments that exist when a peer joins reach it only from the origin (a fallback
//! fetch) or from its new parents (a catch-up, `peer-wasm/src/engine/catch_up.rs`); the trees
//! carry only what is cut after. Starting one fragment behind the newest gives the player a
//! fragment of cushion at once, and that older fragment is fetched from the origin: one
//! fragment's worth of stream per joiner, which in a crowd of a thousand joins a second is the
//! origin's whole egress (docs/benchmarks.md, flash crowd). Starting at the newest fragment,
//! which the parents hand over, costs the origin nothing while the parents have upload to spare
//! for it; in a crowd they do not (each has several new children at once), and the joiners
//! fetched the newest fragment from the origin after all: hundreds of streams a second in the
//! simulator's crowd of 10 000. Starting at the next fragment costs nobody anything beyond the
//! stream itself: the trees carry it to the joiner like to everyone else, and the player waits
//! for it (half a fragment on average, and the trees' delivery).
//!
//! So the start is chosen per joiner ([`StartPolicy::choose`]):
//! * a joiner that comes late in a fragment ([`StartConfig::newest_after`] of it or more has
//!   passed since the newest was cut) starts at the newest: the next fragment is near;
//! * the others start one behind while the origin's start budget lasts
//!   ([`StartConfig::budget_streams`]: streams of origin egress spent on older fragments, a
//!   token bucket one second deep), and at the next fragment beyond it;
//! * once the budget has turned a joiner away, for a fragment's duration every joiner starts
//!   at the next fragment, late ones too: that is a crowd, whose new parents cannot hand over
//!   the newest fragment either.
//!
//! (A budget that counted the late joiners' starts too would make the steady scenario's
//! joins, 300 a second while its audience grows, a crowd: their start-up would go from 1.4 to
//! 2.7 s at the 95th percentile.)

/// Defaults: see [`StartConfig`].
pub const DEFAULT_NEWEST_AFTER: f64 = 0.5;
pub const DEFAULT_BUDGET_STREAMS: f64 = 200.0;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StartConfig {
    /// Share of a fragment's duration after its cut from which a joiner starts at the newest
    /// fragment (above 1: never on this ground).
    pub newest_after: f64,
    /// Streams' worth of origin egress a second for joiners' older fragments (one fragment of
    /// duration `D` costs `D` seconds of stream); beyond it joiners start at the next fragment.
    /// 0: every joiner does.
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
    /// The next fragment's first packet (the newest packet's successor: the origin cuts a
    /// fragment's packets at once).
    pub next: u64,
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
    /// The next fragment, not cut yet, because the start budget is spent.
    NextBudget(u64),
}

impl Start {
    pub fn seq(self) -> u64 {
        match self {
            Start::Older(s) | Start::NewestLate(s) | Start::NextBudget(s) => s,
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
    /// When the budget last turned a joiner away (a crowd).
    refused_ms: Option<u64>,
}

impl StartPolicy {
    pub fn new(cfg: StartConfig) -> Self {
        StartPolicy {
            cfg,
            tokens: cfg.budget_streams.max(0.0),
            filled_ms: None,
            refused_ms: None,
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
        let fragment_ms = if c.fragment_ms.is_finite() && c.fragment_ms > 0.0 {
            c.fragment_ms
        } else {
            1000.0
        };
        // In a crowd (the budget turned a joiner away within the last fragment) the late joiners
        // start at the next fragment too: their new parents have no spare upload to hand the
        // newest over, and the origin would serve it after all.
        let crowd = self
            .refused_ms
            .is_some_and(|t| (now_ms.saturating_sub(t) as f64) < fragment_ms);
        if c.older < c.newest && !crowd {
            let since_cut = now_ms.saturating_sub(c.newest_cut_ms) as f64;
            if since_cut >= self.cfg.newest_after * fragment_ms {
                return Start::NewestLate(c.newest);
            }
        }
        // A fragment costs its duration in stream-seconds; a budget smaller than one fragment
        // still lets one through each time it is full. With one fragment only so far, that one
        // is the older fragment.
        let cost = (fragment_ms / 1000.0).min(budget);
        if budget > 0.0 && self.tokens >= cost {
            self.tokens -= cost;
            return Start::Older(c.older.min(c.newest));
        }
        self.refused_ms = Some(now_ms);
        Start::NextBudget(c.next.max(c.newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(newest_cut_ms: u64) -> StartCandidates {
        StartCandidates {
            older: 8,
            newest: 16,
            next: 24,
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
    fn beyond_the_budget_joiners_start_at_the_next_fragment() {
        let mut p = StartPolicy::new(StartConfig {
            newest_after: 0.5,
            budget_streams: 3.0,
        });
        // A crowd at one instant: three older fragments (1 s each), then the next fragment.
        let got: Vec<Start> = (0..5).map(|_| p.choose(10_000, at(10_000))).collect();
        assert_eq!(got[..3], [Start::Older(8); 3]);
        assert_eq!(got[3..], [Start::NextBudget(24); 2]);
        // Late in the fragment, within a fragment of a refusal: the next fragment too.
        assert_eq!(p.choose(10_200, at(9_700)), Start::NextBudget(24));
        // Refilled at 3 streams a second: one more 1 s fragment after a third of a second.
        assert_eq!(p.choose(10_340, at(10_000)), Start::Older(8));
        // A fragment after the last refusal, a late joiner starts at the newest again.
        assert_eq!(p.choose(11_300, at(10_800)), Start::NewestLate(16));
        // Long fragments cost more: a 4 s fragment is 4 stream-seconds, more than the
        // 3-stream bucket holds, so one gets through whenever it is full.
        let long = StartCandidates {
            fragment_ms: 4000.0,
            ..at(11_300)
        };
        assert_eq!(p.choose(11_400, long), Start::Older(8));
        assert_eq!(p.choose(11_400, long), Start::NextBudget(24));
        // The first fragment alone spends the budget as an older one does.
        let one = StartCandidates {
            older: 16,
            ..at(11_300)
        };
        assert_eq!(p.choose(11_400, one), Start::NextBudget(24));
        assert_eq!(p.choose(12_400, one), Start::Older(16));
    }

    #[test]
    fn no_budget_starts_everyone_at_the_next_fragment_or_late_at_the_newest() {
        let mut p = StartPolicy::new(StartConfig {
            newest_after: 1.0,
            budget_streams: 0.0,
        });
        assert_eq!(p.choose(10_000, at(10_000)), Start::NextBudget(24));
        assert_eq!(p.choose(10_600, at(10_000)), Start::NextBudget(24));
        assert_eq!(p.choose(20_000, at(10_000)), Start::NewestLate(16));
    }
}
