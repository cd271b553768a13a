//! End-to-end HLS/CMAF pull: ffmpeg's HLS muxer writes a live CMAF playlist (`-hls_segment_type
//! fmp4`, in real time with `-re`) into a temporary directory, a small HTTP server in the test
//! serves it, the control server pulls it as channel `hls`, and four Chromium viewers play it
//! byte-exact. The HTTP server then stalls for 3 s (requests hang, as a stuck CDN's do): the
//! viewers must not stall, and the pull's retries must show in the operator's overview and in
//! `/metrics`. Run by `cargo xtask test` (which builds the wasm package first, installs ffmpeg
//! and sets `P2P_WEB_DIR`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use control_server::source::hls::{self, Phase, RenditionChoice};
use e2e::console::{ensure_only_expected, FAVICON_404, VIEWER_PAGE};
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use tokio::time::Instant;

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

const VIEWERS: usize = 4;
const STALL: Duration = Duration::from_secs(3);
const SECOND: Duration = Duration::from_secs(1);

/// The directory ffmpeg writes, served over HTTP; requests hang while a stall lasts.
struct Site {
    dir: PathBuf,
    stall_until: Mutex<Option<Instant>>,
    requests: AtomicU64,
}

async fn serve(State(site): State<Arc<Site>>, Path(name): Path<String>) -> Response {
    site.requests.fetch_add(1, Ordering::Relaxed);
    let until = *site.stall_until.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = until {
        tokio::time::sleep_until(t).await;
    }
    let safe = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !safe || name.starts_with('.') || name.ends_with(".tmp") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(site.dir.join(&name)).await {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// ffmpeg writing a live CMAF HLS stream (x264 + AAC, 1 s segments) into `dir` for `seconds`.
fn ffmpeg(dir: &std::path::Path, seconds: u32) -> Result<tokio::process::Child> {
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let args: Vec<String> = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=30",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        &seconds.to_string(),
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-pix_fmt",
        "yuv420p",
        "-b:v",
        "700k",
        "-g",
        "30",
        "-keyint_min",
        "30",
        "-sc_threshold",
        "0",
        "-c:a",
        "aac",
        "-b:a",
        "64k",
        "-f",
        "hls",
        "-hls_time",
        "1",
        "-hls_list_size",
        "6",
        "-hls_flags",
        "delete_segments+temp_file",
        "-hls_segment_type",
        "fmp4",
        "-hls_fmp4_init_filename",
        "init.mp4",
        "-hls_segment_filename",
        &d("seg%05d.m4s"),
        &d("live.m3u8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    tokio::process::Command::new("ffmpeg")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting ffmpeg (install it: apt-get install ffmpeg)")
}

/// GET on the control server, body as text.
async fn get_text(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    ensure!(text.starts_with("HTTP/1.1 200"), "GET {path}: {text}");
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn four_viewers_play_a_pulled_hls_stream_byte_exact_through_a_source_stall() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut encoder = ffmpeg(dir.path(), 75)?;
    let site = Arc::new(Site {
        dir: dir.path().to_path_buf(),
        stall_until: Mutex::new(None),
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/hls/{name}", get(serve))
        .with_state(site.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site_addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // ffmpeg lists a segment once it is complete: wait for three.
    let playlist = dir.path().join("live.m3u8");
    wait_until(
        "ffmpeg's first three segments",
        Duration::from_secs(20),
        Duration::from_millis(200),
        async || {
            let text = std::fs::read_to_string(&playlist).unwrap_or_default();
            let n = text.lines().filter(|l| l.ends_with(".m4s")).count();
            ensure!(n >= 3, "{n} segments listed");
            ensure!(text.contains("#EXT-X-MAP"), "no EXT-X-MAP: {text}");
            Ok(())
        },
    )
    .await?;

    let mut swarm = Swarm::start(web_dir()).await?;
    let url = format!("http://{site_addr}/hls/live.m3u8");
    let status = hls::start(&swarm.state, "hls", &url, RenditionChoice::default())?;
    swarm.channel = "hls".into();
    wait_until(
        "the pulled channel's first packets",
        Duration::from_secs(15),
        Duration::from_millis(200),
        async || {
            swarm
                .state
                .channel("hls")
                .and_then(|c| c.live_position())
                .with_context(|| format!("nothing published yet: {:?}", status.view()))
        },
    )
    .await?;
    let ch = swarm.state.channel("hls").context("channel")?;
    let (_, mime, _) = ch.init().context("init segment")?;
    println!("pulled channel: {mime}");
    ensure!(mime.contains("avc1") && mime.contains("mp4a"), "{mime}");

    for _ in 0..VIEWERS {
        swarm.add_viewer(2000, true).await?;
    }
    // Every viewer plays, byte-exact with what the origin cut.
    let before = wait_until(
        "every viewer to play more than 20 packets byte-exact",
        Duration::from_secs(25),
        SECOND,
        async || {
            let reports = swarm.all_stats().await?;
            for (i, r) in reports.iter().enumerate() {
                ensure!(
                    r.verified_count > 20 && r.playing && r.current_time > 1.0,
                    "viewer {i}: {} packets verified, playing {}, at {:.1} s",
                    r.verified_count,
                    r.playing,
                    r.current_time
                );
                ensure!(
                    swarm.matches_origin(r) == Some(true),
                    "viewer {i} bytes differ from the origin"
                );
            }
            Ok(reports)
        },
    )
    .await?;
    let stalls_before: Vec<u32> = before.iter().map(|r| r.stalls).collect();
    let retries_before = status.retries.load(Ordering::Relaxed);
    let segments_before = status.segments.load(Ordering::Relaxed);

    // The source's server stalls for 3 s: every request hangs until it ends.
    println!("stalling the HLS server for {STALL:?}");
    *site.stall_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + STALL);
    tokio::time::sleep(STALL).await;
    *site.stall_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    // The viewers play on, byte-exact, past what was cut when the source came back.
    let edge = swarm.latest_seq()?;
    let after = wait_until(
        "every viewer to play past the stall",
        Duration::from_secs(15),
        SECOND,
        async || {
            let reports = swarm.all_stats().await?;
            for (i, r) in reports.iter().enumerate() {
                let end = r.verified_first_seq.unwrap_or(0) + r.verified_count;
                ensure!(
                    end > edge + 40,
                    "viewer {i} verified up to {end}; {edge} was cut when the stall ended"
                );
                ensure!(
                    r.current_time > before[i].current_time + 5.0,
                    "viewer {i} video at {:.1} s, was {:.1} s before the stall",
                    r.current_time,
                    before[i].current_time
                );
                ensure!(
                    swarm.matches_origin(r) == Some(true),
                    "viewer {i} bytes differ after the stall"
                );
            }
            Ok(reports)
        },
    )
    .await?;
    let v = status.view();
    println!(
        "pull: {} segments, {} retries, {} polls, last error {:?}",
        v.segments, v.retries, v.polls, v.last_error
    );
    ensure!(v.phase == Phase::Following, "pull phase {:?}", v.phase);
    ensure!(
        v.segments > segments_before,
        "no segment published after the stall"
    );
    ensure!(
        v.retries > retries_before,
        "the stall caused no retry (request timeout): {v:?}"
    );
    // The operator sees the retries: the overview the dashboard shows, and /metrics.
    let overview: serde_json::Value = serde_json::from_str(
        &get_text(
            swarm.addr,
            &format!(
                "/api/operator/overview?token={}",
                swarm.state.operator_token()
            ),
        )
        .await?,
    )?;
    let pulled = overview["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "hls"))
        .context("hls channel in the overview")?;
    ensure!(
        pulled["pull"]["retries"].as_u64() >= Some(1),
        "overview: {pulled}"
    );
    let metrics = get_text(swarm.addr, "/metrics").await?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("p2p_pull_retries_total{channel=\"hls\""))
        .context("p2p_pull_retries_total for hls")?;
    ensure!(!line.ends_with(" 0"), "{line}");
    // And the dashboard's channel table says so.
    let dashboard = swarm
        .browser
        .new_page(&format!(
            "http://{}/dashboard?token={}",
            swarm.addr,
            swarm.state.operator_token()
        ))
        .await?;
    dashboard
        .wait_for(
            "/HLS pull following: [0-9,]+ segments, [1-9][0-9,]* retries/\
               .test(document.getElementById('channels').textContent)",
            Duration::from_secs(10),
        )
        .await
        .context("the dashboard never showed the pull's retries")?;
    ensure_only_expected("the dashboard", &dashboard.console_errors(), &[FAVICON_404])?;
    // No viewer stalled: the origin's cushion and the viewers' buffer absorbed the stall.
    let stalls: Vec<u32> = after.iter().map(|r| r.stalls).collect();
    println!("stalls before the source stall {stalls_before:?}, after {stalls:?}");
    ensure!(
        stalls.iter().all(|s| *s == 0),
        "viewers stalled: {stalls:?} (before the source stall: {stalls_before:?})"
    );
    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    swarm.shutdown().await;
    let _ = encoder.kill().await;
    Ok(())
}
