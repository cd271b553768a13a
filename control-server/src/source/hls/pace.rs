//! Pacing of pulled segments (sans-IO): the origin releases segments at the pace of their
//! durations rather than as they arrive, so the few segments a pull starts with become a cushion
//! that absorbs a source stalling or a slow fetch, instead of a burst at the start and a gap at
//! every hiccup that the viewers' two-second buffer would have to absorb alone.
//!
//! Segment `i` is due at `anchor + (media_i - anchor_media)`, where `media_i` is the sum of the
//! durations before it. A segment that comes later than its due time (the cushion ran dry) is
//! released at once and re-anchors the schedule, so a backlog that then arrives in a burst is
//! paced out again and becomes the new cushion. A queue longer than `max_queue` is released at
//! once (re-anchoring too), which bounds the delay the cushion adds.

use std::time::Duration;

/// Late or early by more than this re-anchors the schedule.
const SLACK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Pacer {
    /// (wall time, media time) of the schedule's origin.
    anchor: Option<(Duration, f64)>,
    /// Media time of the next segment: the durations released so far.
    media: f64,
    max_queue: usize,
}

impl Pacer {
    pub fn new(max_queue: usize) -> Self {
        Pacer {
            anchor: None,
            media: 0.0,
            max_queue: max_queue.max(1),
        }
    }

    fn scheduled(&self) -> Option<Duration> {
        let (wall, media) = self.anchor?;
        Some(wall + Duration::from_secs_f64((self.media - media).max(0.0)))
    }

    /// When the next segment should go out, `queued` segments waiting (it included); `now` if
    /// it is overdue.
    pub fn due(&self, now: Duration, queued: usize) -> Duration {
        if queued > self.max_queue {
            return now;
        }
        self.scheduled().map_or(now, |d| d.max(now))
    }

    /// Records that a segment of `duration` seconds went out at `now`.
    pub fn released(&mut self, now: Duration, duration: f64) {
        let on_time = self
            .scheduled()
            .is_some_and(|d| now <= d + SLACK && d <= now + SLACK);
        if !on_time {
            self.anchor = Some((now, self.media));
        }
        self.media += duration.max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn the_starting_segments_go_out_at_their_pace() {
        let mut p = Pacer::new(6);
        let mut now = s(10.0);
        let mut out = Vec::new();
        // Three segments of 1 s arrive at once.
        for queued in (1..=3).rev() {
            now = p.due(now, queued);
            out.push(now.as_secs_f64());
            p.released(now, 1.0);
        }
        assert_eq!(out, vec![10.0, 11.0, 12.0]);
    }

    #[test]
    fn a_late_segment_goes_out_at_once_and_the_backlog_is_paced_again() {
        let mut p = Pacer::new(6);
        p.released(s(0.0), 1.0);
        p.released(s(1.0), 1.0);
        // Due at 2 s; the source stalled and it arrives at 4.5 s.
        assert_eq!(p.due(s(4.5), 1), s(4.5));
        p.released(s(4.5), 1.0);
        // Three more arrived in the same burst: paced from the new anchor.
        assert_eq!(p.due(s(4.6), 3), s(5.5));
        p.released(s(5.5), 1.0);
        assert_eq!(p.due(s(5.5), 2), s(6.5));
    }

    #[test]
    fn a_long_queue_is_released_at_once() {
        let mut p = Pacer::new(3);
        p.released(s(0.0), 2.0);
        assert_eq!(p.due(s(0.5), 3), s(2.0));
        assert_eq!(p.due(s(0.5), 4), s(0.5));
        p.released(s(0.5), 2.0);
        // The early release re-anchored the schedule.
        assert_eq!(p.due(s(0.6), 1), s(2.5));
    }
}
