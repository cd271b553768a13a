//! # sim
//!
//! A deterministic discrete-event simulator of the whole system (issue 11): every simulated
//! peer runs the real peer engine (`peer_wasm::engine::Engine`), natively; the control plane is
//! the coordinator core behind [`control`]; the origin cuts synthetic fragments into packets
//! ([`origin`]); the network ([`net`], [`wire`], [`links`]) has per-peer capacities, access
//! delays, a region matrix, loss as retransmission delay on ordered channels, data-channel
//! set-up times and unreachable pairs. Time is virtual ([`queue`]): events run earliest first,
//! so a seed reproduces a run exactly, and thousands of peers run on one core.
//!
//! The model and its defaults are documented in `docs/simulator.md`.

pub mod checks;
pub mod control;
mod control_only;
pub mod dist;
mod driver;
mod inject;
pub mod links;
pub mod net;
pub mod origin;
pub mod peer;
pub mod playout;
pub mod queue;
pub mod report;
pub mod scenario;
mod server;
mod transport;
pub mod wire;
pub mod world;

use std::time::Instant;

pub use report::Report;
pub use scenario::{RunConfig, Scenario};
pub use world::World;

/// Rough memory a run needs, MB: each engine keeps the last `2k` packets and a few more in
/// flight, and the origin keeps every packet twice (for peers and for the coordinator).
pub fn memory_estimate_mb(cfg: &RunConfig) -> f64 {
    let packet =
        (f64::from(cfg.stream_kbps) * f64::from(cfg.fragment_ms) / 8.0 / f64::from(cfg.k.max(1)))
            .clamp(64.0, 16_384.0);
    let sessions = match cfg.scenario {
        Scenario::Churn => {
            cfg.peers as f64 * (1.0 + cfg.churn_pct / 100.0 * cfg.seconds as f64 / 60.0)
        }
        _ => cfg.peers as f64,
    };
    let per_peer = if cfg.scenario == Scenario::ControlOnly {
        // Plan, heartbeat state and the coordinator's view of the peer.
        2_000.0 + 200.0 * f64::from(cfg.k)
    } else {
        (2.0 * f64::from(cfg.k) + 8.0) * packet + 16_000.0
    };
    let origin = 2.0 * f64::from(cfg.stream_kbps) * 1000.0 / 8.0 * cfg.seconds as f64;
    (sessions * per_peer + origin) / 1e6
}

/// Runs one configuration to the end. `progress`: print a line every few seconds of wall time.
pub fn run(cfg: &RunConfig, progress: bool) -> Result<Report, String> {
    let wcfg = cfg.world_config()?;
    let started = Instant::now();
    let rss0 = report::rss_mb();
    let mut w = World::new(wcfg);
    cfg.schedule(&mut w);
    let end = cfg.seconds * 1_000_000;
    let mut last_print = Instant::now();
    // Steps of a tenth of a simulated second, so progress can be printed between them.
    let step = 100_000;
    let mut t = 0;
    while t < end {
        t = (t + step).min(end);
        w.run_until(t);
        if progress && last_print.elapsed().as_secs_f64() >= 5.0 {
            last_print = Instant::now();
            eprintln!("{}", progress_line(&w, started.elapsed().as_secs_f64()));
        }
    }
    let inv = checks::delivery_invariants(&w, 4000.0);
    let rss_growth = match (cfg.scenario, rss0, report::rss_mb()) {
        (Scenario::ControlOnly, Some(a), Some(b)) => {
            Some((b - a).max(0.0) * 1e6 / cfg.peers as f64)
        }
        _ => None,
    };
    Ok(report::build(
        cfg,
        &w,
        inv,
        started.elapsed().as_secs_f64(),
        rss_growth,
    ))
}

fn progress_line(w: &World, wall: f64) -> String {
    let live = w.peers.iter().filter(|p| p.alive).count();
    let (mut from_peers, mut from_origin, mut fallbacks) = (0u64, 0u64, 0u64);
    for p in w.peers.iter().filter(|p| p.alive) {
        if let Some(e) = &p.engine {
            from_peers += e.counters.bytes_from_peers;
            from_origin += e.counters.bytes_from_origin;
            fallbacks += e.counters.origin_fallbacks;
        }
    }
    let stalls: u32 = w.peers.iter().map(|p| p.playout.stalls).sum();
    let share = if from_peers + from_origin > 0 {
        from_peers as f64 / (from_peers + from_origin) as f64
    } else {
        0.0
    };
    format!(
        "  sim t={:>6.1}s  wall {:>6.1}s  live {live}  p2p_share {share:.3}  fallbacks {fallbacks}  stalls {stalls}  links {}  events {}  rss {:.0} MB",
        queue::ms(w.q.now()) / 1000.0,
        wall,
        w.links.len(),
        w.totals.events,
        report::rss_mb().unwrap_or(0.0)
    )
}
