//! HLS/CMAF pull against a tiny live HLS server in the test: the demo clip's fragments served
//! as the segments of a sliding live window that the test moves forward (or back) itself.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::*;
use control_server::config::Config;
use control_server::source::hls::{self, Phase, PullStatus, RenditionChoice};
use control_server::AppState;
use tokio::io::AsyncWriteExt;

/// What the test's HLS server serves.
struct Live {
    init: Vec<u8>,
    /// Segment `seq` is `segments[seq % len]`.
    segments: Vec<Vec<u8>>,
    durations: Vec<f64>,
    /// The playlist lists `first..end`.
    first: u64,
    end: u64,
    /// Requests answered 404 before the server answers again (playlist and segments).
    fail_next: u32,
    /// Segments answered with garbage instead of their bytes.
    garbage: Vec<u64>,
    /// Serve the segments as MPEG-TS (no EXT-X-MAP, `.ts` names).
    transport_stream: bool,
    /// Paths requested, in order.
    log: Vec<String>,
}

type Shared = Arc<Mutex<Live>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Live> {
    s.lock().expect("test server state")
}

impl Live {
    fn demo() -> Self {
        let (init, fragments) =
            control_server::origin::parse_file(control_server::DEMO_CLIP).expect("demo clip");
        let ts = f64::from(init.timescale);
        Live {
            init: init.bytes,
            durations: fragments.iter().map(|f| f.duration as f64 / ts).collect(),
            segments: fragments.into_iter().map(|f| f.bytes).collect(),
            first: 0,
            end: 4,
            fail_next: 0,
            garbage: Vec::new(),
            transport_stream: false,
            log: Vec::new(),
        }
    }

    fn playlist(&self) -> String {
        let target = self.durations.iter().fold(1.0f64, |a, b| a.max(*b)).ceil();
        let mut s = format!(
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:{}\n",
            self.first
        );
        if !self.transport_stream {
            s.push_str("#EXT-X-MAP:URI=\"init.mp4\"\n");
        }
        let ext = if self.transport_stream { "ts" } else { "m4s" };
        for seq in self.first..self.end {
            let d = self.durations[seq as usize % self.durations.len()];
            s.push_str(&format!("#EXTINF:{d:.3},\nseg{seq}.{ext}\n"));
        }
        s
    }

    fn segment(&self, seq: u64) -> Vec<u8> {
        if self.transport_stream {
            let mut ts = vec![0u8; 188 * 4];
            for p in ts.chunks_mut(188) {
                p[0] = 0x47;
            }
            return ts;
        }
        if self.garbage.contains(&seq) {
            return b"\0\0\0\x10junkjunkjunkjunk not an mp4 box".to_vec();
        }
        self.segments[seq as usize % self.segments.len()].clone()
    }
}

async fn serve_path(State(live): State<Shared>, Path(name): Path<String>) -> Response {
    let mut l = lock(&live);
    l.log.push(name.clone());
    if l.fail_next > 0 {
        l.fail_next -= 1;
        return StatusCode::NOT_FOUND.into_response();
    }
    if name == "live.m3u8" {
        return l.playlist().into_response();
    }
    if name == "master.m3u8" {
        return "#EXTM3U\n\
                #EXT-X-STREAM-INF:BANDWIDTH=2000000,RESOLUTION=1280x720\nlive.m3u8\n\
                #EXT-X-STREAM-INF:BANDWIDTH=300000,RESOLUTION=320x180\nlow.m3u8\n"
            .into_response();
    }
    if name == "init.mp4" {
        return l.init.clone().into_response();
    }
    let seq = name
        .strip_prefix("seg")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<u64>().ok());
    match seq {
        Some(seq) if seq >= l.first && seq < l.end => l.segment(seq).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_hls(live: Live) -> (SocketAddr, Shared) {
    let shared: Shared = Arc::new(Mutex::new(live));
    let app = Router::new()
        .route("/hls/{name}", get(serve_path))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, shared)
}

