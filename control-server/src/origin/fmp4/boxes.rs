//! Reading the boxes the origin needs, with `mp4-atom`: box headers (for the streaming cut and
//! the in-place retiming), the `moov` (tracks, timescale, codecs, `trex` defaults) and each `moof`
//! (decode time, duration, keyframe flag).
//!
//! Only the boxes the origin reads are decoded, found by walking their parents: `tkhd`, `mdhd`,
//! `hdlr`, `stsd` and `mvex` out of the `moov`, `tfhd`, `tfdt` and `trun` out of a `moof`. So
//! boxes it does not need (`udta`, `meta`, `edts`, `sdtp`, encryption boxes) cannot make a
//! playable stream be refused, and mp4-atom's warning about a box it does not know is not logged
//! once per fragment.

use mp4_atom::{
    Decode, DecodeMaybe, Hdlr, Mdhd, Mvex, Stsd, Tfdt, Tfhd, Tkhd, Trex, Trun, TrunSamples,
};

use super::{codecs, Fmp4Error, MAX_BOX_SIZE};

/// A box header: its type, its header's length (8, or 16 with a 64-bit size) and its size.
#[derive(Debug, Clone, Copy)]
pub(super) struct BoxHeader {
    pub kind: [u8; 4],
    pub header_len: usize,
    pub size: u64,
}

/// Parses the box header at the start of `data` (`offset` is its stream offset, for errors);
/// `Ok(None)` when more bytes are needed.
pub(super) fn parse_header(data: &[u8], offset: u64) -> Result<Option<BoxHeader>, Fmp4Error> {
    let kind = match data.get(4..8) {
        Some(k) => [k[0], k[1], k[2], k[3]],
        None => return Ok(None),
    };
    let bad = |reason| Fmp4Error::BadBox {
        kind: fourcc(&kind),
        offset,
        reason,
    };
    let mut rest = data;
    let header = match mp4_atom::Header::decode_maybe(&mut rest) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(_) => return Err(bad("size smaller than its header")),
    };
    let header_len = data.len() - rest.len();
    let body = header
        .size
        .ok_or_else(|| bad("size 0 (box extends to the end of the file) is not supported"))?;
    let size = (body as u64).saturating_add(header_len as u64);
    if size > MAX_BOX_SIZE {
        return Err(Fmp4Error::BoxTooLarge {
            kind: fourcc(&kind),
            offset,
            size,
        });
    }
    Ok(Some(BoxHeader {
        kind,
        header_len,
        size,
    }))
}

/// A complete box inside a buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawBox<'a> {
    pub kind: [u8; 4],
    /// Offset of the box within the buffer that was iterated.
    pub start: usize,
    pub header_len: usize,
    /// The whole box, header included (what `mp4-atom` decodes).
    pub bytes: &'a [u8],
}

impl<'a> RawBox<'a> {
    pub fn body(&self) -> &'a [u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }

    /// Decodes the box with `mp4-atom`.
    pub fn decode<T: Decode>(&self) -> Result<T, Fmp4Error> {
        T::decode(&mut &self.bytes[..])
            .map_err(|e| Fmp4Error::Malformed(format!("{} box: {e}", fourcc(&self.kind))))
    }
}

/// Iterates the boxes that make up a complete buffer (a box body). A child that does not fit its
/// parent is an error, and iteration stops after the first error.
pub(super) struct BoxIter<'a> {
    data: &'a [u8],
    pos: usize,
    parent: &'static str,
}

