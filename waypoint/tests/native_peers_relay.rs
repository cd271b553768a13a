//! Native peers against the real control server and demo origin, in one process, over real
//! UDP on this host: they join, open str0m data channels to each other as the DCM says, relay,
//! and verify every byte against the origin (issue 15). No browser needed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use control_server::config::Config;
use control_server::AppState;
use protocol::report::PeerReport;
use waypoint::{NativeSwarm, PeerConfig, SwarmConfig};

async fn start_server() -> Result<(SocketAddr, AppState)> {
    let state = AppState::new(Config::default());
    state.start_demo_channel()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = control_server::app(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, state))
}

/// Errors a peer recorded, less the one benign race: a signal for a link the control center
/// has just unplanned is refused with `NotLinked` (the page logs it as a warning too).
fn errors(r: &PeerReport) -> Vec<&String> {
    r.errors
        .iter()
        .filter(|e| !e.contains("NotLinked"))
        .collect()
}

fn matches_origin(state: &AppState, r: &PeerReport) -> bool {
    let (Some(first), Some(ch)) = (r.verified_first_seq, state.channel("demo")) else {
        return false;
    };
    ch.range_hash(first, r.verified_count)
        .is_some_and(|h| h.hex() == r.verified_hash)
}

/// Polls `check` every 250 ms until it passes or `deadline` is over (then its last error).
async fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= deadline => {
                bail!("{what}: not within {deadline:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_peers_relay_to_each_other_byte_exact() -> Result<()> {
    let (addr, state) = start_server().await?;
    wait_until(
        "the demo channel's first packet",
        Duration::from_secs(10),
        || {
            state
                .channel("demo")
                .and_then(|c| c.live_position())
                .context("nothing cut yet")
        },
    )
    .await?;
    let swarm = NativeSwarm::start(SwarmConfig {
        peer: PeerConfig {
            server: format!("http://{addr}"),
            channel: "demo".into(),
            upload_kbps: 4000,
            region: None,
            token: None,
            public_key: None,
            ice_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            waypoint_token: None,
            connectivity: None,
        },
        peers: 4,
        threads: 2,
        join_every: Duration::from_millis(50),
        upload_cycle: Vec::new(),
    })?;
    let reports = wait_until(
        "every native peer to receive from peers and verify byte-exact",
        Duration::from_secs(30),
        || {
            let reports = swarm.reports();
            for (i, r) in reports.iter().enumerate() {
                ensure!(r.peer_id.is_some(), "peer {i} has not joined");
                ensure!(
                    r.verified_count > 20,
                    "peer {i} verified {}",
                    r.verified_count
                );
                ensure!(
                    matches_origin(&state, r),
                    "peer {i} bytes differ from the origin"
                );
                ensure!(
                    r.bytes_from_peers > 50_000,
                    "peer {i} got {} bytes from peers",
                    r.bytes_from_peers
                );
                ensure!(r.connected_peers > 0, "peer {i} has no open data channel");
            }
            Ok(reports)
        },
    )
    .await?;
    let up: u64 = reports.iter().map(|r| r.bytes_up).sum();
    let from_peers: u64 = reports.iter().map(|r| r.bytes_from_peers).sum();
    ensure!(
        up >= from_peers,
        "uploaded {up} < received from peers {from_peers}"
    );
    ensure!(
        reports
            .iter()
            .all(|r| r.signed.as_ref().is_some_and(|s| s.forged == 0)),
        "a native peer saw a forged packet"
    );
    let failures = swarm.failures();
    ensure!(failures.is_empty(), "peers ended early: {failures:?}");
    let last = swarm.stop();
    for (i, r) in last.iter().enumerate() {
        ensure!(errors(r).is_empty(), "peer {i} errors: {:?}", r.errors);
        ensure!(
            r.links_failed == 0,
            "peer {i} had {} failed links",
            r.links_failed
        );
    }
    Ok(())
}
