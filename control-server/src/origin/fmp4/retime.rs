//! Retiming a fragment in place, so a short clip loops as an endless live stream.
//!
//! The boxes are read with `mp4-atom`, but the new values are written over the old ones in the
//! original bytes rather than by re-encoding the `moof`: `mp4-atom` writes every `tfdt` as
//! version 1 (a version-0 box grows by 4 bytes, which moves the `mdat` and invalidates every
//! `trun` data offset), re-chooses the `trun` flags, and drops boxes it does not know. Patching
//! keeps everything but the two fields byte-exact, and costs no allocation per loop.

use mp4_atom::{Mfhd, Tfdt, Tfhd};

use super::boxes::{read_trak, BoxIter};
use super::Fmp4Error;

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
    // Offsets of the fields below: after the box header and the FullBox version and flags.
    let field = |start: usize, header_len: usize| start + header_len + 4;
    let mut patches = Vec::new();
    let mut saw_moof = false;
    for top in BoxIter::new(bytes, "fragment") {
        let top = top?;
        if &top.kind != b"moof" {
            continue;
        }
        saw_moof = true;
        let moof_body = top.start + top.header_len;
        let mut saw_mfhd = false;
        for child in BoxIter::new(top.body(), "moof") {
            let child = child?;
            match &child.kind {
                b"mfhd" => {
                    child.decode::<Mfhd>()?;
                    saw_mfhd = true;
                    patches.push(Patch::U32(
                        moof_body + field(child.start, child.header_len),
                        sequence_number,
                    ));
                }
                b"traf" => {
                    let traf_body = moof_body + child.start + child.header_len;
                    let mut track_id = 0;
                    let mut tfdt = None;
                    for leaf in BoxIter::new(child.body(), "traf") {
                        let leaf = leaf?;
                        match &leaf.kind {
                            b"tfhd" => track_id = leaf.decode::<Tfhd>()?.track_id,
                            b"tfdt" => tfdt = Some(leaf),
                            _ => {}
                        }
                    }
                    let tfdt = tfdt.ok_or_else(|| {
                        Fmp4Error::Malformed("traf without tfdt: cannot rewrite its timing".into())
                    })?;
                    let old = tfdt.decode::<Tfdt>()?.base_media_decode_time;
                    let at = traf_body + field(tfdt.start, tfdt.header_len);
                    let overflow = Fmp4Error::TimestampOverflow { track_id };
                    let new = old
                        .checked_add(add_decode_time(track_id))
                        .ok_or(overflow.clone())?;
                    // The version decides the field's width; mp4-atom decoded one it knows.
                    if tfdt.body().first() == Some(&1) {
                        patches.push(Patch::U64(at, new));
                    } else {
                        patches.push(Patch::U32(at, u32::try_from(new).map_err(|_| overflow)?));
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
        // Offsets were derived from bounds-checked, decoded boxes of this very buffer.
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
    let mut out = Vec::new();
    for top in BoxIter::new(init, "init segment") {
        let top = top?;
        if &top.kind != b"moov" {
            continue;
        }
        for b in BoxIter::new(top.body(), "moov") {
            let b = b?;
            if &b.kind == b"trak" {
                let t = read_trak(b.body())?;
                out.push((t.track_id, t.timescale));
            }
        }
        return Ok(out);
    }
    Err(Fmp4Error::MissingInit)
}
