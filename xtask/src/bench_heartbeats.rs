//! `cargo xtask bench-heartbeats`: the real control server (release build, its own process)
//! under N simulated peers, tokio-tungstenite clients in this process on loopback, each joining
//! the demo channel and sending binary FIG. 9 heartbeats at the configured interval that report
//! healthy links (from the instructions and live-edge notices they receive). Reports sustained
//! heartbeats per second applied by the DCM, time from receipt to applied, server CPU and
//! server memory per connected peer.

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
    pub json: Option<PathBuf>,
}

/// Kills the server when the benchmark ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// Quantile `q` (ms, bucket upper edge) of the apply times recorded between two stats
/// readings: the connect phase (every peer joining at once) stays out of the figure.
fn window_quantile(s0: &Value, s1: &Value, q: f64) -> Option<f64> {
    let counts = |v: &Value| -> Vec<u64> {
        v["heartbeat_apply_us_buckets"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    let (a, b) = (counts(s0), counts(s1));
    let diff: Vec<u64> = b
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(a.get(i).copied().unwrap_or(0)))
        .collect();
    control_server::channel::ApplyHistogram::quantile_of(&diff, q)
}

/// Idle clock ticks of the whole machine, summed over its cores (`/proc/stat`).
fn machine_idle_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    // cpu  user nice system idle iowait ...
    cpu.split_whitespace().nth(4)?.parse().ok()
}

async fn http_get_json(addr: SocketAddr, path: &str) -> Result<Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
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

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicU64,
    bytes: AtomicU64,
    rate_limited: AtomicU64,
}

