//! `cargo xtask bench-heartbeats`: the real control server (release build, its own process)
//! under N simulated peers, tokio-tungstenite clients in this process on loopback, each joining
//! the demo channel and sending binary FIG. 9 heartbeats at the configured interval that report
//! healthy links (from the instructions and live-edge notices they receive). Reports sustained
//! heartbeats per second applied by the DCM, time from receipt to applied, server CPU and
//! server memory per connected peer.
//!
//! With `--nodes N` (N ≥ 2) it starts a real etcd (its own free ports and temporary data
//! directory) and N control-server processes joined to it in cluster mode, serving 2N looped
//! channels whose DCMs the nodes claim in turn (through the locator). Each simulated peer
//! connects to a node other than its DCM's owner for half of the channels and follows the
//! server's `Redirect`, as a page does; every figure is then reported per node too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use protocol::{ChildLink, ClientMsg, Heartbeat, ParentLink, PeerId, ServerMsg, SubstreamPlan};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::util::{cargo, repo_root, run};

#[derive(Debug, Clone)]
pub struct Args {
    pub peers: usize,
    pub seconds: u64,
    pub heartbeat_ms: u32,
    /// Control-server processes: 1 runs one server alone (no etcd), more run a cluster.
    pub nodes: usize,
    pub json: Option<PathBuf>,
}

/// One control-server process; killed (by its PID) when the benchmark ends, however it ends.
struct Server {
    id: String,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator token of the benchmark's cluster nodes (to read `/api/operator/cluster`).
const OPERATOR_TOKEN: &str = "bench-heartbeats-operator";
/// The shared secret of the benchmark's cluster.
const CLUSTER_SECRET: &str = "bench-heartbeats-cluster-secret";

/// A port free on 127.0.0.1 now (the server binds it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts a control server on a free port with the benchmark's flags; in a cluster, `cluster`
/// is (etcd URL, node id) and `files` the looped channels it serves beside the demo.
fn start_server(
    bin: &std::path::Path,
    heartbeat_ms: u32,
    cluster: Option<(&str, &str)>,
    files: &[String],
) -> Result<Server> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        &addr.to_string(),
        "--heartbeat-ms",
        &heartbeat_ms.to_string(),
        // Every simulated peer connects from 127.0.0.1: the per-address abuse limits
        // (sessions, joins, control bytes) would refuse all but the first few dozen.
        "--max-sessions-per-address",
        "0",
        "--max-joins-per-minute",
        "0",
        "--max-control-bytes-per-sec",
        "0",
    ])
    .arg("--web-dir")
    .arg(repo_root().join("web"))
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null());
    let id = match cluster {
        None => "server".to_string(),
        Some((etcd, id)) => {
            cmd.args(["--cluster-etcd", etcd, "--node-id", id])
                .args(["--advertise-url", &format!("http://{addr}")])
                .args(["--operator-token", OPERATOR_TOKEN])
                .env("P2P_CLUSTER_SECRET", CLUSTER_SECRET);
            for f in files {
                cmd.arg("--file").arg(f);
            }
            id.to_string()
        }
    };
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Server { id, addr, child })
}

fn raise_fd_limit(want: u64) -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    // Root may raise the hard limit too (up to fs.nr_open); others live with theirs.
    if cur.maximum.is_some_and(|m| m < want)
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: Some(want),
            },
        )
        .is_ok()
    {
        return Ok(want);
    }
    let max = cur.maximum.unwrap_or(want);
    let target = want.min(max);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: cur.maximum,
        },
    )
    .context("raising the open-files limit")?;
    Ok(target)
}

/// (utime + stime in clock ticks, RSS in KiB) of a process.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks, rss))
}

/// Idle clock ticks of the whole machine, summed over its cores (`/proc/stat`).
fn machine_idle_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    // cpu  user nice system idle iowait ...
    cpu.split_whitespace().nth(4)?.parse().ok()
}

async fn http_get_json(addr: SocketAddr, path: &str) -> Result<Value> {
    http_get_json_as(addr, path, None).await
}

/// `GET path` with an optional bearer token.
async fn http_get_json_as(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no HTTP body")?;
    serde_json::from_str(body).with_context(|| format!("GET {path}: {body}"))
}

struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicU64,
    bytes: AtomicU64,
    rate_limited: AtomicU64,
    /// Peers welcomed by each node (after redirects).
    per_node: Vec<AtomicUsize>,
    /// `Redirect`s the peers followed.
    redirects: AtomicU64,
}

