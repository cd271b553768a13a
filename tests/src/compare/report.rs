//! The comparison's figures: one [`SideReport`] per system, measured the same way, and the
//! table and JSON that put them side by side with their ratios (ours / theirs).

use protocol::report::Pct;
use serde::Serialize;

/// One system's run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideReport {
    /// `ours` or `p2p-media-loader`.
    pub system: String,
    /// `None` when the side played; otherwise why it is counted as failed (its figures are
    /// still what was measured, and `console_errors` says what the pages said).
    pub failed: Option<String>,
    pub viewers: usize,
    /// Pages that decode and show the video (all of them: see the report's notes).
    pub decoding: usize,
    /// Pages that showed a first frame.
    pub played: usize,
    /// Bytes the pages received, by source, from the library's own counters.
    pub bytes_from_peers: u64,
    pub bytes_from_server: u64,
    /// `bytes_from_peers / (bytes_from_peers + bytes_from_server)`.
    pub p2p_share: f64,
    /// Media bytes the server itself counted sending (our origin: pushes and fallbacks; theirs:
    /// init and media segments).
    pub server_sent_bytes: u64,
    /// `1 - server_sent_bytes / (bytes the pages received)`: the share checked against the
    /// server rather than taken from the pages.
    pub p2p_share_by_server: f64,
    pub bytes_uploaded: u64,
    /// Page load (navigation start) to the first `playing` event, ms, over the pages that played.
    pub startup_ms: Pct,
    /// Sampled once a second on every playing page: now minus the wall-clock time at which the
    /// frame on screen was captured (see the report's notes for each side's clock).
    pub latency_ms: Pct,
    pub latency_samples: usize,
    /// `waiting` events after the first second of playback, not while seeking.
    pub stalls: u32,
    pub stalls_per_viewer: Vec<u32>,
    pub stall_messages: Vec<String>,
    /// CPU time of the whole browser (every process) over the run, per page, in percent of one
    /// core.
    pub cpu_percent_per_viewer: f64,
    pub peak_rss_mb_per_viewer: f64,
    /// Upload cap per viewer, kbit/s (`None`: the library has none).
    pub upload_kbps: Option<u32>,
    /// What the media was cut into: fragments (ours) or segments (theirs), mean seconds.
    pub unit_s: f64,
    pub console_errors: Vec<String>,
    /// Anything about this side a reader needs to judge its figures.
    pub notes: Vec<String>,
}

impl SideReport {
    /// Marks the side failed when no page played, and notes the pages that never did.
    pub fn check_played(&mut self, viewers: usize) {
        if self.played == 0 {
            self.failed = Some("no viewer played".into());
        } else if self.played < viewers {
            self.notes.push(format!(
                "{} of {} viewers never played",
                viewers - self.played,
                viewers
            ));
        }
    }

    pub fn new(system: &str, viewers: usize) -> SideReport {
        SideReport {
            system: system.into(),
            viewers,
            ..SideReport::default()
        }
    }

    /// Fills the shares from the byte counts.
    pub fn compute_shares(&mut self) {
        let received = self.bytes_from_peers + self.bytes_from_server;
        if received > 0 {
            self.p2p_share = self.bytes_from_peers as f64 / received as f64;
            self.p2p_share_by_server =
                (1.0 - self.server_sent_bytes as f64 / received as f64).max(0.0);
        }
    }

    fn ok(&self) -> bool {
        self.failed.is_none()
    }
}

/// Ours over theirs, per measure; 1 where both are 0; `None` where it has no meaning (a failed
/// side, or theirs alone 0: the table gives both values).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    pub p2p_share: Option<f64>,
    pub startup_p95: Option<f64>,
    pub latency_p95: Option<f64>,
    pub stalls: Option<f64>,
    pub cpu_per_viewer: Option<f64>,
}

/// What both runs shared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareConfig {
    pub viewers: usize,
    pub seconds: u64,
    pub upload_kbps: u32,
    pub source: crate::source::SourceInfo,
    /// HLS segment duration asked of ffmpeg, and the playlist window (segments).
    pub segment_seconds: f64,
    pub hls_window: usize,
    /// hls.js `liveSyncDurationCount` their page set (0: left to hls.js and the engine).
    pub hls_sync: usize,
    pub versions: Vec<(String, String)>,
    pub chromium: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareReport {
    pub config: CompareConfig,
    pub ours: SideReport,
    pub theirs: SideReport,
    pub ratio: Ratios,
    pub notes: Vec<String>,
}

