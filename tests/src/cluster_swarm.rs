//! `cargo xtask swarm --nodes N --kill-node-at T` (issue 12): the swarm on a cluster of N
//! control-server processes joined through a real etcd; at `T` seconds the node that owns the
//! channel's DCM is killed (`kill -9`) and the failover is measured from the viewers' side.
//!
//! JSON (field names are a contract): `failover_ms` {p50, p95, max} (kill → the viewer's
//! control connection re-established on the new owner with its id, which is when it has its
//! DCM back with its plan confirmed: unchanged plans are not re-sent), `reconnect_ms` (its
//! connection's drop → that resume), `dcm_owned_after_ms` (kill → another node owns the DCM),
//! `links_kept` (share of the tree links before the kill that the rebuilt trees kept), and the
//! swarm's `stalls`, `continuity`, `p2p_share`, `mismatched` (viewers whose verified bytes differ
//! from the origin's).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocol::report::Pct;
use serde::Serialize;

use crate::cdp::{Browser, LaunchOptions};
use crate::cluster::{
    open_viewer, owner_index, page_stats as stats, placed_peers, start_nodes,
    topology_links as links, Etcd, Link, Node,
};

#[derive(Debug, Clone)]
pub struct ClusterSwarmArgs {
    pub viewers: usize,
    pub seconds: u64,
    pub nodes: usize,
    /// Seconds into the run at which the owner is killed; `None`: no kill.
    pub kill_node_at: Option<u64>,
    pub upload_kbps: Vec<u32>,
    pub playing: usize,
    pub json: Option<PathBuf>,
    pub web_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterSwarmReport {
    pub viewers: usize,
    pub seconds: u64,
    pub nodes: usize,
    pub kill_node_at: Option<u64>,
    pub dcm_owned_after_ms: Option<u64>,
    pub failover_ms: Pct,
    pub reconnect_ms: Pct,
    /// Viewers that resumed on the new owner (of those alive).
    pub resumed: usize,
    pub links_before: usize,
    pub links_kept: f64,
    pub stalls: u32,
    pub continuity: f64,
    pub p2p_share: f64,
    pub mismatched: usize,
    /// Fallback fetches of all viewers from the kill to the end.
    pub origin_fallbacks_after_kill: u64,
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub async fn run(args: ClusterSwarmArgs) -> Result<()> {
    if args.nodes < 2 && args.kill_node_at.is_some() {
        bail!("--kill-node-at needs --nodes 2 or more (someone must take over)");
    }
    if args.kill_node_at.is_some_and(|t| t >= args.seconds) {
        bail!("--kill-node-at must fall within --seconds");
    }
    let logs = tempfile::Builder::new()
        .prefix("swarm-cluster-")
        .tempdir()?;
    let etcd = Etcd::start().await?;
    let mut nodes = start_nodes(
        args.nodes,
        &etcd,
        &args.web_dir,
        logs.path(),
        &["--lease-ttl", "3"],
    )
    .await?;
    let owner = owner_index(&nodes, nodes.len() / 2, "demo").await?;
    let owner_url = nodes[owner].url.clone();
    println!(
        "cluster of {} nodes; channel demo's DCM on {}",
        nodes.len(),
        nodes[owner].id
    );
    let browser = Browser::launch(LaunchOptions::default()).await?;
    let mut pages = Vec::new();
    for i in 0..args.viewers {
        let node = &nodes[i % nodes.len()];
        let upload = args.upload_kbps[i % args.upload_kbps.len().max(1)];
        pages.push(open_viewer(&browser, node, "demo", upload, i < args.playing, None).await?);
    }
    let start = Instant::now();
    // When the owner was killed (wall ms, instant) and the links then.
    let mut killed: Option<(f64, Instant, BTreeSet<Link>)> = None;
    let mut owned_after = None;
    // Share of the links at the kill that the rebuilt trees kept.
    let mut rebuilt: Option<f64> = None;
    let mut fallbacks_at_kill = 0;
    let mut last_print = Instant::now();
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = start.elapsed().as_secs();
        if killed.is_none() && args.kill_node_at.is_some_and(|k| t >= k) {
            let topo = nodes[owner].get_json("/api/channels/demo/topology").await?;
            fallbacks_at_kill = stats(&pages)
                .await?
                .iter()
                .map(|r| r.origin_fallbacks)
                .sum();
            let at = wall_ms();
            nodes[owner].kill().await;
            println!(
                "{t:>4} s: killed {} (kill -9), the DCM's owner",
                nodes[owner].id
            );
            killed = Some((at, Instant::now(), links(&topo)));
        }
        if let (Some((_, at, _)), None) = (&killed, owned_after) {
            let survivor = nodes.iter().find(|n| n.alive()).context("no node left")?;
            if survivor.locate("demo").await.is_ok_and(|u| u != owner_url) {
                owned_after = Some(at.elapsed().as_millis() as u64);
                println!(
                    "{t:>4} s: the DCM is owned again after {} ms",
                    at.elapsed().as_millis()
                );
            }
        }
        // The trees as the new owner rebuilt them: once every viewer has resumed and is placed.
        if let (Some((_, _, before)), Some(_), None) = (&killed, owned_after, &rebuilt) {
            let r = stats(&pages).await?;
            if r.iter().all(|r| r.control_resumes > 0) {
                let survivor = nodes.iter().find(|n| n.alive()).context("no node left")?;
                let url = survivor.locate("demo").await?;
                if let Some(n) = nodes.iter().find(|n| n.url == url && n.alive()) {
                    let topo = n.get_json("/api/channels/demo/topology").await?;
                    let placed = placed_peers(&topo);
                    if placed == args.viewers {
                        let after = links(&topo);
                        let kept = before.intersection(&after).count();
                        println!(
                            "{t:>4} s: trees rebuilt, {kept} of {} links kept",
                            before.len()
                        );
                        rebuilt = Some(kept as f64 / before.len().max(1) as f64);
                    }
                }
            }
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            let r = stats(&pages).await?;
            let (p, o) = r.iter().fold((0u64, 0u64), |(p, o), r| {
                (p + r.bytes_from_peers, o + r.bytes_from_origin)
            });
            println!(
                "{t:>4} s: P2P share so far {:.3}, stalls {}, resumed {}",
                p as f64 / (p + o).max(1) as f64,
                r.iter().map(|r| r.stalls).sum::<u32>(),
                r.iter().filter(|r| r.control_resumes > 0).count()
            );
        }
    }
    let reports = stats(&pages).await?;
    let live: Vec<&Node> = nodes.iter().filter(|n| n.alive()).collect();
    let now_owner_url = live[0].locate("demo").await?;
    let now_owner = live
        .iter()
        .find(|n| n.url == now_owner_url)
        .context("the owner at the end")?;
    let mut mismatched = 0;
    for r in &reports {
        let Some(first) = r.verified_first_seq else {
            mismatched += 1;
            continue;
        };
        let v = now_owner
            .get_json(&format!(
                "/api/channels/demo/hash?first={first}&count={}",
                r.verified_count
            ))
            .await?;
        if v["hash"].as_str() != Some(r.verified_hash.as_str()) {
            mismatched += 1;
        }
    }
    let (mut links_before, mut links_kept, mut failover, mut reconnect) = (0, 0.0, vec![], vec![]);
    if let Some((kill_ms, _, before)) = &killed {
        links_before = before.len();
        links_kept = rebuilt.unwrap_or(0.0);
        for r in &reports {
            if let Some(back) = r.control_resumed_at_ms {
                failover.push(back - kill_ms);
                if let Some(lost) = r.control_lost_at_ms {
                    reconnect.push(back - lost);
                }
            }
        }
    }
    let (p, o) = reports.iter().fold((0u64, 0u64), |(p, o), r| {
        (p + r.bytes_from_peers, o + r.bytes_from_origin)
    });
    let (on_time, late) = reports
        .iter()
        .fold((0u64, 0u64), |(a, b), r| (a + r.on_time, b + r.late));
    let report = ClusterSwarmReport {
        viewers: args.viewers,
        seconds: args.seconds,
        nodes: args.nodes,
        kill_node_at: args.kill_node_at,
        dcm_owned_after_ms: owned_after,
        resumed: failover.len(),
        failover_ms: Pct::of(failover),
        reconnect_ms: Pct::of(reconnect),
        links_before,
        links_kept,
        stalls: reports.iter().map(|r| r.stalls).sum(),
        continuity: if on_time + late > 0 {
            on_time as f64 / (on_time + late) as f64
        } else {
            0.0
        },
        p2p_share: p as f64 / (p + o).max(1) as f64,
        mismatched,
        origin_fallbacks_after_kill: reports
            .iter()
            .map(|r| r.origin_fallbacks)
            .sum::<u64>()
            .saturating_sub(fallbacks_at_kill),
    };
    println!("\n{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    drop(browser);
    drop(etcd);
    Ok(())
}
