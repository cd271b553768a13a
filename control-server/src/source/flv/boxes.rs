//! The MP4 boxes of the remuxer's output, written with `mp4-atom`: the init segment
//! (`ftyp` + `moov` with `avcC` and `esds`) and fragments (`moof` + `mdat`).

use mp4_atom::{
    Audio, Avc1, Avcc, Dinf, Dref, Encode, Esds, Ftyp, Hdlr, Mdhd, Mdia, Mfhd, Minf, Moof, Moov,
    Mp4a, Mvex, Mvhd, Smhd, Stbl, Stco, Stsc, Stsd, Stsz, Stts, Tfdt, Tfhd, Tkhd, Traf, Trak, Trex,
    Trun, TrunEntry, Url, Visual, Vmhd,
};

use super::{AudioConfig, RemuxError, Sample, VIDEO_TIMESCALE};

pub(super) const VIDEO_TRACK: u32 = 1;
pub(super) const AUDIO_TRACK: u32 = 2;
/// `trun` sample flags: a sync sample (depends on no other).
pub(super) const SYNC: u32 = 0x0200_0000;
/// `trun` sample flags: depends on others, not a sync sample.
pub(super) const NON_SYNC: u32 = 0x0101_0000;

/// `ftyp` + `moov`: an H.264 track (id 1) and, with `audio`, an AAC track (id 2), with
/// `mvex` for fragments that follow. Deterministic (no creation times): the same configuration
/// always gives the same bytes, so a reconnecting publisher's init segment compares equal.
pub(super) fn init_segment(
    avcc: &Avcc,
    audio: Option<&AudioConfig>,
    width: u16,
    height: u16,
) -> Result<Vec<u8>, RemuxError> {
    let ftyp = Ftyp {
        major_brand: b"iso6".into(),
        minor_version: 512,
        compatible_brands: vec![b"iso6".into(), b"cmfc".into(), b"mp41".into()],
    };
    let dinf = || Dinf {
        dref: Dref {
            entries: vec![Url {
                location: String::new(),
            }
            .into()],
        },
    };
    let empty_tables = |stsd: Stsd| Stbl {
        stsd,
        stts: Stts::default(),
        stsc: Stsc::default(),
        stsz: Stsz::default(),
        stco: Some(Stco::default()),
        ..Default::default()
    };
    let mut trak = vec![Trak {
        tkhd: Tkhd {
            track_id: VIDEO_TRACK,
            enabled: true,
            in_movie: true,
            width: width.into(),
            height: height.into(),
            ..Default::default()
        },
        mdia: Mdia {
            mdhd: Mdhd {
                timescale: VIDEO_TIMESCALE,
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: b"vide".into(),
                name: "p2p-live RTMP video".into(),
            },
            minf: Minf {
                vmhd: Some(Vmhd::default()),
                dinf: dinf(),
                stbl: empty_tables(Stsd {
                    codecs: vec![Avc1 {
                        visual: Visual {
                            data_reference_index: 1,
                            width,
                            height,
                            horizresolution: 72.into(),
                            vertresolution: 72.into(),
                            frame_count: 1,
                            compressor: "".into(),
                            depth: 24,
                        },
                        avcc: avcc.clone(),
                        btrt: None,
                        colr: None,
                        pasp: None,
                        taic: None,
                        fiel: None,
                        spatial: None,
                    }
                    .into()],
                }),
                ..Default::default()
            },
        },
        ..Default::default()
    }];
    let mut trex = vec![Trex {
        track_id: VIDEO_TRACK,
        default_sample_description_index: 1,
        ..Default::default()
    }];
    if let Some(a) = audio {
        let (profile, freq_index, chan_conf) = asc_fields(&a.asc);
        trak.push(Trak {
            tkhd: Tkhd {
                track_id: AUDIO_TRACK,
                alternate_group: 1,
                enabled: true,
                in_movie: true,
                volume: 1.into(),
                ..Default::default()
            },
            mdia: Mdia {
                mdhd: Mdhd {
                    timescale: a.sample_rate,
                    language: "und".into(),
                    ..Default::default()
                },
                hdlr: Hdlr {
                    handler: b"soun".into(),
                    name: "p2p-live RTMP audio".into(),
                },
                minf: Minf {
                    smhd: Some(Smhd::default()),
                    dinf: dinf(),
                    stbl: empty_tables(Stsd {
                        codecs: vec![Mp4a {
                            audio: Audio {
                                data_reference_index: 1,
                                channel_count: a.channels,
                                sample_size: 16,
                                // 16.16 fixed point: rates above 65535 Hz do not fit.
                                sample_rate: u16::try_from(a.sample_rate).unwrap_or(0).into(),
                            },
                            esds: Esds {
                                es_desc: mp4_atom::esds::EsDescriptor {
                                    es_id: AUDIO_TRACK as u16,
                                    depends_on_es_id: None,
                                    url: None,
                                    ocr_es_id: None,
                                    stream_priority: 0,
                                    dec_config: mp4_atom::esds::DecoderConfig {
                                        // MPEG-4 audio, audio stream.
                                        object_type_indication: 0x40,
                                        stream_type: 5,
                                        dec_specific: Some(mp4_atom::esds::DecoderSpecific {
                                            profile,
                                            freq_index,
                                            chan_conf,
                                            raw: a.asc.clone(),
                                        }),
                                        ..Default::default()
                                    },
                                    sl_config: mp4_atom::esds::SLConfig {},
                                },
                            },
                            btrt: None,
                            taic: None,
                        }
                        .into()],
                    }),
                    ..Default::default()
                },
            },
            ..Default::default()
        });
        trex.push(Trex {
            track_id: AUDIO_TRACK,
            default_sample_description_index: 1,
            ..Default::default()
        });
    }
    let moov = Moov {
        mvhd: Mvhd {
            timescale: 1000,
            rate: 1.into(),
            volume: 1.into(),
            next_track_id: AUDIO_TRACK + 1,
            ..Default::default()
        },
        mvex: Some(Mvex { mehd: None, trex }),
        trak,
        ..Default::default()
    };
    let mut out = Vec::new();
    ftyp.encode(&mut out)?;
    moov.encode(&mut out)?;
    Ok(out)
}