/// `ours / theirs`; 1 when both are 0 (e.g. no stall on either side), `None` when only the
/// denominator is.
fn ratio(ours: f64, theirs: f64) -> Option<f64> {
    if !(ours.is_finite() && theirs.is_finite()) {
        return None;
    }
    match (ours.abs() > f64::EPSILON, theirs.abs() > f64::EPSILON) {
        (_, true) => Some(ours / theirs),
        (false, false) => Some(1.0),
        (true, false) => None,
    }
}

impl CompareReport {
    pub fn new(config: CompareConfig, ours: SideReport, theirs: SideReport) -> CompareReport {
        let both = ours.ok() && theirs.ok();
        let r = |a: f64, b: f64| if both { ratio(a, b) } else { None };
        let ratio = Ratios {
            p2p_share: r(ours.p2p_share, theirs.p2p_share),
            startup_p95: r(ours.startup_ms.p95, theirs.startup_ms.p95),
            latency_p95: r(ours.latency_ms.p95, theirs.latency_ms.p95),
            stalls: r(f64::from(ours.stalls), f64::from(theirs.stalls)),
            cpu_per_viewer: r(ours.cpu_percent_per_viewer, theirs.cpu_percent_per_viewer),
        };
        CompareReport {
            config,
            ours,
            theirs,
            ratio,
            notes: Vec::new(),
        }
    }

    /// One table: a row per measure, ours, theirs, ours/theirs (and what "better" means).
    pub fn table(&self) -> String {
        let (o, t) = (&self.ours, &self.theirs);
        let mut s = String::new();
        let fmt_ratio = |x: Option<f64>, better: &str| match x {
            Some(v) => format!("{v:.2} ({better})"),
            None => "n/a".to_string(),
        };
        let pct3 = |p: &Pct| format!("{:.0} / {:.0} / {:.0}", p.p50, p.p95, p.max);
        s.push_str(&format!(
            "| {:<30} | {:<26} | {:<26} | {:<22} |\n|{:-<32}|{:-<28}|{:-<28}|{:-<24}|\n",
            "measure", "ours (multi-tree)", "P2P Media Loader", "ours / theirs", "", "", "", ""
        ));
        let mut row = |k: &str, a: String, b: String, r: String| {
            s.push_str(&format!("| {k:<30} | {a:<26} | {b:<26} | {r:<22} |\n"))
        };
        let status = |x: &SideReport| match &x.failed {
            None => "played".to_string(),
            Some(why) => format!("FAILED: {why}"),
        };
        row("status", status(o), status(t), String::new());
        row(
            "viewers (decoding, played)",
            format!("{} ({}, {})", o.viewers, o.decoding, o.played),
            format!("{} ({}, {})", t.viewers, t.decoding, t.played),
            String::new(),
        );
        let cap = |x: &SideReport| match x.upload_kbps {
            Some(k) => format!("{k} kbit/s"),
            None => "none (no such option)".into(),
        };
        row("upload cap per viewer", cap(o), cap(t), String::new());
        row(
            "media unit (mean s)",
            format!("fragment {:.2}", o.unit_s),
            format!("segment {:.2}", t.unit_s),
            String::new(),
        );
        row(
            "p2p share (own counters)",
            format!("{:.3}", o.p2p_share),
            format!("{:.3}", t.p2p_share),
            fmt_ratio(self.ratio.p2p_share, "higher is better"),
        );
        row(
            "p2p share (server's bytes)",
            format!("{:.3}", o.p2p_share_by_server),
            format!("{:.3}", t.p2p_share_by_server),
            fmt_ratio(
                both_ok(o, t)
                    .then(|| ratio(o.p2p_share_by_server, t.p2p_share_by_server))
                    .flatten(),
                "higher is better",
            ),
        );
        let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
        row(
            "MB from server (pages/server)",
            format!("{} / {}", mb(o.bytes_from_server), mb(o.server_sent_bytes)),
            format!("{} / {}", mb(t.bytes_from_server), mb(t.server_sent_bytes)),
            String::new(),
        );
        row(
            "MB from peers / uploaded",
            format!("{} / {}", mb(o.bytes_from_peers), mb(o.bytes_uploaded)),
            format!("{} / {}", mb(t.bytes_from_peers), mb(t.bytes_uploaded)),
            String::new(),
        );
        row(
            "start-up ms p50/p95/max",
            pct3(&o.startup_ms),
            pct3(&t.startup_ms),
            fmt_ratio(self.ratio.startup_p95, "p95; lower is better"),
        );
        row(
            "behind live ms p50/p95/max",
            pct3(&o.latency_ms),
            pct3(&t.latency_ms),
            fmt_ratio(self.ratio.latency_p95, "p95; lower is better"),
        );
        row(
            "stalls (per viewer max)",
            format!(
                "{} ({})",
                o.stalls,
                o.stalls_per_viewer.iter().max().unwrap_or(&0)
            ),
            format!(
                "{} ({})",
                t.stalls,
                t.stalls_per_viewer.iter().max().unwrap_or(&0)
            ),
            fmt_ratio(self.ratio.stalls, "lower is better"),
        );
        row(
            "CPU % of a core per viewer",
            format!("{:.1}", o.cpu_percent_per_viewer),
            format!("{:.1}", t.cpu_percent_per_viewer),
            fmt_ratio(self.ratio.cpu_per_viewer, "lower is better"),
        );
        row(
            "peak RSS MB per viewer",
            format!("{:.0}", o.peak_rss_mb_per_viewer),
            format!("{:.0}", t.peak_rss_mb_per_viewer),
            String::new(),
        );
        row(
            "console errors",
            o.console_errors.len().to_string(),
            t.console_errors.len().to_string(),
            String::new(),
        );
        for side in [o, t] {
            for n in &side.notes {
                s.push_str(&format!("  {}: {n}\n", side.system));
            }
            if !side.ok() {
                for e in side.console_errors.iter().take(20) {
                    s.push_str(&format!("  {} console: {e}\n", side.system));
                }
            }
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}\n"));
        }
        s
    }
}

