//! End-to-end: the native peer (`waypoint/`: the same engine on str0m WebRTC) and Chromium
//! peers relay to each other over real data channels, both ways (issue 15). Uploads force the
//! direction: a peer that declares 0 kbit/s is never anyone's parent, so its only peer parent
//! is the one peer with upload to give.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::console::VIEWER_PAGE;
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use protocol::report::PeerReport;
use protocol::{PeerId, Source};
use waypoint::{NativeSwarm, PeerConfig, SwarmConfig};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// One native peer joining the swarm's channel.
fn native_peer(swarm: &Swarm, upload_kbps: u32) -> Result<NativeSwarm> {
    Ok(NativeSwarm::start(SwarmConfig {
        peer: PeerConfig {
            server: format!("http://{}", swarm.addr),
            channel: swarm.channel.clone(),
            upload_kbps,
            region: None,
            token: None,
            public_key: None,
            ice_ip: waypoint::default_ice_ip(),
            waypoint_token: None,
            connectivity: None,
        },
        peers: 1,
        threads: 1,
        join_every: Duration::ZERO,
        upload_cycle: Vec::new(),
    })?)
}

/// Errors a peer recorded, less the one benign race: a signal for a link the control center
/// has just unplanned is refused with `NotLinked` (the page logs it as a warning too).
fn errors(r: &PeerReport) -> Vec<&String> {
    r.errors
        .iter()
        .filter(|e| !e.contains("NotLinked"))
        .collect()
}

fn only(native: &NativeSwarm) -> Result<PeerReport> {
    native.reports().pop().context("no native peer")
}

/// Bytes `child` received from peers, with `parent` as the peer parent of at least one of its
/// substreams, byte-exact against the origin.
fn ensure_fed_by(swarm: &Swarm, child: &PeerReport, parent: PeerId, what: &str) -> Result<()> {
    ensure!(
        child
            .plan
            .iter()
            .any(|s| s.parent == Source::Peer { id: parent }),
        "{what}: {parent} is not a parent of {:?}: {:?}",
        child.peer_id,
        child.plan
    );
    ensure!(
        child.bytes_from_peers > 100_000,
        "{what}: only {} bytes from peers",
        child.bytes_from_peers
    );
    ensure!(
        child.verified_count > 20,
        "{what}: verified only {} packets",
        child.verified_count
    );
    ensure!(
        swarm.matches_origin(child) == Some(true),
        "{what}: bytes differ from the origin"
    );
    ensure!(
        errors(child).is_empty(),
        "{what}: errors {:?}",
        child.errors
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn browser_feeds_native_and_native_feeds_browser() -> Result<()> {
    let mut swarm = Swarm::start(web_dir()).await?;

    // A Chromium parent and a native child.
    swarm.add_viewer(4000, false).await?;
    let browser_parent = wait_until(
        "the Chromium viewer to join",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || swarm.stats(0).await?.peer_id.context("no peer id yet"),
    )
    .await?;
    let native_child = native_peer(&swarm, 0)?;
    wait_until(
        "the native child to receive from the Chromium parent, byte-exact",
        Duration::from_secs(20),
        Duration::from_millis(500),
        async || {
            let r = only(&native_child)?;
            ensure_fed_by(&swarm, &r, browser_parent, "native child")
        },
    )
    .await?;
    let r = swarm.stats(0).await?;
    ensure!(
        r.bytes_up > 100_000,
        "the Chromium parent sent {} bytes",
        r.bytes_up
    );

    // A native parent, then a Chromium child (the first viewer leaves, so the native peer is
    // the only one with upload to give).
    let native_parent = native_peer(&swarm, 4000)?;
    let native_parent_id = wait_until(
        "the native parent to join",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || only(&native_parent)?.peer_id.context("no peer id yet"),
    )
    .await?;
    swarm.close_viewer(0).await?;
    swarm.add_viewer(0, false).await?;
    wait_until(
        "the Chromium child to receive from the native parent, byte-exact",
        Duration::from_secs(20),
        Duration::from_millis(500),
        async || {
            let r = swarm.stats(1).await?;
            ensure_fed_by(&swarm, &r, native_parent_id, "Chromium child")
        },
    )
    .await?;
    let r = only(&native_parent)?;
    ensure!(
        r.bytes_up > 100_000,
        "the native parent sent {} bytes",
        r.bytes_up
    );
    ensure!(
        errors(&r).is_empty(),
        "native parent errors: {:?}",
        r.errors
    );
    // The native child, now fed by the native parent, still verifies every byte.
    let r = only(&native_child)?;
    ensure!(
        swarm.matches_origin(&r) == Some(true),
        "native child bytes differ"
    );

    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    for (name, n) in [
        ("native child", native_child),
        ("native parent", native_parent),
    ] {
        let failures = n.failures();
        ensure!(failures.is_empty(), "{name} ended early: {failures:?}");
        let last = n.stop();
        ensure!(
            last.iter().all(|r| errors(r).is_empty()),
            "{name} errors: {:?}",
            last.iter().map(|r| &r.errors).collect::<Vec<_>>()
        );
    }
    swarm.shutdown().await;
    Ok(())
}
