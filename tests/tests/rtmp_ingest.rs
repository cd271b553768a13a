//! End-to-end, RTMP ingest (issue 14): ffmpeg publishes H.264 + AAC over RTMP as a broadcaster
//! would (854x480, 1.5 Mbit/s, keyframe every 2 s); four Chromium viewers play it with sound,
//! byte-exact with what the origin cut; the publisher is killed and comes back 5 s later, and
//! the same pages (no reload) play on. Run by `cargo xtask test`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use control_server::config::Config;
use control_server::AppState;
use e2e::cdp::{Browser, LaunchOptions, Page, PageOptions};
use e2e::console::{ensure_only_expected, VIEWER_PAGE};
use e2e::wait::wait_until;
use protocol::report::PeerReport;
use tokio::process::{Child, Command};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

const FFMPEG: &str = "/usr/bin/ffmpeg";
const KEY: &str = "e2e-key";
const CHANNEL: &str = "studio";
const VIEWERS: usize = 4;
const SECOND: Duration = Duration::from_secs(1);

/// What a broadcaster's encoder sends: x264 + AAC in FLV over RTMP, in real time.
fn publish(rtmp: SocketAddr) -> Result<Child> {
    Command::new(FFMPEG)
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=854x480:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-tune",
            "zerolatency",
        ])
        .args([
            "-g", "60", "-b:v", "1500k", "-maxrate", "1500k", "-bufsize", "3000k",
        ])
        .args(["-c:a", "aac", "-b:a", "128k", "-t", "120", "-f", "flv"])
        .arg(format!("rtmp://{rtmp}/live/{CHANNEL}?key={KEY}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {FFMPEG}"))
}

async fn stats(page: &Page) -> Result<PeerReport> {
    let json = page.eval("JSON.stringify(window.p2p.stats())").await?;
    let text = json.as_str().context("stats are not a string")?;
    Ok(serde_json::from_str(text)?)
}

/// Audio bytes the page's `<video>` has decoded (Chromium's `webkitAudioDecodedByteCount`):
/// stays 0 when the stream has no audio track or the MediaSource was given none.
async fn audio_decoded(page: &Page) -> Result<u64> {
    let v = page
        .eval("document.getElementById('video').webkitAudioDecodedByteCount")
        .await?;
    v.as_u64()
        .with_context(|| format!("webkitAudioDecodedByteCount is {v}"))
}

