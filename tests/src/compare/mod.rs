//! `cargo xtask compare`: our swarm and a P2P Media Loader swarm on the same source, the same
//! number of viewers, the same Chromium launch and the same machine, one after the other, measured
//! the same way (the probe in [`probe`], the CPU meter in [`cpu`]), in one table with ratios.
//!
//! * [`ours`]: the swarm harness's server looping the source, N decoding viewer pages.
//! * [`theirs`]: ffmpeg's CMAF HLS cut of the source ([`hls`]) published live by a small server
//!   ([`hls_server`]), a local WebTorrent tracker ([`tracker`]), N pages of hls.js +
//!   p2p-media-loader (web/compare/).
//! * [`report`]: the figures, the table and the JSON (`ratio.p2p_share`, `ratio.startup_p95`,
//!   `ratio.latency_p95`, `ratio.stalls`).

pub mod cpu;
pub mod hls;
pub mod hls_server;
pub mod ours;
pub mod preflight;
pub mod probe;
pub mod report;
pub mod theirs;
pub mod tracker;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::source::SourceClip;
use report::{CompareConfig, CompareReport};

/// Parameters of one comparison (see `cargo xtask compare --help`).
#[derive(Debug, Clone)]
pub struct CompareArgs {
    pub viewers: usize,
    /// Measured seconds per side (after all its pages are open).
    pub seconds: u64,
    /// Our viewers' upload cap (P2P Media Loader has none).
    pub upload_kbps: u32,
    /// A fragmented-MP4 file; the demo clip when `None`.
    pub source: Option<PathBuf>,
    pub json: Option<PathBuf>,
    /// HLS segment duration asked of ffmpeg (2 s by default; 1 s favours them).
    pub segment_seconds: f64,
    /// Segments in the live playlist.
    pub hls_window: usize,
    /// hls.js `liveSyncDurationCount` set in their page (0: left to hls.js and the engine).
    pub hls_sync: usize,
    /// `<repo>/web`: our pages and package, their page, bundle and node_modules.
    pub web_dir: PathBuf,
}

/// Wall-clock time, Unix ms.
pub fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn chromium_version() -> String {
    crate::cdp::chromium_path()
        .ok()
        .and_then(|p| Command::new(p).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs both sides and prints the table (and the JSON to `--json` or stdout).
pub async fn run(args: CompareArgs) -> Result<CompareReport> {
    if args.viewers == 0 {
        bail!("--viewers must be at least 1");
    }
    if args.segment_seconds <= 0.0 {
        bail!("--segment-seconds must be positive");
    }
    let versions = preflight::check(&args.web_dir)?;
    preflight::check_bundle(&args.web_dir)?;
    let source = match &args.source {
        Some(p) => SourceClip::load(p)?,
        None => SourceClip::demo()?,
    };
    eprintln!("compare: source {}", source.info.summary());
    let config = CompareConfig {
        viewers: args.viewers,
        seconds: args.seconds,
        upload_kbps: args.upload_kbps,
        source: source.info.clone(),
        segment_seconds: args.segment_seconds,
        hls_window: args.hls_window,
        hls_sync: args.hls_sync,
        versions,
        chromium: chromium_version(),
    };
    let ours = ours::run(&args, &source).await;
    eprintln!(
        "compare: ours done{}",
        ours.failed
            .as_deref()
            .map_or(String::new(), |f| format!(" (FAILED: {f})"))
    );
    let theirs = theirs::run(&args, &source).await;
    let mut report = CompareReport::new(config, ours, theirs);
    report.notes = notes(&report);
    println!("\n{}", report.table());
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(path) => {
            std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{json}"),
    }
    Ok(report)
}

/// What the table's figures mean where the two sides differ.
fn notes(r: &CompareReport) -> Vec<String> {
    vec![
        "every viewer decodes on both sides: P2P Media Loader fetches segments only for a playing \
         hls.js, so it cannot relay without decoding; our non-decoding (verify-only) viewers are \
         not used here"
            .into(),
        format!(
            "behind live = now - capture time of the frame on screen, sampled each second on every \
             playing page. Theirs: hls.js playingDate (EXT-X-PROGRAM-DATE-TIME); a segment goes \
             out when its last frame is captured. Ours: the origin puts a fragment out at its start \
             on the loop's clock, as an encoder that just captured its last frame would, so a \
             frame's capture time is that minus the fragment's duration. Both include one unit of \
             media: a {:.2} s fragment (ours), a {:.2} s segment (theirs)",
            r.ours.unit_s, r.theirs.unit_s
        ),
        "start-up = navigation start to the first `playing` event; stalls = `waiting` after the \
         first second of playback, not while seeking (the same rule, in our player and in their \
         page's script)"
            .into(),
        "p2p share from each library's own counters (ours: bytes from peers / origin per page; \
         theirs: onChunkDownloaded by source), checked against what each server counted sending"
            .into(),
        "CPU = all of Chromium's processes over the measured seconds / pages (both sides run in \
         the same machine, one after the other)"
            .into(),
    ]
}
