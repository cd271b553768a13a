//! P2P Media Loader's side: the source cut into live CMAF HLS, the local HTTP server publishing
//! it in real time, the local tracker, and N pages of hls.js + p2p-media-loader-hlsjs in the
//! same Chromium launch as ours, measured with the shared probe.

use std::time::Duration;

use anyhow::{Context, Result};
use protocol::report::Pct;
use serde::Deserialize;

use super::hls::HlsCut;
use super::hls_server::LiveHlsServer;
use super::probe::{self, LatencyClock};
use super::report::SideReport;
use super::tracker::Tracker;
use super::CompareArgs;
use crate::cdp::{Browser, LaunchOptions, Page, PageOptions};
use crate::source::SourceClip;

pub const SYSTEM: &str = "p2p-media-loader";

/// What their page's `window.cmp.stats()` returns (web/compare/p2pml.js).
#[derive(Debug, Clone, Default, Deserialize)]
struct PageStats {
    bytes_http: u64,
    bytes_p2p: u64,
    bytes_up: u64,
    segments_http: u64,
    segments_p2p: u64,
    segment_errors: u64,
    peers_max: i64,
    startup_ms: Option<f64>,
    stalls: u32,
    errors: Vec<String>,
    live_sync_count: Option<f64>,
    target_latency_s: Option<f64>,
}

/// The running pieces, kept so that a failure can still read the pages' console errors.
struct Parts {
    server: LiveHlsServer,
    tracker: Tracker,
    browser: Browser,
    pages: Vec<Page>,
}

pub async fn run(args: &CompareArgs, source: &SourceClip) -> SideReport {
    let mut rep = SideReport::new(SYSTEM, args.viewers);
    rep.upload_kbps = None;
    rep.notes.push(
        "no upload cap: P2P Media Loader 2.x has no option to limit a peer's upload rate \
         (isP2PUploadDisabled only turns it off)"
            .into(),
    );
    let mut parts = match start(args, source, &mut rep).await {
        Ok(p) => p,
        Err(e) => {
            rep.failed = Some(format!("{e:#}"));
            return rep;
        }
    };
    if let Err(e) = measure(args, &mut parts, &mut rep).await {
        rep.failed = Some(format!("{e:#}"));
    }
    rep.console_errors = parts
        .pages
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.console_errors()
                .into_iter()
                .map(move |e| format!("viewer {i}: {e}"))
        })
        .collect();
    for p in std::mem::take(&mut parts.pages) {
        p.close().await.ok();
    }
    drop(parts.browser);
    parts.tracker.stop().await;
    drop(parts.server);
    rep
}

async fn start(args: &CompareArgs, source: &SourceClip, rep: &mut SideReport) -> Result<Parts> {
    // Enough media for the pre-roll window, opening the pages, and the run.
    let media_s = args.seconds as f64
        + args.segment_seconds * args.hls_window as f64
        + 5.0 * args.viewers as f64
        + 120.0;
    let bytes = source.bytes.clone();
    let segment_s = args.segment_seconds;
    let cut = tokio::task::spawn_blocking(move || HlsCut::cut(&bytes, segment_s, media_s))
        .await
        .context("the ffmpeg task")??;
    rep.unit_s = cut.mean_segment_s();
    if (rep.unit_s - args.segment_seconds).abs() > 0.1 * args.segment_seconds {
        rep.notes.push(format!(
            "segments are {:.2} s, not the {} s asked: ffmpeg cuts at keyframes (stream copy), \
             and the source's keyframes are {:.2} s apart",
            rep.unit_s,
            args.segment_seconds,
            source.info.keyframe_ms.p50 / 1000.0
        ));
    }
    let server = LiveHlsServer::start(cut, args.hls_window, args.web_dir.clone()).await?;
    let tracker = Tracker::start(&args.web_dir).await?;
    let browser = Browser::launch(LaunchOptions::default()).await?;
    Ok(Parts {
        server,
        tracker,
        browser,
        pages: Vec::new(),
    })
}

