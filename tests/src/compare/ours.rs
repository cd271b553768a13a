//! Our side: the swarm harness's control server looping the source (signed, as in production)
//! and N viewer pages, every one decoding (P2P Media Loader's pages cannot relay without
//! playing, so ours play too), measured with the shared probe.

use anyhow::{Context, Result};
use control_server::source::ingest::LoopedClip;
use protocol::report::{LatencyHistogram, Pct};

use super::probe::{self, LatencyClock};
use super::report::SideReport;
use super::{wall_ms, CompareArgs};
use crate::source::SourceClip;
use crate::swarm::Swarm;

pub const SYSTEM: &str = "ours";

/// Our capture clock for a clip whose origin started at `t0_unix_ms` (see [`LatencyClock::Ours`]).
pub fn clock(source: &SourceClip, t0_unix_ms: f64) -> Result<LatencyClock> {
    let clip = LoopedClip::parse(source.bytes.clone()).context("parsing the source")?;
    let ts = f64::from(clip.init.timescale.max(1));
    let first = clip.fragments.first().map_or(0, |f| f.base_decode_time);
    Ok(LatencyClock::Ours {
        t0_unix_ms,
        m0_s: first as f64 / ts,
        lap_s: clip.duration as f64 / ts,
        fragments: clip
            .fragments
            .iter()
            .map(|f| {
                (
                    (f.base_decode_time - first) as f64 / ts,
                    f.duration as f64 / ts,
                )
            })
            .collect(),
    })
}

pub async fn run(args: &CompareArgs, source: &SourceClip) -> SideReport {
    let mut rep = SideReport::new(SYSTEM, args.viewers);
    rep.upload_kbps = Some(args.upload_kbps);
    rep.unit_s = source.info.fragment_ms.p50 / 1000.0;
    let t0 = wall_ms();
    let mut swarm = match Swarm::start_source(args.web_dir.clone(), 0, |c| c, source.clone()).await
    {
        Ok(s) => s,
        Err(e) => {
            rep.failed = Some(format!(
                "the control server or Chromium did not start: {e:#}"
            ));
            return rep;
        }
    };
    if let Err(e) = measure(args, source, t0, &mut swarm, &mut rep).await {
        rep.failed = Some(format!("{e:#}"));
    }
    rep.console_errors = swarm.console_errors();
    swarm.shutdown().await;
    rep
}

async fn measure(
    args: &CompareArgs,
    source: &SourceClip,
    t0: f64,
    swarm: &mut Swarm,
    rep: &mut SideReport,
) -> Result<()> {
    let clock = clock(source, t0)?;
    eprintln!(
        "compare: ours on http://{}/ ({} kbit/s); opening {} viewers, all decoding",
        swarm.addr,
        swarm.stream_kbps(),
        args.viewers
    );
    for i in 0..args.viewers {
        swarm.add_viewer(args.upload_kbps, true).await?;
        eprint!("\r  opened {}/{} viewers", i + 1, args.viewers);
    }
    eprintln!();
    let cpu = super::cpu::CpuMeter::start(swarm.browser.pid());
    let sampled = {
        let pages: Vec<_> = swarm
            .viewers
            .iter()
            .filter_map(|v| v.page.as_ref())
            .collect();
        probe::run(SYSTEM, &swarm.browser, &pages, args.seconds, &clock).await
    };
    rep.cpu_percent_per_viewer = cpu.percent_per_page(args.viewers);
    rep.peak_rss_mb_per_viewer = sampled.peak_rss_mb / args.viewers.max(1) as f64;
    rep.latency_samples = sampled.latency_ms.len();
    rep.latency_ms = Pct::of(sampled.latency_ms);
    let reports = swarm.all_stats().await?;
    rep.decoding = reports.iter().filter(|r| r.decoding).count();
    rep.played = reports.iter().filter(|r| r.startup_ms.is_some()).count();
    rep.bytes_from_peers = reports.iter().map(|r| r.bytes_from_peers).sum();
    rep.bytes_from_server = reports.iter().map(|r| r.bytes_from_origin).sum();
    rep.bytes_uploaded = reports.iter().map(|r| r.bytes_up).sum();
    let (push, fallback) = swarm.origin_counters();
    rep.server_sent_bytes = push + fallback;
    rep.compute_shares();
    rep.startup_ms = Pct::of(reports.iter().filter_map(|r| r.startup_ms).collect());
    rep.stalls_per_viewer = reports.iter().map(|r| r.stalls).collect();
    rep.stalls = rep.stalls_per_viewer.iter().sum();
    rep.stall_messages = crate::swarm::stall_messages(&reports);
    let mut hist = LatencyHistogram::default();
    for r in &reports {
        hist.merge_sparse(&r.latency_hist);
    }
    rep.notes.push(format!(
        "the player's own delivery delay (origin cut -> playable, per packet): p50 {} ms, p95 {} ms",
        hist.quantile(0.5).unwrap_or(0),
        hist.quantile(0.95).unwrap_or(0)
    ));
    rep.notes.push(format!(
        "signed stream; {} substreams; the origin pushed {:.1} MB to tree roots and served {:.1} MB \
         of fallbacks ({} packets fetched by pages that missed them); probe samples that failed: {}",
        swarm.state.config.substreams,
        push as f64 / 1e6,
        fallback as f64 / 1e6,
        reports.iter().map(|r| r.origin_fallbacks).sum::<u64>(),
        sampled.failed_samples
    ));
    rep.check_played(args.viewers);
    Ok(())
}
