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
//! read is bounds-checked, because the bytes come from untrusted ingest clients. Box sizes are
//! capped ([`MAX_BOX_SIZE`]) so a hostile header cannot make the origin buffer gigabytes.
//!
//! [`rewrite_timing`] patches `tfdt`/`mfhd` in place so a short clip can be looped forever as a
//! live stream with a continuous timeline.

use thiserror::Error;

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

/// What the `moov` told us that fragments need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MovieInfo {
    timescale: u32,
    mime: String,
    /// Track whose `traf` defines a fragment's time and keyframe-ness.
    primary_track: u32,
    trex: Vec<Trex>,
}

/// Per-track defaults from `mvex/trex`, used when `tfhd`/`trun` omit a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trex {
    track_id: u32,
    default_sample_duration: u32,
    default_sample_flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FragmentInfo {
    base_decode_time: u64,
    duration: u64,
    starts_with_keyframe: bool,
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
                    self.movie = Some(parse_moov(body)?);
                }
                Phase::Init => {}
                Phase::Fragments if kind == b"moof" => {
                    let movie = self.movie.as_ref().ok_or(Fmp4Error::MissingInit)?;
                    self.moof = Some(parse_moof(body, movie)?);
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

/// Rewrites a fragment's timing in place: adds `add_decode_time` to the `baseMediaDecodeTime` of
/// every `traf` and sets every `mfhd` sequence number.
///
/// This is how the origin loops a short clip as an endless live stream: iteration `n` of the loop
/// is shifted by `n` × the clip duration, so decode times keep increasing and MSE sees one
/// continuous timeline. The buffer is validated completely before the first byte is changed, so on
/// error it is left untouched.
pub fn rewrite_timing(
    bytes: &mut [u8],
    add_decode_time: u64,
    sequence_number: u32,
) -> Result<(), Fmp4Error> {
    rewrite_timing_per_track(bytes, &|_| add_decode_time, sequence_number)
}

/// Like [`rewrite_timing`], adding `add_decode_time(track_id)` to each track's decode times:
/// tracks have their own timescales (video often 15 360 or 90 000 Hz, AAC audio its sample rate),
/// so a loop's shift of `n` × the clip duration is a different count of ticks in each. Shifting
/// an audio track by the video's ticks left a hole in its timeline at the first loop, where
/// every player stalled (issue 14, found with `cargo xtask swarm --source`).
pub fn rewrite_timing_per_track(
    bytes: &mut [u8],
    add_decode_time: &dyn Fn(u32) -> u64,
    sequence_number: u32,
) -> Result<(), Fmp4Error> {
    enum Patch {
        U32(usize, u32),
        U64(usize, u64),
    }
    let mut patches = Vec::new();
    let mut saw_moof = false;
    for top in BoxIter::new(bytes, "fragment") {
        let top = top?;
        if &top.kind != b"moof" {
            continue;
        }
        saw_moof = true;
        let moof_body = top.body_start;
        let mut saw_mfhd = false;
        for child in BoxIter::new(top.body, "moof") {
            let child = child?;
            match &child.kind {
                b"mfhd" => {
                    if child.body.len() < 8 {
                        return Err(truncated("mfhd"));
                    }
                    saw_mfhd = true;
                    patches.push(Patch::U32(
                        moof_body + child.body_start + 4,
                        sequence_number,
                    ));
                }
                b"traf" => {
                    let traf_body = moof_body + child.body_start;
                    let mut track_id = 0;
                    let mut tfdt = None;
                    for leaf in BoxIter::new(child.body, "traf") {
                        let leaf = leaf?;
                        match &leaf.kind {
                            b"tfhd" => {
                                let mut r = Reader::new(leaf.body, "tfhd");
                                r.full_box()?;
                                track_id = r.u32()?;
                            }
                            b"tfdt" => tfdt = Some(leaf),
                            _ => {}
                        }
                    }
                    let tfdt = tfdt.ok_or_else(|| {
                        Fmp4Error::Malformed("traf without tfdt: cannot rewrite its timing".into())
                    })?;
                    let at = traf_body + tfdt.body_start + 4;
                    let add_decode_time = add_decode_time(track_id);
                    let mut r = Reader::new(tfdt.body, "tfdt");
                    let (version, _) = r.full_box()?;
                    if version == 1 {
                        let new = r
                            .u64()?
                            .checked_add(add_decode_time)
                            .ok_or(Fmp4Error::TimestampOverflow { track_id })?;
                        patches.push(Patch::U64(at, new));
                    } else {
                        let new = u64::from(r.u32()?)
                            .checked_add(add_decode_time)
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or(Fmp4Error::TimestampOverflow { track_id })?;
                        patches.push(Patch::U32(at, new));
                    }
                }
                _ => {}
            }
        }
        if !saw_mfhd {
            return Err(Fmp4Error::Malformed("moof without mfhd".into()));
        }
    }
    if !saw_moof {
        return Err(Fmp4Error::Malformed("no moof to rewrite".into()));
    }
    for patch in patches {
        // Offsets were derived from bounds-checked reads of this very buffer.
        match patch {
            Patch::U32(at, v) => {
                if let Some(dst) = bytes.get_mut(at..at + 4) {
                    dst.copy_from_slice(&v.to_be_bytes());
                }
            }
            Patch::U64(at, v) => {
                if let Some(dst) = bytes.get_mut(at..at + 8) {
                    dst.copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    Ok(())
}

/// Each track's timescale (`track_id`, ticks per second) from an init segment's `moov`.
pub fn track_timescales(init: &[u8]) -> Result<Vec<(u32, u32)>, Fmp4Error> {
    let moov = find(init, "init segment", b"moov")?.ok_or(Fmp4Error::MissingInit)?;
    let mut out = Vec::new();
    for b in BoxIter::new(moov.body, "moov") {
        let b = b?;
        if &b.kind == b"trak" {
            let t = parse_trak(b.body)?;
            out.push((t.track_id, t.timescale));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Box framing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct BoxHeader {
    kind: [u8; 4],
    header_len: usize,
    size: u64,
}

/// Parses the box header at the start of `data`; `Ok(None)` when more bytes are needed.
fn parse_header(data: &[u8], offset: u64) -> Result<Option<BoxHeader>, Fmp4Error> {
    let (Some(size32), Some(kind)) = (data.get(0..4), data.get(4..8)) else {
        return Ok(None);
    };
    let mut k = [0u8; 4];
    k.copy_from_slice(kind);
    let bad = |reason| Fmp4Error::BadBox {
        kind: fourcc(&k),
        offset,
        reason,
    };
    let (size, header_len) = match u32::from_be_bytes([size32[0], size32[1], size32[2], size32[3]])
    {
        0 => {
            return Err(bad(
                "size 0 (box extends to the end of the file) is not supported",
            ))
        }
        1 => {
            let Some(large) = data.get(8..16) else {
                return Ok(None);
            };
            let mut b = [0u8; 8];
            b.copy_from_slice(large);
            let size = u64::from_be_bytes(b);
            if size < 16 {
                return Err(bad("64-bit size smaller than its 16-byte header"));
            }
            (size, 16)
        }
        s if s < 8 => return Err(bad("size smaller than the 8-byte header")),
        s => (u64::from(s), 8),
    };
    if size > MAX_BOX_SIZE {
        return Err(Fmp4Error::BoxTooLarge {
            kind: fourcc(&k),
            offset,
            size,
        });
    }
    Ok(Some(BoxHeader {
        kind: k,
        header_len,
        size,
    }))
}

/// A complete box inside a buffer.
#[derive(Debug, Clone, Copy)]
struct RawBox<'a> {
    kind: [u8; 4],
    /// Offset of the body within the buffer that was iterated.
    body_start: usize,
    body: &'a [u8],
}

/// Iterates the boxes that make up a complete buffer (a box body). A child that does not fit its
/// parent is an error, and iteration stops after the first error.
struct BoxIter<'a> {
    data: &'a [u8],
    pos: usize,
    parent: &'static str,
}

impl<'a> BoxIter<'a> {
    fn new(data: &'a [u8], parent: &'static str) -> Self {
        BoxIter {
            data,
            pos: 0,
            parent,
        }
    }
}

impl<'a> Iterator for BoxIter<'a> {
    type Item = Result<RawBox<'a>, Fmp4Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.data.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        let result = match parse_header(rest, self.pos as u64) {
            Ok(Some(h)) => match rest.get(h.header_len..h.size as usize) {
                Some(body) => {
                    let b = RawBox {
                        kind: h.kind,
                        body_start: self.pos + h.header_len,
                        body,
                    };
                    self.pos += h.size as usize;
                    return Some(Ok(b));
                }
                None => Err(Fmp4Error::Malformed(format!(
                    "box {} overruns its parent {}",
                    fourcc(&h.kind),
                    self.parent
                ))),
            },
            Ok(None) => Err(Fmp4Error::Malformed(format!(
                "{} trailing bytes in {} are not a box",
                rest.len(),
                self.parent
            ))),
            Err(e) => Err(e),
        };
        self.pos = self.data.len();
        Some(result)
    }
}

/// The first child box of the given kind.
fn find<'a>(
    data: &'a [u8],
    parent: &'static str,
    kind: &[u8; 4],
) -> Result<Option<RawBox<'a>>, Fmp4Error> {
    for b in BoxIter::new(data, parent) {
        let b = b?;
        if &b.kind == kind {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Printable form of a box type, for error messages.
fn fourcc(kind: &[u8]) -> String {
    kind.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

fn truncated(what: &str) -> Fmp4Error {
    Fmp4Error::Malformed(format!("truncated {what} box"))
}

/// Bounds-checked big-endian reader over a box body.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Reader { data, pos: 0, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Fmp4Error> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| truncated(self.what))?;
        let b = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| truncated(self.what))?;
        self.pos = end;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), Fmp4Error> {
        self.bytes(n).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8, Fmp4Error> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Fmp4Error> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Fmp4Error> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// FullBox header: (version, flags).
    fn full_box(&mut self) -> Result<(u8, u32), Fmp4Error> {
        let v = self.u32()?;
        Ok(((v >> 24) as u8, v & 0x00ff_ffff))
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// moov
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct TrackInfo {
    track_id: u32,
    timescale: u32,
    handler: [u8; 4],
    codec: Option<String>,
}

fn parse_moov(body: &[u8]) -> Result<MovieInfo, Fmp4Error> {
    let mut tracks = Vec::new();
    let mut trex = None;
    for b in BoxIter::new(body, "moov") {
        let b = b?;
        match &b.kind {
            b"trak" => tracks.push(parse_trak(b.body)?),
            b"mvex" => trex = Some(parse_mvex(b.body)?),
            _ => {}
        }
    }
    let trex = trex.ok_or(Fmp4Error::NotFragmented(
        "the moov has no mvex (movie extends) box",
    ))?;
    let first = tracks
        .first()
        .ok_or_else(|| Fmp4Error::Malformed("moov without trak".into()))?;
    if first.timescale == 0 {
        return Err(Fmp4Error::Malformed("mdhd timescale is 0".into()));
    }
    Ok(MovieInfo {
        timescale: first.timescale,
        mime: mime_type(&tracks),
        primary_track: first.track_id,
        trex,
    })
}

fn parse_mvex(body: &[u8]) -> Result<Vec<Trex>, Fmp4Error> {
    let mut out = Vec::new();
    for b in BoxIter::new(body, "mvex") {
        let b = b?;
        if &b.kind == b"trex" {
            let mut r = Reader::new(b.body, "trex");
            r.full_box()?;
            let track_id = r.u32()?;
            let _default_sample_description_index = r.u32()?;
            let default_sample_duration = r.u32()?;
            let _default_sample_size = r.u32()?;
            let default_sample_flags = r.u32()?;
            out.push(Trex {
                track_id,
                default_sample_duration,
                default_sample_flags,
            });
        }
    }
    Ok(out)
}

fn parse_trak(body: &[u8]) -> Result<TrackInfo, Fmp4Error> {
    let tkhd = find(body, "trak", b"tkhd")?.ok_or_else(|| missing("tkhd"))?;
    let mut r = Reader::new(tkhd.body, "tkhd");
    let (version, _) = r.full_box()?;
    r.skip(if version == 1 { 16 } else { 8 })?; // creation + modification time
    let track_id = r.u32()?;

    let mdia = find(body, "trak", b"mdia")?.ok_or_else(|| missing("mdia"))?;
    let mdhd = find(mdia.body, "mdia", b"mdhd")?.ok_or_else(|| missing("mdhd"))?;
    let mut r = Reader::new(mdhd.body, "mdhd");
    let (version, _) = r.full_box()?;
    r.skip(if version == 1 { 16 } else { 8 })?;
    let timescale = r.u32()?;

    let mut handler = [0u8; 4];
    if let Some(hdlr) = find(mdia.body, "mdia", b"hdlr")? {
        let mut r = Reader::new(hdlr.body, "hdlr");
        r.full_box()?;
        r.skip(4)?; // pre_defined
        handler.copy_from_slice(r.bytes(4)?);
    }

    let codec = match sample_entry(mdia.body)? {
        Some(entry) => codec_string(&entry.kind, entry.body)?,
        None => None,
    };
    Ok(TrackInfo {
        track_id,
        timescale,
        handler,
        codec,
    })
}

fn missing(what: &str) -> Fmp4Error {
    Fmp4Error::Malformed(format!("trak without {what}"))
}

/// The first sample entry of `mdia/minf/stbl/stsd`, if any.
fn sample_entry(mdia: &[u8]) -> Result<Option<RawBox<'_>>, Fmp4Error> {
    let Some(minf) = find(mdia, "mdia", b"minf")? else {
        return Ok(None);
    };
    let Some(stbl) = find(minf.body, "minf", b"stbl")? else {
        return Ok(None);
    };
    let Some(stsd) = find(stbl.body, "stbl", b"stsd")? else {
        return Ok(None);
    };
    let mut r = Reader::new(stsd.body, "stsd");
    r.full_box()?;
    let _entry_count = r.u32()?;
    BoxIter::new(r.rest(), "stsd").next().transpose()
}

/// Child boxes of a visual sample entry start after its fixed 78-byte part.
const VISUAL_ENTRY_LEN: usize = 78;

/// RFC 6381 `codecs` parameter for a sample entry, when we know how to build it.
fn codec_string(kind: &[u8; 4], entry: &[u8]) -> Result<Option<String>, Fmp4Error> {
    let visual_config = |config: &[u8; 4]| -> Result<Option<&[u8]>, Fmp4Error> {
        match entry.get(VISUAL_ENTRY_LEN..) {
            Some(children) => Ok(find(children, "sample entry", config)?.map(|b| b.body)),
            None => Ok(None),
        }
    };
    let s = match kind {
        b"avc1" | b"avc3" => visual_config(b"avcC")?.and_then(|c| {
            // configurationVersion, AVCProfileIndication, profile_compatibility, AVCLevelIndication
            let p = c.get(1..4)?;
            Some(format!(
                "{}.{:02x}{:02x}{:02x}",
                fourcc(kind),
                p[0],
                p[1],
                p[2]
            ))
        }),
        b"hvc1" | b"hev1" => visual_config(b"hvcC")?.and_then(|c| hevc_codec(kind, c)),
        b"vp09" => visual_config(b"vpcC")?.and_then(|c| {
            // FullBox header, then profile, level, bitDepth(4) | chroma(3) | fullRange(1).
            let b = c.get(4..7)?;
            Some(format!("vp09.{:02}.{:02}.{:02}", b[0], b[1], b[2] >> 4))
        }),
        b"vp08" => Some("vp8".to_owned()),
        b"av01" => visual_config(b"av1C")?.and_then(|c| {
            let b = c.get(1..3)?;
            let profile = b[0] >> 5;
            let level = b[0] & 0x1f;
            let tier = if b[1] & 0x80 != 0 { 'H' } else { 'M' };
            let bit_depth = match (b[1] & 0x40 != 0, b[1] & 0x20 != 0) {
                (true, true) => 12,
                (true, false) => 10,
                _ => 8,
            };
            Some(format!("av01.{profile}.{level:02}{tier}.{bit_depth:02}"))
        }),
        b"mp4a" => audio_children(entry)
            .map(|children| find(children, "sample entry", b"esds"))
            .transpose()?
            .flatten()
            .and_then(|esds| mp4a_codec(esds.body)),
        b"Opus" => Some("opus".to_owned()),
        b"fLaC" => Some("flac".to_owned()),
        b"ac-3" => Some("ac-3".to_owned()),
        b"ec-3" => Some("ec-3".to_owned()),
        _ => None,
    };
    Ok(s)
}

/// Child boxes of an audio sample entry: after 28 fixed bytes, plus the QuickTime v1/v2 fields.
fn audio_children(entry: &[u8]) -> Option<&[u8]> {
    let version = u16::from_be_bytes([*entry.get(8)?, *entry.get(9)?]);
    let skip = match version {
        1 => 28 + 16,
        2 => 28 + 36,
        _ => 28,
    };
    entry.get(skip..)
}

/// `hvc1.<space><profile>.<compat>.<tier><level>.<constraints>` (ISO/IEC 14496-15 Annex E).
fn hevc_codec(kind: &[u8; 4], c: &[u8]) -> Option<String> {
    let b1 = *c.get(1)?;
    let space = ["", "A", "B", "C"][usize::from(b1 >> 6)];
    let tier = if b1 & 0x20 != 0 { 'H' } else { 'L' };
    let profile = b1 & 0x1f;
    let compat = u32::from_be_bytes(c.get(2..6)?.try_into().ok()?).reverse_bits();
    let constraints = c.get(6..12)?;
    let level = *c.get(12)?;
    let mut s = format!("{}.{space}{profile}.{compat:X}.{tier}{level}", fourcc(kind));
    let used = constraints
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i + 1);
    for b in constraints.iter().take(used) {
        s.push_str(&format!(".{b:02X}"));
    }
    Some(s)
}

/// `mp4a.<objectTypeIndication>[.<audioObjectType>]` from an `esds` body.
fn mp4a_codec(esds: &[u8]) -> Option<String> {
    let mut r = Reader::new(esds, "esds");
    r.full_box().ok()?;
    // ES_Descriptor
    if read_descriptor(&mut r)? != 0x03 {
        return None;
    }
    r.skip(2).ok()?; // ES_ID
    let flags = r.u8().ok()?;
    if flags & 0x80 != 0 {
        r.skip(2).ok()?; // dependsOn_ES_ID
    }
    if flags & 0x40 != 0 {
        let len = r.u8().ok()?;
        r.skip(usize::from(len)).ok()?; // URL
    }
    if flags & 0x20 != 0 {
        r.skip(2).ok()?; // OCR_ES_Id
    }
    // DecoderConfigDescriptor
    if read_descriptor(&mut r)? != 0x04 {
        return None;
    }
    let oti = r.u8().ok()?;
    if oti != 0x40 {
        return Some(format!("mp4a.{oti:02x}"));
    }
    r.skip(12).ok()?; // streamType, bufferSizeDB, maxBitrate, avgBitrate
                      // DecoderSpecificInfo: AudioSpecificConfig starts with the 5-bit audioObjectType.
    if read_descriptor(&mut r)? != 0x05 {
        return Some("mp4a.40.2".to_owned());
    }
    let b0 = r.u8().ok()?;
    let mut aot = b0 >> 3;
    if aot == 31 {
        let b1 = r.u8().ok()?;
        aot = 32 + (((b0 & 0x07) << 3) | (b1 >> 5));
    }
    Some(format!("mp4a.40.{aot}"))
}

/// Reads an MPEG-4 descriptor tag and its variable-length size; returns the tag.
fn read_descriptor(r: &mut Reader<'_>) -> Option<u8> {
    let tag = r.u8().ok()?;
    for _ in 0..4 {
        if r.u8().ok()? & 0x80 == 0 {
            break;
        }
    }
    Some(tag)
}

/// `video/mp4; codecs="…"` over the audio and video tracks, or a bare container type when a
/// codec is unknown (the browser may still cope, and it beats a wrong codecs string).
fn mime_type(tracks: &[TrackInfo]) -> String {
    let media: Vec<&TrackInfo> = tracks
        .iter()
        .filter(|t| &t.handler == b"vide" || &t.handler == b"soun")
        .collect();
    let container = if !media.is_empty() && media.iter().all(|t| &t.handler == b"soun") {
        "audio/mp4"
    } else {
        "video/mp4"
    };
    let codecs: Option<Vec<&str>> = media.iter().map(|t| t.codec.as_deref()).collect();
    match codecs {
        Some(c) if !c.is_empty() => format!("{container}; codecs=\"{}\"", c.join(", ")),
        _ => container.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// moof
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct TrafInfo {
    track_id: u32,
    base_decode_time: u64,
    duration: u64,
    first_sample_flags: Option<u32>,
}

fn parse_moof(body: &[u8], movie: &MovieInfo) -> Result<FragmentInfo, Fmp4Error> {
    let mut primary = None;
    for b in BoxIter::new(body, "moof") {
        let b = b?;
        if &b.kind == b"traf" {
            let traf = parse_traf(b.body, movie)?;
            let is_primary = traf.track_id == movie.primary_track;
            if primary.is_none() || is_primary {
                primary = Some(traf);
            }
            if is_primary {
                break;
            }
        }
    }
    let traf = primary.ok_or_else(|| Fmp4Error::Malformed("moof without traf".into()))?;
    Ok(FragmentInfo {
        base_decode_time: traf.base_decode_time,
        duration: traf.duration,
        // No flags anywhere: nothing says it is not a sync sample.
        starts_with_keyframe: traf.first_sample_flags.is_none_or(is_sync_sample),
    })
}

/// ISO/IEC 14496-12 sample flags: `sample_depends_on` == 2 means "depends on no other sample";
/// `sample_is_non_sync_sample` clear means it is a sync sample.
fn is_sync_sample(flags: u32) -> bool {
    let depends_on = (flags >> 24) & 0x3;
    let non_sync = flags & 0x0001_0000 != 0;
    depends_on == 2 || !non_sync
}

fn parse_traf(body: &[u8], movie: &MovieInfo) -> Result<TrafInfo, Fmp4Error> {
    let tfhd = find(body, "traf", b"tfhd")?
        .ok_or_else(|| Fmp4Error::Malformed("traf without tfhd".into()))?;
    let mut r = Reader::new(tfhd.body, "tfhd");
    let (_, flags) = r.full_box()?;
    let track_id = r.u32()?;
    if flags & 0x01 != 0 {
        r.skip(8)?; // base_data_offset
    }
    if flags & 0x02 != 0 {
        r.skip(4)?; // sample_description_index
    }
    let tfhd_duration = if flags & 0x08 != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    if flags & 0x10 != 0 {
        r.skip(4)?; // default_sample_size
    }
    let tfhd_flags = if flags & 0x20 != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    let trex = movie.trex.iter().find(|t| t.track_id == track_id);
    let default_duration = tfhd_duration
        .or(trex.map(|t| t.default_sample_duration))
        .unwrap_or(0);
    let default_flags = tfhd_flags.or(trex.map(|t| t.default_sample_flags));

    let mut base_decode_time = None;
    let mut duration = 0u64;
    let mut first_sample_flags = None;
    let mut first_trun = true;
    for b in BoxIter::new(body, "traf") {
        let b = b?;
        match &b.kind {
            b"tfdt" => {
                let mut r = Reader::new(b.body, "tfdt");
                let (version, _) = r.full_box()?;
                base_decode_time = Some(if version == 1 {
                    r.u64()?
                } else {
                    u64::from(r.u32()?)
                });
            }
            b"trun" => {
                let run = parse_trun(b.body, default_duration)?;
                duration = duration.saturating_add(run.duration);
                if first_trun && run.sample_count > 0 {
                    first_sample_flags = run.first_sample_flags.or(default_flags);
                    first_trun = false;
                }
            }
            _ => {}
        }
    }
    let base_decode_time = base_decode_time.ok_or_else(|| {
        Fmp4Error::Malformed(
            "traf without tfdt: live delivery needs each fragment's absolute decode time".into(),
        )
    })?;
    Ok(TrafInfo {
        track_id,
        base_decode_time,
        duration,
        first_sample_flags,
    })
}

struct TrunInfo {
    sample_count: u32,
    duration: u64,
    /// `first_sample_flags`, else the first sample's own flags.
    first_sample_flags: Option<u32>,
}

fn parse_trun(body: &[u8], default_duration: u32) -> Result<TrunInfo, Fmp4Error> {
    let mut r = Reader::new(body, "trun");
    let (_, flags) = r.full_box()?;
    let sample_count = r.u32()?;
    if flags & 0x01 != 0 {
        r.skip(4)?; // data_offset
    }
    let mut first_sample_flags = if flags & 0x04 != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    let has_duration = flags & 0x100 != 0;
    let has_flags = flags & 0x400 != 0;
    let per_sample = [0x100, 0x200, 0x400, 0x800]
        .iter()
        .filter(|f| flags & **f != 0)
        .count()
        * 4;
    let duration = if per_sample == 0 {
        u64::from(sample_count) * u64::from(default_duration)
    } else {
        // Check the table fits before walking it, so a bogus count cannot make us loop for long.
        let count = sample_count as usize;
        if count
            .checked_mul(per_sample)
            .is_none_or(|n| n > r.remaining())
        {
            return Err(truncated("trun"));
        }
        let mut total = 0u64;
        for i in 0..count {
            let d = if has_duration {
                r.u32()?
            } else {
                default_duration
            };
            total += u64::from(d);
            if flags & 0x200 != 0 {
                r.skip(4)?;
            }
            if has_flags {
                let f = r.u32()?;
                if i == 0 && first_sample_flags.is_none() {
                    first_sample_flags = Some(f);
                }
            }
            if flags & 0x800 != 0 {
                r.skip(4)?;
            }
        }
        total
    };
    Ok(TrunInfo {
        sample_count,
        duration,
        first_sample_flags,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DEMO: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../web/media/demo.mp4"
    ));

    /// Builds a box from its type and body.
    fn mp4box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(body);
        v
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    use protocol::rng::XorShift as Rng;

    fn tfdt_values(fragment: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        for top in BoxIter::new(fragment, "fragment") {
            let top = top.unwrap();
            if &top.kind != b"moof" {
                continue;
            }
            for traf in BoxIter::new(top.body, "moof") {
                let traf = traf.unwrap();
                if &traf.kind != b"traf" {
                    continue;
                }
                let tfdt = find(traf.body, "traf", b"tfdt").unwrap().unwrap();
                let mut r = Reader::new(tfdt.body, "tfdt");
                let (v, _) = r.full_box().unwrap();
                out.push(if v == 1 {
                    r.u64().unwrap()
                } else {
                    u64::from(r.u32().unwrap())
                });
            }
        }
        out
    }

    fn mfhd_seq(fragment: &[u8]) -> u32 {
        let moof = find(fragment, "fragment", b"moof").unwrap().unwrap();
        let mfhd = find(moof.body, "moof", b"mfhd").unwrap().unwrap();
        u32::from_be_bytes(mfhd.body[4..8].try_into().unwrap())
    }

    #[test]
    fn demo_clip_splits_into_keyframe_fragments() {
        let (init, fragments) = parse_file(DEMO).unwrap();
        assert_eq!(init.mime, r#"video/mp4; codecs="avc1.42c01e""#);
        assert_eq!(init.timescale, 12_800);
        assert_eq!(&init.bytes[4..8], b"ftyp");
        assert_eq!(fragments.len(), 20);
        let mut expected_start = fragments[0].base_decode_time;
        for f in &fragments {
            assert!(f.starts_with_keyframe);
            assert_eq!(&f.bytes[4..8], b"moof");
            assert_eq!(f.base_decode_time, expected_start, "contiguous timeline");
            expected_start += f.duration;
        }
        let total: u64 = fragments.iter().map(|f| f.duration).sum();
        assert_eq!(total, 20 * u64::from(init.timescale));
        // Everything but the trailing mfra index is accounted for.
        let used: usize = init.bytes.len() + fragments.iter().map(|f| f.bytes.len()).sum::<usize>();
        assert_eq!(used, DEMO.len() - 428);
    }

    #[test]
    fn random_chunking_gives_identical_items() {
        let mut whole = Fmp4Splitter::new();
        let mut expected = whole.push(DEMO).unwrap();
        expected.extend(whole.finish().unwrap());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..8 {
            let mut s = Fmp4Splitter::new();
            let mut items = Vec::new();
            let mut rest = DEMO;
            while !rest.is_empty() {
                let max = if round % 2 == 0 { 17 } else { 70_000 };
                let n = (1 + rng.next_u64() as usize % max).min(rest.len());
                items.extend(s.push(&rest[..n]).unwrap());
                rest = &rest[n..];
            }
            items.extend(s.finish().unwrap());
            assert_eq!(items, expected);
        }
    }

    /// A looped clip with audio: each track is shifted by its own count of ticks.
    #[test]
    fn rewrite_timing_per_track_shifts_each_track_by_its_own_ticks() {
        fn bx(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
            let mut b = (8 + body.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(kind);
            b.extend_from_slice(body);
            b
        }
        let traf = |track: u32, base: u64| {
            let mut tfhd = vec![0, 0, 0, 0];
            tfhd.extend_from_slice(&track.to_be_bytes());
            let mut tfdt = vec![1, 0, 0, 0];
            tfdt.extend_from_slice(&base.to_be_bytes());
            bx(b"traf", &cat(&[bx(b"tfhd", &tfhd), bx(b"tfdt", &tfdt)]))
        };
        let mfhd = bx(b"mfhd", &[0, 0, 0, 0, 0, 0, 0, 1]);
        let moof = bx(b"moof", &cat(&[mfhd, traf(1, 15_360), traf(2, 48_000)]));
        let mut bytes = cat(&[moof, bx(b"mdat", &[0; 4])]);
        // One 20 s lap: 20 s of video at 15 360 Hz, 20 s of audio at 48 kHz.
        rewrite_timing_per_track(
            &mut bytes,
            &|track| if track == 1 { 20 * 15_360 } else { 20 * 48_000 },
            2,
        )
        .unwrap();
        assert_eq!(tfdt_values(&bytes), vec![21 * 15_360, 21 * 48_000]);
        assert_eq!(mfhd_seq(&bytes), 2);
        let (init, _) = parse_file(DEMO).unwrap();
        assert_eq!(
            track_timescales(&init.bytes).unwrap(),
            vec![(1, init.timescale)]
        );
    }

    #[test]
    fn rewrite_timing_shifts_tfdt_exactly() {
        let (_, fragments) = parse_file(DEMO).unwrap();
        let f = &fragments[3];
        let mut bytes = f.bytes.clone();
        let before = tfdt_values(&bytes);
        rewrite_timing(&mut bytes, 256_000, 4242).unwrap();
        let after = tfdt_values(&bytes);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(*a, b + 256_000);
        }
        assert_eq!(mfhd_seq(&bytes), 4242);
        // Only the patched fields change, and the result still parses identically otherwise.
        let diff = bytes.iter().zip(&f.bytes).filter(|(a, b)| a != b).count();
        assert!(diff <= 12, "{diff} bytes changed");
        let mut s = Fmp4Splitter::new();
        let (init, _) = parse_file(DEMO).unwrap();
        s.push(&init.bytes).unwrap();
        let items = s.push(&bytes).unwrap();
        let Some(Fmp4Item::Init(_)) = items.first() else {
            panic!("init first");
        };
        let Some(Fmp4Item::Fragment(g)) = items.get(1) else {
            panic!("fragment second");
        };
        assert_eq!(g.base_decode_time, f.base_decode_time + 256_000);
        assert_eq!(g.duration, f.duration);
    }

    #[test]
    fn rewrite_timing_refuses_32_bit_overflow_and_leaves_bytes_untouched() {
        let tfdt_v0 = mp4box(b"tfdt", &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x00]);
        let tfhd = mp4box(b"tfhd", &[0, 0, 0, 0, 0, 0, 0, 7]);
        let traf = mp4box(b"traf", &cat(&[tfhd, tfdt_v0]));
        let mfhd = mp4box(b"mfhd", &[0, 0, 0, 0, 0, 0, 0, 1]);
        let moof = mp4box(b"moof", &cat(&[mfhd, traf]));
        let mut bytes = cat(&[moof, mp4box(b"mdat", b"x")]);
        let original = bytes.clone();
        assert_eq!(
            rewrite_timing(&mut bytes, 0x100, 2),
            Err(Fmp4Error::TimestampOverflow { track_id: 7 })
        );
        assert_eq!(bytes, original);
        rewrite_timing(&mut bytes, 0xff, 2).unwrap();
        assert_eq!(tfdt_values(&bytes), vec![0xffff_ffff]);
        assert!(rewrite_timing(&mut [0u8; 3], 1, 1).is_err());
    }

    #[test]
    fn png_is_not_mp4() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let mut s = Fmp4Splitter::new();
        let err = s.push(png).unwrap_err();
        assert!(matches!(err, Fmp4Error::NotMp4 { .. }), "{err}");
        // Errors are sticky.
        assert_eq!(s.push(b"more").unwrap_err(), err);
        assert!(matches!(parse_file(png), Err(Fmp4Error::NotMp4 { .. })));
    }

    fn minimal_moov(with_mvex: bool) -> Vec<u8> {
        let mvhd = mp4box(b"mvhd", &[0; 100]);
        let mut tkhd = vec![0u8; 84];
        tkhd[12..16].copy_from_slice(&1u32.to_be_bytes());
        let mut mdhd = vec![0u8; 24];
        mdhd[12..16].copy_from_slice(&90_000u32.to_be_bytes());
        let mut hdlr = vec![0u8; 25];
        hdlr[8..12].copy_from_slice(b"vide");
        let mdia = mp4box(
            b"mdia",
            &cat(&[mp4box(b"mdhd", &mdhd), mp4box(b"hdlr", &hdlr)]),
        );
        let trak = mp4box(b"trak", &cat(&[mp4box(b"tkhd", &tkhd), mdia]));
        let mut parts = vec![mvhd, trak];
        if with_mvex {
            let mut trex = vec![0u8; 24];
            trex[4..8].copy_from_slice(&1u32.to_be_bytes());
            trex[12..16].copy_from_slice(&3000u32.to_be_bytes()); // default duration
            trex[20..24].copy_from_slice(&0x0101_0000u32.to_be_bytes()); // non-sync default
            parts.push(mp4box(b"mvex", &mp4box(b"trex", &trex)));
        }
        mp4box(b"moov", &cat(&parts))
    }

    fn ftyp() -> Vec<u8> {
        mp4box(b"ftyp", b"isom\0\0\x02\0isomiso2mp41")
    }

    #[test]
    fn plain_mp4_is_refused_as_not_fragmented() {
        let plain = cat(&[ftyp(), minimal_moov(false), mp4box(b"mdat", &[0; 32])]);
        assert!(matches!(
            parse_file(&plain),
            Err(Fmp4Error::NotFragmented(_))
        ));
        // Non-"faststart" layout: mdat before moov is refused as soon as its header arrives.
        let mut s = Fmp4Splitter::new();
        s.push(&ftyp()).unwrap();
        let err = s
            .push(&[0, 0, 0x10, 0, b'm', b'd', b'a', b't'])
            .unwrap_err();
        assert!(matches!(err, Fmp4Error::NotFragmented(_)), "{err}");
        assert!(err.to_string().contains("frag_keyframe"));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut s = Fmp4Splitter::new();
        s.push(&ftyp()).unwrap();
        assert!(matches!(
            s.push(&[0, 0, 0, 4, b'f', b'r', b'e', b'e']),
            Err(Fmp4Error::BadBox { .. })
        ));
        let mut s = Fmp4Splitter::new();
        s.push(&ftyp()).unwrap();
        assert!(matches!(
            s.push(&[0x10, 0, 0, 0, b'f', b'r', b'e', b'e']),
            Err(Fmp4Error::BoxTooLarge { .. })
        ));
        let mut s = Fmp4Splitter::new();
        assert!(matches!(
            s.push(&[0, 0, 0, 1, b'f', b't', b'y', b'p', 0, 0, 0, 0, 0, 0, 0, 8]),
            Err(Fmp4Error::BadBox { .. })
        ));
    }

    #[test]
    fn synthetic_stream_with_largesize_mdat_prefix_boxes_and_defaults() {
        let init = cat(&[ftyp(), minimal_moov(true), mp4box(b"free", b"")]);
        let fragment = |seq: u32, tfdt: u64, first_flags: Option<u32>| {
            let mfhd = mp4box(b"mfhd", &cat(&[vec![0; 4], seq.to_be_bytes().to_vec()]));
            let tfhd = mp4box(b"tfhd", &[0, 0, 0, 0, 0, 0, 0, 1]);
            let mut tfdt_body = vec![1, 0, 0, 0];
            tfdt_body.extend_from_slice(&tfdt.to_be_bytes());
            // trun: 5 samples, no per-sample durations (trex default applies).
            let mut trun = vec![0, 0, 0, if first_flags.is_some() { 0x04 } else { 0 }];
            trun.extend_from_slice(&5u32.to_be_bytes());
            if let Some(f) = first_flags {
                trun.extend_from_slice(&f.to_be_bytes());
            }
            let traf = mp4box(
                b"traf",
                &cat(&[tfhd, mp4box(b"tfdt", &tfdt_body), mp4box(b"trun", &trun)]),
            );
            let moof = mp4box(b"moof", &cat(&[mfhd, traf]));
            // mdat with a 64-bit largesize header.
            let payload = [seq as u8; 10];
            let mut mdat = 1u32.to_be_bytes().to_vec();
            mdat.extend_from_slice(b"mdat");
            mdat.extend_from_slice(&(16 + payload.len() as u64).to_be_bytes());
            mdat.extend_from_slice(&payload);
            cat(&[mp4box(b"styp", b"msdh"), moof, mdat])
        };
        let f1 = fragment(1, 0, Some(0x0200_0000));
        let f2 = fragment(2, 15_000, None);
        let stream = cat(&[
            init.clone(),
            f1.clone(),
            f2.clone(),
            mp4box(b"mfra", &[0; 8]),
        ]);
        let (i, frags) = parse_file(&stream).unwrap();
        assert_eq!(i.bytes, init);
        assert_eq!(i.timescale, 90_000);
        assert_eq!(i.mime, "video/mp4"); // no sample description: no codecs
        assert_eq!(frags.len(), 2);
        assert_eq!(frags[0].bytes, f1);
        assert_eq!(frags[1].bytes, f2);
        assert_eq!(frags[0].duration, 15_000);
        assert!(frags[0].starts_with_keyframe);
        assert!(!frags[1].starts_with_keyframe, "trex default says non-sync");
        assert_eq!(frags[1].base_decode_time, 15_000);

        // Truncation is reported at the end of the stream.
        let mut s = Fmp4Splitter::new();
        s.push(&stream[..stream.len() - 30]).unwrap();
        assert!(matches!(s.finish(), Err(Fmp4Error::Truncated { .. })));
        // An init segment without fragments is still delivered.
        let (i, frags) = parse_file(&init).unwrap();
        assert_eq!(i.bytes, init);
        assert!(frags.is_empty());
        assert_eq!(parse_file(&[]), Err(Fmp4Error::MissingInit));
    }

    #[test]
    fn codec_strings() {
        // HEVC Main, level 3.1 (93), compat flags 0x60000000, constraints b0.
        let mut hvcc = vec![1u8, 0x01, 0x60, 0, 0, 0, 0xb0, 0, 0, 0, 0, 0, 93];
        hvcc.extend_from_slice(&[0; 10]);
        assert_eq!(
            hevc_codec(b"hvc1", &hvcc).as_deref(),
            Some("hvc1.1.6.L93.B0")
        );
        // esds for AAC-LC.
        let esds = [
            0, 0, 0, 0, 0x03, 0x19, 0, 1, 0, 0x04, 0x11, 0x40, 0x15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0x05, 0x02, 0x12, 0x10,
        ];
        assert_eq!(mp4a_codec(&esds).as_deref(), Some("mp4a.40.2"));
        let mut vpcc = vec![1, 0, 0, 0];
        vpcc.extend_from_slice(&[0, 31, 0x80]);
        let mut entry = vec![0u8; VISUAL_ENTRY_LEN];
        entry.extend(mp4box(b"vpcC", &vpcc));
        assert_eq!(
            codec_string(b"vp09", &entry).unwrap().as_deref(),
            Some("vp09.00.31.08")
        );
        assert_eq!(codec_string(b"zzzz", &entry).unwrap(), None);
        // Garbage never panics.
        for len in 0..40 {
            let junk = vec![0xffu8; len];
            let _ = codec_string(b"avc1", &junk);
            let _ = codec_string(b"mp4a", &junk);
            let _ = hevc_codec(b"hvc1", &junk);
            let _ = mp4a_codec(&junk);
        }
    }

    #[test]
    fn corrupted_demo_never_panics() {
        let mut rng = Rng(42);
        for _ in 0..200 {
            let mut data = DEMO[..30_000].to_vec();
            for _ in 0..4 {
                let i = rng.next_u64() as usize % data.len();
                data[i] = rng.next_u64() as u8;
            }
            let _ = parse_file(&data);
            let _ = rewrite_timing(&mut data[793..], rng.next_u64() % 1000, 1);
        }
    }
}
