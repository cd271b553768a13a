//! `control-server`: runs the control center. With no arguments it serves the embedded demo
//! channel (a looped test pattern) on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use control_server::topology::region::TopologyConfig;
use control_server::{cluster, config::Config, limits, serve, AppState, SessionLimits};
use tracing_subscriber::EnvFilter;

// Tens of thousands of sessions allocate and free small buffers per message on every core:
// mimalloc's per-thread free lists cost less per call and fragment less than glibc's arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(version, about = "P2P live video control center")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory with the viewer pages and the built wasm package (web/pkg).
    #[arg(long, default_value = "web")]
    web_dir: PathBuf,
    /// Do not start the built-in demo channel.
    #[arg(long)]
    no_demo: bool,
    /// Also publish a fragmented MP4 file, looped as a live channel: NAME=PATH (repeatable).
    #[arg(long = "file", value_name = "NAME=PATH")]
    files: Vec<String>,
    /// Publish a file (any type) for download beside the live channels, as a carousel of
    /// pieces distributed through the swarm: NAME=PATH (repeatable).
    #[arg(long = "download", value_name = "NAME=PATH")]
    downloads: Vec<String>,
    /// Rate at which the origin sends each file channel's carousel, kbit/s.
    #[arg(long, default_value_t = 1000)]
    file_kbps: u32,
    /// Publish fragmented MP4 read from standard input as channel NAME.
    #[arg(long, value_name = "NAME")]
    stdin: Option<String>,
    /// Follow a live HLS playlist of fMP4 (CMAF) segments and publish it as channel NAME:
    /// NAME=URL of a media or multivariant .m3u8 (repeatable). MPEG-TS segments are refused.
    #[arg(long = "pull", value_name = "NAME=URL")]
    pulls: Vec<String>,
    /// Rendition of a multivariant playlist to pull: `highest` (default), `lowest`,
    /// `bandwidth<=BITS_PER_SECOND`, or a name (NAME attribute, 1280x720, 720p).
    #[arg(long, default_value = "highest", value_name = "CHOICE")]
    pull_rendition: control_server::source::hls::RenditionChoice,
    /// Stream key that allows HTTP ingest (PUT /ingest/{channel}?key=...); ingest is off without it.
    #[arg(long, env = "P2P_INGEST_KEY")]
    ingest_key: Option<String>,
    /// Accept RTMP publishers (OBS, ffmpeg, hardware encoders) on this address, e.g.
    /// 0.0.0.0:1935: `rtmp://HOST:PORT/live/CHANNEL?key=KEY` (OBS: Server
    /// `rtmp://HOST:PORT/live`, Stream Key `CHANNEL?key=KEY`), KEY being the --ingest-key.
    /// H.264 + AAC. Off by default.
    #[arg(long, value_name = "ADDR", requires = "ingest_key")]
    rtmp: Option<SocketAddr>,
    /// Answer STUN Binding requests (RFC 5389) on this UDP address and on the port after it,
    /// e.g. 0.0.0.0:3478 binds 3478 and 3479: pages gather against both to tell an
    /// endpoint-independent NAT from an endpoint-dependent one (their `nat_class`), and their
    /// links use the first beside the site's `ice_servers`. Off by default.
    #[arg(long, value_name = "ADDR")]
    stun: Option<SocketAddr>,
    /// Number of substreams k (trees per channel; default 4, or the topology file's `k`).
    #[arg(long)]
    substreams: Option<u32>,
    /// TOML file with a `[topology]` section (regions, CIDR rules, k, fec_n, mesh_c): every
    /// channel then runs the three-tier hierarchy. Errors name the line.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Run the three-tier hierarchy with default regions (one per /16 or /48) when no
    /// --topology file is given.
    #[arg(long)]
    hierarchy: bool,
    /// Honour the region a page asks for (`?region=`) when it names a configured region. For
    /// tests on loopback, where every peer has the same address; off by default.
    #[arg(long)]
    allow_region_hint: bool,
    /// Largest bottom cluster of the hierarchy (splits above, merges below a quarter of it).
    #[arg(long, default_value_t = 512)]
    cluster_max: usize,
    /// Heartbeat interval sent to peers, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// Peers the origin feeds directly per substream before it becomes an overflow parent.
    #[arg(long, default_value_t = 1)]
    origin_fanout: u32,
    /// Moved children the origin may feed at once per channel while their new parent
    /// connects (make-before-break repair; each costs 1/k of the stream for about a second).
    /// 0 turns bridging off.
    #[arg(long, default_value_t = control_server::dcm::bridge::DEFAULT_MAX_BRIDGES)]
    max_bridges: usize,
    /// A viewer that joins this share of a fragment after the newest fragment was cut, or
    /// later, starts at the newest fragment (its parents hand it over) instead of one fragment
    /// behind (which the origin serves): the next fragment is near. Above 1: never.
    #[arg(long, default_value_t = coordinator::start::DEFAULT_NEWEST_AFTER)]
    start_newest_after: f64,
    /// Streams' worth of origin egress a second, per channel, for joiners' older fragments
    /// (a fragment of D seconds costs D); in a crowd beyond it viewers start at the next
    /// fragment, which the trees carry (up to a fragment later). 0: all do.
    #[arg(long, env = "P2P_START_BUDGET", default_value_t = coordinator::start::DEFAULT_BUDGET_STREAMS)]
    start_budget: f64,
    /// Token for the operator dashboard and APIs (at least 8 characters). Without it a random
    /// token is generated at start-up and printed with the dashboard URL.
    #[arg(long, env = "P2P_OPERATOR_TOKEN")]
    operator_token: Option<String>,
    /// Origin whose pages may embed the player, e.g. https://site.example (repeatable or
    /// comma-separated). Without any, every origin may.
    #[arg(
        long = "allow-origin",
        value_name = "ORIGIN",
        value_delimiter = ',',
        env = "P2P_ALLOWED_ORIGINS"
    )]
    allowed_origins: Vec<String>,
    /// Access token viewers must present to join (the player's `token` option). Without it,
    /// anyone may join.
    #[arg(long, env = "P2P_VIEWER_TOKEN")]
    viewer_token: Option<String>,
    /// File holding the origin's ed25519 signing key (64 hex digits), created there at the
    /// first start. Without it a fresh key is made for this run (players that pin a public key
    /// then refuse the stream after a restart).
    #[arg(long, value_name = "FILE", env = "P2P_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Do not sign the stream: peers then relay packets without checking them (for
    /// benchmarks that compare the cost of signing).
    #[arg(long, conflicts_with = "signing_key")]
    unsigned: bool,
    /// Seconds an evicted peer's address is refused (0: not at all).
    #[arg(long, default_value_t = 600)]
    ban_secs: u64,
    /// Control sessions one network address (IPv4, or IPv6 /64) may hold open at once; more
    /// are refused with `too_many_sessions`. Viewers behind one NAT share an address. 0: no
    /// limit (e.g. behind a reverse proxy, where every session comes from the proxy).
    #[arg(long, default_value_t = limits::AddressLimits::default().sessions)]
    max_sessions_per_address: u32,
    /// Joins one network address may make per minute (refused with `rate_limited`). 0: no
    /// limit.
    #[arg(long, default_value_t = limits::AddressLimits::default().joins_per_minute)]
    max_joins_per_minute: u32,
    /// Bytes per second of control traffic the server reads from one network address's
    /// sessions together (burst: 4 s worth); messages over it are dropped with `rate_limited`.
    /// 0: no limit.
    #[arg(long, default_value_t = limits::AddressLimits::default().control_bytes_per_sec)]
    max_control_bytes_per_sec: u32,
    /// Channels HTTP or RTMP ingest may create for one network address (counting those that
    /// still exist); more are refused (HTTP 429, RTMP `NetStream.Publish.Rejected`). 0: no
    /// limit.
    #[arg(long, default_value_t = limits::AddressLimits::default().ingest_channels)]
    max_ingest_channels_per_address: u32,
    /// Messages per second one control session may send (burst: twice as many); more are
    /// refused with `rate_limited`.
    #[arg(long, default_value_t = SessionLimits::default().msgs_per_sec)]
    max_msgs_per_sec: f64,
    /// Largest control message, bytes (1024 to 65536); larger ones are refused with
    /// `too_large` and the session is closed.
    #[arg(long, default_value_t = SessionLimits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Protocol errors (refused messages) a session may cause before it is closed.
    #[arg(long, default_value_t = SessionLimits::default().max_errors)]
    max_errors: u32,
    /// Secret (at least 32 bytes) of signed viewer tokens: HS256 JWTs with claims `channel`,
    /// `exp` (Unix seconds) and optional `sub`, minted by the site's backend. Joining then needs
    /// such a token for the channel (or the --viewer-token); prefer the environment variable.
    #[arg(long, env = "P2P_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Join a cluster coordinated by etcd (issue 12): its endpoints, e.g.
    /// http://10.0.0.5:2379,http://10.0.0.6:2379. Without it the server runs alone.
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        requires_all = ["node_id", "advertise_url", "cluster_secret"]
    )]
    cluster_etcd: Vec<String>,
    /// This node's name in the cluster (unique; letters, digits, '-', '_', '.').
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Base URL at which peers and the other nodes reach this node, e.g. http://10.0.0.7:8080.
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Secret shared by all nodes (at least 16 bytes): signs the tokens with which peers resume
    /// on another node and, without --signing-key, seeds the stream's signing key so that every
    /// node signs alike. Prefer the environment variable.
    #[arg(long, env = "P2P_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Lease time-to-live of a node, seconds: a node that dies loses its DCMs this long after.
    #[arg(long, default_value_t = 3)]
    lease_ttl: i64,
    /// Prefix of the cluster's keys in etcd (clusters sharing one etcd need different ones).
    #[arg(long, default_value = "/p2p")]
    cluster_prefix: String,
    /// Lifetime of a resume token, seconds (at least 2): a peer may resume with a token this
    /// long after it was issued. Connected peers are sent a fresh one at about half of it; a
    /// peer cut off for longer must join afresh.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    resume_token_ttl: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages back a whole 2 MiB page as soon as one byte of it is touched; with
    // tens of thousands of sessions each owning a few small allocations that inflates resident
    // memory by half again (measured with `cargo xtask bench-heartbeats`) and buys nothing.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn")),
        )
        .init();
    let args = Args::parse();
    if args.allow_region_hint && args.topology.is_none() {
        anyhow::bail!("--allow-region-hint needs a --topology file naming the regions to hint at");
    }
    let mut topology = match &args.topology {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let t = TopologyConfig::from_toml(&text)
                .with_context(|| format!("in {}", path.display()))?;
            Some(t)
        }
        None if args.hierarchy => {
            let mut t = TopologyConfig::default();
            t.k = args.substreams.unwrap_or(4);
            Some(t)
        }
        None => None,
    };
    if let Some(t) = topology.as_mut() {
        t.allow_region_hint |= args.allow_region_hint;
    }
    let substreams = args
        .substreams
        .or(topology.as_ref().map(|t| t.k))
        .unwrap_or(4);
    let cluster_config = (!args.cluster_etcd.is_empty()).then(|| cluster::ClusterConfig {
        etcd: args.cluster_etcd.clone(),
        node_id: args.node_id.clone().unwrap_or_default(),
        advertise_url: args
            .advertise_url
            .clone()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string(),
        lease_ttl_s: args.lease_ttl,
        secret: args.cluster_secret.clone().unwrap_or_default().into_bytes(),
        prefix: args.cluster_prefix.clone(),
        resume_ttl: std::time::Duration::from_secs(args.resume_token_ttl),
    });
    if let Some(c) = &cluster_config {
        cluster::validate(c).context("invalid cluster configuration")?;
    }
    let signing_seed = match (&args.signing_key, args.unsigned, &cluster_config) {
        (_, true, _) => None,
        (Some(path), false, _) => Some(control_server::signing::load_or_create(path)?),
        // Every node must sign the same packets alike: the key comes from the shared secret.
        (None, false, Some(c)) => Some(control_server::signing::seed_from_secret(&c.secret)),
        (None, false, None) => Some(control_server::signing::random_seed()?),
    };
    // Bound before the configuration is made: pages are told the ports really bound.
    let stun =
        match args.stun {
            Some(addr) => Some(control_server::stun::bind(addr).await.with_context(|| {
                format!("binding the STUN responder on {addr} and the next port")
            })?),
            None => None,
        };
    let config = Config {
        stun: stun.as_ref().map(|s| s.addrs.to_vec()).unwrap_or_default(),
        signing_seed,
        ban_secs: args.ban_secs,
        substreams,
        topology: topology.map(Arc::new),
        cluster_max: args.cluster_max,
        heartbeat_ms: args.heartbeat_ms,
        origin_fanout: args.origin_fanout,
        ingest_key: args.ingest_key.clone(),
        rtmp: args.rtmp,
        web_dir: args.web_dir.clone(),
        operator_token: args.operator_token.clone(),
        allowed_origins: args.allowed_origins.clone(),
        viewer_token: args.viewer_token.clone(),
        token_secret: args.token_secret.clone(),
        file_kbps: args.file_kbps,
        max_bridges: args.max_bridges,
        start: coordinator::start::StartConfig {
            newest_after: args.start_newest_after,
            budget_streams: args.start_budget,
        },
        address_limits: limits::AddressLimits {
            sessions: args.max_sessions_per_address,
            joins_per_minute: args.max_joins_per_minute,
            control_bytes_per_sec: args.max_control_bytes_per_sec,
            ingest_channels: args.max_ingest_channels_per_address,
        },
        session_limits: SessionLimits {
            msgs_per_sec: args.max_msgs_per_sec,
            max_message_bytes: args.max_message_bytes,
            max_errors: args.max_errors,
            ..SessionLimits::default()
        },
        ..Config::default()
    };
    config.validate().context("invalid configuration")?;
    let state = AppState::new(config);
    let cluster = match cluster_config {
        Some(c) => {
            let joined = cluster::connect(c).await.context("joining the cluster")?;
            state.join_cluster(joined.clone());
            Some(joined)
        }
        None => None,
    };
    // A looped channel's timeline: shared by the cluster's nodes, this process's otherwise.
    let start_of = |name: &str| {
        let cluster = cluster.clone();
        let name = name.to_string();
        async move {
            let now = control_server::channel::now_ms();
            match cluster {
                Some(c) => c
                    .start_time(&name, now)
                    .await
                    .with_context(|| format!("reading channel {name:?}'s start time from etcd")),
                None => Ok(now),
            }
        }
    };
    if !args.no_demo {
        let start = start_of("demo").await?;
        state
            .start_looped_channel_at("demo", control_server::DEMO_CLIP.to_vec(), start)
            .context("starting the demo channel")?;
        // The demo page offers this file for download beside the live channel.
        state
            .start_demo_file_channel()
            .context("starting the demo file channel")?;
    }
    for spec in &args.downloads {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--download expects NAME=PATH, got {spec:?}"))?;
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let file_name = std::path::Path::new(path)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or(name);
        state
            .start_file_channel_as(name, file_name, data)
            .with_context(|| format!("publishing {path} for download as channel {name:?}"))?;
    }
    for spec in &args.files {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--file expects NAME=PATH, got {spec:?}"))?;
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let start = start_of(name).await?;
        state
            .start_looped_channel_at(name, data, start)
            .with_context(|| format!("publishing {path} as channel {name:?}"))?;
    }
    if let Some(name) = &args.stdin {
        state.start_stdin_channel(name)?;
    }
    for spec in &args.pulls {
        let (name, url) = control_server::source::hls::parse_spec(spec)
            .with_context(|| format!("--pull expects NAME=URL, got {spec:?}"))?;
        control_server::source::hls::start(&state, name, url, args.pull_rendition.clone())
            .with_context(|| format!("pulling {url} as channel {name:?}"))?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(rtmp) = state.config.rtmp {
        let server = control_server::source::rtmp::listen(rtmp, state.clone())
            .await
            .with_context(|| format!("binding the RTMP listener on {rtmp}"))?;
        println!(
            "Go live: rtmp://{}/live/CHANNEL?key=… (OBS: Server rtmp://{}/live, Stream Key \
             CHANNEL?key=…)",
            server.local_addr, server.local_addr
        );
    }
    if let Some(s) = &stun {
        println!("STUN: udp {} and {}", s.addrs[0], s.addrs[1]);
    }
    tracing::info!("control center listening on http://{addr}/");
    println!("Open http://{addr}/ in two tabs to watch the demo channel.");
    println!("Embed the player: http://{addr}/embed");
    if state.operator_token_generated() {
        println!(
            "Operator dashboard: http://{addr}/dashboard?token={} (token generated at start-up; \
             set --operator-token to choose one)",
            state.operator_token()
        );
    } else {
        println!("Operator dashboard: http://{addr}/dashboard (with your --operator-token)");
    }
    match cluster {
        Some(c) => {
            println!("Cluster node {} at {}", c.node_id(), c.url());
            let drained = state.clone();
            control_server::serve_until(listener, state, async move {
                shutdown_signal().await;
                // A planned stop hands every DCM over before the sockets close.
                let n = c.drain(&drained).await;
                tracing::info!(dcms = n, "handed the DCMs over; stopping");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            })
            .await
        }
        None => serve(listener, state).await,
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
