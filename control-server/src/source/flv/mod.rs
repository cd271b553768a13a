//! FLV tags (as RTMP carries them) → fragmented MP4, in Rust, without ffmpeg.
//!
//! Pure: tags and their millisecond timestamps go in, init segments and `moof`+`mdat` fragments
//! come out as bytes that [`crate::origin::Fmp4Splitter`] accepts, so RTMP enters the origin by
//! the same path as HTTP ingest. The boxes are written with `mp4-atom`.
//!
//! * Video: H.264 only (FLV codec id 7). The AVC sequence header *is* an
//!   `AVCDecoderConfigurationRecord`, copied into `avcC`; NAL units are already length-prefixed
//!   (AVCC), so samples are copied as they are. Timescale 90 000; the FLV composition time
//!   offset becomes the `trun` sample's `cts`.
//! * Audio: AAC only (FLV sound format 10). The AudioSpecificConfig goes into `esds`; the
//!   timescale is the sample rate and every frame lasts 1024 samples, timestamps re-synchronised
//!   to the FLV clock when they drift more than 100 ms from that count (a gap in the source).
//! * Video is required (a stream with only audio is refused after 5 s); audio is optional.
//! * A fragment is cut at every video keyframe and holds both tracks' samples since the previous
//!   one. A video sample's duration is the distance to the next sample's decode time, so the
//!   last sample is held back until the next one arrives (or [`Remuxer::finish`]).
//! * The timeline starts at `resume_us` (a reconnecting publisher continues the channel's
//!   timeline where its previous connection ended, so viewers' MediaSource keeps playing).

use mp4_atom::Avcc;
use thiserror::Error;

mod boxes;

/// Timescale of the video track (ticks per second): FLV milliseconds map to it exactly.
pub const VIDEO_TIMESCALE: u32 = 90_000;
/// Samples per AAC frame (AAC-LC; HE-AAC's core frame as well).
const AAC_FRAME: u32 = 1024;
/// Samples a fragment may hold before it is cut without a keyframe (a publisher whose
/// keyframe interval is absurdly long, or that never sends one, cannot grow memory unbounded).
const MAX_SAMPLES_PER_FRAGMENT: usize = 4096;
/// AAC frames (about 5 s at 48 kHz) a stream may send before its first picture: a stream
/// without video is refused after them rather than kept waiting silently.
const MAX_AUDIO_BEFORE_VIDEO: u32 = 240;
/// How far a tag's timestamp may fall behind the latest before it counts as a restarted clock
/// (audio and video tags interleave a few hundred ms apart at most).
const MAX_BACKWARDS_MS: u64 = 1000;
/// Where the timeline goes on after a restarted clock: one 25 fps frame after the latest tag.
const DISCONTINUITY_STEP_US: u64 = 40_000;
/// Bytes a fragment may hold before it is cut without a keyframe (the origin's splitter takes
/// fragments of up to 128 MiB; a 2 s fragment at 20 Mbit/s is 5 MB).
const MAX_FRAGMENT_BYTES: usize = 32 << 20;

/// Why a tag cannot be remuxed. Unsupported codecs end the publish with this message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RemuxError {
    #[error("video codec 7 (H.264) only; got {0}")]
    UnsupportedVideo(String),
    #[error("audio format 10 (AAC) only; got {0}")]
    UnsupportedAudio(String),
    #[error("malformed {what} tag: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("writing MP4 boxes: {0}")]
    Mp4(String),
}

impl From<mp4_atom::Error> for RemuxError {
    fn from(e: mp4_atom::Error) -> Self {
        RemuxError::Mp4(e.to_string())
    }
}

/// What the remuxer produced, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `ftyp` + `moov`: before the first fragment and whenever a track's configuration changed.
    Init(Vec<u8>),
    /// `moof` + `mdat`, starting with a video keyframe (except a fragment cut for length).
    Fragment(Vec<u8>),
}

/// The name of an FLV video codec id, for refusals.
fn video_codec_name(id: u8) -> &'static str {
    match id {
        2 => "Sorenson H.263",
        3 => "Screen video",
        4 => "VP6",
        5 => "VP6 with alpha",
        6 => "Screen video 2",
        7 => "H.264",
        12 => "HEVC",
        13 => "AV1",
        _ => "unknown",
    }
}

