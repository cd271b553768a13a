//! End-to-end: a waypoint server (issue 15; FIG. 1, 3) in a region whose viewers cannot carry
//! the stream. Six Chromium viewers with uploads below the stream rate fill the region's bottom
//! tier and the origin feeds them; a native waypoint (the `waypoint` crate, in this process)
//! joins with the operator token, enters the region's top tier, and the origin's egress falls by
//! about what the waypoint carries; the operator dashboard draws it as a waypoint.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use protocol::TierName;
use waypoint::{NativeSwarm, PeerConfig, SwarmConfig};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// The origin's egress (pushes and fallbacks), bytes per second over `window`.
async fn origin_egress_rate(swarm: &Swarm, window: Duration) -> f64 {
    let (p0, f0) = swarm.origin_counters();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (p1, f1) = swarm.origin_counters();
    (p1 + f1 - p0 - f0) as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn a_waypoint_enters_a_weak_region_s_top_tier_and_takes_load_off_the_origin() -> Result<()> {
    let mut swarm = Swarm::start_with(web_dir(), 1).await?;
    let s = swarm.stream_kbps().max(100);
    let viewers = 6;
    for _ in 0..viewers {
        swarm.add_viewer(s / 2, false).await?;
    }
    wait_until(
        "six weak viewers playing byte-exact from the origin",
        Duration::from_secs(30),
        Duration::from_millis(500),
        async || {
            let all = swarm.all_stats().await?;
            ensure!(all.len() == viewers, "{} viewers", all.len());
            for r in &all {
                ensure!(
                    r.verified_count > 20,
                    "{:?} verified {}",
                    r.peer_id,
                    r.verified_count
                );
                ensure!(
                    swarm.matches_origin(r) == Some(true),
                    "{:?} differs",
                    r.peer_id
                );
            }
            Ok(())
        },
    )
    .await?;
    let window = Duration::from_secs(8);
    let before = origin_egress_rate(&swarm, window).await;

    let token = swarm.state.operator_token().to_string();
    let wp = NativeSwarm::start(SwarmConfig {
        peer: PeerConfig {
            server: format!("http://{}", swarm.addr),
            channel: swarm.channel.clone(),
            upload_kbps: 20 * s,
            region: swarm.regions.first().cloned(),
            token: None,
            public_key: None,
            ice_ip: waypoint::default_ice_ip(),
            waypoint_token: Some(token),
            connectivity: Some(protocol::Connectivity::OPEN),
        },
        peers: 1,
        threads: 1,
        join_every: Duration::ZERO,
        upload_cycle: Vec::new(),
    })?;
    let wp_id = wait_until(
        "the waypoint in the region's top tier, listed as a waypoint",
        Duration::from_secs(20),
        Duration::from_millis(300),
        async || {
            let r = wp.reports().pop().context("no waypoint report")?;
            let id = r.peer_id.context("the waypoint has not joined yet")?;
            let topo = swarm.topology().await?;
            let me = topo
                .peers
                .iter()
                .find(|p| p.id == id)
                .context("the waypoint is not in the topology")?;
            ensure!(me.waypoint, "not listed as a waypoint");
            ensure!(
                me.tier
                    .as_ref()
                    .is_some_and(|t| t.tier == TierName::Preferred),
                "waypoint tier {:?}",
                me.tier.as_ref().map(|t| t.tier)
            );
            Ok(id)
        },
    )
    .await?;
    // Its children reconnect under it; then the same window again, with what it relayed.
    wait_until(
        "the waypoint relaying to the viewers",
        Duration::from_secs(20),
        Duration::from_millis(500),
        async || {
            let r = wp.reports().pop().context("no waypoint report")?;
            ensure!(
                r.bytes_up > 200_000,
                "the waypoint sent {} bytes",
                r.bytes_up
            );
            Ok(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let up0 = wp.reports().pop().map_or(0, |r| r.bytes_up);
    let down0 = wp
        .reports()
        .pop()
        .map_or(0, |r| r.bytes_from_origin + r.bytes_from_peers);
    let t0 = Instant::now();
    let after = origin_egress_rate(&swarm, window).await;
    let secs = t0.elapsed().as_secs_f64();
    let r = wp.reports().pop().context("no waypoint report")?;
    let carried = (r.bytes_up - up0) as f64 / secs;
    let took = (r.bytes_from_origin + r.bytes_from_peers - down0) as f64 / secs;
    println!(
        "waypoint {wp_id}: origin egress {:.0} kB/s before, {:.0} kB/s after; the waypoint \
         relayed {:.0} kB/s and took {:.0} kB/s (stream {s} kbit/s)",
        before / 1e3,
        after / 1e3,
        carried / 1e3,
        took / 1e3
    );
    // What it carries net of the copy it takes from the origin, less a fifth for the noise of
    // two 8 s windows (fallback fetches come in bursts).
    let net = carried - took;
    ensure!(
        before - after >= 0.8 * net,
        "origin egress fell by {:.0} B/s, the waypoint carries {net:.0} B/s net",
        before - after
    );
    ensure!(
        net > 0.0,
        "the waypoint carried nothing net: {carried} vs {took}"
    );
    // Every viewer still byte-exact, and nothing unexpected in the consoles.
    for r in swarm.all_stats().await? {
        ensure!(
            swarm.matches_origin(&r) == Some(true),
            "{:?} differs",
            r.peer_id
        );
    }
    ensure!(
        r.errors.iter().all(|e| e.contains("NotLinked")),
        "waypoint errors {:?}",
        r.errors
    );
    // The operator dashboard draws it as a waypoint (a square labelled so), with its class.
    let url = format!(
        "http://{}/dashboard?token={}",
        swarm.addr,
        swarm.state.operator_token()
    );
    let dashboard = swarm.browser.new_page(&url).await?;
    let node = format!("#topology svg [data-kind=waypoint][data-node=p{}]", wp_id.0);
    dashboard
        .wait_for(
            &format!(
                "(() => {{ const n = document.querySelector('{node}');                  return n !== null && n.querySelector('rect') !== null                  && n.querySelector('.sub').textContent.includes('waypoint')                  && n.querySelector('title').textContent.includes('(waypoint server)')                  && n.querySelector('title').textContent.includes('NAT open'); }})()"
            ),
            Duration::from_secs(20),
        )
        .await
        .context("the dashboard does not show the waypoint as one")?;
    let peers = dashboard
        .eval("document.querySelectorAll('#topology svg [data-kind=peer]').length")
        .await?;
    ensure!(
        peers.as_u64() == Some(viewers as u64),
        "the dashboard shows {peers} viewer nodes besides the waypoint"
    );
    ensure!(
        dashboard.console_errors().is_empty(),
        "dashboard console errors: {:?}",
        dashboard.console_errors()
    );
    swarm.ensure_no_unexpected_console_errors(&[])?;
    drop(wp);
    swarm.shutdown().await;
    Ok(())
}
