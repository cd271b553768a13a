//! The MSE MIME type (`video/mp4; codecs="…"`) of an init segment, from the sample entries
//! `mp4-atom` decoded. `mp4-atom` reads the codec configuration boxes (`avcC`, `hvcC`, `vpcC`,
//! `av1C`, `esds`) but does not spell RFC 6381 `codecs` parameters: that part is written here.

use mp4_atom::{Av1c, Avcc, Codec, Esds, Hvcc};

use super::boxes::TrackInfo;

/// RFC 6381 `codecs` parameter for a sample entry, when we know how to build it.
pub(super) fn codec_string(codec: &Codec) -> Option<String> {
    Some(match codec {
        Codec::Avc1(c) => avc("avc1", &c.avcc),
        Codec::Avc3(c) => avc("avc3", &c.avcc),
        Codec::Hvc1(c) => hevc("hvc1", &c.hvcc),
        Codec::Hev1(c) => hevc("hev1", &c.hvcc),
        Codec::Vp09(c) => format!(
            "vp09.{:02}.{:02}.{:02}",
            c.vpcc.profile, c.vpcc.level, c.vpcc.bit_depth
        ),
        Codec::Vp08(_) => "vp8".to_owned(),
        Codec::Av01(c) => av1(&c.av1c),
        Codec::Mp4a(c) => mp4a(&c.esds),
        Codec::Opus(_) => "opus".to_owned(),
        Codec::Flac(_) => "flac".to_owned(),
        Codec::Ac3(_) => "ac-3".to_owned(),
        Codec::Eac3(_) => "ec-3".to_owned(),
        _ => return None,
    })
}

/// `avc1.PPCCLL`: profile, constraint flags and level from the `avcC`.
fn avc(kind: &str, c: &Avcc) -> String {
    format!(
        "{kind}.{:02x}{:02x}{:02x}",
        c.avc_profile_indication, c.profile_compatibility, c.avc_level_indication
    )
}

/// `hvc1.<space><profile>.<compat>.<tier><level>.<constraints>` (ISO/IEC 14496-15 Annex E).
pub(super) fn hevc(kind: &str, c: &Hvcc) -> String {
    let space = ["", "A", "B", "C"][usize::from(c.general_profile_space & 3)];
    let tier = if c.general_tier_flag { 'H' } else { 'L' };
    let profile = c.general_profile_idc;
    let compat = u32::from_be_bytes(c.general_profile_compatibility_flags).reverse_bits();
    let level = c.general_level_idc;
    let mut s = format!("{kind}.{space}{profile}.{compat:X}.{tier}{level}");
    let constraints = &c.general_constraint_indicator_flags;
    let used = constraints
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i + 1);
    for b in constraints.iter().take(used) {
        s.push_str(&format!(".{b:02X}"));
    }
    s
}

/// `av01.<profile>.<level><tier>.<bitDepth>`.
fn av1(c: &Av1c) -> String {
    let tier = if c.seq_tier_0 { 'H' } else { 'M' };
    let bit_depth = match (c.high_bitdepth, c.twelve_bit) {
        (true, true) => 12,
        (true, false) => 10,
        _ => 8,
    };
    format!(
        "av01.{}.{:02}{tier}.{bit_depth:02}",
        c.seq_profile, c.seq_level_idx_0
    )
}

/// `mp4a.<objectTypeIndication>[.<audioObjectType>]` from an `esds`.
pub(super) fn mp4a(esds: &Esds) -> String {
    let config = &esds.es_desc.dec_config;
    let oti = config.object_type_indication;
    if oti != 0x40 {
        return format!("mp4a.{oti:02x}");
    }
    match &config.dec_specific {
        // mp4-atom reads the audioObjectType, escape form included, from the AudioSpecificConfig.
        Some(asc) if !asc.raw.is_empty() => format!("mp4a.40.{}", asc.profile),
        // No AudioSpecificConfig: AAC-LC is what such streams carry.
        _ => "mp4a.40.2".to_owned(),
    }
}

/// `video/mp4; codecs="…"` over the audio and video tracks, or a bare container type when a
/// codec is unknown (the browser may still cope, and it beats a wrong codecs string).
pub(super) fn mime_type(tracks: &[TrackInfo]) -> String {
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
