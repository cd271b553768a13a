//! Upload cap: a token bucket in bits, so a peer never uploads more than it declared to the
//! control center (the multi-tree's fan-out was computed from that declaration).

/// The largest thing the engine sends is a parity frame of a maximal packet (a little larger
/// than the packet itself); the bucket must always be able to hold one.
const MIN_BURST_BITS: f64 = 8.0 * protocol::fec::MAX_PARITY_FRAME as f64;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_bps: f64,
    burst_bits: f64,
    tokens: f64,
    last_ms: f64,
}

impl TokenBucket {
    /// `burst_ms` of traffic at the full rate may go out back to back.
    pub fn new(rate_kbps: u32, burst_ms: f64, now_ms: f64) -> Self {
        let rate_bps = f64::from(rate_kbps) * 1000.0;
        // At least one maximal frame must fit, or a slow peer could never send anything.
        let burst_bits = (rate_bps * burst_ms / 1000.0).max(MIN_BURST_BITS);
        TokenBucket {
            rate_bps,
            burst_bits,
            tokens: burst_bits,
            last_ms: now_ms,
        }
    }

    /// Changes the rate; the burst scales with it (a slower uplink also bursts less), and
    /// tokens saved up at the old rate do not outlive the change.
    pub fn set_rate(&mut self, rate_kbps: u32) {
        let old = self.rate_bps;
        self.rate_bps = f64::from(rate_kbps) * 1000.0;
        if old > 0.0 {
            self.burst_bits = (self.burst_bits * self.rate_bps / old).max(MIN_BURST_BITS);
            self.tokens = self.tokens.min(self.burst_bits);
        }
    }

    pub fn rate_kbps(&self) -> u32 {
        (self.rate_bps / 1000.0) as u32
    }

    fn refill(&mut self, now_ms: f64) {
        let dt = (now_ms - self.last_ms).max(0.0);
        self.tokens = (self.tokens + dt * self.rate_bps / 1000.0).min(self.burst_bits);
        self.last_ms = now_ms;
    }

    /// How long until `bytes` worth of tokens will have accrued (0 if they are there now):
    /// the wait of the last of `bytes` queued now, at the current rate.
    pub fn wait_ms(&self, bytes: usize, now_ms: f64) -> f64 {
        if self.rate_bps <= 0.0 {
            return f64::INFINITY;
        }
        let dt = (now_ms - self.last_ms).max(0.0);
        let tokens = (self.tokens + dt * self.rate_bps / 1000.0).min(self.burst_bits);
        ((bytes as f64 * 8.0 - tokens) / self.rate_bps * 1000.0).max(0.0)
    }

    /// Takes `bytes` worth of tokens if available.
    pub fn try_take(&mut self, bytes: usize, now_ms: f64) -> bool {
        self.try_take_keeping(bytes, 0.0, now_ms)
    }

    /// Takes `bytes` worth of tokens if `keep` (a fraction of the burst) are left after it:
    /// optional traffic that must not spend what the next burst of the stream needs.
    pub fn try_take_keeping(&mut self, bytes: usize, keep: f64, now_ms: f64) -> bool {
        if self.rate_bps <= 0.0 {
            return false;
        }
        self.refill(now_ms);
        let bits = bytes as f64 * 8.0;
        if self.tokens - bits >= keep * self.burst_bits {
            self.tokens -= bits;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_what_the_missing_tokens_take_at_the_rate() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        // 8 Mbit/s = 1000 bytes per ms, 100 ms of burst = 100 kB.
        let mut b = TokenBucket::new(8000, 100.0, 0.0);
        assert!(close(b.wait_ms(100_000, 0.0), 0.0));
        assert!(close(b.wait_ms(300_000, 0.0), 200.0));
        assert!(b.try_take(100_000, 0.0));
        // 20 kB accrued in 20 ms; 30 kB more take 30 ms.
        assert!(close(b.wait_ms(50_000, 20.0), 30.0));
        // A throttle shows at once: at a fifth of the rate (200 bytes per ms), 4 kB accrued by
        // 20 ms and 46 kB more take 230 ms.
        b.set_rate(1600);
        assert!(close(b.wait_ms(50_000, 20.0), 230.0));
    }

    #[test]
    fn long_run_rate_is_capped() {
        let mut b = TokenBucket::new(800, 200.0, 0.0);
        let mut sent = 0usize;
        let mut t = 0.0;
        while t < 10_000.0 {
            while b.try_take(1000, t) {
                sent += 1000;
            }
            t += 10.0;
        }
        // 800 kbit/s for 10 s = 1,000,000 bytes, plus at most one burst.
        assert!(sent <= 1_000_000 + 20_000 + 16_384, "sent {sent}");
        assert!(sent >= 950_000, "sent {sent}");
    }

    #[test]
    fn optional_traffic_leaves_the_reserve_to_the_stream() {
        // 8 Mbit/s, 100 ms of burst = 100 kB; half of it kept back.
        let mut b = TokenBucket::new(8000, 100.0, 0.0);
        assert!(b.try_take_keeping(40_000, 0.5, 0.0));
        assert!(
            !b.try_take_keeping(20_000, 0.5, 0.0),
            "would dip into the reserve"
        );
        assert!(b.try_take(50_000, 0.0), "the stream may");
        // 25 ms later 25 kB have accrued: 35 kB in the bucket, still under the reserve plus one.
        assert!(!b.try_take_keeping(1_000, 0.5, 25.0));
        assert!(b.try_take_keeping(1_000, 0.5, 60.0));
    }

    #[test]
    fn a_lower_rate_also_shrinks_the_burst() {
        let mut b = TokenBucket::new(2000, 1000.0, 0.0);
        b.set_rate(100);
        let mut sent = 0;
        while b.try_take(1000, 0.0) {
            sent += 1000;
        }
        // At most one maximal frame's worth, not the 250 kB saved at 2000 kbit/s.
        assert!(sent <= protocol::fec::MAX_PARITY_FRAME, "sent {sent}");
    }

    #[test]
    fn zero_rate_sends_nothing() {
        let mut b = TokenBucket::new(0, 200.0, 0.0);
        assert!(!b.try_take(1, 1000.0));
    }
}
