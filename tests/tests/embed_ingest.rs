//! End-to-end: the `/embed` page's "Go live" table in Chromium, on a server with RTMP and HTTP
//! ingest. Anyone sees each channel's URLs with `key=<your ingest key>`; the operator token
//! typed into the page's form shows the key; a wrong token (`/embed?token=…`) is refused and
//! the page says so. Run by `cargo xtask test` (which builds web/pkg and web/dist first).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use control_server::config::Config;
use e2e::cdp::Page;
use e2e::console::{ensure_only_expected, Allowed, VIEWER_PAGE};
use e2e::swarm::Swarm;

const KEY: &str = "e2e-ingest-key";
const TOKEN: &str = "e2e-operator-token";

/// The page asks `/api/ingest` with the wrong token once, by design, and shows the refusal.
const INGEST_401: Allowed = Allowed {
    why: "the page's /api/ingest call with a wrong operator token, refused by design (401)",
    all_of: &["status of 401", "/api/ingest"],
};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

async fn table_text(page: &Page) -> Result<String> {
    let v = page
        .eval("document.getElementById('ingest').innerText")
        .await?;
    Ok(v.as_str().context("no table text")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built web assets; run by cargo xtask test"]
async fn embed_page_shows_ingest_urls_and_the_key_to_the_operator_only() -> Result<()> {
    let web = web_dir();
    ensure!(
        web.join("dist/player.js").is_file(),
        "{} has no built player (dist/player.js): run `cargo xtask test`, which builds it",
        web.display()
    );
    let swarm = Swarm::start_configured(web, 0, |c| Config {
        ingest_key: Some(KEY.into()),
        operator_token: Some(TOKEN.into()),
        ..c
    })
    .await?;
    let rtmp =
        control_server::source::rtmp::listen("127.0.0.1:0".parse()?, swarm.state.clone()).await?;
    let base = format!("http://{}", swarm.addr);
    let rtmp_demo = format!("rtmp://{}/live/demo?key=", rtmp.local_addr);

    // Anyone: the URLs with a placeholder.
    let page = swarm.browser.new_page(&format!("{base}/embed")).await?;
    page.wait_for(
        "document.querySelector('#ingest tr[data-channel=\"demo\"]') !== null",
        Duration::from_secs(10),
    )
    .await
    .context("the Go live table has no row for demo")?;
    let text = table_text(&page).await?;
    ensure!(
        text.contains(&format!("{rtmp_demo}<your ingest key>")),
        "no RTMP URL with the placeholder in:\n{text}"
    );
    ensure!(
        text.contains(&format!("{base}/ingest/demo?key=<your ingest key>")),
        "no HTTP ingest URL in:\n{text}"
    );
    ensure!(
        !text.contains(KEY),
        "the key shows without the token:\n{text}"
    );

    // The operator types the token: the key shows, OBS's fields too.
    page.eval(&format!(
        "document.getElementById('ingest-token').value = '{TOKEN}'; \
         document.getElementById('ingest-login').requestSubmit(); true"
    ))
    .await?;
    page.wait_for(
        "window.ingest && window.ingest.operator === true",
        Duration::from_secs(10),
    )
    .await
    .context("the operator token did not unlock the keys")?;
    let text = table_text(&page).await?;
    ensure!(
        text.contains(&format!("{rtmp_demo}{KEY}")),
        "no RTMP URL with the key in:\n{text}"
    );
    ensure!(text.contains(&format!("demo?key={KEY}")), "{text}");

    // A wrong token in the address: refused, the placeholders stay, the page says why.
    let wrong = swarm
        .browser
        .new_page(&format!("{base}/embed?token=not-the-token"))
        .await?;
    wrong
        .wait_for(
            "document.getElementById('ingest-note').textContent.includes('refused') && \
             window.ingest && window.ingest.operator === false",
            Duration::from_secs(10),
        )
        .await
        .context("the page did not say the token was refused")?;
    ensure!(!table_text(&wrong).await?.contains(KEY));

    ensure_only_expected("the embed page", &page.console_errors(), VIEWER_PAGE)?;
    let mut allowed = VIEWER_PAGE.to_vec();
    allowed.push(INGEST_401);
    ensure_only_expected(
        "the embed page with a wrong token",
        &wrong.console_errors(),
        &allowed,
    )?;
    rtmp.abort();
    swarm.shutdown().await;
    Ok(())
}
