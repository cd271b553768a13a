//! The splitter, the codecs strings and the retiming, on the demo clip and on hand-built boxes.

#![allow(clippy::unwrap_used)]

use mp4_atom::{Decode, Esds, Hvcc, Moof, Stsd};

use super::boxes::{read_trak, BoxIter};
use super::codecs::{codec_string, hevc, mp4a};
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

/// The `moof`s of a fragment, decoded by mp4-atom.
fn moofs(fragment: &[u8]) -> Vec<Moof> {
    BoxIter::new(fragment, "fragment")
        .map(Result::unwrap)
        .filter(|b| &b.kind == b"moof")
        .map(|b| b.decode::<Moof>().unwrap())
        .collect()
}

fn tfdt_values(fragment: &[u8]) -> Vec<u64> {
    moofs(fragment)
        .iter()
        .flat_map(|m| &m.traf)
        .map(|t| t.tfdt.as_ref().unwrap().base_media_decode_time)
        .collect()
}

fn mfhd_seq(fragment: &[u8]) -> u32 {
    moofs(fragment)[0].mfhd.sequence_number
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
        // An `sdtp` (sample dependencies, which mp4-atom does not know) is skipped.
        let sdtp = mp4box(b"sdtp", &[0, 0, 0, 0, 0x20, 0x10, 0x10, 0x10, 0x10]);
        let traf = mp4box(
            b"traf",
            &cat(&[
                tfhd,
                mp4box(b"tfdt", &tfdt_body),
                sdtp,
                mp4box(b"trun", &trun),
            ]),
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

/// The codecs string of the first entry of a `stsd` holding one sample entry box.
fn entry_codec(kind: &[u8; 4], entry_body: &[u8]) -> Option<String> {
    let mut stsd = vec![0, 0, 0, 0, 0, 0, 0, 1];
    stsd.extend(mp4box(kind, entry_body));
    let stsd = Stsd::decode(&mut &mp4box(b"stsd", &stsd)[..]).ok()?;
    codec_string(stsd.codecs.first()?)
}

#[test]
fn codec_strings() {
    // HEVC Main, level 3.1 (93), compat flags 0x60000000, constraints b0.
    let mut hvcc = vec![1u8, 0x01, 0x60, 0, 0, 0, 0xb0, 0, 0, 0, 0, 0, 93];
    hvcc.extend_from_slice(&[0; 10]);
    let hvcc = Hvcc::decode(&mut &mp4box(b"hvcC", &hvcc)[..]).unwrap();
    assert_eq!(hevc("hvc1", &hvcc), "hvc1.1.6.L93.B0");
    // esds for AAC-LC.
    let esds = [
        0, 0, 0, 0, 0x03, 0x19, 0, 1, 0, 0x04, 0x11, 0x40, 0x15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x05, 0x02, 0x12, 0x10, 0x06, 0x01, 0x02,
    ];
    let esds = Esds::decode(&mut &mp4box(b"esds", &esds)[..]).unwrap();
    assert_eq!(mp4a(&esds), "mp4a.40.2");
    // vpcC: profile 0, level 3.1, 8 bits; BT.709 colour, no initialization data.
    let vpcc = [1, 0, 0, 0, 0, 31, 0x80, 1, 1, 1, 0, 0];
    let mut entry = vec![0u8; 78]; // the visual sample entry's fixed part
    entry.extend(mp4box(b"vpcC", &vpcc));
    assert_eq!(
        entry_codec(b"vp09", &entry).as_deref(),
        Some("vp09.00.31.08")
    );
    assert_eq!(entry_codec(b"zzzz", &entry), None);
    // av1C: profile 0, level 8, main tier, 8 bits.
    let mut entry = vec![0u8; 78];
    entry.extend(mp4box(b"av1C", &[0x81, 0x08, 0x0c, 0]));
    assert_eq!(
        entry_codec(b"av01", &entry).as_deref(),
        Some("av01.0.08M.08")
    );
    // avcC: Baseline 3.0 with its constraint flags, no parameter sets.
    let mut entry = vec![0u8; 78];
    entry.extend(mp4box(b"avcC", &[1, 0x42, 0xc0, 0x1e, 0xff, 0xe0, 0]));
    assert_eq!(entry_codec(b"avc3", &entry).as_deref(), Some("avc3.42c01e"));
    // Garbage never panics.
    for len in 0..40 {
        let junk = vec![0xffu8; len];
        for kind in [b"avc1", b"mp4a", b"hvc1", b"vp09", b"av01", b"esds"] {
            let _ = entry_codec(kind, &junk);
        }
    }
}

#[test]
fn handler_name_that_is_not_utf8_does_not_hide_the_track_type() {
    let mut tkhd = vec![0u8; 84];
    tkhd[12..16].copy_from_slice(&2u32.to_be_bytes());
    let mut mdhd = vec![0u8; 24];
    mdhd[12..16].copy_from_slice(&48_000u32.to_be_bytes());
    let mut hdlr = vec![0u8; 24];
    hdlr[8..12].copy_from_slice(b"soun");
    hdlr.extend_from_slice(b"Son \xe9l\xe9ment\0"); // Latin-1
    let mdia = mp4box(
        b"mdia",
        &cat(&[mp4box(b"mdhd", &mdhd), mp4box(b"hdlr", &hdlr)]),
    );
    let track = read_trak(&cat(&[mp4box(b"tkhd", &tkhd), mdia])).unwrap();
    assert_eq!(&track.handler, b"soun");
    assert_eq!((track.track_id, track.timescale), (2, 48_000));
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

/// Splitter throughput on the demo clip, and the cost of retiming a fragment. Prints, asserts
/// nothing: `cargo test --release -p control-server splitter_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand in release"]
fn splitter_throughput_on_demo_clip() {
    let rounds = 50;
    for chunk in [65_536, 1_316] {
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let mut s = Fmp4Splitter::new();
            for c in DEMO.chunks(chunk) {
                s.push(c).unwrap();
            }
            s.finish().unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "splitter, {chunk}-byte chunks: {:.0} MB/s",
            (DEMO.len() * rounds) as f64 / 1e6 / secs
        );
    }
    let (_, fragments) = parse_file(DEMO).unwrap();
    let mut bytes: Vec<Vec<u8>> = fragments.into_iter().map(|f| f.bytes).collect();
    let n = 20_000;
    let start = std::time::Instant::now();
    for i in 0..n {
        let len = bytes.len();
        rewrite_timing(&mut bytes[i % len], 1, i as u32).unwrap();
    }
    println!(
        "rewrite_timing: {:.2} us per fragment",
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    );
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
