//! `cargo xtask bench-topology`: the control center's hierarchy at scale, without any network.
//!
//! Builds one channel's [`Hierarchy`] for N peers in R regions, then measures incremental joins
//! and leaves, and searches the lowest total-upload / (N × stream rate) ratio at which every peer
//! still receives the full rate.
//!
//! # Capacity distribution
//!
//! Upload capacities, in multiples of the stream rate, mix the access networks viewers have
//! (a rough picture of residential broadband and mobile, not a measurement):
//!
//! | share | class | upload |
//! |---|---|---|
//! | 15 % | cannot relay (symmetric NAT, metered, opted out) | 0 |
//! | 20 % | mobile | 0.2-0.8 × |
//! | 25 % | DSL | 0.5-1.0 × |
//! | 25 % | cable | 1-3 × |
//! | 10 % | fiber | 3-10 × |
//! | 5 % | campus / business fiber | 10-50 × |
//!
//! The mean is about 2.9 × the stream rate; the ratio search scales every peer's capacity by the
//! same factor. Peers are spread uniformly over the regions.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use control_server::topology::hierarchy::{Hierarchy, HierarchyConfig, HierarchyReport};
use control_server::topology::mesh::History;
use control_server::topology::region::Region;
use protocol::PeerId;
use serde_json::json;

/// Command-line arguments.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub nodes: usize,
    pub regions: usize,
    pub json: Option<PathBuf>,
    pub seed: u64,
    pub k: u32,
    pub events: usize,
}

