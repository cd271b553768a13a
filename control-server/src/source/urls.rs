//! Where each channel's publisher sends it: `GET /api/ingest`, the data of the `/embed` page's
//! "Go live" table (the page builds no URL itself, so this is the one place that knows them).
//!
//! * RTMP (`--rtmp`): `rtmp://HOST:PORT/live/CHANNEL?key=KEY`, and the same split as OBS wants
//!   it (Server `rtmp://HOST:PORT/live`, Stream Key `CHANNEL?key=KEY`). HOST is the listener's
//!   address, or, for a listener on every interface (`0.0.0.0`, `::`), the host the request
//!   named (the one the operator reaches the server by).
//! * HTTP ingest (`--ingest-key`): the path `/ingest/CHANNEL?key=KEY` (the page puts its own
//!   origin in front: this server cannot know the scheme a proxy in front of it serves).
//! * HLS pull: the playlist the channel is pulled from.
//!
//! Anyone may read it (publishers need the addresses), but the stream key appears only when the
//! request presents the operator token (`Authorization: Bearer T` or `?token=T`, as for the
//! dashboard); otherwise it reads [`KEY_PLACEHOLDER`]. A pull's playlist URL is shown to the
//! operator only, as `GET /api/operator/pulls` does: CDN URLs often carry a signed token. A wrong
//! token is refused with 401 so that the page can say so.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::operator::{presented_token, token_matches};
use crate::AppState;

/// What the key reads as for a request without the operator token.
pub const KEY_PLACEHOLDER: &str = "<your ingest key>";

/// The answer of `GET /api/ingest`.
#[derive(Debug, Serialize)]
pub struct IngestUrls {
    /// The request presented the operator token: the URLs carry the real key.
    pub operator: bool,
    /// RTMP ingest, if the server listens for it.
    pub rtmp: Option<RtmpServerUrls>,
    /// HTTP ingest's path for a channel named CHANNEL, if `--ingest-key` is set.
    pub http_path: Option<String>,
    /// Every channel but file channels (downloads take no ingest).
    pub channels: Vec<ChannelIngest>,
}

/// The RTMP listener, for any channel name (publishing creates the channel).
#[derive(Debug, Serialize)]
pub struct RtmpServerUrls {
    /// OBS's "Server": `rtmp://HOST:PORT/live`.
    pub server: String,
    /// The full URL for a channel named CHANNEL.
    pub url: String,
}

/// One channel's ingest URLs.
#[derive(Debug, Serialize)]
pub struct ChannelIngest {
    pub id: String,
    /// A source feeds the channel now (a second one is refused).
    pub live: bool,
    pub rtmp: Option<RtmpChannelUrls>,
    pub http_path: Option<String>,
    pub hls_pull: Option<PullSource>,
}

/// A channel's RTMP URL, whole and split as OBS asks for it.
#[derive(Debug, Serialize)]
pub struct RtmpChannelUrls {
    pub url: String,
    pub obs_server: String,
    pub obs_stream_key: String,
}

/// The playlist a channel is pulled from.
#[derive(Debug, Serialize)]
pub struct PullSource {
    /// The playlist given to the pull (`None` without the operator token).
    pub url: Option<String>,
    /// The media playlist followed (`None` without the operator token).
    pub media_url: Option<String>,
    pub phase: crate::source::hls::Phase,
}

/// The host part of a `Host` header (`example.org`, `127.0.0.1`, `[::1]`).
fn request_host(host: &str) -> Option<String> {
    let a: axum::http::uri::Authority = host.parse().ok()?;
    Some(a.host().to_owned()).filter(|h| !h.is_empty())
}

/// `rtmp://HOST:PORT/live` for a listener bound to `bound`, asked for with `Host: host`.
pub fn rtmp_server(bound: std::net::SocketAddr, host: Option<&str>) -> String {
    let app = super::rtmp::APP;
    if !bound.ip().is_unspecified() {
        return format!("rtmp://{bound}/{app}");
    }
    let host = host
        .and_then(request_host)
        .unwrap_or_else(|| "HOST".to_owned());
    format!("rtmp://{host}:{}/{app}", bound.port())
}

