//! How often the origin publishes a fragment: the spacing of the last publications (wall clock),
//! which is how long a viewer's buffered end stands still between two steps. Players size their
//! lag behind the live edge from it (the `fragment_ms` of the Welcome): a stream with 2 s or 4 s
//! keyframe intervals, cut a fragment per keyframe, needs more cushion than the 1 s demo clip.
//!
//! Source-agnostic: a looped clip, an ffmpeg pipe, an RTMP publisher and an HLS pull (whose
//! fragments come a segment at a time) all publish through [`crate::channel::Channel`], and the
//! spacing is measured there. Pure: times go in as arguments.

use std::collections::VecDeque;

/// Publications remembered: the measure follows a change of encoder settings within this many.
const RECENT: usize = 16;

/// Spacings longer than this are a source pausing or reconnecting, not its cadence.
pub const MAX_CADENCE_MS: u64 = 10_000;

#[derive(Debug, Default, Clone)]
pub struct Cadence {
    last_ms: Option<u64>,
    recent: VecDeque<u64>,
    /// What the source announced before publishing (a looped clip knows its fragments).
    seeded_ms: Option<u32>,
}

impl Cadence {
    /// The source knows its longest fragment in advance (a looped clip): used until measured.
    pub fn seed(&mut self, ms: u32) {
        self.seeded_ms = Some(ms.clamp(1, MAX_CADENCE_MS as u32));
    }

    /// A fragment was published at `now_ms`. Several at the same instant (a segment's worth)
    /// count as one step.
    pub fn note(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            let gap = now_ms.saturating_sub(last);
            if gap == 0 {
                return;
            }
            if gap <= MAX_CADENCE_MS {
                self.recent.push_back(gap);
                while self.recent.len() > RECENT {
                    self.recent.pop_front();
                }
            }
        }
        self.last_ms = Some(now_ms);
    }

    /// The longest recent spacing between publications (ms), else the seeded one, else `None`.
    pub fn fragment_ms(&self) -> Option<u32> {
        match self.recent.iter().max() {
            // Timer jitter of a few ms on a looped clip is not worth a different answer.
            Some(&m) if self.recent.len() >= 2 => Some(m as u32),
            _ => self
                .seeded_ms
                .or(self.recent.iter().max().map(|&m| m as u32)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_seeded_or_measured() {
        let mut c = Cadence::default();
        assert_eq!(c.fragment_ms(), None);
        c.note(1_000);
        assert_eq!(c.fragment_ms(), None);
        c.seed(2_000);
        assert_eq!(c.fragment_ms(), Some(2_000));
    }

    #[test]
    fn measured_spacing_replaces_the_seed() {
        let mut c = Cadence::default();
        c.seed(1_000);
        for t in [0, 4_000, 8_000, 12_000] {
            c.note(t);
        }
        assert_eq!(c.fragment_ms(), Some(4_000));
    }

    #[test]
    fn segment_bursts_count_as_one_step() {
        // An HLS pull publishes a 6 s segment's three fragments at once.
        let mut c = Cadence::default();
        for t in [0, 0, 0, 6_000, 6_000, 6_000, 12_000] {
            c.note(t);
        }
        assert_eq!(c.fragment_ms(), Some(6_000));
    }

    #[test]
    fn a_pause_is_not_the_cadence_and_old_steps_age_out() {
        let mut c = Cadence::default();
        c.note(0);
        c.note(4_000);
        c.note(60_000); // publisher reconnected after 56 s
        c.note(62_000);
        assert_eq!(c.fragment_ms(), Some(4_000));
        for i in 1..=RECENT as u64 {
            c.note(62_000 + i * 2_000);
        }
        assert_eq!(c.fragment_ms(), Some(2_000));
    }
}
