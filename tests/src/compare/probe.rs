//! The one probe both sides are measured with: once a second, every page is asked what its video
//! element shows (`currentTime`, paused or not, and, on hls.js, the program date time of that
//! position), and the harness turns each answer into a delay behind live with the side's own
//! capture clock ([`LatencyClock`]).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cdp::{Browser, Page};

/// Evaluated in each page; the same text for both sides.
pub const SAMPLE_JS: &str = "(() => { const v = document.querySelector('video'); \
    const h = window.cmp && window.cmp.hls; \
    const pd = h && h.playingDate ? h.playingDate.getTime() : null; \
    return JSON.stringify({ now: Date.now(), t: v ? v.currentTime : null, \
      paused: v ? v.paused : true, pd }); })()";

/// One page's answer to [`SAMPLE_JS`].
#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    /// The page's wall clock (Unix ms).
    pub now: f64,
    /// The video element's position (media timeline, s).
    pub t: Option<f64>,
    pub paused: bool,
    /// hls.js's `playingDate` (Unix ms): the program date time of the position.
    pub pd: Option<f64>,
}

pub async fn sample(page: &Page) -> Result<Sample> {
    let v = page.eval(SAMPLE_JS).await?;
    let text = v.as_str().context("the probe did not return a string")?;
    serde_json::from_str(text).context("parsing the probe's answer")
}

/// When the frame at a media position was captured, per side.
#[derive(Debug, Clone)]
pub enum LatencyClock {
    /// Our origin loops the source: fragment `f` goes out at `t0 + start_f` (its start, relative
    /// to the clip's first decode time `m0`), which is when an encoder that had just captured
    /// its last frame would publish it. So a frame at relative position `r` in fragment `f` was
    /// captured at `t0 + r - dur_f`.
    Ours {
        t0_unix_ms: f64,
        m0_s: f64,
        lap_s: f64,
        /// (start relative to `m0`, duration) of each fragment of one lap, seconds.
        fragments: Vec<(f64, f64)>,
    },
    /// hls.js maps the position to the segment's `EXT-X-PROGRAM-DATE-TIME` (the wall-clock time
    /// of its first frame) plus the offset into it.
    ProgramDateTime,
}

impl LatencyClock {
    /// Delay behind live (ms) of a sample, or `None` while the page is not playing.
    pub fn latency_ms(&self, s: &Sample) -> Option<f64> {
        if s.paused {
            return None;
        }
        let captured = match self {
            LatencyClock::ProgramDateTime => s.pd?,
            LatencyClock::Ours {
                t0_unix_ms,
                m0_s,
                lap_s,
                fragments,
            } => {
                let rel = s.t? - m0_s;
                let in_lap = if *lap_s > 0.0 {
                    rel.rem_euclid(*lap_s)
                } else {
                    rel
                };
                let i = fragments
                    .partition_point(|(start, _)| *start <= in_lap + 1e-6)
                    .saturating_sub(1);
                let dur = fragments.get(i).map_or(0.0, |f| f.1);
                t0_unix_ms + (rel - dur) * 1000.0
            }
        };
        Some((s.now - captured).max(0.0))
    }
}

/// What the measured run collected.
#[derive(Debug, Default)]
pub struct Sampled {
    pub latency_ms: Vec<f64>,
    pub failed_samples: usize,
    pub peak_rss_mb: f64,
}

/// Samples every page once a second for `seconds`, printing progress every 10 s.
pub async fn run(
    label: &str,
    browser: &Browser,
    pages: &[&Page],
    seconds: u64,
    clock: &LatencyClock,
) -> Sampled {
    let mut out = Sampled::default();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut next_progress = 10.0;
    while Instant::now() < end {
        let tick = Instant::now();
        for page in pages {
            match sample(page).await {
                Ok(s) => out.latency_ms.extend(clock.latency_ms(&s)),
                Err(e) => {
                    out.failed_samples += 1;
                    tracing::debug!("probe failed: {e:#}");
                }
            }
        }
        out.peak_rss_mb = out.peak_rss_mb.max(browser.rss_mb());
        let t = start.elapsed().as_secs_f64();
        if t >= next_progress {
            next_progress += 10.0;
            let recent = &out.latency_ms[out.latency_ms.len().saturating_sub(pages.len())..];
            let mean = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
            eprintln!(
                "  {label} t={t:>4.0}s  playing {}/{}  behind live {:.0} ms (mean of the last round)",
                recent.len(),
                pages.len(),
                mean
            );
        }
        // The probe's clock tick: one round a second, however long the round took.
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now: f64, t: f64, pd: Option<f64>) -> Sample {
        Sample {
            now,
            t: Some(t),
            paused: false,
            pd,
        }
    }

    #[test]
    fn our_clock_counts_the_fragment_as_an_encoder_would() {
        // 1 s fragments from media time 10 s, a 20 s lap, origin started at 1000 ms.
        let clock = LatencyClock::Ours {
            t0_unix_ms: 1000.0,
            m0_s: 10.0,
            lap_s: 20.0,
            fragments: (0..20).map(|i| (f64::from(i), 1.0)).collect(),
        };
        // Position 12.5 s: fragment 2 went out at 3000 ms, its frames captured from 2000 ms, this
        // one at 2500 ms.
        assert_eq!(clock.latency_ms(&at(5000.0, 12.5, None)), Some(2500.0));
        // Second lap: same offsets, 20 s later.
        assert_eq!(clock.latency_ms(&at(25_000.0, 32.5, None)), Some(2500.0));
        let paused = Sample {
            paused: true,
            ..at(5000.0, 12.5, None)
        };
        assert_eq!(clock.latency_ms(&paused), None);
    }

    #[test]
    fn hls_clock_is_the_program_date_time() {
        let c = LatencyClock::ProgramDateTime;
        assert_eq!(
            c.latency_ms(&at(10_000.0, 3.0, Some(4_000.0))),
            Some(6000.0)
        );
        assert_eq!(c.latency_ms(&at(10_000.0, 3.0, None)), None);
    }
}