fn matches_origin(state: &AppState, r: &PeerReport) -> Option<bool> {
    let first = r.verified_first_seq?;
    if r.verified_count == 0 {
        return None;
    }
    let origin = state
        .channel(CHANNEL)?
        .range_hash(first, r.verified_count)?;
    Some(origin.hex() == r.verified_hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn rtmp_publisher_plays_with_sound_in_four_viewers_and_survives_a_restart() -> Result<()> {
    let web = web_dir();
    if !web.join("pkg/peer.js").is_file() {
        bail!(
            "{} has no built wasm package: run `cargo xtask test`",
            web.display()
        );
    }
    ensure!(
        std::path::Path::new(FFMPEG).exists(),
        "{FFMPEG} is missing (cargo xtask test installs it)"
    );
    let state = AppState::new(Config {
        web_dir: web,
        ingest_key: Some(KEY.into()),
        ..Config::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = control_server::app(state.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let rtmp = control_server::source::rtmp::listen("127.0.0.1:0".parse()?, state.clone()).await?;
    let mut ffmpeg = publish(rtmp.local_addr)?;
    wait_until(
        "the RTMP channel's first fragments",
        Duration::from_secs(15),
        Duration::from_millis(100),
        async || {
            state
                .channel(CHANNEL)
                .and_then(|c| c.live_position())
                .context("nothing cut yet")
        },
    )
    .await?;
    let (_, mime, _) = state
        .channel(CHANNEL)
        .and_then(|c| c.init())
        .context("no init segment")?;
    ensure!(
        mime.contains("avc1.") && mime.contains("mp4a.40.2"),
        "the origin's MediaSource type lacks a track: {mime}"
    );

    let browser = Browser::launch(LaunchOptions::default()).await?;
    let mut pages = Vec::new();
    for _ in 0..VIEWERS {
        let url = format!("http://{addr}/?channel={CHANNEL}&upload=4000&decode=1");
        let page = browser
            .new_page_with(&url, PageOptions { new_window: true })
            .await?;
        page.wait_for("window.p2p !== undefined", Duration::from_secs(20))
            .await
            .with_context(|| format!("viewer page did not start: {:?}", page.console_errors()))?;
        // Survives only if the page is never reloaded.
        page.eval("window.__sameDocument = true").await?;
        pages.push(page);
    }

    // Every viewer plays byte-exact, with sound.
    let check = async |what: &str, min_time: &[f64]| -> Result<Vec<f64>> {
        wait_until(what, Duration::from_secs(20), SECOND, async || {
            let mut times = Vec::new();
            for (i, page) in pages.iter().enumerate() {
                let r = stats(page).await?;
                ensure!(
                    r.verified_count > 20,
                    "viewer {i} verified {}: {r:?}",
                    r.verified_count
                );
                ensure!(
                    matches_origin(&state, &r) == Some(true),
                    "viewer {i}'s bytes differ from the origin's"
                );
                ensure!(r.decoding, "viewer {i} does not decode");
                ensure!(
                    r.current_time > min_time[i],
                    "viewer {i} at {:.1} s, waiting for {:.1} s",
                    r.current_time,
                    min_time[i]
                );
                let audio = audio_decoded(page).await?;
                ensure!(audio > 0, "viewer {i} decoded no audio");
                times.push(r.current_time);
            }
            Ok(times)
        })
        .await
    };
    let started = check(
        "every viewer to play byte-exact with sound",
        &[0.0; VIEWERS],
    )
    .await?;
    let playing = check(
        "every viewer's video to advance by 2 s",
        &started.iter().map(|t| t + 2.0).collect::<Vec<_>>(),
    )
    .await?;

    // The publisher drops out (killed, as a crashed encoder or a lost uplink) and comes back
    // after 5 s.
    ffmpeg.kill().await?;
    let channel = state.channel(CHANNEL).context("channel")?;
    wait_until(
        "the origin to notice the publisher left",
        Duration::from_secs(5),
        Duration::from_millis(100),
        async || {
            ensure!(!channel
                .source_attached
                .load(std::sync::atomic::Ordering::SeqCst));
            Ok(())
        },
    )
    .await?;
    let latest_before = channel.live_position().context("position")?.1;
    tokio::time::sleep(5 * SECOND).await;
    // By now the viewers have played all they had (their buffer is shorter than the gap):
    // whatever they play from here on comes from the returning publisher.
    let mut stalled_at = Vec::new();
    for page in &pages {
        let r = stats(page).await?;
        stalled_at.push(r.current_time);
    }
    let mut ffmpeg = publish(rtmp.local_addr)?;
    wait_until(
        "the returning publisher's fragments",
        Duration::from_secs(15),
        Duration::from_millis(100),
        async || {
            let latest = channel.live_position().context("position")?.1;
            ensure!(latest > latest_before + 10, "latest packet {latest}");
            Ok(())
        },
    )
    .await?;
    // The same pages play on past where they were, byte-exact, with sound.
    let resumed = check(
        "every viewer to play on after the publisher came back",
        &stalled_at.iter().map(|t| t + 3.0).collect::<Vec<_>>(),
    )
    .await?;
    for (i, page) in pages.iter().enumerate() {
        let same = page.eval("window.__sameDocument === true").await?;
        ensure!(
            same.as_bool() == Some(true),
            "viewer {i}'s page was reloaded"
        );
    }
    for (i, page) in pages.iter().enumerate() {
        let r = stats(page).await?;
        eprintln!(
            "rtmp_ingest: viewer {i}: {} kB from peers, {} kB from the origin, {} stalls, \
             audio {} B decoded",
            r.bytes_from_peers / 1000,
            r.bytes_from_origin / 1000,
            r.stalls,
            audio_decoded(page).await?
        );
    }
    eprintln!(
        "rtmp_ingest: started at {started:.1?} s, {playing:.1?} s before the publisher left, \
         {stalled_at:.1?} s when it came back, {resumed:.1?} s after"
    );
    let errors: Vec<String> = pages
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.console_errors()
                .into_iter()
                .map(move |e| format!("viewer {i}: {e}"))
        })
        .collect();
    ensure_only_expected("the viewer pages", &errors, VIEWER_PAGE)?;

    ffmpeg.kill().await?;
    for page in pages {
        page.close().await?;
    }
    drop(browser);
    rtmp.abort();
    server.abort();
    Ok(())
}
