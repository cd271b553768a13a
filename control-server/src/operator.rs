//! Operators and embedders: the operator token and the dashboard's data APIs, the pages and
//! player served for site owners, and the rules for other origins (CORS on what an embedded
//! player loads, the `Origin` check on the control WebSocket, the optional viewer token).
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /player.js`, `/player.d.ts` | anyone, CORS | the embeddable player and its typings |
//! | `GET /embed` | anyone | snippet, live preview, option and event reference, ingest URLs |
//! | `GET /api/ingest` | anyone; the key only with the operator token | each channel's ingest URLs ([`crate::source::urls`]) |
//! | `GET /dashboard` | anyone (the page holds no data) | the operator dashboard |
//! | `GET /metrics` | anyone | Prometheus text (aggregates only, no peer details) |
//! | `GET /api/operator/overview` | operator | channels, viewers per region and tier, totals |
//! | `GET /api/operator/channels/{id}/series?since=MS` | operator | one sample per second |
//! | `GET /api/operator/channels/{id}/graph` | operator | topology picture: nodes and links |
//! | `GET /api/channels/{id}/topology` | operator | the DCM's raw snapshot |
//! | `POST /api/operator/pull`, `DELETE /api/operator/pull/{id}`, `GET /api/operator/pulls` | operator | HLS pulls ([`crate::source::hls::api`]) |

use std::collections::HashMap;
use std::path::PathBuf;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use protocol::Source;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::metrics::{self, link_health, peer_samples, placement, ChannelTotals, Sample};
pub use crate::token::random_token;
use crate::AppState;

/// Compares tokens without an early exit on the first differing byte.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request presents: `Authorization: Bearer T`, else `?token=T`.
pub(crate) fn presented_token(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .ok()
        .and_then(|Query(q)| q.get("token").cloned())
}

/// Whether pages of `origin` may embed the player (CORS, WebSocket).
pub fn origin_allowed(config: &Config, origin: &str) -> bool {
    config.allowed_origins.is_empty()
        || config
            .allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Whether `origin` is the server's own (`scheme://` + the request's `Host`).
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((rest, host), (Some(r), Some(h)) if r.eq_ignore_ascii_case(h))
}

/// Paths an embedded player loads from another origin.
pub fn embeddable_path(path: &str) -> bool {
    // `/api/locate`: a peer of a cluster asks any node where its channel's DCM runs now;
    // `/api/connectivity`: the page's STUN servers and address, for its NAT class.
    if matches!(
        path,
        "/player.js" | "/player.js.map" | "/player.d.ts" | "/api/locate" | "/api/connectivity"
    ) || path.starts_with("/pkg/")
    {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/channels/") else {
        return false;
    };
    let mut parts = rest.split('/');
    let _channel = parts.next();
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some("init"), None, _) | (Some("packets"), Some(_), None)
    )
}

/// Paths behind the operator token.
pub fn operator_path(path: &str) -> bool {
    path.starts_with("/api/operator/")
        || (path.starts_with("/api/channels/") && path.ends_with("/topology"))
}

/// CORS for the embeddable paths, for the allowed origins (any, by default).
pub fn cors_layer(config: &Config) -> CorsLayer {
    let config = config.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            embeddable_path(parts.uri.path())
                && origin.to_str().is_ok_and(|o| origin_allowed(&config, o))
        }))
        .allow_methods([Method::GET, Method::HEAD])
        .max_age(std::time::Duration::from_secs(600))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"operator\""),
        );
    }
    r
}

/// Middleware on every request: the WebSocket's `Origin` and viewer-token checks, the operator
/// token on operator paths, and no serving of build-time files (`web/node_modules`).
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/ws" {
        // Browsers always send Origin on a WebSocket upgrade; other clients may not.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            if !origin_allowed(&state.config, origin) && !same_origin(origin, host) {
                tracing::info!(
                    origin,
                    "WebSocket from a page of a not allowed origin refused"
                );
                return refuse(
                    StatusCode::FORBIDDEN,
                    "pages of this origin may not embed the player (see --allow-origin)",
                );
            }
        }
        // With `--token-secret` the session checks every token at join (a browser's WebSocket
        // cannot read an HTTP status, but it can read an error message).
        if let Some(expected) = state
            .config
            .viewer_token
            .as_deref()
            .filter(|_| state.config.token_secret.is_none())
        {
            let given = presented_token(req.headers(), req.uri()).unwrap_or_default();
            if !token_matches(expected, &given) && !token_matches(state.operator_token(), &given) {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "this server needs an access token to join (the player's `token` option)",
                );
            }
        }
    } else if operator_path(path) {
        let given = presented_token(req.headers(), req.uri()).unwrap_or_default();
        if !token_matches(state.operator_token(), &given) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "operator token missing or wrong: send `Authorization: Bearer TOKEN` or ?token=TOKEN",
            );
        }
    } else if path.starts_with("/node_modules/") || path.starts_with("/package") {
        return refuse(StatusCode::NOT_FOUND, "not found");
    }
    next.run(req).await
}

