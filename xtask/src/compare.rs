//! `cargo xtask compare`: our swarm against P2P Media Loader on the same source (issue 16). The
//! checks come first, so that a machine without ffmpeg, Chromium or the npm packages is refused
//! before any build; then the wasm peer and the web bundles are built and both sides run
//! (`e2e::compare`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::build::build_wasm;
use crate::tools::{ensure_wasm_bindgen, ensure_wasm_target};
use crate::util::repo_root;
use crate::web;

/// The command line of `cargo xtask compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Viewer pages per side (all decoding).
    #[arg(long, default_value_t = 12)]
    viewers: usize,
    /// Measured seconds per side, after its pages are open.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Our viewers' upload cap, kbit/s (P2P Media Loader has no such option).
    #[arg(long, default_value_t = 2000)]
    upload_kbps: u32,
    /// A fragmented-MP4 file both sides stream instead of the demo clip.
    #[arg(long, value_name = "PATH")]
    source: Option<PathBuf>,
    /// Write the JSON report here (else it is printed after the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// HLS segment duration for P2P Media Loader (cut at keyframes): 2, or 1, which favours them.
    #[arg(long, default_value_t = 2.0)]
    segment_seconds: f64,
    /// Segments in their live playlist. P2P Media Loader's FAQ: its defaults work best for live
    /// streams with 15-20 segments in the playlist (its hls.js engine then starts that far behind
    /// live, leaving time to fetch from peers).
    #[arg(long, default_value_t = 20)]
    hls_window: usize,
    /// hls.js liveSyncDurationCount in their page. Default: the playlist's segments minus one,
    /// the value P2P Media Loader's engine picks (set by the engine at run time, it comes after
    /// hls.js 1.6 has chosen where to start, see web/compare/p2pml.js); 0 leaves it to them.
    #[arg(long)]
    hls_sync: Option<usize>,
}

/// Whole seconds of a segment, at least 1 (the engine divides its 120 s cap by the playlist's
/// target duration).
fn segment_whole(s: f64) -> usize {
    (s.round() as usize).max(1)
}

pub fn compare(args: Args) -> Result<()> {
    let web_dir = repo_root().join("web");
    // Refuse before building anything.
    e2e::compare::preflight::check(&web_dir)?;
    if let Some(path) = &args.source {
        let clip = e2e::source::SourceClip::load(path)?;
        println!("source {}", clip.info.summary());
    }
    ensure_wasm_target()?;
    ensure_wasm_bindgen()?;
    build_wasm()?;
    web::build_web()?;
    let args = e2e::compare::CompareArgs {
        viewers: args.viewers,
        seconds: args.seconds,
        upload_kbps: args.upload_kbps,
        source: args.source,
        json: args.json,
        segment_seconds: args.segment_seconds,
        hls_window: args.hls_window,
        hls_sync: args.hls_sync.unwrap_or(
            args.hls_window
                .saturating_sub(1)
                .min(120 / segment_whole(args.segment_seconds)),
        ),
        web_dir,
    };
    println!("\n==> compare: {args:?}\n");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(e2e::compare::run(args))
        .map(|_| ())
}