/// Moves the live window forward by one segment (the oldest leaves once there are 6).
fn advance(live: &Shared) {
    let mut l = lock(live);
    l.end += 1;
    if l.end - l.first > 6 {
        l.first += 1;
    }
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn pull(state: &AppState, channel: &str, hls: SocketAddr) -> Arc<PullStatus> {
    hls::start(
        state,
        channel,
        &format!("http://{hls}/hls/live.m3u8"),
        RenditionChoice::default(),
    )
    .expect("pull starts")
}

/// The segments requested, in order.
fn segment_requests(live: &Shared) -> Vec<String> {
    lock(live)
        .log
        .iter()
        .filter(|p| p.starts_with("seg"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn segments_are_published_once_each_in_order() {
    let (_addr, state) = start_server(Config::default()).await;
    let (hls_addr, live) = start_hls(Live::demo()).await;
    let status = pull(&state, "pulled", hls_addr);
    // The first load takes the last four of 0..4 (`START_SEGMENTS`): all of them.
    wait_for("the first segments", 10, || {
        status.segments.load(Ordering::Relaxed) >= 3
    })
    .await;
    for _ in 0..5 {
        advance(&live);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    wait_for("every segment", 10, || {
        status.segments.load(Ordering::Relaxed) == 9
    })
    .await;
    // A few more polls: nothing is fetched twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expected: Vec<String> = (0..9).map(|s| format!("seg{s}.m4s")).collect();
    assert_eq!(segment_requests(&live), expected);
    let v = status.view();
    assert_eq!(v.phase, Phase::Following);
    assert_eq!(v.segments, 9);
    assert_eq!(v.last_segment_seq, Some(8));
    assert_eq!(v.retries, 0);
    let l = lock(&live);
    let bytes: usize = l.init.len() + (0..9).map(|s| l.segment(s).len()).sum::<usize>();
    assert_eq!(v.bytes, bytes as u64);
    assert_eq!(l.log.iter().filter(|p| *p == "init.mp4").count(), 1);
    let ch = state.channel("pulled").expect("channel");
    let (init, mime, _) = ch.init().expect("init segment");
    assert_eq!(&init[..], &l.init[..]);
    assert!(mime.starts_with("video/mp4"), "{mime}");
    assert!(ch.live_position().is_some());
    assert!(ch.source_attached.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_404_then_recovery_is_counted_as_retries_and_loses_nothing() {
    let (addr, state) = start_server(Config::default()).await;
    let (hls_addr, live) = start_hls(Live::demo()).await;
    lock(&live).fail_next = 3;
    let status = pull(&state, "flaky", hls_addr);
    wait_for("the first segments", 15, || {
        status.segments.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert_eq!(status.retries.load(Ordering::Relaxed), 3);
    let err = status.view().last_error.expect("last error");
    assert!(err.contains("HTTP 404"), "{err}");
    // Now a segment 404s twice while the window moves on.
    advance(&live);
    lock(&live).fail_next = 0;
    tokio::time::sleep(Duration::from_millis(100)).await;
    lock(&live).fail_next = 2;
    advance(&live);
    wait_for("the segments after the outage", 15, || {
        status.segments.load(Ordering::Relaxed) == 6
    })
    .await;
    assert_eq!(status.retries.load(Ordering::Relaxed), 5);
    assert_eq!(status.phase(), Phase::Following);
    // Each segment was published once, in order.
    let mut published: Vec<String> = segment_requests(&live);
    published.dedup();
    assert_eq!(
        published,
        (0..6).map(|s| format!("seg{s}.m4s")).collect::<Vec<_>>()
    );
    // The dashboard's JSON and /metrics show the retries.
    let text = get_text(addr, "/metrics").await;
    assert!(
        text.contains("p2p_pull_retries_total{channel=\"flaky\",region=\"default\"} 5"),
        "{text}"
    );
    assert!(text.contains("p2p_pull_segments_total{channel=\"flaky\",region=\"default\"} 6"));
    let overview = get_text(
        addr,
        &format!("/api/operator/overview?token={}", state.operator_token()),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&overview).expect("overview JSON");
    let ch = v["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "flaky"))
        .expect("channel in overview");
    assert_eq!(ch["pull"]["retries"], 5, "{ch}");
    assert_eq!(ch["pull"]["phase"], "following");
}

#[tokio::test]
async fn transport_stream_is_refused_with_the_way_to_cmaf() {
    let (_addr, state) = start_server(Config::default()).await;
    let mut l = Live::demo();
    l.transport_stream = true;
    let (hls_addr, _live) = start_hls(l).await;
    let status = pull(&state, "ts", hls_addr);
    wait_for("the refusal", 10, || status.phase() == Phase::Refused).await;
    let err = status.view().last_error.expect("reason");
    assert!(err.contains("MPEG-TS"), "{err}");
    assert!(err.contains("-hls_segment_type fmp4"), "{err}");
    assert_eq!(status.segments.load(Ordering::Relaxed), 0);
    let ch = state.channel("ts").expect("channel");
    assert!(!ch.source_attached.load(Ordering::Relaxed));
    assert!(ch.init().is_none());
}

#[tokio::test]
async fn time_going_backwards_is_logged_and_ignored() {
    let (_addr, state) = start_server(Config::default()).await;
    let mut l = Live::demo();
    (l.first, l.end) = (10, 14);
    let (hls_addr, live) = start_hls(l).await;
    let status = pull(&state, "looping", hls_addr);
    wait_for("the first segments", 10, || {
        status.segments.load(Ordering::Relaxed) == 4
    })
    .await;
    let ch = state.channel("looping").expect("channel");
    let before = ch.live_position();
    // The source loops back to the start of its numbering.
    {
        let mut l = lock(&live);
        (l.first, l.end) = (0, 4);
    }
    wait_for("the backwards episode", 10, || {
        status.backwards.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(status.segments.load(Ordering::Relaxed), 4);
    assert_eq!(ch.live_position(), before, "the channel keeps its window");
    let err = status.view().last_error.expect("reason");
    assert!(err.contains("back in time"), "{err}");
    // The demo channel never noticed.
    let demo = state.channel("demo").expect("demo");
    let demo_before = demo.live_position();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(demo.live_position() > demo_before);
    // Past the published point again: only the new segments.
    {
        let mut l = lock(&live);
        (l.first, l.end) = (12, 16);
    }
    wait_for("the new segments", 10, || {
        status.segments.load(Ordering::Relaxed) == 6
    })
    .await;
    let requested = segment_requests(&live);
    assert_eq!(
        requested,
        [
            "seg10.m4s",
            "seg11.m4s",
            "seg12.m4s",
            "seg13.m4s",
            "seg14.m4s",
            "seg15.m4s"
        ]
    );
}

#[tokio::test]
async fn a_segment_that_is_not_fmp4_is_skipped_and_the_pull_goes_on() {
    let (_addr, state) = start_server(Config::default()).await;
    let mut l = Live::demo();
    l.garbage = vec![5];
    let (hls_addr, live) = start_hls(l).await;
    let status = pull(&state, "garbled", hls_addr);
    wait_for("the first segments", 10, || {
        status.segments.load(Ordering::Relaxed) == 4
    })
    .await;
    for _ in 0..3 {
        advance(&live);
    }
    wait_for("the segments after the bad one", 10, || {
        status.segments.load(Ordering::Relaxed) == 6
    })
    .await;
    assert_eq!(status.refused_segments.load(Ordering::Relaxed), 1);
    let err = status.view().last_error.expect("reason");
    assert!(
        err.contains("segment 5") && err.contains("not fragmented MP4"),
        "{err}"
    );
    assert_eq!(status.phase(), Phase::Following);
    assert_eq!(status.view().last_segment_seq, Some(6));
}

#[tokio::test]
async fn a_multivariant_playlist_is_followed_through_the_chosen_rendition() {
    let (_addr, state) = start_server(Config::default()).await;
    let (hls_addr, live) = start_hls(Live::demo()).await;
    let master = format!("http://{hls_addr}/hls/master.m3u8");
    let high = hls::start(&state, "high", &master, RenditionChoice::Highest).expect("pull");
    let low = hls::start(&state, "low", &master, "320x180".parse().expect("choice")).expect("pull");
    wait_for("the 720p rendition's segments", 10, || {
        high.segments.load(Ordering::Relaxed) == 3
    })
    .await;
    let media = high.view().media_url.expect("media playlist");
    assert_eq!(media, format!("http://{hls_addr}/hls/live.m3u8"));
    // The 320x180 rendition's playlist does not exist on this server: retried, never published.
    wait_for("retries of the missing rendition", 10, || {
        low.retries.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(low.segments.load(Ordering::Relaxed), 0);
    assert!(low
        .view()
        .media_url
        .is_some_and(|u| u.ends_with("/hls/low.m3u8")));
    assert_eq!(low.phase(), Phase::Retrying);
    assert!(lock(&live).log.iter().any(|p| p == "low.m3u8"));
}

#[tokio::test]
async fn the_operator_starts_and_stops_a_pull_over_the_api() {
    let (addr, state) = start_server(Config::default()).await;
    let (hls_addr, _live) = start_hls(Live::demo()).await;
    let token = state.operator_token().to_string();
    let url = format!("http://{hls_addr}/hls/live.m3u8");
    let body = serde_json::json!({ "channel": "op", "url": url, "rendition": "highest" });
    let (status, text) = request(addr, "POST", "/api/operator/pull", None, Some(&body)).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = request(
        addr,
        "POST",
        "/api/operator/pull",
        Some(&token),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let (status, _) = request(
        addr,
        "POST",
        "/api/operator/pull",
        Some(&token),
        Some(&body),
    )
    .await;
    assert_eq!(status, 409, "a second source is refused");
    let bad = serde_json::json!({ "channel": "op2", "url": "ftp://x/y.m3u8" });
    let (status, _) = request(addr, "POST", "/api/operator/pull", Some(&token), Some(&bad)).await;
    assert_eq!(status, 400);
    let bad = serde_json::json!({ "channel": "op2", "url": url, "rendition": "bandwidth<=x" });
    let (status, _) = request(addr, "POST", "/api/operator/pull", Some(&token), Some(&bad)).await;
    assert_eq!(status, 400);
    let s = state.pulls.status("op").expect("status");
    wait_for("segments", 10, || s.segments.load(Ordering::Relaxed) >= 3).await;
    let (status, text) = request(addr, "GET", "/api/operator/pulls", Some(&token), None).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"channel\":\"op\""), "{text}");
    let (status, text) = request(addr, "DELETE", "/api/operator/pull/op", Some(&token), None).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"phase\":\"stopped\""), "{text}");
    let ch = state.channel("op").expect("the channel stays");
    assert!(!ch.source_attached.load(Ordering::Relaxed));
    assert!(ch.live_position().is_some(), "and keeps its window");
    let (status, _) = request(addr, "DELETE", "/api/operator/pull/op", Some(&token), None).await;
    assert_eq!(status, 404);
    // The channel may be pulled again.
    let (status, text) = request(
        addr,
        "POST",
        "/api/operator/pull",
        Some(&token),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{text}");
}

async fn get_text(addr: SocketAddr, path: &str) -> String {
    let (status, text) = request(addr, "GET", path, None, None).await;
    assert_eq!(status, 200, "{path}: {text}");
    text
}

/// A minimal HTTP/1.1 request, returning (status, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body.as_bytes()).await.expect("write");
    let (status, text) = read_response(&mut s).await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}
