//! The tokio side of an HLS pull: one task per channel that loads the playlist, fetches what
//! [`super::playlist::Follower`] says is new, checks each segment whole, and only then publishes
//! it, so viewers never see half a segment. Network errors are retried with
//! [`super::playlist::Backoff`] and counted in the channel's [`super::PullStatus`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use m3u8_rs::Playlist;
use reqwest::{Client, Url};

use super::fetch::{fetch, FetchError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::pace::Pacer;
use super::playlist::{
    choose_variant, reload_after, request_timeout, sniff_transport_stream, Backoff, Follower,
    NotCmaf, RenditionChoice, Resource, SegmentRef,
};
use super::{Phase, PullStatus};
use crate::channel::Channel;
use crate::origin::{Fmp4Item, Fmp4Splitter};
use crate::source::ingest::LiveIngest;

/// Largest playlist we read.
const PLAYLIST_LIMIT: usize = 4 << 20;
/// Largest segment or init segment we read (a 10 s segment at 50 Mbit/s is about 60 MB).
const SEGMENT_LIMIT: usize = 96 << 20;
/// Attempts at one segment before it is given up (about 10 s with the backoff): by then a live
/// window has usually moved past it.
const SEGMENT_ATTEMPTS: u32 = 6;
/// Target duration assumed before the first media playlist says it.
const DEFAULT_TARGET: Duration = Duration::from_secs(4);
/// Segments waiting to be paced out beyond which they go out at once (bounds the delay).
const MAX_QUEUE: usize = 6;

/// Why a pull ended.
enum Stop {
    Operator,
    Ended,
    Refused(String),
}

/// The init segment in force: where it came from and its bytes.
struct Init {
    url: Url,
    range: Option<(u64, Option<u64>)>,
    bytes: Arc<Vec<u8>>,
}

/// A segment fetched whole and checked, on its way to the publisher.
struct Ready {
    seq: u64,
    /// Seconds, from `EXTINF`.
    duration: f64,
    /// The init segment it needs (a new one starts a new splitter).
    init: Arc<Vec<u8>>,
    bytes: Vec<u8>,
}

/// One channel's pull task.
pub struct Puller {
    channel: Arc<Channel>,
    status: Arc<PullStatus>,
    client: Client,
    url: Url,
    rendition: RenditionChoice,
    stop: watch::Receiver<bool>,
    follower: Follower,
    backoff: Backoff,
    target: Duration,
    init: Option<Init>,
    /// Checked segments go to the publisher task, which paces them out.
    out: Option<mpsc::Sender<Ready>>,
    /// End of the previous byte range per URI (a `BYTERANGE` without offset follows it).
    range_end: Option<(Url, u64)>,
}

impl Puller {
    pub fn new(
        channel: Arc<Channel>,
        status: Arc<PullStatus>,
        client: Client,
        url: Url,
        rendition: RenditionChoice,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Puller {
            channel,
            status,
            client,
            url,
            rendition,
            stop,
            follower: Follower::new(),
            backoff: Backoff::default(),
            target: DEFAULT_TARGET,
            init: None,
            out: None,
            range_end: None,
        }
    }

    /// Runs until the operator stops it, the playlist ends, or the stream is refused.
    pub async fn run(mut self) {
        let name = self.channel.name.clone();
        let (tx, rx) = mpsc::channel(64);
        self.out = Some(tx);
        let publisher = tokio::spawn(publish(
            self.channel.clone(),
            self.status.clone(),
            rx,
            self.stop.clone(),
        ));
        let stop = match self.follow().await {
            Err(stop) => stop,
            Ok(never) => match never {},
        };
        // What is queued still goes out at its pace (unless the operator stopped the pull).
        self.out = None;
        let _ = publisher.await;
        let phase = match stop {
            Stop::Operator => {
                tracing::info!(channel = %name, "HLS pull stopped");
                Phase::Stopped
            }
            Stop::Ended => {
                tracing::info!(channel = %name, "HLS pull: the playlist ended (EXT-X-ENDLIST)");
                Phase::Ended
            }
            Stop::Refused(why) => {
                tracing::error!(channel = %name, url = %self.url, "HLS pull refused: {why}");
                self.status.error(why);
                Phase::Refused
            }
        };
        self.status.set_phase(phase);
        self.channel.source_attached.store(false, Ordering::SeqCst);
    }

    /// Waits until `until`, or returns `Err(Stop::Operator)` if the operator stops the pull first.
    async fn sleep(&mut self, until: Instant) -> Result<(), Stop> {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(until) => Ok(()),
            _ = stop.wait_for(|s| *s) => Err(Stop::Operator),
        }
    }

    /// GETs `url`, retrying failures with backoff (at most `attempts` times, if given: then
    /// `Ok(None)`). Every failure is counted and shown as the pull's last error.
    async fn fetch_retrying(
        &mut self,
        url: &Url,
        range: Option<(u64, u64)>,
        limit: usize,
        attempts: Option<u32>,
    ) -> Result<Option<(Url, Vec<u8>)>, Stop> {
        let mut tries = 0;
        loop {
            let timeout = request_timeout(self.target);
            let result = {
                let mut stop = self.stop.clone();
                tokio::select! {
                    r = fetch(&self.client, url, range, timeout, limit) => r,
                    _ = stop.wait_for(|s| *s) => return Err(Stop::Operator),
                }
            };
            match result {
                Ok(ok) => {
                    if self.backoff.failures() > 0 {
                        tracing::info!(
                            channel = %self.channel.name,
                            failures = self.backoff.failures(),
                            "HLS pull: the source answers again"
                        );
                    }
                    self.backoff.succeed();
                    return Ok(Some(ok));
                }
                Err(e) => {
                    tries += 1;
                    self.failed(e.to_string());
                    if attempts.is_some_and(|n| tries >= n) {
                        return Ok(None);
                    }
                    let wait = self.backoff.fail();
                    self.sleep(Instant::now() + wait).await?;
                }
            }
        }
    }

    fn failed(&mut self, message: String) {
        tracing::warn!(channel = %self.channel.name, "HLS pull: {message}; retrying");
        self.status.retries.fetch_add(1, Ordering::Relaxed);
        self.status.error(message);
        self.status.set_phase(Phase::Retrying);
    }

    /// The media playlist to follow: `self.url` itself, or the chosen rendition of it.
    async fn resolve(&mut self) -> Result<Url, Stop> {
        loop {
            let url = self.url.clone();
            let Some((base, body)) = self
                .fetch_retrying(&url, None, PLAYLIST_LIMIT, None)
                .await?
            else {
                continue;
            };
            match m3u8_rs::parse_playlist_res(&body) {
                Ok(Playlist::MediaPlaylist(_)) => return Ok(base),
                Ok(Playlist::MasterPlaylist(master)) => {
                    let Some(v) = choose_variant(&master, &self.rendition) else {
                        return Err(Stop::Refused(format!(
                            "no rendition of the multivariant playlist matches {} ({} renditions)",
                            self.rendition,
                            master.variants.len()
                        )));
                    };
                    let media = base
                        .join(&v.uri)
                        .map_err(|e| Stop::Refused(format!("rendition URI {:?}: {e}", v.uri)))?;
                    if let Some(group) = &v.audio {
                        let separate = master
                            .alternatives
                            .iter()
                            .any(|a| &a.group_id == group && a.uri.is_some());
                        if separate {
                            tracing::warn!(
                                channel = %self.channel.name,
                                group,
                                "HLS pull: the rendition's audio is a separate playlist \
                                 (EXT-X-MEDIA); only the rendition's own playlist is pulled"
                            );
                        }
                    }
                    tracing::info!(
                        channel = %self.channel.name,
                        bandwidth = v.bandwidth,
                        resolution = ?v.resolution.map(|r| format!("{}x{}", r.width, r.height)),
                        %media,
                        "HLS pull: rendition chosen"
                    );
                    return Ok(media);
                }
                Err(e) => {
                    let detail: String = format!("{e:?}").chars().take(120).collect();
                    self.failed(
                        FetchError::Playlist {
                            url: url.to_string(),
                            detail,
                        }
                        .to_string(),
                    );
                    let wait = self.backoff.fail();
                    self.sleep(Instant::now() + wait).await?;
                }
            }
        }
    }

    async fn follow(&mut self) -> Result<std::convert::Infallible, Stop> {
        let media_url = self.resolve().await?;
        self.status.set_media_url(media_url.as_str());
        loop {
            let began = Instant::now();
            let Some((base, body)) = self
                .fetch_retrying(&media_url, None, PLAYLIST_LIMIT, None)
                .await?
            else {
                continue;
            };
            let pl = match m3u8_rs::parse_media_playlist_res(&body) {
                Ok(pl) => pl,
                Err(e) => {
                    let detail: String = format!("{e:?}").chars().take(120).collect();
                    self.failed(
                        FetchError::Playlist {
                            url: media_url.to_string(),
                            detail,
                        }
                        .to_string(),
                    );
                    let wait = self.backoff.fail();
                    self.sleep(Instant::now() + wait).await?;
                    continue;
                }
            };
            self.status.polls.fetch_add(1, Ordering::Relaxed);
            self.status.set_phase(Phase::Following);
            self.target = Duration::from_secs(pl.target_duration.max(1));
            let was_backwards = self.follower.is_backwards();
            let update = self.follower.update(&pl);
            if let Some((had, now)) = update.backwards {
                self.status.backwards.fetch_add(1, Ordering::Relaxed);
                if !was_backwards {
                    let message = format!(
                        "the playlist went back in time: its media sequence numbers went down \
                         (it now lists up to {}, and {} was published already); ignored until it \
                         passes that point (restart the pull after an encoder restart)",
                        now.saturating_sub(1),
                        had.saturating_sub(1)
                    );
                    tracing::warn!(channel = %self.channel.name, "HLS pull: {message}");
                    self.status.error(message);
                }
            }
            if update.skipped > 0 {
                self.status
                    .skipped_segments
                    .fetch_add(update.skipped, Ordering::Relaxed);
                tracing::warn!(
                    channel = %self.channel.name,
                    skipped = update.skipped,
                    "HLS pull: segments left the playlist before they could be fetched"
                );
            }
            for seg in update.new {
                if *self.stop.borrow() {
                    return Err(Stop::Operator);
                }
                self.take(&base, seg).await?;
            }
            if update.ended {
                return Err(Stop::Ended);
            }
            self.sleep(began + reload_after(self.target, update.changed))
                .await?;
        }
    }

    /// The absolute byte range of a resource (`BYTERANGE` without offset follows the previous
    /// range of the same URI).
    fn range_of(&mut self, url: &Url, r: &Resource) -> Option<(u64, u64)> {
        let (length, offset) = r.byte_range?;
        let offset = offset.unwrap_or_else(|| match &self.range_end {
            Some((u, end)) if u == url => *end,
            _ => 0,
        });
        self.range_end = Some((url.clone(), offset + length));
        Some((offset, length))
    }

    /// Fetches, checks and publishes one segment (and its init segment when it changed).
    async fn take(&mut self, base: &Url, seg: SegmentRef) -> Result<(), Stop> {
        if let Some(refusal) = seg.refusal() {
            return Err(Stop::Refused(refusal.to_string()));
        }
        let Some(map) = &seg.map else {
            return self.take_without_map(base, &seg).await;
        };
        let init_url = base
            .join(&map.uri)
            .map_err(|e| Stop::Refused(format!("EXT-X-MAP URI {:?}: {e}", map.uri)))?;
        let same = self
            .init
            .as_ref()
            .is_some_and(|i| i.url == init_url && i.range == map.byte_range);
        if !same {
            let range = self.range_of(&init_url, map);
            let Some((_, bytes)) = self
                .fetch_retrying(&init_url, range, SEGMENT_LIMIT, None)
                .await?
            else {
                return Ok(());
            };
            if sniff_transport_stream(&bytes) {
                return Err(Stop::Refused(NotCmaf::TransportStream.to_string()));
            }
            let mut probe = Fmp4Splitter::new();
            let checked = probe.push(&bytes).and_then(|_| probe.finish());
            if let Err(e) = checked {
                return Err(Stop::Refused(format!(
                    "the init segment (EXT-X-MAP) {init_url} is not fragmented MP4: {e}"
                )));
            }
            if self.init.is_some() {
                tracing::info!(
                    channel = %self.channel.name,
                    %init_url,
                    "HLS pull: new init segment (EXT-X-MAP changed)"
                );
            }
            self.status
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.init = Some(Init {
                url: init_url,
                range: map.byte_range,
                bytes: Arc::new(bytes),
            });
        }
        let url = base
            .join(&seg.resource.uri)
            .map_err(|e| Stop::Refused(format!("segment URI {:?}: {e}", seg.resource.uri)))?;
        let range = self.range_of(&url, &seg.resource);
        let Some((_, bytes)) = self
            .fetch_retrying(&url, range, SEGMENT_LIMIT, Some(SEGMENT_ATTEMPTS))
            .await?
        else {
            self.status.skipped_segments.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                channel = %self.channel.name,
                seq = seg.seq,
                %url,
                "HLS pull: segment given up after {SEGMENT_ATTEMPTS} attempts"
            );
            return Ok(());
        };
        if sniff_transport_stream(&bytes) {
            return Err(Stop::Refused(NotCmaf::TransportStream.to_string()));
        }
        self.check_and_queue(&seg, &url, bytes).await;
        Ok(())
    }

    /// A playlist without `EXT-X-MAP`: MPEG-TS (refused), or something we cannot use.
    async fn take_without_map(&mut self, base: &Url, seg: &SegmentRef) -> Result<(), Stop> {
        let url = base
            .join(&seg.resource.uri)
            .map_err(|e| Stop::Refused(format!("segment URI {:?}: {e}", seg.resource.uri)))?;
        let range = self.range_of(&url, &seg.resource);
        let Some((_, bytes)) = self
            .fetch_retrying(&url, range, SEGMENT_LIMIT, Some(SEGMENT_ATTEMPTS))
            .await?
        else {
            return Ok(());
        };
        if sniff_transport_stream(&bytes) {
            return Err(Stop::Refused(NotCmaf::TransportStream.to_string()));
        }
        Err(Stop::Refused(format!(
            "the playlist has no EXT-X-MAP (init segment), so its segments are not CMAF; {}",
            super::CMAF_HINT
        )))
    }

    /// Checks a whole segment against the init segment and queues it for publication. A
    /// segment that is not fragmented MP4 is skipped: the channel keeps its window and the pull
    /// goes on.
    async fn check_and_queue(&mut self, seg: &SegmentRef, url: &Url, bytes: Vec<u8>) {
        let Some(init) = &self.init else {
            return;
        };
        let seq = seg.seq;
        let mut probe = Fmp4Splitter::new();
        let checked = probe
            .push(&init.bytes)
            .and_then(|_| probe.push(&bytes))
            .and_then(|items| Ok((items, probe.finish()?)));
        let fragments = match &checked {
            Ok((a, b)) => a
                .iter()
                .chain(b)
                .filter(|i| matches!(i, Fmp4Item::Fragment(_)))
                .count(),
            Err(_) => 0,
        };
        if fragments == 0 {
            let why = match checked {
                Err(e) => e.to_string(),
                Ok(_) => "it holds no media fragment (moof + mdat)".into(),
            };
            let message = format!("segment {seq} ({url}) is not fragmented MP4: {why}; skipped");
            tracing::warn!(channel = %self.channel.name, "HLS pull: {message}");
            self.status.refused_segments.fetch_add(1, Ordering::Relaxed);
            self.status.error(message);
            return;
        }
        let ready = Ready {
            seq,
            duration: seg.duration,
            init: init.bytes.clone(),
            bytes,
        };
        if let Some(out) = &self.out {
            let _ = out.send(ready).await;
        }
    }
}