impl Counters {
    fn new(nodes: usize) -> Counters {
        Counters {
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            per_node: (0..nodes).map(|_| AtomicUsize::new(0)).collect(),
            redirects: AtomicU64::new(0),
        }
    }
}

/// Where a simulated peer goes: the node it asks first, and its channel.
struct Route {
    nodes: Arc<Vec<SocketAddr>>,
    first: usize,
    channel: String,
}

/// A node's base URL (`http://127.0.0.1:PORT`, as a `Redirect` names it) as an address.
fn url_addr(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .trim_end_matches('/');
    hostport
        .parse()
        .with_context(|| format!("redirected to {url:?}, not http://IP:PORT"))
}

/// One simulated peer: joins (following redirects to its DCM's node), tracks its plan and the
/// live edge, reports healthy links.
async fn sim_peer(
    route: Route,
    hb_ms: u32,
    stop: Instant,
    c: Arc<Counters>,
    phase_ms: u64,
    connecting: Arc<tokio::sync::Semaphore>,
    shared_edge: Arc<AtomicU64>,
) -> Result<()> {
    // Bounded concurrent handshakes, released once welcomed.
    let permit = connecting.acquire_owned().await?;
    // A small read buffer: tungstenite zeroes its whole read chunk on every read, and with the
    // default 128 KiB that memset dominated the simulated peers' CPU.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let join = ClientMsg::Join {
        version: protocol::PROTOCOL_VERSION,
        channel: route.channel.clone(),
        upload_kbps: 2000,
        region: None,
        network: None,
        relay_token: None,
        companion: None,
        resume: None,
        connectivity: None,
        waypoint: None,
    };
    let join = serde_json::to_string(&join)?;
    let mut node = route.first;
    let mut hops = 0;
    let (mut ws, me, k, mut edge) = 'connect: loop {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
            format!("ws://{}/ws", route.nodes[node]),
            Some(config),
            false,
        )
        .await?;
        ws.send(Message::Text(join.clone().into())).await?;
        // The first answer is the Welcome, or a Redirect to the node that runs the DCM.
        loop {
            let msg = ws.next().await.context("closed before the welcome")??;
            let Message::Text(t) = msg else { continue };
            match serde_json::from_str::<ServerMsg>(t.as_str()) {
                Ok(ServerMsg::Welcome {
                    peer_id,
                    substreams,
                    live_seq,
                    ..
                }) => break 'connect (ws, peer_id, substreams, live_seq),
                Ok(ServerMsg::Redirect { url, .. }) => {
                    hops += 1;
                    if hops > 3 {
                        bail!("redirected {hops} times (last to {url})");
                    }
                    let to = url_addr(&url)?;
                    node = route
                        .nodes
                        .iter()
                        .position(|a| *a == to)
                        .with_context(|| format!("redirected to an unknown node {url}"))?;
                    c.redirects.fetch_add(1, Ordering::Relaxed);
                    let _ = ws.close(None).await;
                    continue 'connect;
                }
                Ok(ServerMsg::Error { message, .. }) => bail!("server error: {message}"),
                _ => {}
            }
        }
    };
    drop(permit);
    c.connected.fetch_add(1, Ordering::Relaxed);
    c.per_node[node].fetch_add(1, Ordering::Relaxed);
    let mut plan: Vec<SubstreamPlan> = Vec::new();
    let mut seq = 0u64;
    let mut last_sent: Option<Instant> = None;
    // Rebuilt when the plan changes; each tick only updates its numbers in place.
    let mut template: Option<Heartbeat> = None;
    let start = tokio::time::Instant::now() + Duration::from_millis(phase_ms);
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(u64::from(hb_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < stop {
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else { break };
                if let Message::Text(t) = msg? {
                    // The live-edge notice is the common message: read its number directly.
                    if let Some(rest) = t.as_str().strip_prefix(r#"{"type":"live_edge","seq":"#) {
                        if let Ok(s) = rest.trim_end_matches('}').parse() {
                            edge = s;
                            continue;
                        }
                    }
                    match serde_json::from_str::<ServerMsg>(t.as_str()) {
                        Ok(ServerMsg::Instructions { substreams, .. }) => {
                            plan = substreams;
                            template = None;
                        }
                        Ok(ServerMsg::LiveEdge { seq }) => edge = seq,
                        Ok(ServerMsg::Error { code: protocol::ErrorCode::RateLimited, .. }) => {
                            c.rate_limited.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(ServerMsg::Error { message, .. }) => bail!("server error: {message}"),
                        _ => {}
                    }
                }
            }
            _ = tick.tick() => {
                // The server refuses heartbeats closer than half an interval; a late tick
                // must not be followed by a catch-up burst.
                if last_sent.is_some_and(|t: Instant| t.elapsed() < Duration::from_millis(u64::from(hb_ms) * 6 / 10)) {
                    continue;
                }
                last_sent = Some(Instant::now());
                seq += 1;
                let hb = template.get_or_insert_with(|| healthy_heartbeat(me, k, &plan));
                // A fed peer knows the edge from the packets its parents deliver; the server
                // tells only lagging peers every time, so the simulated peers read it from the
                // benchmark's poller.
                refresh(hb, seq, k, edge.max(shared_edge.load(Ordering::Relaxed)));
                let frame = protocol::heartbeat::binary::encode(hb);
                c.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                ws.send(Message::Binary(frame.into())).await?;
                c.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// A heartbeat reporting every link of `plan` (numbers filled in by [`refresh`]).
fn healthy_heartbeat(id: PeerId, k: u32, plan: &[SubstreamPlan]) -> Heartbeat {
    Heartbeat {
        client_id: id,
        seq: 0,
        local_ts_ms: 0,
        parents: plan
            .iter()
            .map(|sp| ParentLink {
                substream: sp.index,
                parent: sp.parent,
                last_seq: None,
                last_ts_ms: None,
            })
            .collect(),
        children: plan
            .iter()
            .flat_map(|sp| {
                sp.children.iter().map(move |ch| ChildLink {
                    substream: sp.index,
                    child: *ch,
                    last_seq: None,
                    last_ts_ms: None,
                })
            })
            .collect(),
        buffer: vec![2; k as usize],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up: 0,
        origin_fallbacks: 0,
        upload_kbps: 2000,
        send_backlog_ms: 0,
        place: None,
    }
}

/// Healthy numbers for heartbeat `seq`: every link has carried the newest packet of its
/// substream up to the live edge `edge`.
fn refresh(hb: &mut Heartbeat, seq: u64, k: u32, edge: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let newest = |s: u32| {
        (edge.saturating_sub(u64::from(k))..=edge)
            .rev()
            .find(|q| protocol::substream_of(*q, k) == s)
    };
    hb.seq = seq;
    hb.local_ts_ms = now;
    for p in &mut hb.parents {
        p.last_seq = newest(p.substream);
        p.last_ts_ms = Some(now);
    }
    for ch in &mut hb.children {
        ch.last_seq = newest(ch.substream);
        ch.last_ts_ms = Some(now);
    }
    hb.bytes_from_peers = seq * 50_000;
    hb.bytes_up = seq * 50_000;
}

/// The heartbeat-apply histogram's bucket counts between two stats readings.
fn bucket_diff(s0: &Value, s1: &Value) -> Vec<u64> {
    let counts = |v: &Value| -> Vec<u64> {
        v["heartbeat_apply_us_buckets"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    let (a, b) = (counts(s0), counts(s1));
    b.iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(a.get(i).copied().unwrap_or(0)))
        .collect()
}

/// Adds `b` into `a`, bucket by bucket.
fn add_buckets(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// A counter of a stats reading that grew between two readings.
fn grew(s0: &Value, s1: &Value, field: &str) -> u64 {
    s1[field]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(s0[field].as_u64().unwrap_or(0))
}

/// Every channel's stats on one node.
/// Bytes of packets held in the windows of the channels in `stats` (one node's).
fn window_bytes(stats: &[Value]) -> u64 {
    stats
        .iter()
        .map(|v| v["window_bytes"].as_u64().unwrap_or(0))
        .sum::<u64>()
}

async fn node_stats(addr: SocketAddr, channels: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(channels.len());
    for ch in channels {
        out.push(http_get_json(addr, &format!("/api/channels/{ch}/stats")).await?);
    }
    Ok(out)
}

/// Waits until every node cuts packets on every channel and, in a cluster, sees all nodes.
async fn wait_ready(servers: &[Server], channels: &[String], cluster: bool) -> Result<()> {
    let t0 = Instant::now();
    for s in servers {
        loop {
            let mut ready = true;
            for ch in channels {
                let v = http_get_json(s.addr, &format!("/api/channels/{ch}/stats")).await;
                ready &= v.is_ok_and(|v| v["live_seq"].is_u64());
            }
            if ready && cluster {
                let v =
                    http_get_json_as(s.addr, "/api/operator/cluster", Some(OPERATOR_TOKEN)).await;
                ready = v.is_ok_and(|v| v["nodes"].as_array().map_or(0, Vec::len) == servers.len());
            }
            if ready {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("control server {} did not come up on {}", s.id, s.addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The node that owns each channel's DCM: in a cluster, node `j mod N` asks its own locator
/// for channel `j`, which claims the DCM for it (nobody owns it yet).
async fn claim_dcms(servers: &[Server], channels: &[String]) -> Result<Vec<usize>> {
    let mut owners = Vec::with_capacity(channels.len());
    for (j, ch) in channels.iter().enumerate() {
        if servers.len() == 1 {
            owners.push(0);
            continue;
        }
        let ask = &servers[j % servers.len()];
        let t0 = Instant::now();
        let url = loop {
            match http_get_json(ask.addr, &format!("/api/locate?channel={ch}")).await {
                Ok(v) if v["url"].is_string() => break v["url"].as_str().unwrap_or("").to_string(),
                r if t0.elapsed() > Duration::from_secs(10) => {
                    bail!("locating channel {ch} on node {}: {r:?}", ask.id)
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let addr = url_addr(&url)?;
        owners.push(
            servers
                .iter()
                .position(|s| s.addr == addr)
                .with_context(|| format!("channel {ch} is owned by an unknown node {url}"))?,
        );
    }
    Ok(owners)
}

pub fn bench(args: Args) -> Result<()> {
    if crate::util::rerun_in_release("bench-heartbeats")? {
        return Ok(());
    }
    if args.peers == 0 || args.seconds == 0 || args.nodes == 0 {
        bail!("--peers, --seconds and --nodes must be at least 1");
    }
    let n = args.nodes;
    let limit = raise_fd_limit(4 * args.peers as u64 + 1024)?;
    // This process holds one descriptor per peer (two while a redirected peer switches), each
    // server one per peer it holds.
    if limit < args.peers as u64 + 256 {
        bail!(
            "the open-files limit here is {limit} per process and cannot be raised; this \
             process and the server each need one descriptor per peer plus ~250: use --peers {} \
             or fewer",
            limit.saturating_sub(256)
        );
    }
    if n > 1 {
        crate::tools::ensure_etcd()?;
    }
    run(cargo().args(["build", "--release", "-p", "control-server"]))?;
    let bin = crate::build::target_dir()?.join("release/control-server");
    // One server: the demo channel, as always. A cluster: two channels per node (the demo and
    // looped copies of its clip), each DCM claimed by a node in turn.
    let channels: Vec<String> = if n == 1 {
        vec!["demo".into()]
    } else {
        std::iter::once("demo".to_string())
            .chain((2..=2 * n).map(|j| format!("bench{j}")))
            .collect()
    };
    let clip = repo_root().join("web/media/demo.mp4");
    let files: Vec<String> = channels[1..]
        .iter()
        .map(|c| format!("{c}={}", clip.display()))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // A real etcd on its own ports and data directory, killed by its PID when dropped.
        let etcd = if n > 1 {
            Some(e2e::cluster::Etcd::start().await.context("starting etcd")?)
        } else {
            None
        };
        let mut servers = Vec::with_capacity(n);
        for i in 1..=n {
            let id = format!("n{i}");
            let cluster = etcd.as_ref().map(|e| (e.url.as_str(), id.as_str()));
            servers.push(start_server(&bin, args.heartbeat_ms, cluster, &files)?);
        }
        wait_ready(&servers, &channels, n > 1).await?;
        let owners = claim_dcms(&servers, &channels).await?;
        let pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
        let addrs: Arc<Vec<SocketAddr>> = Arc::new(servers.iter().map(|s| s.addr).collect());
        let mut rss_idle = Vec::with_capacity(n);
        for &pid in &pids {
            rss_idle.push(proc_usage(pid).context("reading server /proc")?.1);
        }
        // The packet windows the nodes hold at that moment: they fill while the run goes on (a
        // per-channel cost, not a per-peer one), and every node holds every channel's.
        let mut windows_idle = Vec::with_capacity(n);
        for s in &servers {
            windows_idle.push(window_bytes(&node_stats(s.addr, &channels).await?));
        }
        let c = Arc::new(Counters::new(n));
        let connect_deadline = Duration::from_secs(30 + args.peers as u64 / 200);
        let stop = Instant::now() + connect_deadline + Duration::from_secs(args.seconds) + Duration::from_secs(2);
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        // Each channel's live edge, polled from its owner's stats API (what the peers' parents
        // would deliver).
        let edges: Vec<Arc<AtomicU64>> = channels.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let poller = {
            let edges = edges.clone();
            let polled: Vec<(SocketAddr, String)> = channels
                .iter()
                .zip(&owners)
                .map(|(ch, &o)| (addrs[o], format!("/api/channels/{ch}/stats")))
                .collect();
            tokio::spawn(async move {
                while Instant::now() < stop {
                    for ((addr, path), edge) in polled.iter().zip(&edges) {
                        if let Ok(v) = http_get_json(*addr, path).await {
                            if let Some(seq) = v["live_seq"].as_u64() {
                                edge.fetch_max(seq, Ordering::Relaxed);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        for (s, &pid) in servers.iter().zip(&pids) {
            let owned: Vec<&str> = channels
                .iter()
                .zip(&owners)
                .filter(|(_, &o)| addrs[o] == s.addr)
                .map(|(ch, _)| ch.as_str())
                .collect();
            eprintln!(
                "bench-heartbeats: node {} pid {pid} on {}, DCMs {owned:?}",
                s.id, s.addr
            );
        }
        eprintln!("bench-heartbeats: {} peers over {} channel(s), heartbeat every {} ms", args.peers, channels.len(), args.heartbeat_ms);
        let mut tasks = Vec::with_capacity(args.peers);
        for i in 0..args.peers {
            let c = c.clone();
            let sem = sem.clone();
            let hb = args.heartbeat_ms;
            let phase = (i as u64 * 7919) % u64::from(hb);
            // Channel i mod C; the first node asked is (i / C) mod N, the owner or another
            // node that redirects the peer there.
            let j = i % channels.len();
            let route = Route {
                nodes: addrs.clone(),
                first: (i / channels.len()) % n,
                channel: channels[j].clone(),
            };
            let edge = edges[j].clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sim_peer(route, hb, stop, c.clone(), phase, sem, edge).await {
                    if c.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("  peer {i}: {e:#}");
                    }
                }
            }));
            if i % 256 == 255 {
                tokio::task::yield_now().await;
            }
        }
        // Wait until everyone is connected (or the connect phase times out).
        let t_connect = Instant::now();
        while c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) < args.peers
            && t_connect.elapsed() < connect_deadline
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            eprint!(
                "\r  connected {}/{} ({} failed)",
                c.connected.load(Ordering::Relaxed),
                args.peers,
                c.failed.load(Ordering::Relaxed)
            );
        }
        eprintln!();
        let connected = c.connected.load(Ordering::Relaxed);
        // Settle one interval, then measure for `seconds`.
        tokio::time::sleep(Duration::from_millis(u64::from(args.heartbeat_ms) * 2)).await;
        let mut s0 = Vec::with_capacity(n);
        for s in &servers {
            s0.push(node_stats(s.addr, &channels).await?);
        }
        let mut ticks0 = Vec::with_capacity(n);
        for &pid in &pids {
            ticks0.push(proc_usage(pid).context("server /proc")?.0);
        }
        let (gen_ticks0, _) = proc_usage(std::process::id()).context("own /proc")?;
        let idle0 = machine_idle_ticks();
        let sent0 = c.sent.load(Ordering::Relaxed);
        let m0 = Instant::now();
        let mut peak_rss = vec![0u64; n];
        while m0.elapsed() < Duration::from_secs(args.seconds) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut total = 0;
            for (peak, &pid) in peak_rss.iter_mut().zip(&pids) {
                let (_, rss) = proc_usage(pid).unwrap_or((0, 0));
                *peak = (*peak).max(rss);
                total += rss;
            }
            eprintln!(
                "  t={:>3.0}s  sent {:>9}  server rss {:>6.1} MB",
                m0.elapsed().as_secs_f64(),
                c.sent.load(Ordering::Relaxed) - sent0,
                total as f64 / 1024.0
            );
        }
        let elapsed = m0.elapsed().as_secs_f64();
        let mut s1 = Vec::with_capacity(n);
        for s in &servers {
            s1.push(node_stats(s.addr, &channels).await?);
        }
        let mut usage1 = Vec::with_capacity(n);
        for &pid in &pids {
            usage1.push(proc_usage(pid).context("server /proc")?);
        }
        let (gen_ticks1, _) = proc_usage(std::process::id()).context("own /proc")?;
        let idle1 = machine_idle_ticks();
        let sent = c.sent.load(Ordering::Relaxed) - sent0;
        let hz = 100.0; // Linux USER_HZ
        // Per node, then the totals.
        let mut node_reports = Vec::with_capacity(n);
        let mut buckets = Vec::new();
        let mut buckets_since_start = Vec::new();
        let (mut applied, mut ticks, mut congestion, mut repairs) = (0u64, 0u64, 0u64, 0u64);
        let (mut rss_total, mut rss_idle_total, mut growth_total) = (0u64, 0u64, 0u64);
        let mut windows_growth_total = 0u64;
        for i in 0..n {
            let mut node_applied = 0;
            for (a, b) in s0[i].iter().zip(&s1[i]) {
                node_applied += grew(a, b, "heartbeats");
                congestion += grew(a, b, "congestion_events");
                repairs += grew(a, b, "repairs");
                add_buckets(&mut buckets, &bucket_diff(a, b));
                add_buckets(&mut buckets_since_start, &bucket_diff(&Value::Null, b));
            }
            let (ticks1, rss) = usage1[i];
            let node_ticks = ticks1 - ticks0[i];
            let growth = peak_rss[i].max(rss).saturating_sub(rss_idle[i]);
            let windows_growth = window_bytes(&s1[i]).saturating_sub(windows_idle[i]) / 1024;
            windows_growth_total += windows_growth;
            let peers = c.per_node[i].load(Ordering::Relaxed);
            applied += node_applied;
            ticks += node_ticks;
            rss_total += rss;
            rss_idle_total += rss_idle[i];
            growth_total += growth;
            let view = if n > 1 {
                http_get_json_as(servers[i].addr, "/api/operator/cluster", Some(OPERATOR_TOKEN))
                    .await
                    .unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            node_reports.push(json!({
                "node_id": servers[i].id,
                "peers": peers,
                "dcms": if n > 1 { view["owned"].clone() } else { json!(["demo"]) },
                "failovers": view["failovers"],
                "redirects": view["redirects"],
                "applied_per_s": node_applied as f64 / elapsed,
                "server_cpu_percent": node_ticks as f64 / hz / elapsed * 100.0,
                "server_cpu_us_per_heartbeat": node_ticks as f64 / hz * 1e6 / node_applied.max(1) as f64,
                "server_rss_mb": rss as f64 / 1024.0,
                "server_rss_idle_mb": rss_idle[i] as f64 / 1024.0,
                "server_bytes_per_peer": growth as f64 * 1024.0 / peers.max(1) as f64,
                "window_growth_mb": windows_growth as f64 / 1024.0,
                "server_bytes_per_peer_net_of_windows": growth.saturating_sub(windows_growth) as f64 * 1024.0 / peers.max(1) as f64,
            }));
        }
        let quantile = |b: &[u64], q| control_server::channel::ApplyHistogram::quantile_of(b, q);
        let cpu = ticks as f64 / hz / elapsed * 100.0;
        let gen_cpu = (gen_ticks1 - gen_ticks0) as f64 / hz / elapsed * 100.0;
        let idle = match (idle0, idle1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / hz / elapsed * 100.0),
            _ => None,
        };
        let per_peer_kib = growth_total as f64 / connected.max(1) as f64;
        let report = json!({
            "peers": args.peers,
            "connected": connected,
            "failed": c.failed.load(Ordering::Relaxed),
            "rate_limited": c.rate_limited.load(Ordering::Relaxed),
            "seconds": args.seconds,
            "heartbeat_ms": args.heartbeat_ms,
            "heartbeats_sent": sent,
            "heartbeats_applied": applied,
            "heartbeats_per_sec": applied as f64 / elapsed,
            "apply_ms": { "p50": quantile(&buckets, 0.5), "p99": quantile(&buckets, 0.99) },
            "apply_ms_since_start": { "p50": quantile(&buckets_since_start, 0.5), "p99": quantile(&buckets_since_start, 0.99) },
            "server_cpu_percent": cpu,
            "congestion_events": congestion,
            "repairs": repairs,
            "generator_cpu_percent": gen_cpu,
            "machine_idle_percent": idle,
            "server_rss_mb": rss_total as f64 / 1024.0,
            "server_rss_idle_mb": rss_idle_total as f64 / 1024.0,
            "server_kib_per_peer": per_peer_kib,
            // Issue 12: the servers' own CPU (user + system, kernel included, from their /proc
            // counters; the generator is not counted) per applied heartbeat, and their memory
            // per connected peer in bytes. With several nodes: over all of them, and per node
            // in `nodes`.
            "server_cpu_us_per_heartbeat": ticks as f64 / hz * 1e6 / applied.max(1) as f64,
            "server_bytes_per_peer": per_peer_kib * 1024.0,
            // The same without what the packet windows grew by meanwhile (KiB → MB).
            "window_growth_mb": windows_growth_total as f64 / 1024.0,
            "server_bytes_per_peer_net_of_windows": growth_total.saturating_sub(windows_growth_total) as f64 * 1024.0 / connected.max(1) as f64,
            "heartbeat_bytes_avg": c.bytes.load(Ordering::Relaxed) as f64 / c.sent.load(Ordering::Relaxed).max(1) as f64,
            "channels": channels.len(),
            "redirects_followed": c.redirects.load(Ordering::Relaxed),
            "nodes": node_reports,
        });
        println!();
        println!("| metric | value | target |");
        println!("|---|---|---|");
        println!("| peers connected | {connected} of {} | |", args.peers);
        println!("| heartbeats/s applied | {:.0} | ≥ 100000 at 20000 peers |", report["heartbeats_per_sec"].as_f64().unwrap_or(0.0));
        println!("| apply ms p50 / p99 | {} / {} | p99 ≤ 20 |", report["apply_ms"]["p50"], report["apply_ms"]["p99"]);
        println!("| server CPU | {cpu:.0} % (of one core) | |");
        println!(
            "| server CPU per heartbeat (kernel included) | {:.1} µs | ≤ 7 |",
            report["server_cpu_us_per_heartbeat"].as_f64().unwrap_or(0.0)
        );
        println!("| generator CPU (this process) | {gen_cpu:.0} % | |");
        if let Some(idle) = idle {
            println!("| machine idle | {idle:.0} % (of {} cores) | |", std::thread::available_parallelism().map_or(1, |n| n.get()));
        }
        println!(
            "| server memory per peer | {per_peer_kib:.1} KiB ({:.0} bytes) | ≤ 8 KiB (8192 bytes) |",
            per_peer_kib * 1024.0
        );
        println!(
            "| the same without the packet windows' growth ({:.1} MB) | {:.0} bytes | |",
            report["window_growth_mb"].as_f64().unwrap_or(0.0),
            report["server_bytes_per_peer_net_of_windows"].as_f64().unwrap_or(0.0)
        );
        println!("| congestion events / repairs during the run | {} / {} | 0 / 0 (all links healthy) |", report["congestion_events"], report["repairs"]);
        println!("| heartbeat size | {:.0} bytes (binary) | |", report["heartbeat_bytes_avg"].as_f64().unwrap_or(0.0));
        println!();
        println!("| node | DCMs | peers | applied/s | server CPU | µs per heartbeat | bytes per peer | without window growth |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in report["nodes"].as_array().into_iter().flatten() {
            let dcms: Vec<&str> = r["dcms"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            println!(
                "| {} | {} | {} | {:.0} | {:.0} % | {:.1} | {:.0} | {:.0} |",
                r["node_id"].as_str().unwrap_or("?"),
                dcms.join(", "),
                r["peers"],
                r["applied_per_s"].as_f64().unwrap_or(0.0),
                r["server_cpu_percent"].as_f64().unwrap_or(0.0),
                r["server_cpu_us_per_heartbeat"].as_f64().unwrap_or(0.0),
                r["server_bytes_per_peer"].as_f64().unwrap_or(0.0),
                r["server_bytes_per_peer_net_of_windows"].as_f64().unwrap_or(0.0),
            );
        }
        let text = serde_json::to_string_pretty(&report)?;
        match &args.json {
            Some(p) => {
                std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {}", p.display());
            }
            None => println!("{text}"),
        }
        for t in tasks {
            t.abort();
        }
        poller.abort();
        drop(servers);
        drop(etcd);
        Ok(())
    })
}