/// The name of an FLV sound format, for refusals.
fn audio_codec_name(id: u8) -> &'static str {
    match id {
        0 | 3 => "PCM",
        1 => "ADPCM",
        2 | 14 => "MP3",
        4..=6 => "Nellymoser",
        7 => "G.711 A-law",
        8 => "G.711 mu-law",
        10 => "AAC",
        11 => "Speex",
        _ => "unknown",
    }
}

/// A FourCC of Enhanced RTMP, for refusals.
fn fourcc_name(f: &[u8]) -> String {
    let name = match f {
        b"hvc1" => "HEVC",
        b"av01" => "AV1",
        b"vp09" => "VP9",
        b"avc1" => "H.264 (Enhanced RTMP)",
        b"Opus" => "Opus",
        b"fLaC" => "FLAC",
        b"ac-3" => "AC-3",
        b"ec-3" => "E-AC-3",
        b".mp3" => "MP3",
        b"mp4a" => "AAC (Enhanced RTMP)",
        _ => "unknown",
    };
    format!(
        "Enhanced RTMP codec {:?} ({name})",
        String::from_utf8_lossy(f)
    )
}

#[derive(Debug, Clone)]
struct Sample {
    /// Decode time in the track's timescale.
    dts: u64,
    /// Composition offset in the track's timescale.
    cts: i32,
    duration: u32,
    key: bool,
    data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AudioConfig {
    /// The AudioSpecificConfig, verbatim.
    asc: Vec<u8>,
    sample_rate: u32,
    channels: u16,
}

/// FLV tags in, fMP4 out. See the module documentation.
#[derive(Debug)]
pub struct Remuxer {
    avcc: Option<Avcc>,
    audio: Option<AudioConfig>,
    width: u16,
    height: u16,
    /// Bytes of the init segment last emitted.
    last_init: Option<Vec<u8>>,
    /// Whether the emitted init segment has an audio track.
    init_has_audio: bool,
    /// A configuration changed since the last init segment: a new one goes before the next
    /// keyframe.
    config_dirty: bool,
    /// Where this connection's timeline starts, microseconds.
    resume_us: u64,
    /// FLV timestamp (ms) of the first media tag, mapped to `resume_us`.
    origin_ms: Option<u32>,
    /// The latest time a tag was mapped to, µs.
    latest_us: u64,
    /// The fragment being assembled: open once the first keyframe arrived.
    open: bool,
    video: Vec<Sample>,
    audio_samples: Vec<Sample>,
    /// Bytes of `video` and `audio_samples` together.
    pending_bytes: usize,
    /// The latest video sample, waiting for the next one to know its duration.
    held: Option<Sample>,
    /// Decode time the next AAC frame should have, audio ticks.
    audio_next: Option<u64>,
    /// AAC frames received before any H.264 configuration.
    audio_before_video: u32,
    /// End of the last sample written, per track, in µs (for the next connection's resume).
    video_end_us: u64,
    audio_end_us: u64,
    sequence: u32,
}

impl Remuxer {
    /// A remuxer whose timeline starts at `resume_us` microseconds.
    pub fn new(resume_us: u64) -> Self {
        Remuxer {
            avcc: None,
            audio: None,
            width: 0,
            height: 0,
            last_init: None,
            init_has_audio: false,
            config_dirty: false,
            resume_us,
            origin_ms: None,
            latest_us: resume_us,
            open: false,
            video: Vec::new(),
            audio_samples: Vec::new(),
            pending_bytes: 0,
            held: None,
            audio_next: None,
            audio_before_video: 0,
            video_end_us: resume_us,
            audio_end_us: resume_us,
            sequence: 0,
        }
    }

    /// Picture size from the stream's metadata (`onMetaData`), written in the `avc1` entry.
    /// Decoders read the size from the SPS; this is informative.
    pub fn set_dimensions(&mut self, width: u32, height: u32) {
        let w = u16::try_from(width).unwrap_or(0);
        let h = u16::try_from(height).unwrap_or(0);
        if (w, h) != (self.width, self.height) {
            self.width = w;
            self.height = h;
            self.config_dirty |= self.avcc.is_some();
        }
    }

