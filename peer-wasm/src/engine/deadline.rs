//! The player's deadline: gaps the playhead will reach before a fallback period and a fetch
//! could fill them are fetched at once.
//!
//! A gap normally waits a fallback period (plus its tree's usual lag) for its tree before the
//! origin is asked: that wait is what keeps the origin's egress small. It is sized for a player
//! that keeps about a fragment of media ahead of its playhead. A peer whose trees run later
//! than when it started playing (a tree that grew deeper under it, a new parent after a move)
//! has less: waiting the whole period then costs a stall that a fetch made when the gap was
//! seen would have avoided (the simulator's hierarchy, docs/benchmarks.md). So the player
//! reports how much media it has buffered ahead of its playhead, and when that is within
//! [`URGENT_RTTS`] fetch round trips (plus [`URGENT_MARGIN_MS`]) the gaps of the fragment it
//! needs next are fetched without waiting.

/// Fetch round trips of buffered media below which the next fragment's gaps are urgent.
pub const URGENT_RTTS: f64 = 2.0;

/// Added to the urgency threshold: the packet must also be appended and decoded.
pub const URGENT_MARGIN_MS: f64 = 150.0;

/// The fetch round trip assumed until one is measured (ms).
pub const DEFAULT_FETCH_RTT_MS: f64 = 300.0;

/// Weight of a new fetch round-trip sample in the running average.
const RTT_GAIN: f64 = 0.125;

/// What the engine knows of the player's position.
#[derive(Debug, Clone)]
pub struct PlayerDeadline {
    /// Media buffered ahead of the playhead (ms) and when that was reported; `None` while the
    /// player does not play (starting up, paused).
    slack: Option<(f64, f64)>,
    /// Smoothed fallback fetch round trip (ms): request sent → packet in.
    fetch_rtt_ms: f64,
}

impl Default for PlayerDeadline {
    fn default() -> Self {
        PlayerDeadline {
            slack: None,
            fetch_rtt_ms: DEFAULT_FETCH_RTT_MS,
        }
    }
}

impl PlayerDeadline {
    /// The player has `slack_ms` of media ahead of its playhead at `now` (`None`: it does not
    /// play). Negative or non-finite figures count as none.
    pub fn set_slack(&mut self, slack_ms: Option<f64>, now: f64) {
        self.slack = slack_ms
            .filter(|s| s.is_finite())
            .map(|s| (s.max(0.0), now));
    }

    /// A fallback fetch took `ms` from request to packet.
    pub fn note_fetch_rtt(&mut self, ms: f64) {
        if ms.is_finite() && ms >= 0.0 {
            self.fetch_rtt_ms += RTT_GAIN * (ms - self.fetch_rtt_ms);
        }
    }

    pub fn fetch_rtt_ms(&self) -> f64 {
        self.fetch_rtt_ms
    }

    /// Media left ahead of the playhead at `now` (ms), counting down from the last report at
    /// the playback rate.
    pub fn remaining_ms(&self, now: f64) -> Option<f64> {
        self.slack.map(|(s, at)| (s - (now - at).max(0.0)).max(0.0))
    }

    /// Whether the player reaches the end of its media before a fetch started now could
    /// bring a packet, with margin.
    pub fn urgent(&self, now: f64) -> bool {
        self.remaining_ms(now)
            .is_some_and(|r| r <= URGENT_RTTS * self.fetch_rtt_ms + URGENT_MARGIN_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_player_that_does_not_play_has_no_deadline() {
        let mut d = PlayerDeadline::default();
        assert!(!d.urgent(0.0));
        d.set_slack(Some(100.0), 0.0);
        assert!(d.urgent(0.0));
        d.set_slack(None, 10.0);
        assert!(!d.urgent(10.0));
        d.set_slack(Some(f64::NAN), 10.0);
        assert!(!d.urgent(10.0));
    }

    #[test]
    fn the_slack_counts_down_at_the_playback_rate() {
        let mut d = PlayerDeadline::default();
        d.set_slack(Some(2000.0), 1000.0);
        let threshold = URGENT_RTTS * DEFAULT_FETCH_RTT_MS + URGENT_MARGIN_MS;
        assert_eq!(d.remaining_ms(1500.0), Some(1500.0));
        assert!(!d.urgent(1000.0 + 1999.0 - threshold));
        assert!(d.urgent(1000.0 + 2000.0 - threshold));
        assert_eq!(d.remaining_ms(5000.0), Some(0.0));
    }

    #[test]
    fn measured_round_trips_move_the_threshold() {
        let mut d = PlayerDeadline::default();
        for _ in 0..100 {
            d.note_fetch_rtt(50.0);
        }
        assert!((d.fetch_rtt_ms() - 50.0).abs() < 1.0);
        d.set_slack(Some(400.0), 0.0);
        assert!(
            !d.urgent(0.0),
            "400 ms is four 50 ms round trips and margin"
        );
        d.note_fetch_rtt(f64::INFINITY);
        assert!((d.fetch_rtt_ms() - 50.0).abs() < 1.0);
    }
}