/// The ingest URLs of `state`'s channels, as a request with `Host: host` should see them;
/// `operator`: show the key.
pub fn ingest_urls(state: &AppState, host: Option<&str>, operator: bool) -> IngestUrls {
    let key = match state.config.ingest_key.as_deref() {
        Some(k) if !k.is_empty() => Some(if operator { k } else { KEY_PLACEHOLDER }),
        _ => None,
    };
    let server = state
        .rtmp
        .listening()
        .filter(|_| key.is_some())
        .map(|addr| rtmp_server(addr, host));
    let rtmp_for = |channel: &str| {
        let (server, key) = (server.as_ref()?, key?);
        Some(RtmpChannelUrls {
            url: format!("{server}/{channel}?key={key}"),
            obs_server: server.clone(),
            obs_stream_key: format!("{channel}?key={key}"),
        })
    };
    let http_for = |channel: &str| key.map(|k| format!("/ingest/{channel}?key={k}"));
    let mut channels = Vec::new();
    for id in state.channel_names() {
        let Some(ch) = state.channel(&id) else {
            continue;
        };
        if ch.file.get().is_some() {
            continue;
        }
        let hls_pull = state.pulls.status(&id).map(|p| {
            let v = p.view();
            PullSource {
                url: operator.then_some(v.url),
                media_url: v.media_url.filter(|_| operator),
                phase: v.phase,
            }
        });
        channels.push(ChannelIngest {
            live: ch
                .source_attached
                .load(std::sync::atomic::Ordering::Relaxed),
            rtmp: rtmp_for(&id),
            http_path: http_for(&id),
            hls_pull,
            id,
        });
    }
    IngestUrls {
        operator,
        rtmp: server.as_ref().and_then(|s| {
            Some(RtmpServerUrls {
                server: s.clone(),
                url: format!("{s}/CHANNEL?key={}", key?),
            })
        }),
        http_path: http_for("CHANNEL"),
        channels,
    }
}

async fn get_ingest_urls(State(state): State<AppState>, req: Request) -> Response {
    let operator = match presented_token(req.headers(), req.uri()) {
        None => false,
        Some(t) if token_matches(state.operator_token(), &t) => true,
        Some(_) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"operator\"")],
                Json(json!({ "error": "operator token wrong: the stream key stays hidden" })),
            )
                .into_response();
        }
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let mut r = Json(ingest_urls(&state, host, operator)).into_response();
    // The key may be in it: no cache keeps it.
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// `GET /api/ingest` (merged into the operator routes).
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/ingest", get(get_ingest_urls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rtmp_listener_on_every_interface_is_named_by_the_requested_host() {
        let any: std::net::SocketAddr = "0.0.0.0:1935".parse().expect("addr");
        assert_eq!(
            rtmp_server(any, Some("stream.example:8080")),
            "rtmp://stream.example:1935/live"
        );
        assert_eq!(
            rtmp_server(any, Some("[::1]:8080")),
            "rtmp://[::1]:1935/live"
        );
        assert_eq!(rtmp_server(any, None), "rtmp://HOST:1935/live");
        let local: std::net::SocketAddr = "127.0.0.1:19350".parse().expect("addr");
        assert_eq!(
            rtmp_server(local, Some("stream.example")),
            "rtmp://127.0.0.1:19350/live"
        );
    }

    #[tokio::test]
    async fn the_key_is_shown_to_the_operator_only() {
        let state = AppState::new(crate::config::Config {
            ingest_key: Some("s3cret".into()),
            ..crate::config::Config::default()
        });
        state.create_channel("cam", 1000).expect("channel");
        state
            .rtmp
            .set_listening("0.0.0.0:1935".parse().expect("addr"));
        let open = ingest_urls(&state, Some("tv.example"), false);
        let json = serde_json::to_string(&open).expect("json");
        assert!(!json.contains("s3cret"), "{json}");
        let cam = &open.channels[0];
        assert_eq!(
            cam.rtmp.as_ref().map(|r| r.url.as_str()),
            Some("rtmp://tv.example:1935/live/cam?key=<your ingest key>")
        );
        let op = ingest_urls(&state, Some("tv.example"), true);
        let cam = &op.channels[0];
        let rtmp = cam.rtmp.as_ref().expect("rtmp");
        assert_eq!(
            (rtmp.obs_server.as_str(), rtmp.obs_stream_key.as_str()),
            ("rtmp://tv.example:1935/live", "cam?key=s3cret")
        );
        assert_eq!(cam.http_path.as_deref(), Some("/ingest/cam?key=s3cret"));
        assert_eq!(op.http_path.as_deref(), Some("/ingest/CHANNEL?key=s3cret"));
    }
}
