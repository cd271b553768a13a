//! The swarm's source: the embedded demo clip, or any fragmented-MP4 file (`cargo xtask swarm
//! --source PATH`), looped as a live channel by the origin. Parsed once here, before the run, so
//! that a file the origin cannot loop is refused with a message naming it and saying how to make
//! one, and so that the report can say what was streamed (rate, fragment and keyframe spacing).

use std::path::Path;

use anyhow::{Context, Result};
use control_server::source::ingest::LoopedClip;
use protocol::report::Pct;
use serde::Serialize;

/// How to turn any video into a file the swarm can loop (printed with a refusal).
pub const FRAGMENT_HINT: &str = "ffmpeg -i IN -c:v libx264 -g 60 -c:a aac \
     -movflags +frag_keyframe+empty_moov+default_base_moof OUT.mp4";

/// A parsed source clip and what the report prints about it.
#[derive(Debug, Clone)]
pub struct SourceClip {
    /// The file's name (`demo.mp4` for the embedded clip).
    pub name: String,
    pub bytes: Vec<u8>,
    pub info: SourceInfo,
}

/// What the swarm report says about its source (JSON field `source`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceInfo {
    pub name: String,
    /// Average media rate of the clip (fragments only), kbit/s.
    pub kbps: u32,
    pub seconds: f64,
    pub fragments: usize,
    /// Fragment durations, ms: how long each step of the players' buffered end is.
    pub fragment_ms: Pct,
    /// Spacing of the fragments that start with a keyframe (the joiners' starting points), ms.
    pub keyframe_ms: Pct,
    /// The init segment's MIME type with codecs (tracks present).
    pub mime: String,
}

impl SourceClip {
    /// The demo clip the server embeds.
    pub fn demo() -> Result<SourceClip> {
        SourceClip::parse("demo.mp4", control_server::DEMO_CLIP.to_vec())
    }

    /// Reads and checks a fragmented-MP4 file.
    pub fn load(path: &Path) -> Result<SourceClip> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the swarm's source {}", path.display()))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        SourceClip::parse(&name, bytes).with_context(|| {
            format!(
                "{} cannot be looped as a live source: it must be a fragmented MP4 (init segment, \
                 then moof+mdat fragments starting at keyframes); make one with `{FRAGMENT_HINT}` (a fragment per keyframe; \
                 -g 60 is 2 s at 30 fps; `-c copy` instead re-muxes without re-encoding)",
                path.display()
            )
        })
    }

    fn parse(name: &str, bytes: Vec<u8>) -> Result<SourceClip> {
        let clip = LoopedClip::parse(bytes.clone())?;
        let ts = f64::from(clip.init.timescale.max(1));
        let ms = |ticks: u64| ticks as f64 * 1000.0 / ts;
        let fragment_ms = clip.fragments.iter().map(|f| ms(f.duration)).collect();
        let keyframes: Vec<u64> = clip
            .fragments
            .iter()
            .filter(|f| f.starts_with_keyframe)
            .map(|f| f.base_decode_time)
            .collect();
        let keyframe_ms = keyframes.windows(2).map(|w| ms(w[1] - w[0])).collect();
        let info = SourceInfo {
            name: name.to_string(),
            kbps: clip.stream_kbps(),
            seconds: clip.seconds(),
            fragments: clip.fragments.len(),
            fragment_ms: Pct::of(fragment_ms),
            keyframe_ms: Pct::of(keyframe_ms),
            mime: clip.init.mime.clone(),
        };
        Ok(SourceClip {
            name: name.to_string(),
            bytes,
            info,
        })
    }
}

impl SourceInfo {
    /// One line for the report's table.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} kbit/s, {:.0} s in {} fragments of {:.0} ms (max {:.0}), keyframes every \
             {:.0} ms (max {:.0}); {}",
            self.name,
            self.kbps,
            self.seconds,
            self.fragments,
            self.fragment_ms.p50,
            self.fragment_ms.max,
            self.keyframe_ms.p50,
            self.keyframe_ms.max,
            self.mime
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_clip_has_one_second_fragments() {
        let demo = SourceClip::demo().expect("the demo clip parses");
        assert_eq!(demo.name, "demo.mp4");
        assert!(demo.info.kbps > 100, "{:?}", demo.info);
        assert!(
            (demo.info.fragment_ms.p50 - 1000.0).abs() < 50.0,
            "{:?}",
            demo.info
        );
    }

    #[test]
    fn non_fragmented_file_is_refused_naming_it_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plain.mp4");
        // An MP4 whose movie box holds the samples (no fragments): ftyp, moov, mdat.
        let mut bytes = Vec::new();
        for (kind, body) in [(b"ftyp", &b"isom\0\0\0\0isom"[..]), (b"moov", &[][..])] {
            bytes.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
            bytes.extend_from_slice(kind);
            bytes.extend_from_slice(body);
        }
        std::fs::write(&path, &bytes).expect("write");
        let err = format!("{:#}", SourceClip::load(&path).expect_err("refused"));
        assert!(err.contains("plain.mp4"), "{err}");
        assert!(err.contains("frag_keyframe+empty_moov"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = format!(
            "{:#}",
            SourceClip::load(Path::new("/nonexistent/x.mp4")).expect_err("refused")
        );
        assert!(err.contains("/nonexistent/x.mp4"), "{err}");
    }
}
