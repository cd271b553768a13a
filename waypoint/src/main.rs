//! `waypoint`: native viewers of a channel (issue 15). One process runs `--peers N` of them
//! (default 1); each verifies and relays bytes like a browser viewer that does not decode, and
//! the process prints their statistics (`protocol::report::PeerReport`, JSON) at the end.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use waypoint::{NativeSwarm, PeerConfig, SwarmConfig};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Native peers of a p2p-live channel (the browser's engine, on str0m WebRTC)"
)]
struct Args {
    /// Control center base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    #[arg(long, default_value = "demo")]
    channel: String,
    /// Declared upload capacity (kbit/s); sends never exceed it. Several values,
    /// comma-separated, are cycled over the peers.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    upload_kbps: Vec<u32>,
    /// Region to ask to be placed in (servers allowing region hints).
    #[arg(long)]
    region: Option<String>,
    /// Viewer token (`--viewer-token` or a signed JWT).
    #[arg(long, env = "P2P_VIEWER_TOKEN")]
    token: Option<String>,
    /// The stream's public key to insist on (64 hex digits).
    #[arg(long)]
    public_key: Option<String>,
    /// Address offered to neighbours (default: the first non-loopback IPv4 address).
    #[arg(long)]
    ice_ip: Option<IpAddr>,
    /// How many peers this process runs.
    #[arg(long, default_value_t = 1)]
    peers: usize,
    /// Worker threads for the peers (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Milliseconds between two peers' joins.
    #[arg(long, default_value_t = 20)]
    join_every_ms: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Join as a waypoint server (FIG. 1, 3: a relay the operator runs near a region that lacks
    /// capable peers) with the control center's operator token. A waypoint reports its NAT
    /// class as `open` unless `--nat-class` says otherwise.
    #[arg(long, env = "P2P_OPERATOR_TOKEN")]
    waypoint_token: Option<String>,
    /// The NAT class to report in the join: `open`, `endpoint-independent`,
    /// `endpoint-dependent` or `udp-blocked` (default: none, or `open` for a waypoint).
    #[arg(long, value_parser = parse_nat_class)]
    nat_class: Option<protocol::NatClass>,
    /// Write the statistics (a JSON array, one report per peer) here instead of stdout: every
    /// 5 s while running (replaced whole: written beside, then renamed) and at the end.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_nat_class(s: &str) -> Result<protocol::NatClass, String> {
    use protocol::NatClass::*;
    Ok(match s {
        "open" => Open,
        "endpoint-independent" => EndpointIndependent,
        "endpoint-dependent" => EndpointDependent,
        "udp-blocked" => UdpBlocked,
        _ => {
            return Err(format!(
                "{s:?}: expected open, endpoint-independent, endpoint-dependent or udp-blocked"
            ))
        }
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("waypoint=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let swarm = NativeSwarm::start(SwarmConfig {
        peer: PeerConfig {
            server: args.server.clone(),
            channel: args.channel.clone(),
            upload_kbps: args.upload_kbps.first().copied().unwrap_or(2000),
            region: args.region.clone(),
            token: args.token.clone(),
            public_key: args.public_key.clone(),
            ice_ip: args.ice_ip.unwrap_or_else(waypoint::default_ice_ip),
            waypoint_token: args.waypoint_token.clone(),
            connectivity: args
                .nat_class
                .or(args
                    .waypoint_token
                    .as_ref()
                    .map(|_| protocol::NatClass::Open))
                .map(|class| protocol::Connectivity { class, turn: false }),
        },
        peers: args.peers,
        threads,
        join_every: Duration::from_millis(args.join_every_ms),
        upload_cycle: args.upload_kbps.clone(),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    rt.block_on(async {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = every.tick() => {
                    let r = swarm.reports();
                    let peers: u64 = r.iter().map(|r| r.bytes_from_peers).sum();
                    let origin: u64 = r.iter().map(|r| r.bytes_from_origin).sum();
                    let share = peers as f64 / (peers + origin).max(1) as f64;
                    tracing::info!(
                        joined = r.iter().filter(|r| r.peer_id.is_some()).count(),
                        links = r.iter().map(|r| r.connected_peers).sum::<u32>(),
                        p2p_share = format!("{share:.3}"),
                        verified = r.iter().map(|r| r.verified_count).sum::<u64>(),
                        ended = swarm.failures().len(),
                        "native peers"
                    );
                    if let Some(p) = &args.json {
                        if let Err(e) = write_json(p, &r) {
                            tracing::warn!("{e:#}");
                        }
                    }
                    if args.seconds.is_some_and(|s| started.elapsed().as_secs() >= s) {
                        break;
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    let reports = swarm.stop();
    match &args.json {
        Some(p) => write_json(p, &reports)?,
        None => println!("{}", serde_json::to_string_pretty(&reports)?),
    }
    Ok(())
}

/// Replaces `path` with the reports, so that a reader never sees half a file.
fn write_json(
    path: &std::path::Path,
    reports: &[protocol::report::PeerReport],
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(reports)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