async fn measure(args: &CompareArgs, parts: &mut Parts, rep: &mut SideReport) -> Result<()> {
    let url = format!(
        "http://{}/p2pml.html?src=/live.m3u8&tracker={}&swarm=compare&sync={}",
        parts.server.addr,
        parts.tracker.url(),
        args.hls_sync
    );
    eprintln!(
        "compare: P2P Media Loader on {url} ({:.2} s segments, {} in the playlist); opening {} \
         viewers, all decoding",
        rep.unit_s, args.hls_window, args.viewers
    );
    for i in 0..args.viewers {
        let page = parts
            .browser
            .new_page_with(&url, PageOptions { new_window: true })
            .await?;
        let started = page
            .wait_for("window.cmp !== undefined", Duration::from_secs(20))
            .await;
        let errors = page.console_errors();
        parts.pages.push(page);
        started.with_context(|| {
            format!("viewer {i}'s page did not set up hls.js; console errors: {errors:?}")
        })?;
        eprint!("\r  opened {}/{} viewers", i + 1, args.viewers);
    }
    eprintln!();
    let cpu = super::cpu::CpuMeter::start(parts.browser.pid());
    let sampled = {
        let pages: Vec<&Page> = parts.pages.iter().collect();
        probe::run(
            SYSTEM,
            &parts.browser,
            &pages,
            args.seconds,
            &LatencyClock::ProgramDateTime,
        )
        .await
    };
    rep.cpu_percent_per_viewer = cpu.percent_per_page(args.viewers);
    rep.peak_rss_mb_per_viewer = sampled.peak_rss_mb / args.viewers.max(1) as f64;
    rep.latency_samples = sampled.latency_ms.len();
    rep.latency_ms = Pct::of(sampled.latency_ms);
    let mut stats = Vec::with_capacity(parts.pages.len());
    for (i, page) in parts.pages.iter().enumerate() {
        let v = page
            .eval("JSON.stringify(window.cmp.stats())")
            .await
            .with_context(|| format!("reading viewer {i}'s counters"))?;
        let text = v.as_str().context("stats are not a string")?;
        let s: PageStats =
            serde_json::from_str(text).with_context(|| format!("parsing viewer {i}'s counters"))?;
        stats.push(s);
    }
    rep.decoding = stats.len();
    rep.played = stats.iter().filter(|s| s.startup_ms.is_some()).count();
    rep.bytes_from_peers = stats.iter().map(|s| s.bytes_p2p).sum();
    rep.bytes_from_server = stats.iter().map(|s| s.bytes_http).sum();
    rep.bytes_uploaded = stats.iter().map(|s| s.bytes_up).sum();
    let served = parts.server.served.counts();
    rep.server_sent_bytes = served.media_bytes;
    rep.compute_shares();
    rep.startup_ms = Pct::of(stats.iter().filter_map(|s| s.startup_ms).collect());
    rep.stalls_per_viewer = stats.iter().map(|s| s.stalls).collect();
    rep.stalls = rep.stalls_per_viewer.iter().sum();
    rep.stall_messages = stats
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.errors.iter().map(move |e| format!("viewer {i}: {e}")))
        .collect();
    rep.notes.push(format!(
        "segments loaded over HTTP {} / from peers {}, segment errors {}, most peers at once \
         (max over pages) {}; the server answered {} playlists ({:.1} MB, not in the shares) and \
         refused {} requests for segments not out yet; probe samples that failed: {}",
        stats.iter().map(|s| s.segments_http).sum::<u64>(),
        stats.iter().map(|s| s.segments_p2p).sum::<u64>(),
        stats.iter().map(|s| s.segment_errors).sum::<u64>(),
        stats.iter().map(|s| s.peers_max).max().unwrap_or(0),
        served.playlists,
        served.playlist_bytes as f64 / 1e6,
        served.early_requests,
        sampled.failed_samples
    ));
    rep.notes.push(format!(
        "hls.js liveSyncDurationCount {} ({}), target latency {:.1} s (first page, at the end)",
        stats.first().and_then(|s| s.live_sync_count).unwrap_or(0.0),
        if args.hls_sync > 0 {
            "set in the page: the engine's own choice, playlist segments - 1"
        } else {
            "left to hls.js and the engine"
        },
        stats
            .first()
            .and_then(|s| s.target_latency_s)
            .unwrap_or(0.0)
    ));
    rep.check_played(args.viewers);
    Ok(())
}
