//! The RTMP remuxer (`control-server/src/source/flv/`), which reads whatever an RTMP publisher
//! sends as FLV tags. Any tags, with any timestamps, must give fMP4 output or an error, never a
//! panic; and whatever it outputs must be taken by the origin's own splitter (as the RTMP
//! ingest feeds it): each init segment starts a stream that splits without error into exactly
//! the fragments the remuxer emitted after it, each with the remuxer's sequence of bytes.
//!
//! Input: one byte of options (bit 0: start with a valid H.264 and AAC configuration, so the
//! fuzzer explores the media paths; the rest: where the timeline resumes), then tags, each
//! `kind` (bit 0: video, else audio), a timestamp step in ms, a little-endian u16 length, and
//! that many bytes of tag body (fewer at the end of the input).
//!
//! The modules are compiled here from their source files, as in `fmp4_split`: the
//! `control-server` crate would bring tokio, axum and hyper into every instrumented build.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../control-server/src/origin/fmp4/mod.rs"]
mod fmp4;

#[allow(dead_code)]
#[path = "../../control-server/src/source/flv/mod.rs"]
mod flv;

use flv::{Output, Remuxer};
use fmp4::{Fmp4Item, Fmp4Splitter};

/// An AVC sequence header: High profile, level 3.1 (an x264 SPS and PPS).
const AVC_CONFIG: &[u8] = b"\x17\0\0\0\0\x01\x64\x00\x1f\xff\xe1\x00\x19gd\0\x1f\xac$\x84\x01@\x16\xec\x04@\0\0\x03\0@\0\0\x0c#\xc6\x0c\x92\x01\x00\x05h\xee2\xc8\xb0";
/// An AAC sequence header: AAC-LC, 48 kHz, stereo.
const AAC_CONFIG: &[u8] = b"\xaf\x00\x11\x90";

/// Checks one init segment and the fragments after it with the origin's splitter.
fn check(init: &[u8], fragments: &[Vec<u8>]) {
    let mut s = Fmp4Splitter::new();
    let mut items = s
        .push(init)
        .expect("the splitter refused the remuxer's init segment");
    for f in fragments {
        items.extend(
            s.push(f)
                .expect("the splitter refused the remuxer's fragment"),
        );
    }
    items.extend(s.finish().expect("the remuxer's stream ended inside a box"));
    let mut got = items.into_iter();
    assert!(matches!(got.next(), Some(Fmp4Item::Init(i)) if i.bytes == init));
    let split: Vec<Vec<u8>> = got
        .map(|i| match i {
            Fmp4Item::Fragment(f) => f.bytes,
            Fmp4Item::Init(_) => panic!("a second init segment from one stream"),
        })
        .collect();
    assert_eq!(
        &split, fragments,
        "fragments split differently than emitted"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, mut rest)) = data.split_first() else {
        return;
    };
    let mut r = Remuxer::new(u64::from(options >> 1) * 1_000_000);
    let mut out = Vec::new();
    if options & 1 == 1 {
        out.extend(r.push_video(0, AVC_CONFIG).expect("valid AVC config"));
        out.extend(r.push_audio(0, AAC_CONFIG).expect("valid AAC config"));
    }
    let mut ts = 0u32;
    let mut end = r.end_us();
    while let [kind, step, l0, l1, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
        let (tag, next) = tail.split_at(len);
        rest = next;
        ts = ts.wrapping_add(u32::from(*step));
        let result = if kind & 1 == 1 {
            r.push_video(ts, tag)
        } else {
            r.push_audio(ts, tag)
        };
        match result {
            Ok(more) => out.extend(more),
            // The connection is closed on an error: what was emitted stands.
            Err(_) => break,
        }
        assert!(r.end_us() >= end, "the timeline went back");
        end = r.end_us();
    }
    if let Ok(more) = r.finish() {
        out.extend(more);
    }
    // Each init segment starts a new splitter, as the RTMP ingest does.
    let mut init: Option<Vec<u8>> = None;
    let mut fragments = Vec::new();
    for o in out {
        match o {
            Output::Init(bytes) => {
                if let Some(i) = init.take() {
                    check(&i, &fragments);
                }
                fragments.clear();
                init = Some(bytes);
            }
            Output::Fragment(bytes) => {
                assert!(init.is_some(), "a fragment before any init segment");
                fragments.push(bytes);
            }
        }
    }
    if let Some(i) = init {
        check(&i, &fragments);
    }
});
