//! End-to-end: the operator dashboard during a running swarm (one topology node per viewer,
//! charts with data, a screenshot saved under target/e2e-artifacts/), and `/metrics` of the same
//! run against the swarm's JSON report. Run by `cargo xtask test`.

#[path = "../../control-server/tests/prom/mod.rs"]
mod prom;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use e2e::cdp::PageOptions;
use e2e::console::{ensure_only_expected, OPERATOR_API_401, VIEWER_PAGE};
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use prom::{http, parse, Exposition};
use serde_json::{json, Value};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// `target/e2e-artifacts` (or `$CARGO_TARGET_DIR/e2e-artifacts`, or `$E2E_ARTIFACTS`).
fn artifacts_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("E2E_ARTIFACTS") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("e2e-artifacts"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn require_assets(web: &std::path::Path) -> Result<()> {
    ensure!(
        web.join("dist/dashboard.js").is_file() && web.join("dist/player.js").is_file(),
        "{} has no built web assets (dist/): run `cargo xtask test`, which builds them",
        web.display()
    );
    Ok(())
}

async fn scrape(swarm: &Swarm) -> Result<Exposition> {
    let r = http(swarm.addr, "GET", "/metrics", &[])
        .await
        .map_err(|e| anyhow!(e))?;
    ensure!(r.status == 200, "/metrics: HTTP {}: {}", r.status, r.body);
    parse(&r.body).map_err(|e| anyhow!("/metrics is not Prometheus text: {e}\n{}", r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built web assets; run by cargo xtask test"]
async fn dashboard_shows_the_running_swarm() -> Result<()> {
    let web = web_dir();
    require_assets(&web)?;
    let mut swarm = Swarm::start(web).await?;
    let viewers = 5;
    for i in 0..viewers {
        swarm.add_viewer(2000, i == 0).await?;
    }
    let token = swarm.state.operator_token().to_string();
    let url = format!("http://{}/dashboard?token={token}", swarm.addr);
    let page = swarm
        .browser
        .new_page_with(&url, PageOptions { new_window: true })
        .await?;
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1360, "height": 1360, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await?;
    page.eval("dispatchEvent(new Event('resize')); true")
        .await?;

    // One node per viewer (plus the origin), all in the default region and tier.
    let nodes_ok = format!(
        "document.querySelectorAll('#topology svg [data-kind=peer]').length === {viewers} \
         && document.querySelectorAll('#topology svg [data-kind=origin]').length === 1"
    );
    page.wait_for(&nodes_ok, Duration::from_secs(30))
        .await
        .context("the topology picture never showed one node per viewer")?;
    // Charts have data: several samples, and the share and delivery series are not empty.
    page.wait_for(
        "['chart-share', 'chart-rates', 'chart-viewers'].every((id) => \
           Number(document.getElementById(id).dataset.points) >= 12) \
         && window.dashboard.samples.some((s) => s.p2p_share != null && s.peers_kbps > 0) \
         && window.dashboard.samples.some((s) => s.viewers === 5)",
        Duration::from_secs(30),
    )
    .await
    .context("the charts never had data")?;
    // Links: every viewer receives every substream from someone (tree links; a bridge is an
    // extra, temporary origin link beside one).
    let links: Value = page
        .eval("window.dashboard.graph.links.filter((l) => l.kind === 'tree').length")
        .await?;
    let k = u64::from(swarm.state.config.substreams);
    ensure!(
        links.as_u64() == Some(viewers as u64 * k),
        "expected {} links, got {links}",
        viewers as u64 * k
    );
    let nodes: Value = page
        .eval("JSON.stringify([...document.querySelectorAll('#topology svg [data-kind=peer]')].map((n) => n.dataset.node).sort())")
        .await?;
    let topo = swarm.topology().await?;
    let mut expected: Vec<String> = topo.peers.iter().map(|p| format!("p{}", p.id.0)).collect();
    expected.sort();
    ensure!(
        nodes.as_str() == Some(&serde_json::to_string(&expected)?),
        "picture nodes {nodes} vs DCM peers {expected:?}"
    );
    // Viewers per region and tier, and the token is gone from the address bar.
    let cell = page
        .eval("document.querySelector('#placement td[data-region=default][data-tier=multitree]').textContent")
        .await?;
    ensure!(cell == json!(viewers.to_string()), "placement cell: {cell}");
    let href = page.eval("location.href").await?;
    ensure!(
        !href.as_str().unwrap_or("").contains(&token),
        "token left in the URL: {href}"
    );
    // Let the picture settle on a fresh poll, then keep a screenshot.
    let n = page.eval("window.dashboard.updates").await?;
    page.wait_for(
        &format!("window.dashboard.updates > {}", n.as_u64().unwrap_or(0) + 1),
        Duration::from_secs(10),
    )
    .await?;
    let png = artifacts_dir()?.join("dashboard.png");
    page.screenshot(&png).await?;
    println!("dashboard screenshot: {}", png.display());

    // Without the token, the dashboard asks for it and shows no data.
    let locked = swarm
        .browser
        .new_page(&format!("http://{}/dashboard", swarm.addr))
        .await?;
    locked
        .wait_for(
            "!document.getElementById('login').hidden && document.getElementById('main').hidden",
            Duration::from_secs(10),
        )
        .await
        .context("the dashboard without a token did not ask for one")?;

    ensure_only_expected("the dashboard", &page.console_errors(), &[])?;
    // The locked page's API calls are refused with 401 by design.
    ensure_only_expected(
        "the dashboard without a token",
        &locked.console_errors(),
        &[OPERATOR_API_401],
    )?;
    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    swarm.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn metrics_match_the_swarm_report() -> Result<()> {
    let web = web_dir();
    let mut swarm = Swarm::start(web).await?;
    let viewers = 4;
    for i in 0..viewers {
        swarm.add_viewer(2000, i == 0).await?;
    }
    let demo = [("channel", "demo"), ("region", "default")];

    // While running (within the 12 s the test used to sleep): every viewer counted, one DCM,
    // heartbeats arriving, bytes going peer to peer.
    wait_until(
        "/metrics to count every viewer and their heartbeats",
        Duration::from_secs(12),
        Duration::from_millis(500),
        async || {
            let e = scrape(&swarm).await?;
            ensure!(
                e.sum("p2p_viewers", &[("channel", "demo"), ("tier", "multitree")])
                    == viewers as f64,
                "p2p_viewers: {:?}",
                e.select("p2p_viewers", &[]).collect::<Vec<_>>()
            );
            ensure!(
                e.sum("p2p_dcms", &[("region", "default")]) == 1.0,
                "p2p_dcms: {:?}",
                e.select("p2p_dcms", &[]).collect::<Vec<_>>()
            );
            let hb = e.sum("p2p_heartbeats_total", &demo);
            ensure!(
                hb >= (viewers * 8) as f64,
                "only {hb} heartbeats from {viewers} viewers"
            );
            let from_peers = e.sum(
                "p2p_received_bytes_total",
                &[demo[0], demo[1], ("source", "peers")],
            );
            ensure!(from_peers > 0.0, "no bytes from peers yet");
            Ok(())
        },
    )
    .await?;

    // Everyone leaves; then the server's counters are still and the report and /metrics
    // describe the same run.
    for i in 0..viewers {
        swarm.close_viewer(i).await?;
    }
    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    wait_until(
        "the DCM to remove every viewer",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || {
            let n = swarm.topology().await?.peers.len();
            ensure!(n == 0, "viewers never left: {n} still in the topology");
            Ok(())
        },
    )
    .await?;
    // The counters are still (this used to be a 1.5 s sleep) once two scrapes half a second
    // apart agree on every series compared below.
    let mut last: Option<Vec<f64>> = None;
    let e = wait_until(
        "the server's counters to be still",
        Duration::from_secs(5),
        Duration::from_millis(500),
        async || {
            let e = scrape(&swarm).await?;
            let now: Vec<f64> = [
                e.sum("p2p_origin_egress_bytes_total", &demo),
                e.sum(
                    "p2p_origin_egress_bytes_total",
                    &[demo[0], demo[1], ("path", "push")],
                ),
                e.sum("p2p_viewers", &demo),
                e.sum(
                    "p2p_received_bytes_total",
                    &[demo[0], demo[1], ("source", "peers")],
                ),
                e.sum(
                    "p2p_received_bytes_total",
                    &[demo[0], demo[1], ("source", "origin")],
                ),
            ]
            .to_vec();
            let still = last.as_ref() == Some(&now);
            let was = last.replace(now.clone());
            ensure!(still, "counters moved: {was:?} -> {now:?}");
            Ok(e)
        },
    )
    .await?;
    let report = swarm.report(12).await?;
    println!("{}", report.table());
    let egress = e.sum("p2p_origin_egress_bytes_total", &demo);
    ensure!(
        egress == (report.server_push_bytes + report.server_fallback_bytes) as f64,
        "origin egress {egress} != report push {} + fallback {}",
        report.server_push_bytes,
        report.server_fallback_bytes
    );
    ensure!(
        e.sum(
            "p2p_origin_egress_bytes_total",
            &[demo[0], demo[1], ("path", "push")]
        ) == report.server_push_bytes as f64
    );
    ensure!(e.sum("p2p_viewers", &demo) == 0.0, "viewers left behind");
    // Viewer-reported bytes come from heartbeats (sent every second), the report from the
    // pages at close time: equal up to the last heartbeat interval of each viewer.
    let slack = viewers as f64 * 2.0 * f64::from(report.stream_kbps) * 1000.0 / 8.0;
    for (source, reported) in [
        ("peers", report.bytes_from_peers),
        ("origin", report.bytes_from_origin),
    ] {
        let m = e.sum(
            "p2p_received_bytes_total",
            &[demo[0], demo[1], ("source", source)],
        );
        ensure!(
            (m - reported as f64).abs() <= slack,
            "bytes from {source}: /metrics {m} vs report {reported} (slack {slack})"
        );
    }
    ensure!(report.bytes_from_peers > 0, "nothing went peer to peer");
    swarm.shutdown().await;
    Ok(())
}
