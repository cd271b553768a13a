//! Sources that feed a channel: a file looped as an endless live stream (the demo), and live
//! byte streams (stdin, HTTP ingest) split into fragments as they arrive.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::channel::{now_ms, Channel};
use crate::origin::{Fmp4Error, Fmp4Item, Fmp4Splitter, Fragment, InitSegment, Packetizer};

/// Why a live ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Media(#[from] Fmp4Error),
    #[error("reading the source: {0}")]
    Io(String),
}

/// A parsed clip ready to be played out in a loop.
#[derive(Debug, Clone)]
pub struct LoopedClip {
    pub init: InitSegment,
    pub fragments: Vec<Fragment>,
    /// Total duration in timescale units; each loop shifts timestamps by this much.
    pub duration: u64,
    first_decode_time: u64,
}

impl LoopedClip {
    pub fn parse(data: Vec<u8>) -> Result<Self, Fmp4Error> {
        let (init, fragments) = crate::origin::fmp4::parse_file(&data)?;
        if fragments.is_empty() {
            return Err(Fmp4Error::NotFragmented("the file has no media fragments"));
        }
        let first_decode_time = fragments[0].base_decode_time;
        let last = &fragments[fragments.len() - 1];
        let duration = (last.base_decode_time + last.duration).saturating_sub(first_decode_time);
        if duration == 0 || init.timescale == 0 {
            return Err(Fmp4Error::Malformed(
                "clip has zero duration or timescale".into(),
            ));
        }
        Ok(LoopedClip {
            init,
            fragments,
            duration,
            first_decode_time,
        })
    }

    pub fn seconds(&self) -> f64 {
        self.duration as f64 / f64::from(self.init.timescale)
    }

    /// The longest fragment, ms (the viewers' buffered end steps by this much).
    pub fn max_fragment_ms(&self) -> u32 {
        let ts = f64::from(self.init.timescale.max(1));
        self.fragments
            .iter()
            .map(|f| (f.duration as f64 * 1000.0 / ts).round() as u32)
            .max()
            .unwrap_or(0)
    }

    /// Average media bit rate of the clip, kbit/s.
    pub fn stream_kbps(&self) -> u32 {
        let bytes: usize = self.fragments.iter().map(|f| f.bytes.len()).sum();
        ((bytes as f64 * 8.0 / 1000.0) / self.seconds().max(0.001)).ceil() as u32
    }
}

