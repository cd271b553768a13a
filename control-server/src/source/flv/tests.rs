//! The remuxer against synthetic FLV tags, checked by the origin's own splitter.

use super::boxes::{AUDIO_TRACK, NON_SYNC, SYNC, VIDEO_TRACK};
use super::*;
use crate::origin::fmp4::parse_file;
use mp4_atom::Moof;

/// An SPS of High profile, level 3.1 (from an x264 encode), and its PPS.
const SPS: &[u8] = b"gd\0\x1f\xac$\x84\x01@\x16\xec\x04@\0\0\x03\0@\0\0\x0c#\xc6\x0c\x92";
const PPS: &[u8] = b"h\xee2\xc8\xb0";

fn avc_sequence_header() -> Vec<u8> {
    let mut t = vec![0x17, 0, 0, 0, 0, 1, SPS[1], SPS[2], SPS[3], 0xff, 0xe1];
    t.extend_from_slice(&(SPS.len() as u16).to_be_bytes());
    t.extend_from_slice(SPS);
    t.push(1);
    t.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
    t.extend_from_slice(PPS);
    t
}

/// A video tag with one 4-byte-length-prefixed NAL unit of `len` bytes.
fn picture(key: bool, cts_ms: i32, len: usize) -> Vec<u8> {
    let cts = cts_ms.to_be_bytes();
    let mut t = vec![if key { 0x17 } else { 0x27 }, 1, cts[1], cts[2], cts[3]];
    t.extend_from_slice(&(len as u32).to_be_bytes());
    t.extend(std::iter::repeat_n(if key { 0x65 } else { 0x41 }, len));
    t
}

/// AAC-LC, 48 kHz, stereo.
fn aac_sequence_header() -> Vec<u8> {
    vec![0xaf, 0, 0x11, 0x90]
}

fn aac_frame(len: usize) -> Vec<u8> {
    let mut t = vec![0xaf, 1];
    t.extend(std::iter::repeat_n(0x21, len));
    t
}

/// 30 fps video with a keyframe every `gop` frames and 48 kHz AAC, interleaved by time as
/// ffmpeg's FLV muxer does, for `frames` frames; returns everything the remuxer produced,
/// flushed at the end.
fn remux_stream(remuxer: &mut Remuxer, frames: u32, gop: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut take = |items: Vec<Output>| {
        for o in items {
            match o {
                Output::Init(b) | Output::Fragment(b) => out.extend(b),
            }
        }
    };
    take(remuxer.push_video(0, &avc_sequence_header()).expect("avc"));
    take(remuxer.push_audio(0, &aac_sequence_header()).expect("aac"));
    let mut next_audio = 0u32; // in 1024-sample frames
    for i in 0..frames {
        let ts = i * 1000 / 30;
        while next_audio * 1024 * 1000 / 48000 <= ts {
            let ats = next_audio * 1024 * 1000 / 48000;
            take(remuxer.push_audio(ats, &aac_frame(200)).expect("audio"));
            next_audio += 1;
        }
        // B-frame-like composition offsets on non-key pictures.
        let cts = if i % gop == 0 { 0 } else { 33 };
        take(
            remuxer
                .push_video(ts, &picture(i % gop == 0, cts, 1000))
                .expect("video"),
        );
    }
    take(remuxer.finish().expect("finish"));
    out
}