/// The publisher task: releases checked segments at the pace of their durations (see
/// [`Pacer`]) through [`LiveIngest`], one whole segment at a time. Ends when the fetcher is done
/// and the queue is empty, or at once when the operator stops the pull.
async fn publish(
    channel: Arc<Channel>,
    status: Arc<PullStatus>,
    mut rx: mpsc::Receiver<Ready>,
    mut stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut pacer = Pacer::new(MAX_QUEUE);
    let mut live: Option<(Arc<Vec<u8>>, LiveIngest)> = None;
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(ready) = next else {
            return;
        };
        // Wait for its turn; a queue that grows past MAX_QUEUE meanwhile releases it early.
        loop {
            let now = Instant::now();
            let due = start + pacer.due(now - start, rx.len() + 1);
            if due <= now {
                break;
            }
            let nap = due.min(now + Duration::from_millis(200));
            tokio::select! {
                _ = tokio::time::sleep_until(nap) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        pacer.released(start.elapsed(), ready.duration);
        let ingest = match &mut live {
            Some((init, ingest)) if Arc::ptr_eq(init, &ready.init) => ingest,
            _ => {
                // A new init segment starts a new splitter (the packet numbering goes on).
                let mut ingest = LiveIngest::new(channel.clone());
                if let Err(e) = ingest.push(&ready.init).await {
                    tracing::error!(channel = %channel.name, "HLS pull: init segment: {e}");
                    continue;
                }
                &mut live.insert((ready.init.clone(), ingest)).1
            }
        };
        if let Err(e) = ingest.push(&ready.bytes).await {
            // Checked before it was queued, so this is not expected; start afresh at the next.
            tracing::error!(channel = %channel.name, seq = ready.seq, "HLS pull: publishing: {e}");
            live = None;
            continue;
        }
        status.published(ready.seq, ready.bytes.len());
    }
}
