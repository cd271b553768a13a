//! End-to-end: signed viewer tokens (`--token-secret`). Four embedding pages with the player's
//! `token` option: an expired token, a token for another channel and a badly signed one each
//! get their own `error` event code (and no video); a valid token plays.
//! Run by `cargo xtask test` (which builds web/pkg and web/dist first).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use axum::extract::Path;
use axum::response::Html;
use axum::routing::get;
use control_server::viewer_token::{unix_now_s, ViewerClaims};
use e2e::cdp::PageOptions;
use e2e::console::{ensure_only_expected, VIEWER_PAGE};
use e2e::swarm::Swarm;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

const SECRET: &str = "the site's secret, shared with the control server";

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// What a site owner's backend does: an HS256 JWT with `channel`, `exp` and `sub`.
fn mint(secret: &str, channel: &str, exp: u64) -> Result<String> {
    let claims = ViewerClaims {
        channel: channel.into(),
        exp,
        sub: Some("viewer-42".into()),
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The site owner's page: the two-line snippet with a `token`, and the player's events kept.
fn site_page(server: &str, token: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A members-only page</title></head><body>
<script src="{server}/player.js"></script>
<p2p-player server="{server}" channel="demo" token="{token}"></p2p-player>
<script>
  window.events = {{ ready: [], playing: [], error: [] }};
  const el = document.querySelector('p2p-player');
  el.style.width = '640px'; el.style.height = '360px';
  for (const k of Object.keys(window.events)) {{
    el.addEventListener(k, (e) => window.events[k].push(e.detail));
  }}
</script>
</body></html>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built web assets; run by cargo xtask test"]
async fn expired_wrong_channel_and_badly_signed_tokens_get_their_error_and_a_valid_one_plays(
) -> Result<()> {
    let web = web_dir();
    ensure!(
        web.join("dist/player.js").is_file(),
        "{} has no built player (dist/player.js): run `cargo xtask test`, which builds it",
        web.display()
    );
    let swarm = Swarm::start_configured(web, 0, |c| control_server::config::Config {
        token_secret: Some(SECRET.into()),
        ..c
    })
    .await?;
    let server = format!("http://{}", swarm.addr);
    let now = unix_now_s();
    let pages = [
        ("expired", mint(SECRET, "demo", now - 3600)?),
        (
            "wrong_channel",
            mint(SECRET, "another-channel", now + 3600)?,
        ),
        (
            "badly_signed",
            mint(
                "not the site's secret, but as long as it",
                "demo",
                now + 3600,
            )?,
        ),
        ("valid", mint(SECRET, "demo", now + 3600)?),
    ];
    let tokens: std::collections::HashMap<String, String> = pages
        .iter()
        .map(|(n, t)| ((*n).to_string(), t.clone()))
        .collect();

    // The site owner's server (another origin), one page per token.
    let srv = server.clone();
    let site = axum::Router::new().route(
        "/{name}",
        get(move |Path(name): Path<String>| {
            let html = tokens
                .get(&name)
                .map(|t| site_page(&srv, t))
                .unwrap_or_default();
            async move { Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site_addr = listener.local_addr()?;
    let site_server = tokio::spawn(async move {
        let _ = axum::serve(listener, site).await;
    });

    let mut opened = Vec::new();
    for (name, _) in &pages {
        let page = swarm
            .browser
            .new_page_with(
                &format!("http://{site_addr}/{name}"),
                PageOptions { new_window: true },
            )
            .await?;
        opened.push((*name, page));
    }

    for (name, page) in &opened {
        let want = match *name {
            "expired" => "token_expired",
            "wrong_channel" => "token_wrong_channel",
            "badly_signed" => "token_invalid",
            _ => continue,
        };
        if let Err(e) = page
            .wait_for(
                &format!("window.events.error.some((e) => e.code === '{want}')"),
                Duration::from_secs(20),
            )
            .await
        {
            let seen = page.eval("JSON.stringify(window.events)").await?;
            anyhow::bail!(
                "page {name}: no `{want}` error event ({e:#}); events {seen}, console {:?}",
                page.console_errors()
            );
        }
        let errors = page.eval("JSON.stringify(window.events.error)").await?;
        let errors: Value = serde_json::from_str(errors.as_str().unwrap_or("[]"))?;
        println!("page {name}: {errors}");
        // Only its own token code: the others never appear on this page.
        let codes: Vec<&str> = errors
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["code"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            codes.iter().all(|c| !c.starts_with("token_") || *c == want),
            "page {name}: codes {codes:?}"
        );
    }

    let (_, valid) = opened
        .iter()
        .find(|(n, _)| *n == "valid")
        .context("the valid page")?;
    valid
        .wait_for(
            "window.events.playing.length > 0 && \
             document.querySelector('p2p-player').player.video.currentTime > 1",
            Duration::from_secs(30),
        )
        .await
        .context("the page with a valid token never played")?;
    let t0 = valid
        .eval("document.querySelector('p2p-player').player.video.currentTime")
        .await?;
    valid
        .wait_for(
            &format!(
                "document.querySelector('p2p-player').player.video.currentTime > {} + 1",
                t0.as_f64().unwrap_or(0.0)
            ),
            Duration::from_secs(15),
        )
        .await
        .context("the valid page's video does not advance")?;
    let valid_errors = valid.eval("JSON.stringify(window.events.error)").await?;
    ensure!(
        !valid_errors.as_str().unwrap_or("").contains("token_"),
        "the valid page got a token error: {valid_errors}"
    );
    // The refused pages never joined: only the valid one is in the topology.
    let peers = swarm.topology().await?.peers.len();
    ensure!(
        peers == 1,
        "{peers} peers joined, expected only the valid page"
    );

    for (name, page) in &opened {
        ensure_only_expected(&format!("page {name}"), &page.console_errors(), VIEWER_PAGE)?;
    }
    site_server.abort();
    swarm.shutdown().await;
    Ok(())
}