/// Plays the clip out in real time forever, rewriting timestamps so the timeline never jumps.
///
/// The timeline began at `start_ms` (ms since the Unix epoch): fragment `i` of lap `L` is
/// published when its media time has come, numbered from the packets of every fragment before
/// it. Every server that loops the same clip on the same start time (the nodes of a cluster)
/// cuts the same packets with the same sequence numbers, so any of them can serve a peer's
/// fallback fetches, and one that starts late begins with the fragment that is current.
pub async fn run_looped(channel: Arc<Channel>, clip: LoopedClip, start_ms: u64) {
    let k = channel.substreams;
    let ts = f64::from(clip.init.timescale);
    // A lap is the primary track's duration, shifted into each track's own timescale (audio's
    // is its sample rate): one shift in the primary's ticks would tear the audio timeline.
    let timescales = match crate::origin::fmp4::track_timescales(&clip.init.bytes) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(channel = %channel.name, "cannot loop clip: {e}");
            return;
        }
    };
    // Packets per fragment: retiming patches fields in place, so every lap cuts alike.
    let mut first_of = Vec::with_capacity(clip.fragments.len());
    let mut per_lap = 0u64;
    for f in &clip.fragments {
        first_of.push(per_lap);
        per_lap += Packetizer::new(0, k)
            .packetize(&f.bytes, f.starts_with_keyframe, 0)
            .len() as u64;
    }
    let n = clip.fragments.len() as u64;
    let offset_ms = |lap: u64, frag: &Fragment| -> u64 {
        let media_time = lap * clip.duration + (frag.base_decode_time - clip.first_decode_time);
        (media_time as f64 * 1000.0 / ts).round() as u64
    };
    // Where the timeline is now: the newest fragment whose time has come.
    let elapsed = now_ms().saturating_sub(start_ms);
    let lap_ms = ((clip.duration as f64 * 1000.0 / ts).round() as u64).max(1);
    let mut lap = elapsed / lap_ms;
    let mut i = clip
        .fragments
        .iter()
        .rposition(|f| offset_ms(lap, f) <= elapsed)
        .unwrap_or(0);
    let mut packetizer = Packetizer::new(lap * per_lap + first_of[i], k);
    loop {
        let frag = &clip.fragments[i];
        let created_ms = start_ms + offset_ms(lap, frag);
        let wait = created_ms.saturating_sub(now_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let lap_s = (lap * clip.duration) as f64 / ts;
        let shift = |track_id: u32| -> u64 {
            match timescales.iter().find(|(id, _)| *id == track_id) {
                Some((_, track_ts)) => (lap_s * f64::from(*track_ts)).round() as u64,
                None => lap * clip.duration,
            }
        };
        let mut bytes = frag.bytes.clone();
        let sequence_number = (lap * n + i as u64 + 1) as u32;
        if let Err(e) =
            crate::origin::fmp4::rewrite_timing_per_track(&mut bytes, &shift, sequence_number)
        {
            tracing::error!(channel = %channel.name, "cannot loop clip: {e}");
            return;
        }
        channel
            .publish_fragment_at(
                &mut packetizer,
                &bytes,
                frag.starts_with_keyframe,
                created_ms,
            )
            .await;
        i += 1;
        if i as u64 == n {
            i = 0;
            lap += 1;
        }
    }
}

/// Feeds a live fragmented-MP4 byte stream (stdin, a pipe) into the channel until it ends.
pub async fn run_reader<R: AsyncRead + Unpin>(
    channel: Arc<Channel>,
    mut reader: R,
) -> Result<(), IngestError> {
    let mut live = LiveIngest::new(channel);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| IngestError::Io(e.to_string()))?;
        if n == 0 {
            return Ok(());
        }
        live.push(&buf[..n]).await?;
    }
}

/// Incremental ingest of a live byte stream into a channel.
pub struct LiveIngest {
    channel: Arc<Channel>,
    splitter: Fmp4Splitter,
    packetizer: Packetizer,
    started: Option<Instant>,
    bytes: u64,
}

impl LiveIngest {
    pub fn new(channel: Arc<Channel>) -> Self {
        let next = channel
            .media
            .read()
            .ok()
            .and_then(|m| m.window.latest_seq())
            .map_or(0, |s| s + 1);
        let k = channel.substreams;
        LiveIngest {
            channel,
            splitter: Fmp4Splitter::new(),
            packetizer: Packetizer::new(next, k),
            started: None,
            bytes: 0,
        }
    }

    /// Splits `data` into fragments and publishes them. An error leaves the channel as it was
    /// before the offending bytes.
    pub async fn push(&mut self, data: &[u8]) -> Result<(), IngestError> {
        for item in self.splitter.push(data)? {
            match item {
                Fmp4Item::Init(init) => self.channel.set_init(init),
                Fmp4Item::Fragment(f) => {
                    let started = *self.started.get_or_insert_with(Instant::now);
                    self.bytes += f.bytes.len() as u64;
                    let secs = started.elapsed().as_secs_f64();
                    if secs > 2.0 {
                        self.channel
                            .set_stream_kbps((self.bytes as f64 * 8.0 / 1000.0 / secs) as u32);
                    }
                    self.channel
                        .publish_fragment(&mut self.packetizer, &f.bytes, f.starts_with_keyframe)
                        .await;
                }
            }
        }
        Ok(())
    }
}