const STREAM_KBPS: u32 = 1000;
/// Runs the benchmark; in a debug build, re-runs itself with `cargo run --release` first.
pub fn run(args: BenchArgs) -> Result<()> {
    if crate::util::rerun_in_release("bench-topology")? {
        return Ok(());
    }
    if args.nodes == 0 || args.regions == 0 {
        bail!("--nodes and --regions must be at least 1");
    }
    println!(
        "==> bench-topology: {} nodes, {} regions, k = {}, stream {STREAM_KBPS} kbit/s, seed {} \
         (release build{})",
        args.nodes,
        args.regions,
        args.k,
        args.seed,
        if crate::util::was_rerun() {
            ", re-executed"
        } else {
            ""
        }
    );
    let cfg = HierarchyConfig {
        k: args.k,
        stream_kbps: STREAM_KBPS,
        ..HierarchyConfig::default()
    };
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let base: Vec<(PeerId, Region, u32)> = (0..args.nodes as u64)
        .map(|i| {
            (
                PeerId(i),
                region(&mut rng, args.regions),
                draw_upload(&mut rng),
            )
        })
        .collect();

    // 1. Full build with the distribution as drawn.
    println!("--> full build of {} peers", args.nodes);
    let peers = scaled(&base, 1.0);
    let start = Instant::now();
    let mut h = Hierarchy::build(cfg, &peers);
    let build = start.elapsed();
    let rep = h.report();
    println!("    {:.3} s", build.as_secs_f64());

    // 2. Incremental joins and leaves on the built hierarchy.
    println!(
        "--> {} incremental events (half joins, half leaves)",
        args.events
    );
    let mut present: Vec<PeerId> = base.iter().map(|p| p.0).collect();
    let mut next = args.nodes as u64;
    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    let mut affected = 0usize;
    for i in 0..args.events {
        if i % 2 == 0 {
            let (id, r, up) = (
                PeerId(next),
                region(&mut rng, args.regions),
                draw_upload(&mut rng),
            );
            next += 1;
            let t = Instant::now();
            affected += h.join(id, r, up, History::default()).affected.len();
            joins.push(t.elapsed().as_nanos() as u64);
            present.push(id);
        } else {
            let id = present.swap_remove(rng.below(present.len() as u64) as usize);
            let t = Instant::now();
            affected += h.leave(id).affected.len();
            leaves.push(t.elapsed().as_nanos() as u64);
        }
        if (i + 1) % (args.events / 4).max(1) == 0 {
            println!("    {} / {} events", i + 1, args.events);
        }
    }
    let after_churn = h.report();
    h.check_invariants()
        .map_err(|e| anyhow::anyhow!("invariants after churn: {e}"))?;

    // 3. Lowest capacity ratio at which everyone gets the full rate (bisection on a scale).
    println!("--> searching the lowest total-upload / (N x stream) with everyone at full rate");
    let ratio_of = |r: &HierarchyReport| {
        r.upload_total_kbps as f64 / (r.peers as f64 * f64::from(STREAM_KBPS))
    };
    let base_ratio = ratio_of(&rep);
    let full =
        |scale: f64| -> HierarchyReport { Hierarchy::build(cfg, &scaled(&base, scale)).report() };
    let at_target = full(1.1 / base_ratio);
    // The target is "every node at full rate whenever total upload >= 1.1 N R": check a sweep.
    let sweep: Vec<(f64, f64)> = [1.1, 1.2, 1.3, 1.5, 2.0]
        .iter()
        .map(|r| {
            let rep = full(r / base_ratio);
            (*r, rep.full_rate as f64 / rep.peers.max(1) as f64)
        })
        .collect();
    let (mut lo, mut hi) = (0.5 / base_ratio, 3.0 / base_ratio);
    let mut best: Option<HierarchyReport> = None;
    if full(hi).full_rate == args.nodes {
        for step in 0..10 {
            let mid = (lo + hi) / 2.0;
            let r = full(mid);
            let ok = r.full_rate == args.nodes;
            println!(
                "    step {}: ratio {:.3}: {:.4} at full rate{}",
                step + 1,
                ratio_of(&r),
                r.full_rate as f64 / r.peers as f64,
                if ok { " (all)" } else { "" }
            );
            if ok {
                hi = mid;
                best = Some(r);
            } else {
                lo = mid;
            }
        }
        if best.is_none() {
            best = Some(full(hi));
        }
    }
    let min_ratio = best.as_ref().map(ratio_of);

    let (jp50, jp99) = (pct(&mut joins, 50.0), pct(&mut joins, 99.0));
    let (lp50, lp99) = (pct(&mut leaves, 50.0), pct(&mut leaves, 99.0));
    let frac = |r: &HierarchyReport| r.full_rate as f64 / r.peers.max(1) as f64;
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| nodes / regions / k / stream | {} / {} / {} / {STREAM_KBPS} kbit/s |",
        args.nodes, args.regions, args.k
    );
    println!("| capacity ratio as drawn (total upload / N·stream) | {base_ratio:.2} |");
    println!("| full build | {:.3} s |", build.as_secs_f64());
    println!(
        "| incremental join p50 / p99 | {:.1} / {:.1} µs |",
        jp50 / 1e3,
        jp99 / 1e3
    );
    println!(
        "| incremental leave p50 / p99 | {:.1} / {:.1} µs |",
        lp50 / 1e3,
        lp99 / 1e3
    );
    println!(
        "| peers told per event (mean) | {:.1} |",
        affected as f64 / args.events.max(1) as f64
    );
    println!(
        "| tiers: preferred / middle / bottom (clusters) / waypoints | {} / {} / {} ({}) / {} |",
        rep.preferred, rep.middle, rep.bottom, rep.bottom_clusters, rep.waypoints
    );
    println!("| mesh connectivity | {} |", rep.mesh_connectivity);
    println!(
        "| max tree depth: middle / bottom | {} / {} |",
        rep.max_depth_middle, rep.max_depth_bottom
    );
    println!(
        "| full rate (as drawn; after churn) | {:.4}; {:.4} |",
        frac(&rep),
        frac(&after_churn)
    );
    println!(
        "| upload used / total (as drawn) | {:.3} |",
        rep.upload_used_kbps as f64 / rep.upload_total_kbps.max(1) as f64
    );
    println!("| full rate at ratio 1.10 | {:.4} |", frac(&at_target));
    println!(
        "| full rate at ratios {} | {} |",
        sweep
            .iter()
            .map(|s| format!("{:.1}", s.0))
            .collect::<Vec<_>>()
            .join(" / "),
        sweep
            .iter()
            .map(|s| format!("{:.4}", s.1))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    match min_ratio {
        Some(r) => println!("| lowest ratio with every node at full rate | {r:.3} |"),
        None => println!("| lowest ratio with every node at full rate | not reached below 3.0 |"),
    }
    println!();

    if let Some(path) = &args.json {
        let report = |r: &HierarchyReport| serde_json::to_value(r).unwrap_or_default();
        let v = json!({
            "nodes": args.nodes,
            "regions": args.regions,
            "k": args.k,
            "stream_kbps": STREAM_KBPS,
            "seed": args.seed,
            "release": true,
            "capacity_ratio": base_ratio,
            "build_s": build.as_secs_f64(),
            "join_us": { "p50": jp50 / 1e3, "p99": jp99 / 1e3 },
            "leave_us": { "p50": lp50 / 1e3, "p99": lp99 / 1e3 },
            "as_drawn": report(&rep),
            "after_churn": report(&after_churn),
            "full_rate_at_1_1": frac(&at_target),
            "full_rate_sweep": sweep
                .iter()
                .map(|(r, f)| json!({ "ratio": r, "full_rate": f }))
                .collect::<Vec<_>>(),
            "min_full_rate_ratio": min_ratio,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn scaled(base: &[(PeerId, Region, u32)], scale: f64) -> Vec<(PeerId, Region, u32, History)> {
    base.iter()
        .map(|(p, r, u)| (*p, *r, (f64::from(*u) * scale) as u32, History::default()))
        .collect()
}

fn region(rng: &mut Rng, regions: usize) -> Region {
    let i = rng.below(regions as u64);
    Region::V4([(i >> 8) as u8, i as u8])
}

/// One draw from the distribution in the module docs, kbit/s.
fn draw_upload(rng: &mut Rng) -> u32 {
    let between = |rng: &mut Rng, lo: f64, hi: f64| {
        let x = (rng.below(1_000_000) as f64) / 1e6;
        ((lo + (hi - lo) * x) * f64::from(STREAM_KBPS)) as u32
    };
    match rng.below(100) {
        0..15 => 0,
        15..35 => between(rng, 0.2, 0.8),
        35..60 => between(rng, 0.5, 1.0),
        60..85 => between(rng, 1.0, 3.0),
        85..95 => between(rng, 3.0, 10.0),
        _ => between(rng, 10.0, 50.0),
    }
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)] as f64
}

use protocol::rng::XorShift as Rng;
