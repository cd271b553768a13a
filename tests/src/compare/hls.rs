//! The source as live HLS with CMAF segments, for P2P Media Loader's side: ffmpeg cuts the very
//! file our origin loops (looped for as long as the run needs, stream copy, so the media is
//! byte-for-byte the same encode) into fMP4 segments once, before the run; [`LiveSchedule`] then
//! says which segments a live encoder would have published by a given moment and writes the
//! sliding-window playlist with each segment's program date time.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One fMP4 media segment and its duration (from ffmpeg's `#EXTINF`).
#[derive(Debug, Clone)]
pub struct Segment {
    pub bytes: Vec<u8>,
    pub duration_s: f64,
}

/// The init segment (`EXT-X-MAP`) and the media segments, in order.
#[derive(Debug, Clone)]
pub struct HlsCut {
    pub init: Vec<u8>,
    pub segments: Vec<Segment>,
}

impl HlsCut {
    /// Cuts `source` (a fragmented MP4) into CMAF segments of about `segment_s` seconds covering
    /// at least `media_s` seconds, looping the source as often as needed. Segments are cut at
    /// keyframes (`-c copy`): a source with keyframes every 2 s cannot give 1 s segments, which
    /// the caller sees in the segments' durations.
    pub fn cut(source: &[u8], segment_s: f64, media_s: f64) -> Result<HlsCut> {
        let dir = tempfile::tempdir().context("making a directory for the HLS segments")?;
        let input = dir.path().join("source.mp4");
        std::fs::write(&input, source).with_context(|| format!("writing {}", input.display()))?;
        let out = Command::new("ffmpeg")
            .current_dir(dir.path())
            .args(["-v", "error", "-nostdin", "-y", "-stream_loop", "-1", "-i"])
            .arg(&input)
            .args(["-t", &format!("{media_s:.3}")])
            .args([
                "-c",
                "copy",
                "-f",
                "hls",
                "-hls_time",
                &format!("{segment_s}"),
            ])
            .args(["-hls_list_size", "0", "-hls_playlist_type", "vod"])
            .args([
                "-hls_segment_type",
                "fmp4",
                "-hls_fmp4_init_filename",
                "init.mp4",
            ])
            .args(["-hls_segment_filename", "seg%05d.m4s", "cut.m3u8"])
            .output()
            .context("running ffmpeg (install it with `cargo xtask test`, as root, or apt-get)")?;
        if !out.status.success() {
            bail!(
                "ffmpeg could not cut the source into HLS segments: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        HlsCut::read(dir.path())
    }

    /// Reads what [`HlsCut::cut`] wrote: `cut.m3u8` and the files it names.
    fn read(dir: &Path) -> Result<HlsCut> {
        let playlist =
            std::fs::read_to_string(dir.join("cut.m3u8")).context("ffmpeg wrote no playlist")?;
        let entries = parse_vod_playlist(&playlist)?;
        let init = std::fs::read(dir.join("init.mp4")).context("ffmpeg wrote no init.mp4")?;
        let mut segments = Vec::with_capacity(entries.len());
        for (uri, duration_s) in entries {
            let bytes = std::fs::read(dir.join(&uri)).with_context(|| format!("reading {uri}"))?;
            segments.push(Segment { bytes, duration_s });
        }
        if segments.is_empty() {
            bail!("ffmpeg cut no segment out of the source");
        }
        Ok(HlsCut { init, segments })
    }

    /// Mean segment duration, seconds.
    pub fn mean_segment_s(&self) -> f64 {
        let total: f64 = self.segments.iter().map(|s| s.duration_s).sum();
        total / self.segments.len().max(1) as f64
    }
}

/// `(uri, duration)` of each media segment of a VOD media playlist, in order.
pub fn parse_vod_playlist(text: &str) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    let mut pending: Option<f64> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("#EXTINF:") {
            let d = rest.split(',').next().unwrap_or("");
            pending = Some(d.parse().with_context(|| format!("bad #EXTINF {line:?}"))?);
        } else if !line.is_empty() && !line.starts_with('#') {
            let d = pending
                .take()
                .with_context(|| format!("segment {line:?} has no #EXTINF"))?;
            out.push((line.to_string(), d));
        }
    }
    Ok(out)
}

/// When each segment goes live, as a live encoder publishes it: segment `i` the moment its last
/// frame is captured, `t0 + end_i`; its program date time is `t0 + start_i` (wall-clock time of
/// its first frame). `t0` is chosen so that `window` segments are out when the server starts:
/// viewers join a stream that has been live for a while, as they do on ours.
#[derive(Debug, Clone)]
pub struct LiveSchedule {
    /// Start of each segment, seconds after `t0`, and of the one after the last.
    starts: Vec<f64>,
    /// Playlist length (segments in the sliding window).
    pub window: usize,
    pub target_duration: u32,
    /// Wall-clock time of the first frame (Unix ms).
    pub t0_unix_ms: f64,
}

