//! A viewer's player, modelled on `peer-wasm/src/web/media.rs`: media becomes playable a whole
//! fragment at a time (a fragment's packets delivered in order); playback starts with 1.5 s
//! buffered (or 3 s after the first media, whatever is buffered), 2.5 s behind the buffered
//! end; the playhead then runs with the clock. Reaching the end of the buffered media is a
//! stall, counted as the page counts a `waiting` event: only after 1 s of playback (start-up
//! hiccups are start-up). A playhead more than 5 s behind the buffered end jumps to 2 s behind
//! it (the page's live catch-up), which also crosses gaps the engine skipped.

/// Media buffered before playback starts, ms.
const STARTUP_BUFFER_MS: f64 = 1500.0;
/// Start anyway this long after the first media.
const STARTUP_WAIT_MS: f64 = 3000.0;
/// Playback starts this far behind the buffered end (the page's TARGET_LAG_S + 0.5).
const START_LAG_MS: f64 = 2500.0;
const STARTUP_GRACE_MS: f64 = 1000.0;
const MAX_LAG_MS: f64 = 5000.0;
const TARGET_LAG_MS: f64 = 2000.0;
/// Media that must be ahead of a stalled playhead for playback to resume.
const RESUME_MS: f64 = 100.0;

#[derive(Debug, Clone, Default)]
pub struct Playout {
    joined_ms: f64,
    first_media_ms: Option<f64>,
    /// Buffered media ranges `[start, end)` in media time (ms), at most a few.
    ranges: Vec<(f64, f64)>,
    pub startup_ms: Option<f64>,
    playhead: f64,
    playing: bool,
    started_at_media: f64,
    last_ms: f64,
    pub stalls: u32,
    pub stalled_ms: f64,
}

impl Playout {
    pub fn new(joined_ms: f64) -> Self {
        Playout {
            joined_ms,
            last_ms: joined_ms,
            ..Playout::default()
        }
    }

    pub fn started(&self) -> bool {
        self.startup_ms.is_some()
    }

    /// A whole fragment of media `[start, end)` became playable at `now`.
    pub fn add(&mut self, start: f64, end: f64, now: f64) {
        self.advance(now);
        self.first_media_ms.get_or_insert(now);
        match self.ranges.last_mut() {
            Some(last) if start <= last.1 + 1.0 => last.1 = last.1.max(end),
            _ => self.ranges.push((start, end)),
        }
        // Old ranges behind the playhead are of no use.
        while self.ranges.len() > 4 {
            self.ranges.remove(0);
        }
        self.advance(now);
    }

    /// Media ahead of the playhead (ms), what a page reads from its video element: `None`
    /// before playback started; 0 while stalled.
    pub fn slack(&self) -> Option<f64> {
        if !self.started() {
            return None;
        }
        if !self.playing {
            return Some(0.0);
        }
        Some(
            self.current_end()
                .map_or(0.0, |e| (e - self.playhead).max(0.0)),
        )
    }

    fn buffered_end(&self) -> Option<f64> {
        self.ranges.last().map(|r| r.1)
    }

    /// End of the range the playhead is in (it plays up to there).
    fn current_end(&self) -> Option<f64> {
        self.ranges
            .iter()
            .find(|r| r.0 <= self.playhead + 1e-6 && self.playhead <= r.1 + 1e-6)
            .map(|r| r.1)
    }

    /// Moves the playhead to `now`.
    pub fn advance(&mut self, now: f64) {
        let dt = (now - self.last_ms).max(0.0);
        self.last_ms = now;
        let Some(end) = self.buffered_end() else {
            return;
        };
        if !self.started() {
            let start = self.ranges.first().map_or(end, |r| r.0);
            let waited = self.first_media_ms.map_or(0.0, |t| now - t);
            if end - start >= STARTUP_BUFFER_MS || waited >= STARTUP_WAIT_MS {
                self.startup_ms = Some(now - self.joined_ms);
                self.playhead = start.max(end - START_LAG_MS);
                self.started_at_media = self.playhead;
                self.playing = true;
            }
            return;
        }
        if self.playing {
            let limit = self.current_end().unwrap_or(self.playhead);
            self.playhead += dt;
            if self.playhead >= limit {
                self.stalled_ms += self.playhead - limit;
                self.playhead = limit;
                self.playing = false;
                if limit - self.started_at_media >= STARTUP_GRACE_MS {
                    self.stalls += 1;
                }
            }
        } else {
            self.stalled_ms += dt;
            if self
                .current_end()
                .is_some_and(|e| e - self.playhead >= RESUME_MS)
            {
                self.playing = true;
            }
        }
        // Live catch-up: far behind the buffered end, jump (the page's own seek, no stall).
        if end - self.playhead > MAX_LAG_MS {
            self.playhead = end - TARGET_LAG_MS;
            self.ranges.retain(|r| r.1 > self.playhead);
            if let Some(first) = self.ranges.first_mut() {
                first.0 = first.0.max(self.playhead);
                if first.0 > self.playhead {
                    self.playhead = first.0;
                }
            }
            self.playing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one-second fragments `from..to` (media time = index s), each arriving at
    /// `at(i)` ms, advancing every 50 ms up to `until` ms.
    fn run(p: &mut Playout, frags: &[(f64, f64)], until: f64) {
        let mut i = 0;
        let mut t = 0.0;
        while t <= until {
            while i < frags.len() && frags[i].1 <= t {
                let m = frags[i].0;
                p.add(m, m + 1000.0, t);
                i += 1;
            }
            p.advance(t);
            t += 50.0;
        }
    }

    #[test]
    fn steady_fragments_play_without_a_stall() {
        let mut p = Playout::new(0.0);
        // Fragment i (media i s) arrives at i s + 300 ms.
        let frags: Vec<(f64, f64)> = (0..60)
            .map(|i| (f64::from(i) * 1000.0, f64::from(i) * 1000.0 + 300.0))
            .collect();
        run(&mut p, &frags, 60_000.0);
        assert!(p.started());
        assert_eq!(p.stalls, 0);
        // Started once 1.5 s were buffered: after the second fragment.
        assert_eq!(p.startup_ms, Some(1300.0));
    }

    #[test]
    fn a_late_fragment_after_startup_is_one_stall() {
        let mut p = Playout::new(0.0);
        let mut frags: Vec<(f64, f64)> = (0..30)
            .map(|i| (f64::from(i) * 1000.0, f64::from(i) * 1000.0 + 300.0))
            .collect();
        // Fragment 10 and the next ones are 3.5 s late (they pile up behind it).
        for f in frags.iter_mut().skip(10) {
            f.1 = f.1.max(13_800.0);
        }
        run(&mut p, &frags, 30_000.0);
        assert_eq!(p.stalls, 1);
        assert!(p.stalled_ms > 1000.0);
    }

    #[test]
    fn a_skipped_gap_is_crossed_by_the_live_catch_up() {
        let mut p = Playout::new(0.0);
        let frags: Vec<(f64, f64)> = (0..30)
            .filter(|i| *i != 5)
            .map(|i| (f64::from(i) * 1000.0, f64::from(i) * 1000.0 + 300.0))
            .collect();
        run(&mut p, &frags, 30_000.0);
        // One stall at the hole, then the catch-up jumps over it and playback goes on.
        assert_eq!(p.stalls, 1);
        assert!(p.playing);
    }
}
