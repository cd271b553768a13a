//! End-to-end: a site owner's page on another origin embeds the player with the two-line snippet.
//! Two such pages (two viewers, so the stream really goes peer to peer) play in headless
//! Chromium; their `stats` events report peers; `destroy()` closes every RTCPeerConnection and
//! the control WebSocket, and the control center sees the viewer leave.
//! Run by `cargo xtask test` (which builds web/pkg and web/dist first).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use axum::response::Html;
use axum::routing::get;
use e2e::cdp::{Page, PageOptions};
use e2e::console::{ensure_only_expected, VIEWER_PAGE};
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use serde_json::Value;

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// The site owner's page: test instrumentation first (it wraps RTCPeerConnection and WebSocket to
/// keep every instance the player opens), then exactly the two-line snippet, then listeners.
fn site_page(server: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A site owner's page</title>
<script>
  window.__pcs = []; window.__wss = [];
  const PC = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends PC {{ constructor(...a) {{ super(...a); window.__pcs.push(this); }} }};
  const WS = window.WebSocket;
  window.WebSocket = class extends WS {{ constructor(...a) {{ super(...a); window.__wss.push(this); }} }};
</script>
</head><body>
<h1>My blog, with a live video</h1>
<script src="{server}/player.js"></script>
<p2p-player server="{server}" channel="demo" stats></p2p-player>
<script>
  window.events = {{ ready: [], playing: [], stall: [], stats: [], error: [] }};
  const el = document.querySelector('p2p-player');
  el.style.width = '640px'; el.style.height = '360px';
  for (const k of Object.keys(window.events)) {{
    el.addEventListener(k, (e) => {{
      const list = window.events[k];
      list.push(k === 'stats' ? Object.assign({{}}, e.detail, {{ report: undefined }}) : e.detail);
      if (list.length > 300) list.shift();
    }});
  }}
</script>
</body></html>"#
    )
}

