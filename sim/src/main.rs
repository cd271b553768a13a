//! `sim`: runs one simulated scenario and prints its report (`cargo xtask sim` forwards here).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sim::net::NatModel;
use sim::scenario::Network;
use sim::{RunConfig, Scenario};

#[derive(Debug, Parser)]
#[command(
    name = "sim",
    about = "Whole-system simulator: the real peer engine and coordinator over a simulated network"
)]
struct Args {
    /// Peers (viewers) at the start.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Simulated seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    scenario: Scenario,
    /// Regions (peers spread evenly over them).
    #[arg(long, default_value_t = 1)]
    regions: u16,
    /// Run the three-tier hierarchy.
    #[arg(long)]
    hierarchy: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Churn scenario: percentage of the peers leaving (and replaced) per minute.
    #[arg(long, default_value_t = 10.0)]
    churn: f64,
    /// Percentage of peer pairs that can never connect (model default 20).
    #[arg(long)]
    unreachable: Option<f64>,
    /// How unreachable pairs arise: `classes` (peers behind NATs report their class at join,
    /// a symmetric NAT reaches only open peers) or `pairs` (random pairs the DCM learns of
    /// only when a data channel fails).
    #[arg(long, value_enum, default_value_t = NatModel::Classes)]
    nat_model: NatModel,
    /// Loss per transmission on every path, percent (model default 0.1; lossy: 5).
    #[arg(long)]
    loss: Option<f64>,
    /// Stream rate, kbit/s.
    #[arg(long, default_value_t = 1000)]
    stream_kbps: u32,
    /// Fragment (keyframe interval) duration, ms.
    #[arg(long, default_value_t = 1000)]
    fragment_ms: u32,
    /// Substreams.
    #[arg(long, default_value_t = 4)]
    k: u32,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// Every peer declares this upload (kbit/s) instead of 80 % of its drawn capacity.
    #[arg(long)]
    upload_kbps: Option<u32>,
    /// Network model: `internet` (the documented mix) or `loopback` (the browser swarm's
    /// machine, for calibration).
    #[arg(long, value_enum, default_value_t = Network::Internet)]
    network: Network,
    /// The origin releases each fragment's packets evenly over the next fragment duration
    /// instead of all at once (a design option to evaluate; the real origin bursts).
    #[arg(long)]
    pace: bool,
    /// The engines' fallback delay: how long a gap waits before the origin is asked (ms).
    #[arg(long, default_value_t = 600.0)]
    fallback_ms: f64,
    /// The engines' handover: how long a moved tree link is kept until its replacement
    /// delivers, at most (ms; 0: the old parent stops at once).
    #[arg(long, default_value_t = 1500.0)]
    handover_ms: f64,
    /// A joiner that comes this share of a fragment after the newest was cut or later starts
    /// at the newest fragment (as the server's flag).
    #[arg(long, default_value_t = coordinator::start::DEFAULT_NEWEST_AFTER)]
    start_newest_after: f64,
    /// Streams' worth of origin egress a second for joiners' older fragments; beyond it they
    /// start at the next fragment (as the server's flag; 0: all do).
    #[arg(long, default_value_t = coordinator::start::DEFAULT_BUDGET_STREAMS)]
    start_budget: f64,
    /// Relaying peers whose upload is cut to a fifth of their load a third into the run.
    #[arg(long, default_value_t = 0)]
    throttle: usize,
    /// JSON file with the region-to-region one-way delays, ms (`regions` rows of `regions`).
    #[arg(long)]
    matrix: Option<PathBuf>,
    /// Write the JSON report here (otherwise it is printed).
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let a = Args::parse();
    let matrix = match &a.matrix {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--matrix {}", p.display()))?;
            let m: Vec<Vec<f64>> = serde_json::from_str(&text).with_context(|| {
                format!("--matrix {}: expected a JSON array of arrays", p.display())
            })?;
            Some(m)
        }
        None => None,
    };
    let cfg = RunConfig {
        regions: a.regions,
        hierarchy: a.hierarchy,
        seed: a.seed,
        churn_pct: a.churn,
        unreachable_pct: match a.scenario {
            Scenario::Unreachable => Some(a.unreachable.unwrap_or(20.0)),
            _ => a.unreachable,
        },
        nat_model: a.nat_model,
        loss_pct: a.loss,
        stream_kbps: a.stream_kbps,
        fragment_ms: a.fragment_ms,
        k: a.k,
        heartbeat_ms: a.heartbeat_ms,
        matrix,
        upload_kbps: a.upload_kbps,
        throttle: a.throttle,
        network: a.network,
        pace: a.pace,
        fallback_ms: a.fallback_ms,
        handover_ms: a.handover_ms,
        start: coordinator::start::StartConfig {
            newest_after: a.start_newest_after,
            budget_streams: a.start_budget,
        },
        ..RunConfig::new(a.peers, a.seconds, a.scenario)
    };
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    let need = sim::memory_estimate_mb(&cfg);
    if let Some(avail) = sim::report::available_mb() {
        if need > 0.8 * avail {
            bail!(
                "this run needs about {need:.0} MB of memory and {avail:.0} MB are available: \
                 lower --peers, --seconds or --stream-kbps"
            );
        }
    }
    eprintln!(
        "==> sim {:?}: {} peers, {} s, {} region(s){}, seed {} (memory estimate {need:.0} MB)",
        cfg.scenario,
        cfg.peers,
        cfg.seconds,
        cfg.regions,
        if cfg.hierarchy { ", hierarchy" } else { "" },
        cfg.seed
    );
    let report = sim::run(&cfg, true).map_err(anyhow::Error::msg)?;
    println!("\n{}", report.table());
    let json = serde_json::to_string_pretty(&report)?;
    match &a.json {
        Some(p) => {
            std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}
