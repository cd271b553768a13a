//! Incremental fragmented-MP4 splitter.
//!
//! The origin ingests fMP4 as an opaque byte stream (a file, stdin, an HTTP body) that arrives in
//! chunks of arbitrary size. Browsers play it through Media Source Extensions, which need the
//! *init segment* (`ftyp` + `moov`) once and then self-contained *media fragments*
//! (`moof` + `mdat`). [`Fmp4Splitter`] cuts the stream at exactly those boundaries, without
//! copying or re-muxing the media, and reads the few header fields the origin needs:
//!
//! * the timescale and the MSE MIME type (`video/mp4; codecs="…"`) from the `moov`;
//! * per fragment, its decode time (`tfdt`), its duration (`trun`/`tfhd`/`trex` defaults) and
//!   whether it starts with a keyframe, which makes it a random-access point for joiners.
//!
//! Everything here is pure and never panics on input: sizes are validated before slicing and every
//! read, ours or `mp4-atom`'s, is bounds-checked (the `fmp4_split` fuzz target checks both),
//! because the bytes come from untrusted ingest clients. Box sizes are
//! capped ([`MAX_BOX_SIZE`]) so a hostile header cannot make the origin buffer gigabytes.
//!
//! [`rewrite_timing`] patches `tfdt`/`mfhd` in place so a short clip can be looped forever as a
//! live stream with a continuous timeline.
//!
//! The boxes are decoded by `mp4-atom` (`boxes.rs`); what is written here is what it does not do:
//! cutting a stream that arrives in pieces at box boundaries with bounded memory and keeping the
//! original bytes (this file), the MSE `codecs` string (`codecs.rs`), and patching timing fields
//! in place (`retime.rs`).

mod boxes;
mod codecs;
mod retime;
#[cfg(test)]
mod tests;

use thiserror::Error;

use boxes::{fourcc, parse_header, read_moof, read_moov, FragmentInfo, MovieInfo};
pub use retime::{rewrite_timing, rewrite_timing_per_track, track_timescales};

/// Largest box the splitter accepts. A one-second fragment of even a high-bitrate stream is far
/// below this; anything larger is almost certainly garbage or an attack on the origin's memory.
pub const MAX_BOX_SIZE: u64 = 64 * 1024 * 1024;

/// Largest init segment or fragment (all its boxes together) the splitter buffers.
pub const MAX_ITEM_SIZE: usize = 2 * MAX_BOX_SIZE as usize;

/// Boxes that belong to the media fragment that follows them rather than to the init segment.
const FRAGMENT_PREFIX_BOXES: [&[u8; 4]; 6] = [b"moof", b"styp", b"sidx", b"ssix", b"prft", b"emsg"];

/// Why a byte stream cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Fmp4Error {
    #[error(
        "not an MP4 stream: the first box is {found:?}, expected \"ftyp\" \
         (a fragmented MP4 starting with its init segment)"
    )]
    NotMp4 { found: String },
    #[error(
        "the MP4 is not fragmented: {0}; re-mux it, e.g. \
         `ffmpeg -i in.mp4 -c copy -movflags frag_keyframe+empty_moov+default_base_moof out.mp4`"
    )]
    NotFragmented(&'static str),
    #[error("invalid box {kind:?} at offset {offset}: {reason}")]
    BadBox {
        kind: String,
        offset: u64,
        reason: &'static str,
    },
    #[error("box {kind:?} at offset {offset} is {size} bytes, over the {MAX_BOX_SIZE}-byte limit")]
    BoxTooLarge {
        kind: String,
        offset: u64,
        size: u64,
    },
    #[error("{what} at offset {offset} exceeds the {MAX_ITEM_SIZE}-byte limit")]
    ItemTooLarge { what: &'static str, offset: u64 },
    #[error("malformed MP4: {0}")]
    Malformed(String),
    #[error("the stream ended before a complete init segment (ftyp + moov)")]
    MissingInit,
    #[error("the stream ended inside a box or fragment ({pending} bytes pending)")]
    Truncated { pending: usize },
    #[error("new decode time of track {track_id} does not fit its 32-bit (version 0) tfdt")]
    TimestampOverflow { track_id: u32 },
}

/// `ftyp` + `moov` (and any other box seen before the first fragment, except `mdat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSegment {
    pub bytes: Vec<u8>,
    /// Timescale (ticks per second) of the first track, from its `mdhd`.
    pub timescale: u32,
    /// MIME type for `MediaSource.addSourceBuffer`, e.g. `video/mp4; codecs="avc1.42c01e"`.
    /// Falls back to plain `video/mp4` (or `audio/mp4`) when a codec is not recognised.
    pub mime: String,
}