/// One simulated peer: joins, tracks its plan and the live edge, reports healthy links.
async fn sim_peer(
    addr: SocketAddr,
    hb_ms: u32,
    stop: Instant,
    c: Arc<Counters>,
    phase_ms: u64,
    connecting: Arc<tokio::sync::Semaphore>,
    shared_edge: Arc<AtomicU64>,
) -> Result<()> {
    // Bounded concurrent handshakes, released once welcomed.
    let mut permit = Some(connecting.acquire_owned().await?);
    // A small read buffer: tungstenite zeroes its whole read chunk on every read, and with the
    // default 128 KiB that memset dominated the simulated peers' CPU.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{addr}/ws"),
        Some(config),
        false,
    )
    .await?;
    let join = ClientMsg::Join {
        version: protocol::PROTOCOL_VERSION,
        channel: "demo".into(),
        upload_kbps: 2000,
        region: None,
        network: None,
        relay_token: None,
        companion: None,
        resume: None,
        connectivity: None,
        waypoint: None,
    };
    ws.send(Message::Text(serde_json::to_string(&join)?.into()))
        .await?;
    let mut me = None;
    let mut k = 4u32;
    let mut plan: Vec<SubstreamPlan> = Vec::new();
    let mut edge = 0u64;
    let mut seq = 0u64;
    let mut counted = false;
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
                        Ok(ServerMsg::Welcome { peer_id, substreams, live_seq, .. }) => {
                            me = Some(peer_id);
                            k = substreams;
                            edge = live_seq;
                            permit.take();
                            if !counted {
                                counted = true;
                                c.connected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
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
                let Some(id) = me else { continue };
                // The server refuses heartbeats closer than half an interval; a late tick
                // must not be followed by a catch-up burst.
                if last_sent.is_some_and(|t: Instant| t.elapsed() < Duration::from_millis(u64::from(hb_ms) * 6 / 10)) {
                    continue;
                }
                last_sent = Some(Instant::now());
                seq += 1;
                let hb = template.get_or_insert_with(|| healthy_heartbeat(id, k, &plan));
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

pub fn bench(args: Args) -> Result<()> {
    if crate::util::rerun_in_release("bench-heartbeats")? {
        return Ok(());
    }
    if args.peers == 0 || args.seconds == 0 {
        bail!("--peers and --seconds must be at least 1");
    }
    let limit = raise_fd_limit(4 * args.peers as u64 + 1024)?;
    if limit < args.peers as u64 + 256 {
        bail!(
            "the open-files limit here is {limit} per process and cannot be raised; this \
             process and the server each need one descriptor per peer plus ~250: use --peers {} \
             or fewer",
            limit.saturating_sub(256)
        );
    }
    run(cargo().args(["build", "--release", "-p", "control-server"]))?;
    let bin = crate::build::target_dir()?.join("release/control-server");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let server = Server(
        Command::new(&bin)
            .args([
                "--listen",
                &addr.to_string(),
                "--heartbeat-ms",
                &args.heartbeat_ms.to_string(),
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
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let pid = server.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The server is up when the demo channel has produced its first packet.
        let t0 = Instant::now();
        loop {
            if let Ok(v) = http_get_json(addr, "/api/channels/demo/stats").await {
                if v["live_seq"].is_u64() {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("control server did not come up on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, rss_idle_kib) = proc_usage(pid).context("reading server /proc")?;
        let c = Arc::new(Counters::default());
        let connect_deadline = Duration::from_secs(30 + args.peers as u64 / 200);
        let stop = Instant::now() + connect_deadline + Duration::from_secs(args.seconds) + Duration::from_secs(2);
        let sem = Arc::new(tokio::sync::Semaphore::new(256));
        // The live edge, polled from the stats API (what the peers' parents would deliver).
        let shared_edge = Arc::new(AtomicU64::new(0));
        let poller = {
            let shared_edge = shared_edge.clone();
            tokio::spawn(async move {
                while Instant::now() < stop {
                    if let Ok(v) = http_get_json(addr, "/api/channels/demo/stats").await {
                        if let Some(seq) = v["live_seq"].as_u64() {
                            shared_edge.fetch_max(seq, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        eprintln!("bench-heartbeats: {} peers, heartbeat every {} ms, server pid {pid} on {addr}", args.peers, args.heartbeat_ms);
        let mut tasks = Vec::with_capacity(args.peers);
        for i in 0..args.peers {
            let c = c.clone();
            let sem = sem.clone();
            let hb = args.heartbeat_ms;
            let phase = (i as u64 * 7919) % u64::from(hb);
            let edge = shared_edge.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sim_peer(addr, hb, stop, c.clone(), phase, sem, edge).await {
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
        let s0 = http_get_json(addr, "/api/channels/demo/stats").await?;
        let (ticks0, _) = proc_usage(pid).context("server /proc")?;
        let (gen_ticks0, _) = proc_usage(std::process::id()).context("own /proc")?;
        let idle0 = machine_idle_ticks();
        let sent0 = c.sent.load(Ordering::Relaxed);
        let m0 = Instant::now();
        let mut peak_rss = 0u64;
        while m0.elapsed() < Duration::from_secs(args.seconds) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (_, rss) = proc_usage(pid).unwrap_or((0, 0));
            peak_rss = peak_rss.max(rss);
            eprintln!(
                "  t={:>3.0}s  sent {:>9}  server rss {:>6.1} MB",
                m0.elapsed().as_secs_f64(),
                c.sent.load(Ordering::Relaxed) - sent0,
                rss as f64 / 1024.0
            );
        }
        let elapsed = m0.elapsed().as_secs_f64();
        let s1 = http_get_json(addr, "/api/channels/demo/stats").await?;
        let (ticks1, rss_kib) = proc_usage(pid).context("server /proc")?;
        let (gen_ticks1, _) = proc_usage(std::process::id()).context("own /proc")?;
        let idle1 = machine_idle_ticks();
        let sent = c.sent.load(Ordering::Relaxed) - sent0;
        let applied = s1["heartbeats"].as_u64().unwrap_or(0) - s0["heartbeats"].as_u64().unwrap_or(0);
        let hz = 100.0; // Linux USER_HZ
        let cpu = (ticks1 - ticks0) as f64 / hz / elapsed * 100.0;
        let gen_cpu = (gen_ticks1 - gen_ticks0) as f64 / hz / elapsed * 100.0;
        let idle = match (idle0, idle1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / hz / elapsed * 100.0),
            _ => None,
        };
        let per_peer_kib = (peak_rss.max(rss_kib).saturating_sub(rss_idle_kib)) as f64 / connected.max(1) as f64;
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
            "apply_ms": { "p50": window_quantile(&s0, &s1, 0.5), "p99": window_quantile(&s0, &s1, 0.99) },
            "apply_ms_since_start": { "p50": s1["heartbeat_apply_ms"]["p50"], "p99": s1["heartbeat_apply_ms"]["p99"] },
            "server_cpu_percent": cpu,
            "congestion_events": s1["congestion_events"].as_u64().unwrap_or(0).saturating_sub(s0["congestion_events"].as_u64().unwrap_or(0)),
            "repairs": s1["repairs"].as_u64().unwrap_or(0).saturating_sub(s0["repairs"].as_u64().unwrap_or(0)),
            "generator_cpu_percent": gen_cpu,
            "machine_idle_percent": idle,
            "server_rss_mb": rss_kib as f64 / 1024.0,
            "server_rss_idle_mb": rss_idle_kib as f64 / 1024.0,
            "server_kib_per_peer": per_peer_kib,
            // Issue 12: the server's own CPU (user + system, kernel included, from its /proc
            // counters; the generator is not counted) per applied heartbeat, and its memory
            // per connected peer in bytes.
            "server_cpu_us_per_heartbeat": (ticks1 - ticks0) as f64 / hz * 1e6 / applied.max(1) as f64,
            "server_bytes_per_peer": per_peer_kib * 1024.0,
            "heartbeat_bytes_avg": c.bytes.load(Ordering::Relaxed) as f64 / c.sent.load(Ordering::Relaxed).max(1) as f64,
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
        println!("| congestion events / repairs during the run | {} / {} | 0 / 0 (all links healthy) |", report["congestion_events"], report["repairs"]);
        println!("| heartbeat size | {:.0} bytes (binary) | |", report["heartbeat_bytes_avg"].as_f64().unwrap_or(0.0));
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
        drop(server);
        Ok(())
    })
}
