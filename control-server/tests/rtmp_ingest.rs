//! RTMP ingest with a real publisher (ffmpeg): H.264 + AAC becomes a live channel with both
//! tracks; a wrong key, a second publisher, an unsupported codec and garbage are refused
//! without touching the running channel; a publisher that comes back resumes its channel.

mod common;
mod rtmp_client;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use control_server::config::Config;
use rtmp_client as client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const FFMPEG: &str = "/usr/bin/ffmpeg";
const KEY: &str = "sekrit";

fn have_ffmpeg() -> bool {
    if Path::new(FFMPEG).exists() {
        return true;
    }
    eprintln!("SKIPPED: {FFMPEG} is missing (cargo xtask test installs it)");
    false
}

async fn start() -> (SocketAddr, control_server::AppState, SocketAddr) {
    let (addr, state) = start_server(Config {
        ingest_key: Some(KEY.into()),
        ..Config::default()
    })
    .await;
    let rtmp =
        control_server::source::rtmp::listen("127.0.0.1:0".parse().expect("addr"), state.clone())
            .await
            .expect("rtmp listener");
    (addr, state, rtmp.local_addr)
}

/// ffmpeg publishing a test pattern (854x480, 30 fps, keyframe every 2 s, 1.5 Mbit/s) and a
/// 440 Hz tone (AAC, 48 kHz) for `seconds` to `url`.
fn publish(url: &str, seconds: u32, video_codec: &[&str]) -> Child {
    let mut cmd = Command::new(FFMPEG);
    cmd.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=854x480:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(video_codec)
        .args(["-c:a", "aac", "-b:a", "128k"])
        .args(["-t", &seconds.to_string(), "-f", "flv", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().expect("spawn ffmpeg")
}

const X264: &[&str] = &[
    "-c:v",
    "libx264",
    "-preset",
    "veryfast",
    "-tune",
    "zerolatency",
    "-g",
    "60",
    "-b:v",
    "1500k",
];

/// Waits for ffmpeg to exit (within `limit`): its success and what it printed.
async fn outcome(mut child: Child, limit: Duration) -> (bool, String) {
    let mut err = String::new();
    let mut stderr = child.stderr.take().expect("stderr");
    let status = tokio::time::timeout(limit, async {
        let _ = stderr.read_to_string(&mut err).await;
        child.wait().await
    })
    .await;
    match status {
        Ok(Ok(s)) => (s.success(), err),
        _ => {
            let _ = child.kill().await;
            (
                false,
                format!("ffmpeg still running after {limit:?}: {err}"),
            )
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ffmpeg_publishes_h264_and_aac_over_rtmp() {
    if !have_ffmpeg() {
        return;
    }
    let (_addr, state, rtmp) = start().await;
    let ffmpeg = publish(&format!("rtmp://{rtmp}/live/cam1?key={KEY}"), 5, X264);
    wait_for("the channel", Duration::from_secs(10), || {
        state.channel("cam1").is_some()
    })
    .await;
    let ch = state.channel("cam1").expect("channel");
    wait_for("two keyframe fragments", Duration::from_secs(15), || {
        ch.live_position()
            .is_some_and(|(start, latest)| latest > start)
    })
    .await;
    let (init, mime, _) = ch.init().expect("init segment");
    assert!(
        mime.starts_with(r#"video/mp4; codecs="avc1.64"#) && mime.ends_with(r#", mp4a.40.2""#),
        "{mime}"
    );
    let (parsed, _) = control_server::origin::parse_file(&init).expect("init parses");
    assert_eq!(parsed.timescale, 90_000);
    let (ok, err) = outcome(ffmpeg, Duration::from_secs(20)).await;
    assert!(ok, "ffmpeg failed: {err}");
    wait_for("the source to detach", Duration::from_secs(5), || {
        !ch.source_attached.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let (_, latest) = ch.live_position().expect("position");
    // 5 s at 1.5 Mbit/s (about 900 kB) in packets of at most 16 kB.
    assert!(latest > 40, "only {latest} packets");
}

#[tokio::test]
async fn wrong_or_missing_key_is_refused_at_publish() {
    if !have_ffmpeg() {
        return;
    }
    let (_addr, state, rtmp) = start().await;
    for url in [
        format!("rtmp://{rtmp}/live/cam2?key=nope"),
        format!("rtmp://{rtmp}/live/cam2"),
    ] {
        let (ok, err) = outcome(publish(&url, 3, X264), Duration::from_secs(20)).await;
        assert!(!ok, "ffmpeg was let in at {url}");
        assert!(
            err.contains("stream key"),
            "ffmpeg should print the reason: {err}"
        );
    }
    assert!(
        state.channel("cam2").is_none(),
        "a refused publisher created a channel"
    );
}

#[tokio::test]
async fn a_second_publisher_is_refused_and_the_first_keeps_going() {
    if !have_ffmpeg() {
        return;
    }
    let (_addr, state, rtmp) = start().await;
    let url = format!("rtmp://{rtmp}/live/cam3?key={KEY}");
    let first = publish(&url, 8, X264);
    wait_for("the first fragments", Duration::from_secs(15), || {
        state
            .channel("cam3")
            .and_then(|c| c.live_position())
            .is_some()
    })
    .await;
    let ch = state.channel("cam3").expect("channel");
    let (ok, err) = outcome(publish(&url, 3, X264), Duration::from_secs(20)).await;
    assert!(!ok, "a second publisher was let in");
    assert!(err.contains("already has a live source"), "{err}");
    let before = ch.live_position().expect("position").1;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        ch.live_position().expect("position").1 > before,
        "the first publisher stopped"
    );
    let (ok, err) = outcome(first, Duration::from_secs(20)).await;
    assert!(ok, "the first publisher failed: {err}");
}

#[tokio::test]
async fn an_unsupported_codec_is_refused_by_name() {
    if !have_ffmpeg() {
        return;
    }
    let (_addr, state, rtmp) = start().await;
    // FLV's Sorenson H.263 (codec id 2).
    let ffmpeg = publish(
        &format!("rtmp://{rtmp}/live/cam4?key={KEY}"),
        3,
        &["-c:v", "flv1"],
    );
    let (ok, err) = outcome(ffmpeg, Duration::from_secs(20)).await;
    assert!(!ok, "an H.263 stream was taken");
    assert!(
        err.contains("video codec 7 (H.264) only; got codec id 2 (Sorenson H.263)"),
        "{err}"
    );
    let ch = state.channel("cam4").expect("created at publish");
    assert!(ch.init().is_none(), "no init segment from a refused stream");
    assert!(!ch.source_attached.load(std::sync::atomic::Ordering::SeqCst));
    // H.264 with MP3 audio: refused from the stream's metadata, before any media is cut.
    let mut cmd = Command::new(FFMPEG);
    cmd.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(X264)
        .args(["-c:a", "libmp3lame", "-t", "3", "-f", "flv"])
        .arg(format!("rtmp://{rtmp}/live/cam7?key={KEY}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (ok, err) = outcome(cmd.spawn().expect("ffmpeg"), Duration::from_secs(20)).await;
    assert!(!ok, "MP3 audio was taken");
    assert!(
        err.contains("audio format 10 (AAC) only; got format 2 (MP3)"),
        "{err}"
    );
    let ch = state.channel("cam7").expect("created at publish");
    assert!(
        ch.init().is_none(),
        "nothing published from a refused stream"
    );
    // The dashboard's row and /metrics' counter name the codec refusals.
    use control_server::source::rtmp::Reason;
    assert_eq!(state.rtmp.refusals(Reason::Codec), 2);
    assert_eq!(state.rtmp.dropped(), 0, "a refused stream is not a drop");
    let row = state.rtmp.channel("cam7").expect("cam7's RTMP row");
    assert!(!row.publishing);
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("got format 2 (MP3)")),
        "{row:?}"
    );
}

#[tokio::test]
async fn garbage_and_a_publisher_cut_mid_tag_leave_other_channels_alone() {
    let (_addr, state, rtmp) = start().await;
    let demo = state.channel("demo").expect("demo");
    let before = demo.live_position();
    // Not an RTMP handshake at all.
    let mut s = tokio::net::TcpStream::connect(rtmp).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(12), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a garbage connection open");
    assert_eq!(
        state.rtmp.failed_connections(),
        1,
        "the garbage connection is counted"
    );
    // A valid handshake start (C0 + C1), then the connection drops mid-handshake.
    let mut s = tokio::net::TcpStream::connect(rtmp).await.expect("connect");
    let mut c1 = vec![3u8];
    c1.extend(std::iter::repeat_n(7u8, 1536));
    s.write_all(&c1[..700]).await.expect("write");
    drop(s);
    if have_ffmpeg() {
        // A publisher killed mid-stream: the channel keeps its window.
        let mut ffmpeg = publish(&format!("rtmp://{rtmp}/live/cam5?key={KEY}"), 20, X264);
        wait_for("fragments", Duration::from_secs(15), || {
            state
                .channel("cam5")
                .and_then(|c| c.live_position())
                .is_some()
        })
        .await;
        ffmpeg.kill().await.expect("kill");
        let ch = state.channel("cam5").expect("channel");
        wait_for("the source to detach", Duration::from_secs(5), || {
            !ch.source_attached.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        assert!(ch.live_position().is_some(), "the window was lost");
        assert!(ch.init().is_some());
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(demo.live_position() > before, "the demo channel stopped");
}

#[tokio::test]
async fn a_publisher_that_reconnects_resumes_its_channel() {
    if !have_ffmpeg() {
        return;
    }
    let (_addr, state, rtmp) = start().await;
    let url = format!("rtmp://{rtmp}/live/cam6?key={KEY}");
    let (ok, err) = outcome(publish(&url, 3, X264), Duration::from_secs(20)).await;
    assert!(ok, "{err}");
    let ch = state.channel("cam6").expect("channel");
    wait_for("the source to detach", Duration::from_secs(5), || {
        !ch.source_attached.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let (init1, _, _) = ch.init().expect("init");
    let (_, latest1) = ch.live_position().expect("position");
    let (ok, err) = outcome(publish(&url, 3, X264), Duration::from_secs(20)).await;
    assert!(ok, "the publisher could not come back: {err}");
    let (init2, _, _) = ch.init().expect("init");
    assert_eq!(
        init1, init2,
        "same encoder settings: the init segment is unchanged"
    );
    let (start2, latest2) = ch.live_position().expect("position");
    assert!(
        latest2 > latest1 + 20,
        "packet numbers continue: {latest1} → {latest2}"
    );
    assert!(
        start2 > latest1,
        "joiners start in the new connection's media"
    );
}

#[tokio::test]
async fn a_publisher_cut_mid_tag_keeps_its_channel_and_can_come_back() {
    let (_addr, state, rtmp) = start().await;
    let url = format!("cam8?key={KEY}");
    let mut p = client::Publisher::publish(rtmp, &url)
        .await
        .expect("publish");
    p.video(0, client::avc_sequence_header()).await;
    client::send_seconds(&mut p, 0, 3).await;
    let ch = state.channel("cam8").expect("channel");
    wait_for("fragments", Duration::from_secs(5), || {
        ch.live_position().is_some_and(|(_, latest)| latest > 10)
    })
    .await;
    // Half of a keyframe's RTMP message, then the connection drops.
    let bytes = p.video_bytes(3000, client::picture(true, 20_000));
    p.socket
        .write_all(&bytes[..bytes.len() / 2])
        .await
        .expect("write");
    drop(p);
    wait_for("the source to detach", Duration::from_secs(5), || {
        !ch.source_attached.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let (_, latest) = ch.live_position().expect("the window is kept");
    let init = ch.init().expect("the init segment is kept");
    // The publisher comes back: accepted, packets continue, same init segment.
    let mut p = client::Publisher::publish(rtmp, &url)
        .await
        .expect("publish again");
    p.video(0, client::avc_sequence_header()).await;
    client::send_seconds(&mut p, 0, 3).await;
    wait_for("new fragments", Duration::from_secs(5), || {
        ch.live_position().is_some_and(|(_, l)| l > latest + 10)
    })
    .await;
    assert_eq!(ch.init().expect("init").0, init.0, "unchanged init segment");
}

#[tokio::test]
async fn garbage_after_publishing_closes_only_that_connection() {
    let (_addr, state, rtmp) = start().await;
    let mut p = client::Publisher::publish(rtmp, &format!("cam9?key={KEY}"))
        .await
        .expect("publish");
    p.video(0, client::avc_sequence_header()).await;
    client::send_seconds(&mut p, 0, 2).await;
    let ch = state.channel("cam9").expect("channel");
    wait_for("fragments", Duration::from_secs(5), || {
        ch.live_position().is_some()
    })
    .await;
    // Chunk headers of format 3 on chunk streams nobody opened, and worse.
    let _ = p.socket.write_all(&[0xff; 8192]).await;
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match p.socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept a garbage-sending publisher"
    );
    wait_for("the source to detach", Duration::from_secs(5), || {
        !ch.source_attached.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    assert!(ch.init().is_some() && ch.live_position().is_some());
    let demo = state.channel("demo").expect("demo");
    let before = demo.live_position();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(demo.live_position() > before, "the demo channel stopped");
}

#[tokio::test]
async fn a_second_synthetic_publisher_is_refused_with_the_reason() {
    let (_addr, _state, rtmp) = start().await;
    let url = format!("cam10?key={KEY}");
    let _first = client::Publisher::publish(rtmp, &url)
        .await
        .expect("publish");
    let second = client::Publisher::publish(rtmp, &url).await;
    let err = second.err().expect("refused");
    assert!(err.contains("already has a live source"), "{err}");
    let bad = client::Publisher::publish(rtmp, "bad name!?key=sekrit").await;
    assert!(bad.err().expect("refused").contains("invalid channel name"));
}