/// Routes of this module (merged into the HTTP router).
pub fn routes(state: &AppState) -> Router<AppState> {
    let web = state.config.web_dir.clone();
    let dist = web.join("dist");
    let file = |path: PathBuf, mime: &'static str| get(move || serve_file(path.clone(), mime));
    Router::new()
        .route(
            "/player.js",
            file(dist.join("player.js"), "text/javascript; charset=utf-8"),
        )
        .route(
            "/player.js.map",
            file(dist.join("player.js.map"), "application/json"),
        )
        .route(
            "/player.d.ts",
            file(dist.join("player.d.ts"), "text/plain; charset=utf-8"),
        )
        .route(
            "/dashboard",
            file(web.join("dashboard.html"), "text/html; charset=utf-8"),
        )
        .route(
            "/embed",
            file(web.join("embed.html"), "text/html; charset=utf-8"),
        )
        .route("/metrics", get(prometheus))
        .route("/api/operator/overview", get(overview))
        .route("/api/operator/channels/{id}/series", get(series))
        .route("/api/operator/channels/{id}/graph", get(graph))
        .merge(crate::source::hls::api::routes())
        .merge(crate::source::urls::routes())
}

async fn serve_file(path: PathBuf, mime: &'static str) -> Response {
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("serving {}: {e}", path.display());
            (
                StatusCode::NOT_FOUND,
                format!(
                    "{} is missing: build the web assets with `cargo xtask demo` (or `cargo xtask test`)\n",
                    path.display()
                ),
            )
                .into_response()
        }
    }
}

async fn prometheus(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics::render(&state).await,
    )
        .into_response()
}

fn not_found(what: String) -> Response {
    refuse(StatusCode::NOT_FOUND, &what)
}

/// A region with its DCMs, for the dashboard.
#[derive(Debug, Serialize)]
pub struct RegionView {
    pub id: String,
    pub dcms: usize,
}

/// A tier and the algorithm that links its peers.
#[derive(Debug, Serialize)]
pub struct TierView {
    pub id: String,
    pub algorithm: String,
}

#[derive(Debug, Serialize)]
pub struct ChannelOverview {
    pub id: String,
    pub live: bool,
    pub dcm_running: bool,
    pub stream_kbps: u32,
    pub substreams: u32,
    pub totals: ChannelTotals,
    pub origin_egress_bytes: u64,
    /// Cumulative share of received bytes that came from peers.
    pub p2p_share: Option<f64>,
    pub last_sample: Option<Sample>,
    /// The channel's HLS pull, if it is pulled from a playlist.
    pub pull: Option<crate::source::hls::PullView>,
    /// The channel's RTMP publisher, refusals and last error, if RTMP ever touched it.
    pub rtmp: Option<crate::source::rtmp::RtmpChannelView>,
}

#[derive(Debug, Serialize)]
pub struct Overview {
    pub server_time_ms: u64,
    pub regions: Vec<RegionView>,
    pub tiers: Vec<TierView>,
    pub channels: Vec<ChannelOverview>,
    /// The RTMP listener (publishers, refusals by reason, last error), if it listens.
    pub rtmp: Option<crate::source::rtmp::RtmpView>,
}

async fn overview(State(state): State<AppState>) -> Json<Overview> {
    let mut channels = Vec::new();
    for name in state.channel_names() {
        let Some(ch) = state.channel(&name) else {
            continue;
        };
        let snap = metrics::snapshot(&ch).await;
        let totals = state.metrics.observe(&ch, snap.as_ref());
        let last_sample = state.metrics.series(&name, 0).pop();
        channels.push(ChannelOverview {
            live: ch
                .source_attached
                .load(std::sync::atomic::Ordering::Relaxed),
            dcm_running: snap.is_some(),
            stream_kbps: ch.init().map_or(0, |i| i.2),
            substreams: snap
                .as_ref()
                .map_or(state.config.substreams, |s| s.substreams),
            origin_egress_bytes: totals.origin_egress_bytes(),
            p2p_share: totals.received.p2p_share(),
            totals,
            last_sample,
            pull: state.pulls.status(&name).map(|p| p.view()),
            rtmp: state.rtmp.channel(&name),
            id: name,
        });
    }
    Json(Overview {
        server_time_ms: crate::channel::now_ms(),
        regions: vec![RegionView {
            id: metrics::DEFAULT_REGION.into(),
            dcms: channels.iter().filter(|c| c.dcm_running).count(),
        }],
        tiers: vec![TierView {
            id: metrics::DEFAULT_TIER.into(),
            algorithm: metrics::DEFAULT_ALGORITHM.into(),
        }],
        channels,
        rtmp: state.rtmp.view(),
    })
}

