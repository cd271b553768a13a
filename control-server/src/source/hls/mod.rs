//! HLS/CMAF pull: the origin follows a live `.m3u8` that already exists (a CDN's, an encoder's)
//! and publishes it as a channel, so a site adds peer-to-peer delivery without touching its
//! encoder.
//!
//! * [`playlist`]: the sans-IO rules: rendition choice, which segments are new, reload timing,
//!   backoff, what is not CMAF.
//! * [`pace`]: when each segment goes out (sans-IO): at the pace of the segments' durations, so
//!   the segments a pull starts with are a cushion against a stalling source.
//! * [`fetch`]: one GET, whole, bounded in time and size, its failure classified.
//! * [`pull`]: the tokio side, per channel: a fetcher task that loads the playlist, fetches the
//!   `EXT-X-MAP` init segment once and every new segment once, checks each whole segment, and
//!   hands it to a publisher task that paces it out through
//!   [`crate::source::ingest::LiveIngest`].
//! * [`api`]: `POST /api/operator/pull`, `DELETE /api/operator/pull/{channel}`,
//!   `GET /api/operator/pulls`.
//!
//! [`PullBoard`] (on [`crate::AppState`]) holds each pull's status for the dashboard and
//! `/metrics`.

pub mod api;
pub mod fetch;
pub mod pace;
pub mod playlist;
pub mod pull;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::watch;

pub use playlist::{RenditionChoice, CMAF_HINT};

use crate::AppState;

/// Why a pull cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PullStartError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("channel {0:?} already has a live source")]
    SourceAttached(String),
    #[error(transparent)]
    Channel(#[from] crate::ServerError),
    #[error("cannot start an HTTP client: {0}")]
    Client(String),
}

/// `--pull CHANNEL=URL`, split.
pub fn parse_spec(spec: &str) -> Option<(&str, &str)> {
    let (channel, url) = spec.split_once('=')?;
    (!channel.is_empty() && !url.is_empty()).then_some((channel, url))
}

/// Where a pull is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading the (multivariant) playlist for the first time.
    Starting,
    /// Following the live playlist.
    Following,
    /// The last request failed; retrying with backoff.
    Retrying,
    /// The playlist ended (`EXT-X-ENDLIST`).
    Ended,
    /// The stream cannot be pulled (MPEG-TS, encrypted, no such rendition): see `last_error`.
    Refused,
    /// Stopped by the operator.
    Stopped,
}

/// Counters and state of one pull, written by its task, read by the dashboard and `/metrics`.
#[derive(Debug)]
pub struct PullStatus {
    pub channel: String,
    pub url: String,
    pub rendition: RenditionChoice,
    /// Segments published.
    pub segments: AtomicU64,
    /// Media bytes published (segments and init segments).
    pub bytes: AtomicU64,
    /// Requests that failed and were retried (connect refused, HTTP errors, timeouts,
    /// truncated bodies, unparsable playlists).
    pub retries: AtomicU64,
    /// Segments that were not fMP4 and were skipped.
    pub refused_segments: AtomicU64,
    /// Segments that left the playlist before they could be fetched.
    pub skipped_segments: AtomicU64,
    /// Loads of the playlist that went back in time (ignored).
    pub backwards: AtomicU64,
    /// Playlist loads.
    pub polls: AtomicU64,
    state: Mutex<PullState>,
}

#[derive(Debug, Clone, Serialize)]
struct PullState {
    phase: Phase,
    media_url: Option<String>,
    last_error: Option<String>,
    last_error_ms: Option<u64>,
    last_segment_seq: Option<u64>,
    last_segment_ms: Option<u64>,
}

/// What the dashboard and `GET /api/operator/pulls` show of a pull.
#[derive(Debug, Clone, Serialize)]
pub struct PullView {
    pub channel: String,
    pub url: String,
    pub rendition: String,
    pub phase: Phase,
    /// The media playlist followed (the chosen rendition's, for a multivariant playlist).
    pub media_url: Option<String>,
    pub segments: u64,
    pub bytes: u64,
    pub retries: u64,
    pub refused_segments: u64,
    pub skipped_segments: u64,
    pub backwards: u64,
    pub polls: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub last_segment_seq: Option<u64>,
    pub last_segment_ms: Option<u64>,
}