/// `moof` + `mdat` holding `video`'s and `audio`'s samples (either may be empty), the video
/// track's `traf` first.
pub(super) fn fragment(
    sequence: u32,
    video: &[Sample],
    audio: &[Sample],
) -> Result<Vec<u8>, RemuxError> {
    let traf = |track_id: u32, samples: &[Sample], data_offset: i32, video: bool| Traf {
        tfhd: Tfhd {
            track_id,
            default_base_is_moof: true,
            ..Default::default()
        },
        tfdt: Some(Tfdt {
            base_media_decode_time: samples.first().map_or(0, |s| s.dts),
        }),
        trun: vec![Trun {
            data_offset: Some(data_offset),
            samples: samples
                .iter()
                .map(|s| TrunEntry {
                    duration: Some(s.duration),
                    size: Some(s.data.len() as u32),
                    flags: Some(if s.key { SYNC } else { NON_SYNC }),
                    cts: video.then_some(i64::from(s.cts)),
                })
                .collect::<Vec<_>>()
                .into(),
        }],
        sbgp: vec![],
        sgpd: vec![],
        subs: vec![],
        saiz: vec![],
        saio: vec![],
        meta: None,
        senc: None,
        udta: None,
    };
    let video_bytes: usize = video.iter().map(|s| s.data.len()).sum();
    let audio_bytes: usize = audio.iter().map(|s| s.data.len()).sum();
    let build = |moof_len: usize| -> Result<Moof, RemuxError> {
        let base =
            i32::try_from(moof_len + 8).map_err(|_| RemuxError::Mp4("moof too large".into()))?;
        let audio_at = i32::try_from(moof_len + 8 + video_bytes)
            .map_err(|_| RemuxError::Mp4("fragment too large".into()))?;
        let mut trafs = Vec::new();
        if !video.is_empty() {
            trafs.push(traf(VIDEO_TRACK, video, base, true));
        }
        if !audio.is_empty() {
            trafs.push(traf(AUDIO_TRACK, audio, audio_at, false));
        }
        Ok(Moof {
            mfhd: Mfhd {
                sequence_number: sequence,
            },
            traf: trafs,
        })
    };
    // The data offsets count from the moof's start, so its size is needed first; it does
    // not depend on the offsets' values.
    let mut probe = Vec::new();
    build(0)?.encode(&mut probe)?;
    let mut out = Vec::with_capacity(probe.len() + 8 + video_bytes + audio_bytes);
    build(probe.len())?.encode(&mut out)?;
    let mdat_len = u32::try_from(8 + video_bytes + audio_bytes)
        .map_err(|_| RemuxError::Mp4("mdat over 4 GiB".into()))?;
    out.extend_from_slice(&mdat_len.to_be_bytes());
    out.extend_from_slice(b"mdat");
    for s in video.iter().chain(audio.iter()) {
        out.extend_from_slice(&s.data);
    }
    Ok(out)
}

/// `(audioObjectType, samplingFrequencyIndex, channelConfiguration)` of an AudioSpecificConfig's
/// first two bytes (the escape forms are kept verbatim in `raw`; these fields are informative).
fn asc_fields(asc: &[u8]) -> (u8, u8, u8) {
    match asc {
        [a, b, ..] => (a >> 3, ((a & 7) << 1) | (b >> 7), (b >> 3) & 0x0f),
        _ => (0, 0, 0),
    }
}