    /// Refuses, before any media, a stream whose `onMetaData` announces another codec than
    /// H.264 (7) or AAC (10). Enhanced RTMP announces a FourCC as the number.
    pub fn check_metadata(
        video_codec_id: Option<u32>,
        audio_codec_id: Option<u32>,
    ) -> Result<(), RemuxError> {
        let fourcc = |id: u32| fourcc_name(&id.to_be_bytes());
        match video_codec_id {
            None | Some(7) => {}
            Some(id @ 0..=15) => {
                return Err(RemuxError::UnsupportedVideo(format!(
                    "codec id {id} ({})",
                    video_codec_name(id as u8)
                )))
            }
            Some(id) => return Err(RemuxError::UnsupportedVideo(fourcc(id))),
        }
        match audio_codec_id {
            None | Some(10) => Ok(()),
            Some(id @ 0..=15) => Err(RemuxError::UnsupportedAudio(format!(
                "format {id} ({})",
                audio_codec_name(id as u8)
            ))),
            Some(id) => Err(RemuxError::UnsupportedAudio(fourcc(id))),
        }
    }

    /// Where the timeline ends so far (the end of the last sample written), microseconds.
    pub fn end_us(&self) -> u64 {
        self.video_end_us.max(self.audio_end_us)
    }

    /// Microseconds → ticks of `timescale`.
    fn ticks(us: u64, timescale: u32) -> u64 {
        (u128::from(us) * u128::from(timescale) / 1_000_000) as u64
    }

