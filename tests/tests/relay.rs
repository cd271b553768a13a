//! End-to-end: a recruited relay (claims 19, 43). A second channel whose viewers cannot upload
//! lacks capacity in its region; the control center recruits a strong viewer of *another*
//! channel, whose page opens a relay session that forwards the second channel without playing
//! it. Run by `cargo xtask test`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use e2e::cdp::{Page, PageOptions};
use e2e::console::{ensure_only_expected, VIEWER_PAGE};
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use protocol::report::PeerReport;

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

async fn stats(page: &Page) -> Result<PeerReport> {
    let json = page.eval("JSON.stringify(window.p2p.stats())").await?;
    let text = json
        .as_str()
        .ok_or_else(|| anyhow!("stats are not a string: {json}"))?;
    Ok(serde_json::from_str(text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn a_strong_viewer_of_one_channel_is_recruited_to_relay_another_it_does_not_play(
) -> Result<()> {
    // One configured region (r0), hierarchy on; a second live channel beside the demo.
    let mut swarm = Swarm::start_with(web_dir(), 1).await?;
    let other = swarm
        .state
        .start_looped_channel("other", control_server::DEMO_CLIP.to_vec())
        .context("starting the second channel")?;
    wait_until(
        "the second channel's first packets",
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            other
                .live_position()
                .context("the second channel produced nothing")
        },
    )
    .await?;
    let s = swarm.stream_kbps().max(100);
    // The strong viewer watches the demo channel alone: nearly all its upload is spare.
    let strong = swarm.add_viewer(8 * s, false).await?;
    // Viewers of the other channel that can barely upload anything.
    let mut weak = Vec::new();
    for _ in 0..4 {
        let url = format!(
            "http://{}/?channel=other&upload={}&decode=0&region=r0",
            swarm.addr,
            s / 8
        );
        let page = swarm
            .browser
            .new_page_with(&url, PageOptions { new_window: false })
            .await?;
        page.wait_for("window.p2p !== undefined", Duration::from_secs(20))
            .await?;
        weak.push(page);
    }
    // Within the 20 s the test used to sleep: the strong viewer is recruited and relays the
    // other channel, and everyone gets their channel byte-exact.
    let r = wait_until(
        "the strong viewer to be recruited and relay the other channel",
        Duration::from_secs(20),
        Duration::from_secs(1),
        async || {
            let r = swarm.stats(strong).await?;
            let relay = r
                .relays
                .iter()
                .find(|x| x.channel == "other")
                .ok_or_else(|| anyhow!("the strong viewer was not recruited: {r:?}"))?;
            // Its engine verifies what passes through but hands nothing to a player (unit-tested in
            // the engine); the session has no video element at all.
            ensure!(!relay.plays, "a relay must not play the channel: {relay:?}");
            ensure!(
                relay.bytes_from_peers + relay.bytes_from_origin > 100_000
                    && relay.bytes_up > 100_000,
                "the relay does not forward the other channel: {relay:?}"
            );
            ensure!(
                other
                    .counters
                    .relays_recruited
                    .load(std::sync::atomic::Ordering::Relaxed)
                    >= 1,
                "the other channel counted no recruited relay"
            );
            // Its own channel is unaffected, and the other channel's viewers get it byte-exact.
            ensure!(
                swarm.matches_origin(&r) == Some(true) && r.verified_count > 50,
                "the recruited viewer's own channel suffered: {r:?}"
            );
            let mut relayed_to_weak = 0;
            for (i, page) in weak.iter().enumerate() {
                let w = stats(page).await?;
                let first = w.verified_first_seq.context("nothing verified")?;
                let origin = other
                    .range_hash(first, w.verified_count)
                    .context("range left the window")?;
                ensure!(
                    w.verified_count > 50 && origin.hex() == w.verified_hash,
                    "weak viewer {i} of the other channel is not byte-exact: {w:?}"
                );
                relayed_to_weak += w.bytes_from_peers;
            }
            ensure!(
                relayed_to_weak > 0,
                "the other channel's viewers received nothing from peers"
            );
            Ok(r)
        },
    )
    .await?;
    println!("strong viewer relays: {:?}", r.relays);
    let mut errors = swarm.console_errors();
    for (i, page) in weak.iter().enumerate() {
        errors.extend(
            page.console_errors()
                .into_iter()
                .map(|e| format!("weak viewer {i}: {e}")),
        );
    }
    ensure_only_expected("the viewer pages", &errors, VIEWER_PAGE)?;
    for page in weak {
        page.close().await?;
    }
    swarm.shutdown().await;
    Ok(())
}