#[derive(Deserialize)]
struct SeriesQuery {
    #[serde(default)]
    since: u64,
}

async fn series(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> Response {
    if state.channel(&id).is_none() {
        return not_found(format!("no channel named {id:?}"));
    }
    Json(json!({
        "channel": id,
        "interval_ms": metrics::SAMPLE_INTERVAL.as_millis() as u64,
        "samples": state.metrics.series(&id, q.since),
    }))
    .into_response()
}

/// A node of the topology picture: the origin or a peer.
#[derive(Debug, Serialize)]
pub struct GraphNode {
    pub id: String,
    /// `origin`, `peer`, or `waypoint` (a peer the operator runs, FIG. 1 and 3).
    pub kind: &'static str,
    pub label: String,
    pub region: Option<String>,
    pub tier: Option<String>,
    pub upload_kbps: Option<u32>,
    /// Capacity the DCM places the peer with (declared, or capped after congestion).
    pub effective_upload_kbps: Option<u32>,
    pub measured_upload_kbps: Option<f64>,
    pub congestion_events: Option<u32>,
    pub uptime_s: Option<f64>,
    pub interior_tree: Option<u32>,
    pub p2p_share: Option<f64>,
    pub bytes_up: Option<u64>,
    /// The NAT class the peer reported (`open`, `endpoint_independent`, ...), if it did.
    pub nat_class: Option<protocol::NatClass>,
    /// Whether its ICE servers include a TURN relay.
    pub turn: bool,
}

/// A link of the topology picture: parent → child for one substream.
#[derive(Debug, Serialize)]
pub struct GraphLink {
    pub from: String,
    pub to: String,
    pub substream: u32,
    /// `tree` (parent → child in a substream tree), `mesh` (a top-tier flooding link) or
    /// `bridge` (the origin feeding a moved substream while the child's new parent connects).
    pub kind: &'static str,
    pub algorithm: &'static str,
    /// The child's heartbeat shows nothing from the parent for a while.
    pub lagging: bool,
    pub silent_ms: Option<u64>,
    /// The DCM found this link congested in the last [`RECENT_MS`] ms.
    pub congested: bool,
}

/// How far back a congestion record still marks its link on the picture.
pub const RECENT_MS: u64 = 10_000;
/// Congestion and repair records sent to the dashboard (newest first).
const LOG_ROWS: usize = 25;

#[derive(Debug, Serialize)]
pub struct Graph {
    pub channel: String,
    pub substreams: u32,
    pub epoch: u64,
    pub max_depth: u32,
    pub groups: Vec<serde_json::Value>,
    pub nodes: Vec<GraphNode>,
    pub links: Vec<GraphLink>,
    /// Recent congestion records of the DCM, newest first.
    pub congestion: Vec<serde_json::Value>,
    /// Recent repairs of the DCM, newest first.
    pub repairs: Vec<serde_json::Value>,
}

fn node_id(s: &Source) -> String {
    match s {
        Source::Origin => "origin".into(),
        Source::Peer { id } => format!("p{}", id.0),
    }
}

async fn graph(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(ch) = state.channel(&id) else {
        return not_found(format!("no channel named {id:?}"));
    };
    let Some(snap) = metrics::snapshot(&ch).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "DCM is not running");
    };
    let health: HashMap<(u32, u64), metrics::LinkHealth> = link_health(&peer_samples(&snap))
        .into_iter()
        .map(|l| ((l.substream, l.child.0), l))
        .collect();
    let now = crate::channel::now_ms();
    let congested: std::collections::HashSet<(u64, u64, u32)> = snap
        .congestion
        .iter()
        .filter(|c| now.saturating_sub(c.at_ms) <= RECENT_MS)
        .map(|c| (c.link.parent.0, c.link.child.0, c.link.substream))
        .collect();
    let recent = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter().rev().take(LOG_ROWS).collect()
    };
    let congestion_log = recent(
        snap.congestion
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect(),
    );
    let repair_log = recent(
        snap.repairs
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect(),
    );
    let mut nodes = vec![GraphNode {
        id: "origin".into(),
        kind: "origin",
        label: "origin".into(),
        region: None,
        tier: None,
        upload_kbps: None,
        effective_upload_kbps: None,
        measured_upload_kbps: None,
        congestion_events: None,
        uptime_s: None,
        interior_tree: None,
        p2p_share: None,
        bytes_up: None,
        nat_class: None,
        turn: false,
    }];
    let mut links = Vec::new();
    let mut groups: Vec<(String, String)> = Vec::new();
    for p in &snap.peers {
        let place = placement(p);
        if !groups.contains(&(place.region.clone(), place.tier.clone())) {
            groups.push((place.region.clone(), place.tier.clone()));
        }
        let totals = p.last_heartbeat.as_ref().map(|hb| {
            let t = hb.bytes_from_peers + hb.bytes_from_origin;
            (
                (t > 0).then(|| hb.bytes_from_peers as f64 / t as f64),
                hb.bytes_up,
            )
        });
        nodes.push(GraphNode {
            id: format!("p{}", p.id.0),
            kind: if p.waypoint { "waypoint" } else { "peer" },
            label: format!("p{}", p.id.0),
            region: Some(place.region),
            tier: Some(place.tier),
            upload_kbps: Some(p.upload_kbps),
            effective_upload_kbps: Some(p.effective_upload_kbps),
            measured_upload_kbps: p.measured_upload_kbps,
            congestion_events: Some(p.congestion_events),
            uptime_s: Some(p.uptime_s),
            interior_tree: p.interior_tree,
            p2p_share: totals.and_then(|t| t.0),
            bytes_up: totals.map(|t| t.1),
            nat_class: p.connectivity.map(|c| c.class),
            turn: p.connectivity.is_some_and(|c| c.turn),
        });
        let fec = p.tier.as_ref().and_then(|t| t.fec);
        // Top-tier flooding links, drawn once per pair (from the lower id, or the origin).
        for m in p.tier.iter().flat_map(|t| &t.mesh) {
            let draw = match m {
                Source::Origin => true,
                Source::Peer { id } => id.0 < p.id.0,
            };
            if draw {
                links.push(GraphLink {
                    from: node_id(m),
                    to: format!("p{}", p.id.0),
                    substream: 0,
                    kind: "mesh",
                    algorithm: "flood",
                    lagging: false,
                    silent_ms: None,
                    congested: false,
                });
            }
        }
        for sub in &p.origin_bridges {
            links.push(GraphLink {
                from: "origin".into(),
                to: format!("p{}", p.id.0),
                substream: *sub,
                kind: "bridge",
                algorithm: "origin_bridge",
                lagging: false,
                silent_ms: None,
                congested: false,
            });
        }
        for s in &p.plan {
            let h = health.get(&(s.index, p.id.0));
            links.push(GraphLink {
                from: node_id(&s.parent),
                to: format!("p{}", p.id.0),
                substream: s.index,
                kind: "tree",
                algorithm: match fec {
                    Some(f) if s.index >= f.k => "multitree_fec_parity",
                    Some(_) => "multitree_fec",
                    None => "multitree",
                },
                lagging: h.is_some_and(|h| h.lagging),
                silent_ms: h.and_then(|h| h.silent_ms),
                congested: match s.parent {
                    Source::Peer { id } => congested.contains(&(id.0, p.id.0, s.index)),
                    Source::Origin => false,
                },
            });
        }
    }
    Json(Graph {
        channel: snap.channel.clone(),
        substreams: snap.substreams,
        epoch: snap.epoch,
        max_depth: snap.max_depth,
        groups: groups
            .into_iter()
            .map(|(region, tier)| json!({ "region": region, "tier": tier }))
            .collect(),
        nodes,
        links,
        congestion: congestion_log,
        repairs: repair_log,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let a = random_token().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(Some(&a), random_token().as_ref());
        assert!(token_matches(&a, &a.clone()));
        assert!(!token_matches(&a, &a[..31]));
        assert!(!token_matches("abc", "abd"));
    }

    #[test]
    fn path_classes() {
        assert!(embeddable_path("/player.js"));
        assert!(embeddable_path("/pkg/peer_bg.wasm"));
        assert!(embeddable_path("/api/channels/demo/init"));
        assert!(embeddable_path("/api/channels/demo/packets/17"));
        assert!(!embeddable_path("/api/channels/demo/topology"));
        assert!(!embeddable_path("/api/channels/demo/packets"));
        assert!(!embeddable_path("/dashboard"));
        assert!(operator_path("/api/channels/demo/topology"));
        assert!(operator_path("/api/operator/overview"));
        assert!(!operator_path("/api/channels/demo/stats"));
    }

    #[test]
    fn origins() {
        let mut c = Config::default();
        assert!(origin_allowed(&c, "https://any.example"));
        c.allowed_origins = vec!["https://site.example".into()];
        assert!(origin_allowed(&c, "https://site.example"));
        assert!(!origin_allowed(&c, "https://evil.example"));
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin("http://127.0.0.1:9", Some("127.0.0.1:8080")));
        assert!(!same_origin("null", Some("127.0.0.1:8080")));
    }
}