    fn us(ticks: u64, timescale: u32) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(timescale.max(1))) as u64
    }

    /// Time of FLV timestamp `ts_ms` on this connection's timeline, µs.
    ///
    /// A timestamp more than [`MAX_BACKWARDS_MS`] behind the latest (an encoder that restarted
    /// its clock without reconnecting) is a discontinuity: the timeline goes on from where it
    /// was, one frame later, instead of going back (which would make players overwrite what
    /// they buffered).
    fn timeline_us(&mut self, ts_ms: u32) -> u64 {
        let origin = *self.origin_ms.get_or_insert(ts_ms);
        let mut t = self.resume_us + u64::from(ts_ms.saturating_sub(origin)) * 1000;
        if t + MAX_BACKWARDS_MS * 1000 < self.latest_us {
            self.resume_us = self.latest_us + DISCONTINUITY_STEP_US;
            self.origin_ms = Some(ts_ms);
            t = self.resume_us;
        }
        self.latest_us = self.latest_us.max(t);
        t
    }

    /// One FLV video tag body (the RTMP video message).
    pub fn push_video(&mut self, ts_ms: u32, tag: &[u8]) -> Result<Vec<Output>, RemuxError> {
        let malformed = |reason: &str| RemuxError::Malformed {
            what: "video",
            reason: reason.to_owned(),
        };
        let first = *tag.first().ok_or_else(|| malformed("empty"))?;
        if first & 0x80 != 0 {
            // Enhanced RTMP: the FourCC follows the first byte.
            let fourcc = tag.get(1..5).ok_or_else(|| malformed("no FourCC"))?;
            return Err(RemuxError::UnsupportedVideo(fourcc_name(fourcc)));
        }
        let frame_type = first >> 4;
        let codec = first & 0x0f;
        if codec != 7 {
            return Err(RemuxError::UnsupportedVideo(format!(
                "codec id {codec} ({})",
                video_codec_name(codec)
            )));
        }
        if frame_type == 5 {
            // Video info / command frame: carries no picture.
            return Ok(Vec::new());
        }
        let packet_type = *tag.get(1).ok_or_else(|| malformed("no AVC packet type"))?;
        let cts_bytes = tag
            .get(2..5)
            .ok_or_else(|| malformed("no composition time"))?;
        // Signed 24-bit composition time offset, milliseconds.
        let cts_ms = (i32::from(cts_bytes[0] as i8) << 16)
            | (i32::from(cts_bytes[1]) << 8)
            | i32::from(cts_bytes[2]);
        let body = tag.get(5..).unwrap_or_default();
        match packet_type {
            0 => {
                let mut buf = body;
                let avcc = <Avcc as mp4_atom::Atom>::decode_body(&mut buf)
                    .map_err(|e| malformed(&format!("AVC sequence header: {e}")))?;
                if self.avcc.as_ref() != Some(&avcc) {
                    self.avcc = Some(avcc);
                    self.config_dirty = true;
                }
                Ok(Vec::new())
            }
            1 => {
                if self.avcc.is_none() || body.is_empty() {
                    // Pictures before the decoder configuration cannot be decoded.
                    return Ok(Vec::new());
                }
                let key = frame_type == 1;
                let t_us = self.timeline_us(ts_ms);
                let sample = Sample {
                    dts: Self::ticks(t_us, VIDEO_TIMESCALE),
                    cts: cts_ms.saturating_mul((VIDEO_TIMESCALE / 1000) as i32),
                    duration: 0,
                    key,
                    data: body.to_vec(),
                };
                self.push_video_sample(sample)
            }
            // End of sequence, or unknown: nothing to play.
            _ => Ok(Vec::new()),
        }
    }

    fn push_video_sample(&mut self, sample: Sample) -> Result<Vec<Output>, RemuxError> {
        let mut out = Vec::new();
        if !self.open && !sample.key {
            // Viewers start at a keyframe: wait for the first one.
            return Ok(out);
        }
        if let Some(mut prev) = self.held.take() {
            // A decode time that goes backwards or stands still gets the smallest duration.
            prev.duration = u32::try_from(sample.dts.saturating_sub(prev.dts))
                .unwrap_or(u32::MAX)
                .max(1);
            self.pending_bytes += prev.data.len();
            self.video.push(prev);
        }
        let full = self.video.len() + self.audio_samples.len() >= MAX_SAMPLES_PER_FRAGMENT
            || self.pending_bytes >= MAX_FRAGMENT_BYTES;
        if sample.key || full {
            if let Some(f) = self.cut(false)? {
                out.push(Output::Fragment(f));
            }
            if sample.key {
                if let Some(init) = self.init_if_changed()? {
                    out.push(Output::Init(init));
                }
                self.open = true;
            }
        }
        self.held = Some(sample);
        Ok(out)
    }

    /// One FLV audio tag body (the RTMP audio message).
    pub fn push_audio(&mut self, ts_ms: u32, tag: &[u8]) -> Result<Vec<Output>, RemuxError> {
        let malformed = |reason: &str| RemuxError::Malformed {
            what: "audio",
            reason: reason.to_owned(),
        };
        let first = *tag.first().ok_or_else(|| malformed("empty"))?;
        let format = first >> 4;
        if format == 9 {
            let fourcc = tag.get(1..5).ok_or_else(|| malformed("no FourCC"))?;
            return Err(RemuxError::UnsupportedAudio(fourcc_name(fourcc)));
        }
        if format != 10 {
            return Err(RemuxError::UnsupportedAudio(format!(
                "format {format} ({})",
                audio_codec_name(format)
            )));
        }
        let packet_type = *tag.get(1).ok_or_else(|| malformed("no AAC packet type"))?;
        let body = tag.get(2..).unwrap_or_default();
        match packet_type {
            0 => {
                let config = parse_audio_specific_config(body).ok_or_else(|| {
                    malformed("AudioSpecificConfig too short or its sample rate unknown")
                })?;
                if self.audio.as_ref() != Some(&config) {
                    self.audio = Some(config);
                    self.audio_next = None;
                    self.config_dirty = true;
                }
                Ok(Vec::new())
            }
            1 => {
                let Some(rate) = self.audio.as_ref().map(|a| a.sample_rate) else {
                    return Ok(Vec::new());
                };
                if self.avcc.is_none() {
                    self.audio_before_video += 1;
                    if self.audio_before_video > MAX_AUDIO_BEFORE_VIDEO {
                        return Err(RemuxError::UnsupportedVideo(
                            "no video in the first 5 s (audio-only streams are not supported)"
                                .into(),
                        ));
                    }
                }
                if !self.open || !self.init_has_audio || body.is_empty() {
                    // Before the first keyframe (or before an init segment with this track).
                    self.timeline_us(ts_ms);
                    return Ok(Vec::new());
                }
                let flv = Self::ticks(self.timeline_us(ts_ms), rate);
                let dts = match self.audio_next {
                    Some(next) if flv.abs_diff(next) <= u64::from(rate / 10) => next,
                    _ => flv,
                };
                self.audio_next = Some(dts + u64::from(AAC_FRAME));
                if self.pending_bytes >= MAX_FRAGMENT_BYTES
                    || self.video.len() + self.audio_samples.len() >= MAX_SAMPLES_PER_FRAGMENT
                {
                    // No keyframe for far too long: drop audio rather than grow without bound
                    // (the next picture cuts the fragment).
                    return Ok(Vec::new());
                }
                self.pending_bytes += body.len();
                self.audio_samples.push(Sample {
                    dts,
                    cts: 0,
                    duration: AAC_FRAME,
                    key: true,
                    data: body.to_vec(),
                });
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The publisher left: writes the held-back samples as a last fragment. The held video
    /// sample lasts as long as the one before it.
    pub fn finish(&mut self) -> Result<Vec<Output>, RemuxError> {
        if let Some(mut last) = self.held.take() {
            last.duration = self
                .video
                .last()
                .map_or(VIDEO_TIMESCALE / 30, |s| s.duration);
            self.video.push(last);
        }
        Ok(self.cut(true)?.map(Output::Fragment).into_iter().collect())
    }

    /// The init segment, if the configuration changed since the last one emitted.
    fn init_if_changed(&mut self) -> Result<Option<Vec<u8>>, RemuxError> {
        if !self.config_dirty && self.last_init.is_some() {
            return Ok(None);
        }
        self.config_dirty = false;
        let bytes = self.init_segment()?;
        if self.last_init.as_ref() == Some(&bytes) {
            return Ok(None);
        }
        self.init_has_audio = self.audio.is_some();
        self.last_init = Some(bytes.clone());
        Ok(Some(bytes))
    }

    fn init_segment(&self) -> Result<Vec<u8>, RemuxError> {
        let avcc = self
            .avcc
            .as_ref()
            .ok_or_else(|| RemuxError::Mp4("no AVC sequence header before the keyframe".into()))?;
        boxes::init_segment(avcc, self.audio.as_ref(), self.width, self.height)
    }

    /// Writes the samples gathered so far as one fragment (nothing if there are none). Audio
    /// alone waits for the next picture unless `flush`: a fragment's time and random access
    /// are its video's.
    fn cut(&mut self, flush: bool) -> Result<Option<Vec<u8>>, RemuxError> {
        if self.video.is_empty() && !flush {
            return Ok(None);
        }
        let video = std::mem::take(&mut self.video);
        let audio = std::mem::take(&mut self.audio_samples);
        self.pending_bytes = 0;
        if video.is_empty() && audio.is_empty() {
            return Ok(None);
        }
        if let Some(last) = video.last() {
            self.video_end_us = Self::us(last.dts + u64::from(last.duration), VIDEO_TIMESCALE)
                .max(self.video_end_us);
        }
        if let (Some(last), Some(a)) = (audio.last(), &self.audio) {
            self.audio_end_us =
                Self::us(last.dts + u64::from(last.duration), a.sample_rate).max(self.audio_end_us);
        }
        self.sequence = self.sequence.wrapping_add(1);
        boxes::fragment(self.sequence, &video, &audio).map(Some)
    }
}

/// Sample rates by `samplingFrequencyIndex` (ISO/IEC 14496-3).
const AAC_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Sample rate and channels of an AudioSpecificConfig.
fn parse_audio_specific_config(asc: &[u8]) -> Option<AudioConfig> {
    // 5 bits object type (31: escape, 6 more bits), 4 bits frequency index (15: 24-bit rate),
    // 4 bits channel configuration.
    let mut bits = BitReader { data: asc, pos: 0 };
    let aot = bits.read(5)?;
    if aot == 31 {
        bits.read(6)?;
    }
    let index = bits.read(4)?;
    let sample_rate = if index == 15 {
        bits.read(24)?
    } else {
        *AAC_RATES.get(index as usize)?
    };
    let channels = bits.read(4)? as u16;
    (sample_rate > 0).then(|| AudioConfig {
        asc: asc.to_vec(),
        sample_rate,
        channels: if channels == 0 { 2 } else { channels },
    })
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn read(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.pos / 8)?;
            let bit = (byte >> (7 - self.pos % 8)) & 1;
            v = (v << 1) | u32::from(bit);
            self.pos += 1;
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests;