fn both_ok(a: &SideReport, b: &SideReport) -> bool {
    a.ok() && b.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(name: &str, peers: u64, server: u64, p95: f64, stalls: u32) -> SideReport {
        let mut s = SideReport::new(name, 4);
        s.bytes_from_peers = peers;
        s.bytes_from_server = server;
        s.server_sent_bytes = server;
        s.startup_ms = Pct::of(vec![p95 / 2.0, p95]);
        s.latency_ms = Pct::of(vec![p95 * 4.0]);
        s.stalls = stalls;
        s.compute_shares();
        s
    }

    #[test]
    fn ratios_are_ours_over_theirs() {
        let r = CompareReport::new(
            CompareConfig::default(),
            side("ours", 80, 20, 1000.0, 0),
            side("theirs", 40, 60, 2000.0, 4),
        );
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(r.ratio.p2p_share, 2.0), "{:?}", r.ratio);
        assert!(close(r.ratio.startup_p95, 0.5));
        assert!(close(r.ratio.latency_p95, 0.5));
        assert!(close(r.ratio.stalls, 0.0));
        let even = CompareReport::new(
            CompareConfig::default(),
            side("ours", 1, 1, 1.0, 0),
            side("theirs", 1, 1, 1.0, 0),
        );
        assert!(close(even.ratio.stalls, 1.0), "{:?}", even.ratio);
        let json = serde_json::to_value(&r).unwrap_or_default();
        for k in ["p2p_share", "startup_p95", "latency_p95", "stalls"] {
            assert!(json["ratio"].get(k).is_some(), "ratio.{k} missing");
        }
        let table = r.table();
        assert!(table.contains("2.00 (higher is better)"), "{table}");
        assert!(table.contains("| stalls (per viewer max)"));
    }

    #[test]
    fn a_failed_side_stays_in_the_table_without_ratios() {
        let mut theirs = side("p2p-media-loader", 0, 0, 0.0, 0);
        theirs.failed = Some("no viewer played".into());
        theirs.console_errors = vec!["viewer 0: hls.js fatal error".into()];
        let r = CompareReport::new(
            CompareConfig::default(),
            side("ours", 80, 20, 1000.0, 1),
            theirs,
        );
        assert!(r.ratio.p2p_share.is_none() && r.ratio.stalls.is_none());
        let table = r.table();
        assert!(table.contains("FAILED: no viewer played"), "{table}");
        assert!(table.contains("hls.js fatal error"), "{table}");
    }

    #[test]
    fn zero_denominators_give_no_ratio() {
        assert_eq!(ratio(0.0, 0.0), Some(1.0));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(1.0, 4.0), Some(0.25));
    }
}