async fn json(page: &Page, expr: &str) -> Result<Value> {
    let v = page.eval(&format!("JSON.stringify({expr})")).await?;
    let s = v.as_str().context("JSON.stringify returned no string")?;
    Ok(serde_json::from_str(s)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built web assets; run by cargo xtask test"]
async fn player_embedded_from_another_origin_plays_reports_peers_and_destroys_cleanly() -> Result<()>
{
    let web = web_dir();
    ensure!(
        web.join("dist/player.js").is_file(),
        "{} has no built player (dist/player.js): run `cargo xtask test`, which builds it",
        web.display()
    );
    let swarm = Swarm::start(web).await?;
    let server = format!("http://{}", swarm.addr);

    // The site owner's server: another port on 127.0.0.1 is another origin.
    let html = site_page(&server);
    let site = axum::Router::new().route(
        "/",
        get(move || {
            let html = html.clone();
            async move { Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site_addr = listener.local_addr()?;
    let site_server = tokio::spawn(async move {
        let _ = axum::serve(listener, site).await;
    });
    let url = format!("http://{site_addr}/");
    assert_ne!(site_addr.port(), swarm.addr.port());

    let a = swarm
        .browser
        .new_page_with(&url, PageOptions { new_window: true })
        .await?;
    let b = swarm
        .browser
        .new_page_with(&url, PageOptions { new_window: true })
        .await?;
    for (name, p) in [("a", &a), ("b", &b)] {
        ensure!(
            p.eval("location.origin").await? != Value::String(server.clone()),
            "the page must be on another origin"
        );
        p.wait_for("window.events.ready.length > 0", Duration::from_secs(20))
            .await
            .with_context(|| format!("page {name}: player never became ready"))?;
    }
    // Video plays on both.
    for (name, p) in [("a", &a), ("b", &b)] {
        p.wait_for(
            "window.events.playing.length > 0 && \
             document.querySelector('p2p-player').player.video.currentTime > 2",
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("page {name}: video never played"))?;
    }
    let t0 = json(
        &a,
        "document.querySelector('p2p-player').player.video.currentTime",
    )
    .await?;
    // Stats report peers, and bytes really flow between the two viewers.
    for (name, p) in [("a", &a), ("b", &b)] {
        p.wait_for(
            "window.events.stats.some((s) => s.peers >= 1)",
            Duration::from_secs(20),
        )
        .await
        .with_context(|| format!("page {name}: stats never reported a peer"))?;
    }
    a.wait_for(
        "window.events.stats.length > 0 && (() => { \
           const s = window.events.stats[window.events.stats.length - 1]; \
           return s.bitrate_kbps > 0 && s.buffer_s >= 0; })()",
        Duration::from_secs(10),
    )
    .await?;
    let last_a = json(&a, "window.events.stats[window.events.stats.length - 1]").await?;
    let last_b = json(&b, "window.events.stats[window.events.stats.length - 1]").await?;
    println!("last stats a: {last_a}\nlast stats b: {last_b}");
    let from_peers = last_a["bytes_from_peers"].as_f64().unwrap_or(0.0)
        + last_b["bytes_from_peers"].as_f64().unwrap_or(0.0);
    ensure!(
        from_peers > 0.0,
        "no bytes went peer to peer: {last_a} {last_b}"
    );
    let t1 = json(
        &a,
        "document.querySelector('p2p-player').player.video.currentTime",
    )
    .await?;
    ensure!(
        t1.as_f64() > t0.as_f64(),
        "video does not advance: {t0} -> {t1}"
    );
    // The stats overlay is shown (the `stats` attribute) and says something.
    let overlay = json(
        &a,
        "document.querySelector('p2p-player').shadowRoot.querySelector('.p2p-stats').textContent",
    )
    .await?;
    ensure!(
        overlay.as_str().is_some_and(|t| t.contains("P2P")),
        "overlay: {overlay}"
    );
    let errors = json(&a, "window.events.error.concat([])").await?;
    let fatal: Vec<&Value> = errors
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|e| {
                    matches!(
                        e["code"].as_str(),
                        Some("unsupported" | "load_failed" | "start_failed" | "media")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ensure!(fatal.is_empty(), "player errors: {fatal:?}");

    // destroy(): every RTCPeerConnection and the WebSocket closed, the wasm instance freed.
    let opened = json(&a, "window.__pcs.length").await?;
    ensure!(
        opened.as_u64().unwrap_or(0) >= 1,
        "the player opened no RTCPeerConnection"
    );
    a.eval("document.querySelector('p2p-player').destroy(); true")
        .await?;
    let closed = a
        .wait_for(
            "window.__pcs.every((pc) => pc.signalingState === 'closed' && pc.connectionState === 'closed') \
             && window.__wss.every((ws) => ws.readyState >= 2) \
             && !document.querySelector('p2p-player').shadowRoot.querySelector('video') \
             && document.querySelector('p2p-player').player === null",
            Duration::from_secs(5),
        )
        .await;
    if closed.is_err() {
        let states = json(
            &a,
            "window.__pcs.map((pc) => [pc.signalingState, pc.connectionState]).concat(window.__wss.map((w) => w.readyState))",
        )
        .await?;
        anyhow::bail!("not everything closed after destroy(): {states}");
    }
    // The control center sees the viewer leave; the other one keeps playing.
    wait_until(
        "the control center to see the destroyed player leave",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || {
            let n = swarm.topology().await?.peers.len();
            ensure!(n == 1, "{n} peers still joined after destroy()");
            Ok(())
        },
    )
    .await?;
    let before = json(
        &b,
        "document.querySelector('p2p-player').player.video.currentTime",
    )
    .await?;
    // Within the 2 s the test used to sleep.
    wait_until(
        "the remaining viewer's video to advance",
        Duration::from_secs(2),
        Duration::from_millis(100),
        async || {
            let after = json(
                &b,
                "document.querySelector('p2p-player').player.video.currentTime",
            )
            .await?;
            ensure!(
                after.as_f64() > before.as_f64(),
                "the remaining viewer stopped: {before} -> {after}"
            );
            Ok(())
        },
    )
    .await?;

    // Fallback fetches of packets not cut yet, and the favicon, are 404s by design.
    ensure_only_expected("page a", &a.console_errors(), VIEWER_PAGE)?;
    ensure_only_expected("page b", &b.console_errors(), VIEWER_PAGE)?;
    site_server.abort();
    swarm.shutdown().await;
    Ok(())
}