impl<'a> BoxIter<'a> {
    pub fn new(data: &'a [u8], parent: &'static str) -> Self {
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
            Ok(Some(h)) => match rest.get(..h.size as usize) {
                Some(bytes) => {
                    let b = RawBox {
                        kind: h.kind,
                        start: self.pos,
                        header_len: h.header_len,
                        bytes,
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

/// The first box at `path` below `data` (a box body), e.g. `[b"mdia", b"mdhd"]`.
fn find<'a>(data: &'a [u8], path: &[&[u8; 4]]) -> Result<Option<RawBox<'a>>, Fmp4Error> {
    let Some((first, deeper)) = path.split_first() else {
        return Ok(None);
    };
    for b in BoxIter::new(data, "box") {
        let b = b?;
        if &b.kind == *first {
            return match deeper {
                [] => Ok(Some(b)),
                _ => find(b.body(), deeper),
            };
        }
    }
    Ok(None)
}

/// Printable form of a box type, for error messages.
pub(super) fn fourcc(kind: &[u8]) -> String {
    kind.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// moov
// ---------------------------------------------------------------------------------------------

/// What the `moov` told us that fragments need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MovieInfo {
    pub timescale: u32,
    pub mime: String,
    /// Track whose `traf` defines a fragment's time and keyframe-ness.
    pub primary_track: u32,
    /// Per-track defaults used when `tfhd`/`trun` omit a field.
    pub trex: Vec<Trex>,
}

/// One `trak`, as far as the MIME type and the timeline are concerned.
#[derive(Debug)]
pub(super) struct TrackInfo {
    pub track_id: u32,
    pub timescale: u32,
    pub handler: [u8; 4],
    pub codec: Option<String>,
}

/// Reads a `moov` body.
pub(super) fn read_moov(body: &[u8]) -> Result<MovieInfo, Fmp4Error> {
    let mut tracks = Vec::new();
    let mut mvex = None;
    for b in BoxIter::new(body, "moov") {
        let b = b?;
        match &b.kind {
            b"trak" => tracks.push(read_trak(b.body())?),
            b"mvex" => mvex = Some(b.decode::<Mvex>()?),
            _ => {}
        }
    }
    let mvex = mvex.ok_or(Fmp4Error::NotFragmented(
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
        mime: codecs::mime_type(&tracks),
        primary_track: first.track_id,
        trex: mvex.trex,
    })
}

pub(super) fn read_trak(body: &[u8]) -> Result<TrackInfo, Fmp4Error> {
    let missing = |what: &str| Fmp4Error::Malformed(format!("trak without {what}"));
    let tkhd: Tkhd = find(body, &[b"tkhd"])?
        .ok_or_else(|| missing("tkhd"))?
        .decode()?;
    let mdhd: Mdhd = find(body, &[b"mdia", b"mdhd"])?
        .ok_or_else(|| missing("mdhd"))?
        .decode()?;
    let handler = match find(body, &[b"mdia", b"hdlr"])? {
        // mp4-atom also decodes the handler's name, and refuses one that is not UTF-8 (a Latin-1
        // name from an old muxer): no reason to refuse a stream, so then the type is read from
        // its fixed place (after version, flags and pre_defined).
        Some(b) => match b.decode::<Hdlr>() {
            Ok(hdlr) => hdlr.handler.into(),
            Err(e) => match b.body().get(8..12) {
                Some(&[a, b, c, d]) => [a, b, c, d],
                _ => return Err(e),
            },
        },
        None => [0; 4],
    };
    // A sample entry mp4-atom cannot decode is a codec we cannot name: the MIME type falls back to
    // the bare container type, as for a codec it does not know.
    let codec = find(body, &[b"mdia", b"minf", b"stbl", b"stsd"])?
        .and_then(|b| b.decode::<Stsd>().ok())
        .and_then(|stsd| stsd.codecs.into_iter().next())
        .as_ref()
        .and_then(codecs::codec_string);
    Ok(TrackInfo {
        track_id: tkhd.track_id,
        timescale: mdhd.timescale,
        handler,
        codec,
    })
}

// ---------------------------------------------------------------------------------------------
// moof
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FragmentInfo {
    pub base_decode_time: u64,
    pub duration: u64,
    pub starts_with_keyframe: bool,
}

/// Reads a `moof` body: the primary track's `traf` (else the first one).
///
/// As in the `moov`, only the boxes read here are decoded (`tfhd` of each `traf`, then `tfdt`
/// and `trun` of the chosen one): a box mp4-atom does not know (`sdtp`, a `uuid`) costs nothing
/// and logs nothing once per fragment.
pub(super) fn read_moof(body: &[u8], movie: &MovieInfo) -> Result<FragmentInfo, Fmp4Error> {
    let mut chosen = None;
    for b in BoxIter::new(body, "moof") {
        let b = b?;
        if &b.kind != b"traf" {
            continue;
        }
        let tfhd: Tfhd = find(b.body(), &[b"tfhd"])?
            .ok_or_else(|| Fmp4Error::Malformed("traf without tfhd".into()))?
            .decode()?;
        let is_primary = tfhd.track_id == movie.primary_track;
        if chosen.is_none() || is_primary {
            chosen = Some((tfhd, b));
        }
        if is_primary {
            break;
        }
    }
    let (tfhd, traf) = chosen.ok_or_else(|| Fmp4Error::Malformed("moof without traf".into()))?;
    let mut tfdt = None;
    let mut truns = Vec::new();
    for b in BoxIter::new(traf.body(), "traf") {
        let b = b?;
        match &b.kind {
            b"tfdt" => tfdt = Some(b.decode::<Tfdt>()?),
            b"trun" => truns.push(b.decode::<Trun>()?),
            _ => {}
        }
    }
    let base_decode_time = tfdt
        .ok_or_else(|| {
            Fmp4Error::Malformed(
                "traf without tfdt: live delivery needs each fragment's absolute decode time"
                    .into(),
            )
        })?
        .base_media_decode_time;
    let trex = movie.trex.iter().find(|t| t.track_id == tfhd.track_id);
    let default_duration = tfhd
        .default_sample_duration
        .or(trex.map(|t| t.default_sample_duration))
        .unwrap_or(0);
    let default_flags = tfhd
        .default_sample_flags
        .or(trex.map(|t| t.default_sample_flags));
    let duration = truns.iter().fold(0u64, |total, run| {
        let run_duration = match &run.samples {
            // Not walked: the count comes from the stream and costs no bytes.
            TrunSamples::Inherited { count, .. } => u64::from(*count) * u64::from(default_duration),
            TrunSamples::Explicit(samples) => samples
                .iter()
                .map(|s| u64::from(s.duration.unwrap_or(default_duration)))
                .sum(),
        };
        total.saturating_add(run_duration)
    });
    let first_sample_flags = truns
        .iter()
        .find_map(|run| run.samples.get(0))
        .and_then(|s| s.flags.or(default_flags));
    Ok(FragmentInfo {
        base_decode_time,
        duration,
        // No flags anywhere: nothing says it is not a sync sample.
        starts_with_keyframe: first_sample_flags.is_none_or(is_sync_sample),
    })
}

/// ISO/IEC 14496-12 sample flags: `sample_depends_on` == 2 means "depends on no other sample";
/// `sample_is_non_sync_sample` clear means it is a sync sample.
fn is_sync_sample(flags: u32) -> bool {
    let depends_on = (flags >> 24) & 0x3;
    let non_sync = flags & 0x0001_0000 != 0;
    depends_on == 2 || !non_sync
}
