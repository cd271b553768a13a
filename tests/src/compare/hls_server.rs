//! The small HTTP server of P2P Media Loader's side: publishes the cut segments in real time
//! (see [`LiveSchedule`]), serves their viewer page, and counts every byte of media it sends, to
//! check the library's own counters against.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::hls::{HlsCut, LiveSchedule};
use super::wall_ms;

/// What the server sent (media and playlists apart), and how many segment requests it refused
/// because the segment was not out yet.
#[derive(Debug, Default)]
pub struct Served {
    pub media_bytes: AtomicU64,
    pub segments: AtomicU64,
    pub playlist_bytes: AtomicU64,
    pub playlists: AtomicU64,
    pub early_requests: AtomicU64,
}

/// A snapshot of [`Served`] for the report.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServedCounts {
    /// Init and media segment bytes (what a CDN would bill for the media).
    pub media_bytes: u64,
    pub segments: u64,
    pub playlist_bytes: u64,
    pub playlists: u64,
    pub early_requests: u64,
}

impl Served {
    pub fn counts(&self) -> ServedCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServedCounts {
            media_bytes: get(&self.media_bytes),
            segments: get(&self.segments),
            playlist_bytes: get(&self.playlist_bytes),
            playlists: get(&self.playlists),
            early_requests: get(&self.early_requests),
        }
    }
}

struct Live {
    cut: HlsCut,
    schedule: LiveSchedule,
    served: Arc<Served>,
    web_dir: PathBuf,
}

/// The running server; stops when dropped.
pub struct LiveHlsServer {
    pub addr: SocketAddr,
    pub served: Arc<Served>,
    pub schedule: LiveSchedule,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LiveHlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LiveHlsServer {
    /// Serves on 127.0.0.1 (any port): `/live.m3u8`, `/init.mp4`, `/seg/N.m4s`, and the page
    /// `/p2pml.html` with its bundle from `web_dir` (`compare/p2pml.html`,
    /// `dist/compare/p2pml.js`). `window`: segments in the playlist.
    pub async fn start(cut: HlsCut, window: usize, web_dir: PathBuf) -> Result<LiveHlsServer> {
        let durations: Vec<f64> = cut.segments.iter().map(|s| s.duration_s).collect();
        let schedule = LiveSchedule::new(&durations, window, wall_ms());
        let served = Arc::new(Served::default());
        let live = Arc::new(Live {
            cut,
            schedule: schedule.clone(),
            served: served.clone(),
            web_dir,
        });
        let app = Router::new()
            .route("/live.m3u8", get(playlist))
            .route("/init.mp4", get(init))
            .route("/seg/{file}", get(segment))
            .route("/p2pml.html", get(page))
            .route("/dist/compare/p2pml.js", get(bundle))
            .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
            .with_state(live);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the live HLS server")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("live HLS server stopped: {e}");
            }
        });
        Ok(LiveHlsServer {
            addr,
            served,
            schedule,
            task,
        })
    }
}

fn media(content_type: &'static str, bytes: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Every page runs in one browser, whose HTTP cache would otherwise serve one page's
            // segments to the next like a shared proxy: each viewer is a machine of its own.
            (header::CACHE_CONTROL, "no-store"),
        ],
        bytes,
    )
        .into_response()
}

async fn playlist(State(live): State<Arc<Live>>) -> Response {
    let text = live.schedule.playlist(wall_ms());
    live.served
        .playlist_bytes
        .fetch_add(text.len() as u64, Ordering::Relaxed);
    live.served.playlists.fetch_add(1, Ordering::Relaxed);
    (
        [
            (header::CONTENT_TYPE, "application/vnd.apple.mpegurl"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        text,
    )
        .into_response()
}

async fn init(State(live): State<Arc<Live>>) -> Response {
    let bytes = live.cut.init.clone();
    live.served
        .media_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    media("video/mp4", bytes)
}

async fn segment(State(live): State<Arc<Live>>, Path(file): Path<String>) -> Response {
    let Some(i) = file
        .strip_suffix(".m4s")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if i >= live.cut.segments.len() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !live.schedule.is_out(i, wall_ms()) {
        live.served.early_requests.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NOT_FOUND.into_response();
    }
    let bytes = live.cut.segments[i].bytes.clone();
    live.served
        .media_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    live.served.segments.fetch_add(1, Ordering::Relaxed);
    media("video/iso.segment", bytes)
}

async fn file(path: PathBuf, content_type: &'static str) -> Response {
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            format!("{}: {e} (run `cargo xtask build`)", path.display()),
        )
            .into_response(),
    }
}

async fn page(State(live): State<Arc<Live>>) -> Response {
    file(live.web_dir.join("compare/p2pml.html"), "text/html").await
}

async fn bundle(State(live): State<Arc<Live>>) -> Response {
    file(
        live.web_dir.join("dist/compare/p2pml.js"),
        "text/javascript",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::hls::Segment;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A bare HTTP/1.1 GET: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no header end")?;
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        Ok((status, buf[split + 4..].to_vec()))
    }

    #[tokio::test]
    async fn publishes_segments_live_and_counts_bytes() -> Result<()> {
        let cut = HlsCut {
            init: vec![1; 10],
            segments: (0..6)
                .map(|i| Segment {
                    bytes: vec![i as u8; 100 + i],
                    duration_s: 1.0,
                })
                .collect(),
        };
        let server = LiveHlsServer::start(cut, 2, std::env::temp_dir()).await?;
        let (status, body) = get(server.addr, "/live.m3u8").await?;
        let text = String::from_utf8(body)?;
        assert_eq!(status, 200);
        assert!(
            text.contains("seg/0.m4s") && text.contains("seg/1.m4s"),
            "{text}"
        );
        assert!(text.contains("#EXT-X-PROGRAM-DATE-TIME:"));
        assert!(!text.contains("seg/2.m4s"), "{text}");
        assert_eq!(get(server.addr, "/seg/1.m4s").await?, (200, vec![1; 101]));
        assert_eq!(get(server.addr, "/init.mp4").await?.1.len(), 10);
        // Not out yet, then out a second later.
        assert_eq!(get(server.addr, "/seg/3.m4s").await?.0, 404);
        assert_eq!(get(server.addr, "/seg/x.m4s").await?.0, 404);
        let c = server.served.counts();
        assert_eq!((c.media_bytes, c.segments, c.early_requests), (111, 1, 1));
        assert_eq!(c.playlist_bytes, text.len() as u64);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(get(server.addr, "/seg/2.m4s").await?.0, 200);
        assert_eq!(get(server.addr, "/p2pml.html").await?.0, 404);
        Ok(())
    }
}