impl PullStatus {
    fn new(channel: &str, url: &str, rendition: RenditionChoice) -> Self {
        PullStatus {
            channel: channel.into(),
            url: url.into(),
            rendition,
            segments: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            refused_segments: AtomicU64::new(0),
            skipped_segments: AtomicU64::new(0),
            backwards: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            state: Mutex::new(PullState {
                phase: Phase::Starting,
                media_url: None,
                last_error: None,
                last_error_ms: None,
                last_segment_seq: None,
                last_segment_ms: None,
            }),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut PullState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn phase(&self) -> Phase {
        self.with_state(|s| s.phase)
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.with_state(|s| s.phase = phase);
    }

    pub(crate) fn set_media_url(&self, url: &str) {
        self.with_state(|s| s.media_url = Some(url.into()));
    }

    pub(crate) fn error(&self, message: String) {
        self.with_state(|s| {
            s.last_error = Some(message);
            s.last_error_ms = Some(crate::channel::now_ms());
        });
    }

    pub(crate) fn published(&self, seq: u64, bytes: usize) {
        self.segments.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.with_state(|s| {
            s.last_segment_seq = Some(seq);
            s.last_segment_ms = Some(crate::channel::now_ms());
        });
    }

    pub fn view(&self) -> PullView {
        let s = self.with_state(|s| s.clone());
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PullView {
            channel: self.channel.clone(),
            url: self.url.clone(),
            rendition: self.rendition.to_string(),
            phase: s.phase,
            media_url: s.media_url,
            segments: n(&self.segments),
            bytes: n(&self.bytes),
            retries: n(&self.retries),
            refused_segments: n(&self.refused_segments),
            skipped_segments: n(&self.skipped_segments),
            backwards: n(&self.backwards),
            polls: n(&self.polls),
            last_error: s.last_error,
            last_error_ms: s.last_error_ms,
            last_segment_seq: s.last_segment_seq,
            last_segment_ms: s.last_segment_ms,
        }
    }
}

struct PullEntry {
    status: Arc<PullStatus>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Every pull of the server, by channel (one pull per channel).
#[derive(Default)]
pub struct PullBoard {
    pulls: Mutex<HashMap<String, PullEntry>>,
}

impl PullBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PullEntry>> {
        self.pulls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The status of the channel's pull, if it has (or had) one.
    pub fn status(&self, channel: &str) -> Option<Arc<PullStatus>> {
        self.lock().get(channel).map(|e| e.status.clone())
    }

    /// Every pull's status, by channel name.
    pub fn all(&self) -> Vec<Arc<PullStatus>> {
        let mut v: Vec<Arc<PullStatus>> = self.lock().values().map(|e| e.status.clone()).collect();
        v.sort_by(|a, b| a.channel.cmp(&b.channel));
        v
    }

    /// Stops the channel's pull and waits (up to 5 s) for its task to end: it ends at its next
    /// network wait, never in the middle of publishing a segment. Returns the pull's last status,
    /// if there was one.
    pub async fn stop(&self, channel: &str) -> Option<Arc<PullStatus>> {
        let entry = self.lock().remove(channel)?;
        let _ = entry.stop.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), entry.task).await;
        Some(entry.status)
    }
}

/// Starts pulling `url` into channel `channel` (created when missing). Must run inside a tokio
/// runtime.
pub fn start(
    state: &AppState,
    channel: &str,
    url: &str,
    rendition: RenditionChoice,
) -> Result<Arc<PullStatus>, PullStartError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| PullStartError::BadUrl(url.into()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(PullStartError::BadUrl(url.into()));
    }
    let client = fetch::client().map_err(|e| PullStartError::Client(e.to_string()))?;
    let ch = match state.channel(channel) {
        Some(ch) => ch,
        None => state.create_channel(channel, state.config.default_stream_kbps)?,
    };
    if ch.source_attached.swap(true, Ordering::SeqCst) {
        return Err(PullStartError::SourceAttached(channel.into()));
    }
    let status = Arc::new(PullStatus::new(channel, url, rendition.clone()));
    let (stop, stopped) = watch::channel(false);
    tracing::info!(channel, url, %rendition, "HLS pull started");
    let puller = pull::Puller::new(ch, status.clone(), client, parsed, rendition, stopped);
    let task = tokio::spawn(puller.run());
    // A finished pull (ended, refused) of this channel leaves its status until replaced.
    let entry = PullEntry {
        status: status.clone(),
        stop,
        task,
    };
    if let Some(old) = state.pulls.lock().insert(channel.to_string(), entry) {
        let _ = old.stop.send(true);
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_specs_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_spec("live=https://cdn.example/a.m3u8?x=1"),
            Some(("live", "https://cdn.example/a.m3u8?x=1"))
        );
        assert_eq!(parse_spec("live"), None);
        assert_eq!(parse_spec("=https://x/a.m3u8"), None);
        assert_eq!(parse_spec("live="), None);
    }

    #[test]
    fn a_fresh_status_is_starting_and_counts_what_is_published() {
        let s = PullStatus::new("ch", "http://x/a.m3u8", RenditionChoice::Lowest);
        assert_eq!(s.phase(), Phase::Starting);
        s.published(7, 1000);
        s.error("GET http://x/a.m3u8: HTTP 404".into());
        let v = s.view();
        assert_eq!(
            (v.segments, v.bytes, v.last_segment_seq),
            (1, 1000, Some(7))
        );
        assert_eq!(v.rendition, "lowest");
        assert!(v.last_error.as_ref().is_some_and(|e| e.contains("404")));
        let json = serde_json::to_value(&v).expect("JSON");
        assert_eq!(json["phase"], "starting");
    }
}