/// One media fragment: any fragment-level boxes preceding it (`styp`, `sidx`, `prft`, `emsg`),
/// its `moof` and the `mdat` that follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub bytes: Vec<u8>,
    /// `baseMediaDecodeTime` of the primary track (the init segment's first track, else the first
    /// `traf`), in the init segment's timescale.
    pub base_decode_time: u64,
    /// Sum of the primary track's sample durations, in the init segment's timescale.
    pub duration: u64,
    /// Whether the first sample is a sync sample, so decoding can start at this fragment.
    pub starts_with_keyframe: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fmp4Item {
    Init(InitSegment),
    Fragment(Fragment),
}

/// Where the splitter is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet: the first box must be `ftyp`.
    Start,
    /// Collecting the init segment.
    Init,
    /// Emitting fragments.
    Fragments,
}

/// Splits a fragmented-MP4 byte stream, fed in arbitrary chunks, into an [`InitSegment`] followed
/// by [`Fragment`]s.
///
/// A fragment is emitted as soon as its `mdat` is complete (not when the next `moof` arrives), so
/// the splitter adds no latency beyond the encoder's fragment duration. Errors are terminal: after
/// one, every further call returns the same error.
#[derive(Debug, Clone)]
pub struct Fmp4Splitter {
    /// Bytes of the item being assembled, followed by bytes not yet examined.
    buf: Vec<u8>,
    /// Offset in `buf` of the next box header to examine.
    scan: usize,
    /// Stream offset of `buf[scan]`, for error messages.
    pos: u64,
    phase: Phase,
    movie: Option<MovieInfo>,
    /// The current fragment's parsed `moof`, waiting for its `mdat`.
    moof: Option<FragmentInfo>,
    failed: Option<Fmp4Error>,
}

impl Default for Fmp4Splitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Fmp4Splitter {
    pub fn new() -> Self {
        Fmp4Splitter {
            buf: Vec::new(),
            scan: 0,
            pos: 0,
            phase: Phase::Start,
            movie: None,
            moof: None,
            failed: None,
        }
    }