impl LiveSchedule {
    /// `server_start_unix_ms`: when the server starts; `t0` is `window` segments before it.
    pub fn new(durations: &[f64], window: usize, server_start_unix_ms: f64) -> LiveSchedule {
        let mut starts = Vec::with_capacity(durations.len() + 1);
        let mut t = 0.0;
        starts.push(t);
        for d in durations {
            t += d;
            starts.push(t);
        }
        let window = window.max(1);
        let preroll = starts[window.min(durations.len())];
        let max_d = durations.iter().copied().fold(0.0, f64::max);
        LiveSchedule {
            starts,
            window,
            target_duration: max_d.round().max(1.0) as u32,
            t0_unix_ms: server_start_unix_ms - preroll * 1000.0,
        }
    }

    pub fn segments(&self) -> usize {
        self.starts.len() - 1
    }

    /// How many segments are out at `now` (Unix ms): those whose end has passed.
    pub fn published(&self, now_unix_ms: f64) -> usize {
        let t = (now_unix_ms - self.t0_unix_ms) / 1000.0;
        // starts[i + 1] is the end of segment i.
        self.starts[1..].partition_point(|end| *end <= t + 1e-9)
    }

    /// Whether segment `i` may be served at `now` (a request for a later one is a 404, as from
    /// a live origin).
    pub fn is_out(&self, i: usize, now_unix_ms: f64) -> bool {
        i < self.published(now_unix_ms)
    }

    /// Program date time of segment `i` (Unix ms).
    pub fn pdt_ms(&self, i: usize) -> f64 {
        self.t0_unix_ms + self.starts[i] * 1000.0
    }

    /// The live media playlist at `now`: the last `window` published segments, each with its
    /// program date time; `#EXT-X-ENDLIST` once the cut is used up.
    pub fn playlist(&self, now_unix_ms: f64) -> String {
        let n = self.published(now_unix_ms);
        let first = n.saturating_sub(self.window);
        let mut s = format!(
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:{}\n#EXT-X-MEDIA-SEQUENCE:{first}\n\
             #EXT-X-INDEPENDENT-SEGMENTS\n#EXT-X-MAP:URI=\"init.mp4\"\n",
            self.target_duration
        );
        for i in first..n {
            s.push_str(&format!(
                "#EXT-X-PROGRAM-DATE-TIME:{}\n#EXTINF:{:.6},\nseg/{i}.m4s\n",
                rfc3339_ms(self.pdt_ms(i)),
                self.starts[i + 1] - self.starts[i]
            ));
        }
        if n == self.segments() {
            s.push_str("#EXT-X-ENDLIST\n");
        }
        s
    }
}

/// `2026-12-06T08:10:15.894Z` for a Unix time in ms (UTC; the proleptic Gregorian calendar).
pub fn rfc3339_ms(unix_ms: f64) -> String {
    let ms = unix_ms.round() as i64;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (sec, milli) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_544_615_894.0), "2026-12-06T08:10:15.894Z");
        assert_eq!(rfc3339_ms(951_782_400_000.0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn vod_playlist_is_read_in_order() -> Result<()> {
        let text = "#EXTM3U\n#EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:2.000000,\n\
                    #EXT-X-PROGRAM-DATE-TIME:2026-12-06T08:10:15.894+0000\nseg00000.m4s\n\
                    #EXTINF:1.5,\nseg00001.m4s\n#EXT-X-ENDLIST\n";
        let e = parse_vod_playlist(text)?;
        assert_eq!(
            e,
            vec![("seg00000.m4s".into(), 2.0), ("seg00001.m4s".into(), 1.5)]
        );
        assert!(parse_vod_playlist("seg.m4s\n").is_err());
        Ok(())
    }

    #[test]
    fn segments_go_live_at_their_end_with_a_sliding_window() {
        let start = 1_000_000.0;
        let s = LiveSchedule::new(&[2.0; 10], 3, start);
        // Three segments (the window) are out at the start, the fourth 2 s later.
        assert_eq!(s.t0_unix_ms, start - 6000.0);
        assert_eq!(s.published(start), 3);
        assert_eq!(s.published(start + 1999.0), 3);
        assert_eq!(s.published(start + 2000.0), 4);
        assert!(s.is_out(3, start + 2000.0) && !s.is_out(4, start + 2000.0));
        assert_eq!(s.pdt_ms(3), start);
        let p = s.playlist(start + 2500.0);
        assert!(p.contains("#EXT-X-MEDIA-SEQUENCE:1\n"), "{p}");
        assert!(p.contains("seg/1.m4s") && p.contains("seg/3.m4s") && !p.contains("seg/0.m4s"));
        assert!(p.contains("#EXT-X-TARGETDURATION:2\n"));
        assert!(!p.contains("ENDLIST"));
        assert!(s.playlist(start + 60_000.0).ends_with("#EXT-X-ENDLIST\n"));
        assert_eq!(s.published(start + 60_000.0), 10);
    }
}