#[test]
fn h264_and_aac_tags_become_fragments_the_splitter_accepts() {
    let mut r = Remuxer::new(0);
    r.set_dimensions(854, 480);
    let bytes = remux_stream(&mut r, 180, 60);
    let (init, fragments) = parse_file(&bytes).expect("splitter accepts the remuxer's output");
    assert_eq!(init.mime, r#"video/mp4; codecs="avc1.64001f, mp4a.40.2""#);
    assert_eq!(init.timescale, VIDEO_TIMESCALE);
    assert_eq!(fragments.len(), 3, "one fragment per keyframe");
    for (i, f) in fragments.iter().enumerate() {
        assert!(f.starts_with_keyframe, "fragment {i} starts at a keyframe");
        assert_eq!(f.base_decode_time, i as u64 * 2 * 90_000);
        // The last one ends with the held-back picture, given its predecessor's duration
        // (timestamps are whole milliseconds: 33 or 34 ms at 30 fps).
        assert!(
            f.duration.abs_diff(2 * 90_000) <= 90,
            "fragment {i} lasts 2 s"
        );
    }
    assert!(r.end_us().abs_diff(6_000_000) <= 1000);
}

#[test]
fn fragments_carry_both_tracks_with_sample_timing() {
    let mut r = Remuxer::new(0);
    let bytes = remux_stream(&mut r, 60, 30);
    let (init, fragments) = parse_file(&bytes).expect("split");
    let mut buf = &fragments[0].bytes[..];
    let moof = <Moof as mp4_atom::Decode>::decode(&mut buf).expect("moof");
    assert_eq!(moof.traf.len(), 2, "video and audio in one fragment");
    let video = &moof.traf[0];
    assert_eq!(video.tfhd.track_id, VIDEO_TRACK);
    let entries: Vec<_> = video.trun[0].samples.iter().collect();
    assert_eq!(entries.len(), 30);
    assert_eq!(entries[0].flags, Some(SYNC));
    assert_eq!(entries[1].flags, Some(NON_SYNC));
    assert_eq!(entries[1].cts, Some(33 * 90));
    // 33 or 34 ms between 30 fps frames at millisecond timestamps.
    assert!(entries
        .iter()
        .all(|e| matches!(e.duration, Some(2970 | 3060))));
    let audio = &moof.traf[1];
    assert_eq!(audio.tfhd.track_id, AUDIO_TRACK);
    let a: Vec<_> = audio.trun[0].samples.iter().collect();
    assert!(a.len() >= 46, "about 1 s of 48 kHz AAC, got {}", a.len());
    assert!(a.iter().all(|e| e.duration == Some(1024)));
    // The data offsets point into the mdat: the first video sample starts with its length.
    let off = video.trun[0].data_offset.expect("offset") as usize;
    assert_eq!(&fragments[0].bytes[off..off + 5], &[0, 0, 3, 0xe8, 0x65]);
    let aoff = audio.trun[0].data_offset.expect("offset") as usize;
    assert_eq!(fragments[0].bytes[aoff], 0x21);
    assert!(init.bytes.len() > 100);
}

#[test]
fn pictures_before_the_first_keyframe_are_dropped() {
    let mut r = Remuxer::new(0);
    assert!(r
        .push_video(0, &avc_sequence_header())
        .expect("avc")
        .is_empty());
    assert!(r
        .push_video(0, &picture(false, 0, 10))
        .expect("p")
        .is_empty());
    let out = r.push_video(33, &picture(true, 0, 10)).expect("key");
    assert!(matches!(out.as_slice(), [Output::Init(_)]));
}

#[test]
fn a_resumed_timeline_continues_where_the_last_connection_ended() {
    let mut first = Remuxer::new(0);
    let a = remux_stream(&mut first, 90, 30);
    let end = first.end_us();
    assert!(end.abs_diff(3_000_000) <= 1000, "{end}");
    let mut second = Remuxer::new(end);
    let b = remux_stream(&mut second, 60, 30);
    let (init_a, _) = parse_file(&a).expect("a");
    let (init_b, frags) = parse_file(&b).expect("b");
    assert_eq!(
        init_a, init_b,
        "same encoder settings: the same init segment"
    );
    assert_eq!(frags[0].base_decode_time, end * 9 / 100);
}

#[test]
fn a_changed_sequence_header_emits_a_new_init_segment_at_the_next_keyframe() {
    let mut r = Remuxer::new(0);
    r.push_video(0, &avc_sequence_header()).expect("avc");
    let first = r.push_video(0, &picture(true, 0, 10)).expect("key");
    assert!(matches!(first.as_slice(), [Output::Init(_)]));
    // The same configuration again (OBS repeats it): nothing new.
    r.push_video(33, &avc_sequence_header()).expect("avc");
    let same = r.push_video(33, &picture(true, 0, 10)).expect("key");
    assert!(matches!(same.as_slice(), [Output::Fragment(_)]));
    r.set_dimensions(1280, 720);
    let changed = r.push_video(66, &picture(true, 0, 10)).expect("key");
    assert!(matches!(
        changed.as_slice(),
        [Output::Fragment(_), Output::Init(_)]
    ));
}

#[test]
fn unsupported_codecs_are_refused_by_name() {
    let mut r = Remuxer::new(0);
    let e = r.push_video(0, &[0x1c, 0, 0, 0, 0]).expect_err("hevc");
    assert_eq!(
        e.to_string(),
        "video codec 7 (H.264) only; got codec id 12 (HEVC)"
    );
    let e = r.push_video(0, b"\x90hvc1").expect_err("enhanced");
    assert!(e.to_string().contains("\"hvc1\" (HEVC)"), "{e}");
    let e = r.push_video(0, b"\x90av01").expect_err("enhanced");
    assert!(e.to_string().contains("AV1"), "{e}");
    let e = r.push_audio(0, &[0x2f, 0]).expect_err("mp3");
    assert_eq!(
        e.to_string(),
        "audio format 10 (AAC) only; got format 2 (MP3)"
    );
}

#[test]
fn malformed_tags_are_errors_never_panics() {
    let mut r = Remuxer::new(0);
    assert!(r.push_video(0, &[]).is_err());
    assert!(r.push_video(0, &[0x17]).is_err());
    assert!(r.push_video(0, &[0x17, 0, 0, 0, 0, 1]).is_err());
    assert!(r.push_audio(0, &[0xaf, 0, 0xff]).is_err());
    // Random bytes after a valid start: errors or nothing, never a panic.
    let mut seed = 0x1234_5678u32;
    for _ in 0..2000 {
        let len = (seed % 40) as usize;
        let tag: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let _ = r.push_video(seed % 5000, &tag);
        let _ = r.push_audio(seed % 5000, &tag);
    }
    let _ = r.finish();
}

#[test]
fn audio_specific_config_gives_rate_and_channels() {
    let c = parse_audio_specific_config(&[0x12, 0x10]).expect("44.1k");
    assert_eq!((c.sample_rate, c.channels), (44100, 2));
    let c = parse_audio_specific_config(&[0x11, 0x90]).expect("48k");
    assert_eq!((c.sample_rate, c.channels), (48000, 2));
    assert!(
        parse_audio_specific_config(&[0x17, 0x80]).is_none(),
        "index 14 is reserved"
    );
    assert!(parse_audio_specific_config(&[0x12]).is_none());
}

#[test]
fn metadata_announcing_another_codec_is_refused_before_any_media() {
    assert!(Remuxer::check_metadata(Some(7), Some(10)).is_ok());
    assert!(Remuxer::check_metadata(None, None).is_ok());
    let e = Remuxer::check_metadata(Some(7), Some(2)).expect_err("mp3");
    assert_eq!(
        e.to_string(),
        "audio format 10 (AAC) only; got format 2 (MP3)"
    );
    let e =
        Remuxer::check_metadata(Some(u32::from_be_bytes(*b"hvc1")), Some(10)).expect_err("hevc");
    assert!(e.to_string().contains("\"hvc1\" (HEVC)"), "{e}");
}

#[test]
fn a_publisher_without_keyframes_cannot_grow_a_fragment_without_bound() {
    let mut r = Remuxer::new(0);
    r.push_video(0, &avc_sequence_header()).expect("avc");
    r.push_video(0, &picture(true, 0, 10)).expect("key");
    let mut cut = false;
    for i in 1..8u32 {
        let out = r
            .push_video(i * 33, &picture(false, 0, 8 << 20))
            .expect("p");
        cut |= out.iter().any(|o| matches!(o, Output::Fragment(_)));
    }
    assert!(
        cut,
        "a fragment over 32 MiB must be cut without waiting for a keyframe"
    );
}

#[test]
fn an_audio_only_stream_is_refused_after_five_seconds() {
    let mut r = Remuxer::new(0);
    r.push_audio(0, &aac_sequence_header()).expect("aac");
    let mut refused = None;
    for i in 0..300u32 {
        if let Err(e) = r.push_audio(i * 21, &aac_frame(100)) {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("refused");
    assert!(i > 200, "refused too early, after {i} frames");
    assert!(e.to_string().contains("no video"), "{e}");
}

#[test]
fn an_encoder_clock_that_restarts_does_not_take_the_timeline_back() {
    let mut r = Remuxer::new(0);
    let first = remux_stream(&mut r, 90, 30);
    // The same encoder restarts its timestamps at 0 on the same connection.
    let second = remux_stream(&mut r, 60, 30);
    let (_, a) = parse_file(&first).expect("first");
    let b = {
        // The second run repeats the sequence headers but no init segment (unchanged).
        let mut whole = first.clone();
        whole.extend(&second);
        parse_file(&whole).expect("both").1
    };
    let last = a.last().expect("fragments");
    let next = &b[a.len()];
    assert!(
        next.base_decode_time >= last.base_decode_time + last.duration,
        "went back: {} after {}",
        next.base_decode_time,
        last.base_decode_time + last.duration
    );
    assert!(next.base_decode_time - (last.base_decode_time + last.duration) <= 2 * 3600);
}

#[test]
fn audio_without_pictures_cannot_grow_a_fragment_without_bound() {
    let mut r = Remuxer::new(0);
    r.push_video(0, &avc_sequence_header()).expect("avc");
    r.push_audio(0, &aac_sequence_header()).expect("aac");
    r.push_video(0, &picture(true, 0, 10)).expect("key");
    for i in 0..20_000u32 {
        r.push_audio(i * 21, &aac_frame(1)).expect("audio");
    }
    assert!(r.audio_samples.len() <= MAX_SAMPLES_PER_FRAGMENT);
}