    /// Feeds the next chunk and returns every item it completed, in stream order.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Fmp4Item>, Fmp4Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        match self.drain(&mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                Err(e)
            }
        }
    }

    /// Declares the end of the stream. Returns the init segment if the stream held one but no
    /// fragment (it is otherwise emitted just before the first fragment), and fails if the stream
    /// stopped inside a box or between a `moof` and its `mdat`.
    pub fn finish(mut self) -> Result<Vec<Fmp4Item>, Fmp4Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.scan < self.buf.len() || self.moof.is_some() {
            if self.movie.is_none() {
                return Err(Fmp4Error::MissingInit);
            }
            return Err(Fmp4Error::Truncated {
                pending: self.buf.len(),
            });
        }
        match self.phase {
            Phase::Start => Err(Fmp4Error::MissingInit),
            Phase::Init => {
                let init = self.take_init()?;
                Ok(vec![Fmp4Item::Init(init)])
            }
            // Complete boxes after the last mdat that no moof followed (e.g. `mfra` was dropped,
            // a trailing `free`) carry nothing playable.
            Phase::Fragments => Ok(Vec::new()),
        }
    }

    fn drain(&mut self, out: &mut Vec<Fmp4Item>) -> Result<(), Fmp4Error> {
        loop {
            let rest = self.buf.get(self.scan..).unwrap_or_default();
            if self.phase == Phase::Start {
                if let Some(kind) = rest.get(4..8) {
                    if kind != b"ftyp" {
                        return Err(Fmp4Error::NotMp4 {
                            found: fourcc(kind),
                        });
                    }
                }
            }
            let Some(header) = parse_header(rest, self.pos)? else {
                return Ok(());
            };
            let kind = &header.kind;

            // Decisions that need only the header: refuse early rather than buffer a whole
            // non-fragmented `mdat` first.
            match self.phase {
                Phase::Start | Phase::Init if kind == b"mdat" => {
                    return Err(Fmp4Error::NotFragmented(
                        "media data (mdat) before any moof",
                    ));
                }
                Phase::Init if FRAGMENT_PREFIX_BOXES.contains(&kind) => {
                    let init = self.take_init()?;
                    out.push(Fmp4Item::Init(init));
                    self.phase = Phase::Fragments;
                    continue;
                }
                Phase::Fragments if kind == b"ftyp" || kind == b"moov" => {
                    return Err(Fmp4Error::Malformed(format!(
                        "{} at offset {} after fragments (concatenated streams are not supported)",
                        fourcc(kind),
                        self.pos
                    )));
                }
                Phase::Fragments if kind == b"mdat" && self.moof.is_none() => {
                    return Err(Fmp4Error::Malformed(format!(
                        "mdat at offset {} without a preceding moof",
                        self.pos
                    )));
                }
                Phase::Fragments if kind == b"moof" && self.moof.is_some() => {
                    return Err(Fmp4Error::Malformed(format!(
                        "moof at offset {} follows a moof without an mdat",
                        self.pos
                    )));
                }
                _ => {}
            }

            // usize is at least 32 bits and sizes are capped at MAX_BOX_SIZE.
            let size = header.size as usize;
            let end = self.scan + size;
            if end > MAX_ITEM_SIZE {
                let what = if self.phase == Phase::Fragments {
                    "fragment"
                } else {
                    "init segment"
                };
                return Err(Fmp4Error::ItemTooLarge {
                    what,
                    offset: self.pos,
                });
            }
            if self.buf.len() < end {
                return Ok(());
            }
            let body = self
                .buf
                .get(self.scan + header.header_len..end)
                .unwrap_or_default();

            if kind == b"mfra" {
                // The random-access index of a whole file: its offsets are meaningless once the
                // stream is cut into pieces.
                self.buf.drain(self.scan..end);
                self.pos += size as u64;
                continue;
            }
            match self.phase {
                Phase::Start => self.phase = Phase::Init,
                Phase::Init if kind == b"ftyp" => {
                    return Err(Fmp4Error::Malformed(format!(
                        "second ftyp at offset {}",
                        self.pos
                    )));
                }
                Phase::Init if kind == b"moov" => {
                    if self.movie.is_some() {
                        return Err(Fmp4Error::Malformed(format!(
                            "second moov at offset {}",
                            self.pos
                        )));
                    }
                    self.movie = Some(read_moov(body)?);
                }
                Phase::Init => {}
                Phase::Fragments if kind == b"moof" => {
                    let movie = self.movie.as_ref().ok_or(Fmp4Error::MissingInit)?;
                    self.moof = Some(read_moof(body, movie)?);
                }
                Phase::Fragments if kind == b"mdat" => {
                    if let Some(info) = self.moof.take() {
                        let rest = self.buf.split_off(end);
                        let bytes = std::mem::replace(&mut self.buf, rest);
                        self.scan = 0;
                        self.pos += size as u64;
                        out.push(Fmp4Item::Fragment(Fragment {
                            bytes,
                            base_decode_time: info.base_decode_time,
                            duration: info.duration,
                            starts_with_keyframe: info.starts_with_keyframe,
                        }));
                        continue;
                    }
                }
                Phase::Fragments => {}
            }
            self.scan = end;
            self.pos += size as u64;
        }
    }

    /// Cuts the init segment (everything before `scan`) off the buffer.
    fn take_init(&mut self) -> Result<InitSegment, Fmp4Error> {
        let movie = self.movie.as_ref().ok_or(Fmp4Error::NotFragmented(
            "a fragment starts before any moov (no init segment)",
        ))?;
        let rest = self.buf.split_off(self.scan);
        let bytes = std::mem::replace(&mut self.buf, rest);
        self.scan = 0;
        Ok(InitSegment {
            bytes,
            timescale: movie.timescale,
            mime: movie.mime.clone(),
        })
    }
}

/// Splits a complete file in one go.
pub fn parse_file(data: &[u8]) -> Result<(InitSegment, Vec<Fragment>), Fmp4Error> {
    let mut splitter = Fmp4Splitter::new();
    let mut items = splitter.push(data)?;
    items.extend(splitter.finish()?);
    let mut init = None;
    let mut fragments = Vec::new();
    for item in items {
        match item {
            Fmp4Item::Init(i) => init = Some(i),
            Fmp4Item::Fragment(f) => fragments.push(f),
        }
    }
    Ok((init.ok_or(Fmp4Error::MissingInit)?, fragments))
}
