//! HTTP surface: static pages and the wasm package, the control WebSocket, init segments,
//! fallback packets, range hashes (for byte-exact checks), topology, and HTTP ingest.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;

use crate::events::DcmEvent;
use crate::origin::Lookup;
use crate::source::ingest::LiveIngest;
use crate::{AppState, SharedChannel};

/// Error type of the HTTP handlers: a status and a message the client can read.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

pub fn router(state: AppState) -> Router {
    let web_dir = state.config.web_dir.clone();
    Router::new()
        .route("/ws", get(crate::ws::ws_handler))
        .route("/api/channels", get(list_channels))
        .route("/api/channels/{id}/init", get(init_segment))
        .route("/api/channels/{id}/key", get(stream_key))
        .route("/api/channels/{id}/packets/{seq}", get(packet))
        .route("/api/channels/{id}/hash", get(range_hash))
        .route("/api/channels/{id}/topology", get(topology))
        .route("/api/channels/{id}/stats", get(channel_stats))
        .route("/ingest/{id}", put(ingest).post(ingest))
        .route("/api/locate", get(locate))
        .route("/api/connectivity", get(connectivity))
        .route("/api/operator/cluster", get(cluster_view))
        .merge(crate::operator::routes(&state))
        .fallback_service(ServeDir::new(web_dir).append_index_html_on_directories(true))
        // Operator token, WebSocket origin check (see `operator::guard`).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::operator::guard,
        ))
        // CORS for what an embedded player loads from another origin.
        .layer(crate::operator::cors_layer(&state.config))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// What a page needs to classify its NAT (issue 15): the STUN responder's URLs (`--stun`, two
/// ports, see `crate::stun`; empty without it) and the address this request came from, which
/// a page whose host candidate carries it knows to be on an open address. The STUN host is
/// the one the page reached this server by (its `Host` header) unless the responder is bound
/// to a specific address.
async fn connectivity(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    request: axum::extract::Request,
) -> Json<serde_json::Value> {
    let observed = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_canonical().to_string());
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_without_port);
    let stun: Vec<String> = state
        .config
        .stun
        .iter()
        .filter_map(|a| {
            let ip = a.ip();
            let h = if ip.is_unspecified() {
                host.clone()?
            } else if ip.is_ipv6() {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            Some(format!("stun:{h}:{}", a.port()))
        })
        .collect();
    Json(json!({ "stun": stun, "observed": observed }))
}

/// `example.org:8080` → `example.org`, `[::1]:8080` → `[::1]`.
fn host_without_port(host: &str) -> String {
    if let Some(end) = host.strip_prefix('[').and_then(|r| r.find(']')) {
        return host[..end + 2].to_string();
    }
    host.split(':').next().unwrap_or(host).to_string()
}

#[derive(Deserialize)]
struct LocateQuery {
    channel: String,
}

/// The resource service locator (FIG. 7): the base URL of the server that runs `channel`'s
/// DCM. A lone server answers its own (an empty `url`: this server). In a cluster, a channel
/// nobody owns is claimed by this server when it runs it; 503 while nobody can say (a
/// failover under way, or etcd unreachable).
async fn locate(
    State(state): State<AppState>,
    Query(q): Query<LocateQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let local = state.channel(&q.channel);
    let runs_here = local.is_some();
    // The newest packet this node has cut: a peer whose server failed learns from it which
    // packets exist while it has no control connection (and fetches what its parents miss).
    let live_seq = local.and_then(|c| c.live_position()).map(|p| p.1);
    #[cfg(feature = "cluster")]
    if let Some(cluster) = state.cluster() {
        return match cluster.place(&q.channel, runs_here).await {
            crate::cluster::Placement::Here => Ok(Json(json!({
                "url": cluster.url(),
                "dcm": q.channel,
                "node": cluster.node_id(),
                "live_seq": live_seq,
            }))),
            crate::cluster::Placement::There { url } => Ok(Json(
                json!({ "url": url, "dcm": q.channel, "live_seq": live_seq }),
            )),
            crate::cluster::Placement::Unavailable(message) => {
                Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, message))
            }
        };
    }
    if !runs_here {
        return Err(not_found(format!("no channel named {:?}", q.channel)));
    }
    Ok(Json(
        json!({ "url": "", "dcm": q.channel, "live_seq": live_seq }),
    ))
}

/// The cluster as this node sees it: nodes, their load and the DCMs each owns, and this node's
/// counters (operator token required, like every `/api/operator/` route).
async fn cluster_view(State(state): State<AppState>) -> Json<serde_json::Value> {
    #[cfg(feature = "cluster")]
    if let Some(cluster) = state.cluster() {
        let c = &cluster.counters;
        let nodes: Vec<_> = cluster
            .nodes()
            .into_iter()
            .map(|(id, (n, dcms))| json!({ "id": id, "record": n, "dcms": dcms }))
            .collect();
        return Json(json!({
            "cluster": true,
            "node": cluster.node_id(),
            "url": cluster.url(),
            "nodes": nodes,
            "owned": cluster.owned(),
            "redirects": c.redirects.load(Ordering::Relaxed),
            "failovers": {
                "lease_expired": c.failovers_lease.load(Ordering::Relaxed),
                "handover": c.failovers_handover.load(Ordering::Relaxed),
                "fenced": c.failovers_fenced.load(Ordering::Relaxed),
                "drain": c.failovers_drain.load(Ordering::Relaxed),
            },
            "claims": c.claims.load(Ordering::Relaxed),
            "etcd_errors": c.etcd_errors.load(Ordering::Relaxed),
        }));
    }
    let _ = state;
    Json(json!({ "cluster": false }))
}

fn channel(state: &AppState, id: &str) -> Result<SharedChannel, ApiError> {
    state
        .channel(id)
        .ok_or_else(|| not_found(format!("no channel named {id:?}")))
}

async fn list_channels(State(state): State<AppState>) -> Json<serde_json::Value> {
    let list: Vec<_> = state
        .channel_names()
        .into_iter()
        .filter_map(|n| state.channel(&n))
        .map(|c| {
            let pos = c.live_position();
            json!({
                "id": c.name,
                "live": c.source_attached.load(Ordering::Relaxed),
                "start_seq": pos.map(|p| p.0),
                "live_seq": pos.map(|p| p.1),
                // Set on file channels (downloads): name, size, pieces, digest.
                "file": c.file(),
            })
        })
        .collect();
    Json(json!({ "channels": list }))
}

async fn init_segment(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let ch = channel(&state, &id)?;
    let (bytes, _, _) = ch
        .init()
        .ok_or_else(|| not_found(format!("channel {id:?} has no init segment yet")))?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("video/mp4")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        bytes,
    )
        .into_response())
}

/// The channel's public stream key, for sites that pin it in the player (`public_key`).
async fn stream_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let ch = channel(&state, &id)?;
    let key = ch.public_key().ok_or_else(|| {
        not_found(format!(
            "channel {id:?} is not signed (the server runs with --unsigned)"
        ))
    })?;
    Ok(axum::Json(serde_json::json!({
        "channel": ch.name,
        "algorithm": "ed25519",
        "public_key": key,
    }))
    .into_response())
}

async fn packet(
    State(state): State<AppState>,
    Path((id, seq)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ch = channel(&state, &id)?;
    let seq: u64 = seq.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("packet sequence number must be an unsigned integer, got {seq:?}"),
        )
    })?;
    match ch.packet(seq) {
        Lookup::Found(bytes) => {
            ch.counters
                .fallback_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            ch.counters.fallback_packets.fetch_add(1, Ordering::Relaxed);
            Ok((
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    ),
                    // Not cached: every fallback byte is origin egress, counted here.
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                bytes,
            )
                .into_response())
        }
        Lookup::NotYet => Err(not_found(format!("packet {seq} does not exist yet"))),
        Lookup::Evicted => Err(ApiError(
            StatusCode::GONE,
            format!("packet {seq} has left the origin's window"),
        )),
    }
}

#[derive(Deserialize)]
struct HashQuery {
    first: u64,
    count: u64,
}

async fn range_hash(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ch = channel(&state, &id)?;
    let h = ch.range_hash(q.first, q.count).ok_or_else(|| {
        not_found(format!(
            "range {}+{} is not (or no longer) known",
            q.first, q.count
        ))
    })?;
    Ok(Json(
        json!({ "first": h.first_seq, "count": h.count, "hash": h.hex() }),
    ))
}

async fn topology(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::dcm::TopologySnapshot>, ApiError> {
    let ch = channel(&state, &id)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || ApiError(StatusCode::SERVICE_UNAVAILABLE, "DCM is not running".into());
    ch.dcm
        .send(DcmEvent::Snapshot { reply: tx })
        .await
        .map_err(|_| gone())?;
    Ok(Json(rx.await.map_err(|_| gone())?))
}

async fn channel_stats(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ch = channel(&state, &id)?;
    let c = &ch.counters;
    let pos = ch.live_position();
    let kbps = ch.init().map(|i| i.2);
    Ok(Json(json!({
        "channel": ch.name,
        "stream_kbps": kbps,
        "substreams": state.config.substreams,
        "start_seq": pos.map(|p| p.0),
        "live_seq": pos.map(|p| p.1),
        "packets_produced": c.packets_produced.load(Ordering::Relaxed),
        "window_bytes": ch.window_bytes(),
        "origin_push_bytes": c.origin_push_bytes.load(Ordering::Relaxed),
        "origin_bridge_bytes": c.origin_bridge_bytes.load(Ordering::Relaxed),
        "bridges_opened": c.bridges_opened.load(Ordering::Relaxed),
        "bridges_refused": c.bridges_refused.load(Ordering::Relaxed),
        "fallback_bytes": c.fallback_bytes.load(Ordering::Relaxed),
        "fallback_packets": c.fallback_packets.load(Ordering::Relaxed),
        "heartbeats": c.heartbeats.load(Ordering::Relaxed),
        "heartbeat_apply_ms": {
            "p50": c.heartbeat_apply.quantile_ms(0.5),
            "p99": c.heartbeat_apply.quantile_ms(0.99),
        },
        // Counts per quarter-octave bucket of µs (bucket i: below 2^((i+1)/4) - 1 µs), since
        // the server started: the difference of two readings gives a window's quantiles.
        "heartbeat_apply_us_buckets": c.heartbeat_apply.counts(),
        "congestion_events": c.congestion_events.load(Ordering::Relaxed),
        "repairs": c.repairs.load(Ordering::Relaxed),
    })))
}

/// Streaming ingest: `PUT /ingest/{channel}?key=K` with a fragmented-MP4 body, e.g.
/// `ffmpeg … -f mp4 -movflags frag_keyframe+empty_moov+default_base_moof - | curl -T - URL`.
///
/// A refusal (wrong key, busy channel, not fragmented MP4, a broken stream) is answered only
/// after the rest of the upload was read and discarded (see [`drain_body`]): a server that
/// answers and closes with the upload unread makes the kernel reset the connection, and the
/// publisher sees `curl: (55) Send failure: Broken pipe` instead of the status and its reason.
async fn ingest(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    extensions: axum::http::Extensions,
    body: Body,
) -> Response {
    // The publisher's address, for the limit on channels ingest may create per address.
    let remote = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| {
            c.0.ip()
        });
    let mut stream = body.into_data_stream();
    match ingest_stream(state, id, q, remote, &mut stream).await {
        Ok(r) => r,
        Err(e) => {
            let drained = drain_body(&mut stream).await;
            tracing::info!(
                status = %e.0,
                reason = %e.1,
                drained_bytes = drained.bytes,
                complete = drained.complete,
                "ingest refused"
            );
            let mut r = e.into_response();
            if !drained.complete {
                // Part of the upload is still unread: say that the connection ends here.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
    }
}

/// Longest a refused upload is read and discarded before the answer goes out anyway.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// Most bytes of a refused upload read and discarded before the answer goes out anyway.
const DRAIN_BYTES: u64 = 1 << 30;

/// What [`drain_body`] did.
struct Drained {
    bytes: u64,
    /// The body ended (or failed) within the bounds.
    complete: bool,
}

/// Reads and discards the rest of a request body, for at most [`DRAIN_TIME`] and
/// [`DRAIN_BYTES`].
async fn drain_body(stream: &mut axum::body::BodyDataStream) -> Drained {
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let mut bytes = 0u64;
    while bytes < DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => bytes += chunk.len() as u64,
            Ok(None | Some(Err(_))) => {
                return Drained {
                    bytes,
                    complete: true,
                }
            }
            Err(_) => break,
        }
    }
    Drained {
        bytes,
        complete: false,
    }
}

async fn ingest_stream(
    state: AppState,
    id: String,
    q: HashMap<String, String>,
    remote: std::net::IpAddr,
    stream: &mut axum::body::BodyDataStream,
) -> Result<Response, ApiError> {
    let Some(expected) = state.config.ingest_key.as_deref() else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "HTTP ingest is disabled: start the server with --ingest-key".into(),
        ));
    };
    if q.get("key").map(String::as_str) != Some(expected) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "wrong or missing stream key".into(),
        ));
    }
    match state.channel(&id) {
        Some(existing) if existing.source_attached.load(Ordering::Relaxed) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("channel {id:?} already has a live source"),
            ));
        }
        Some(_) => {}
        // A new channel (and its DCM thread): within the address's allowance.
        None => {
            if let Err(e) = state
                .addresses
                .may_create_channel(remote, |c| state.channel(c).is_some())
            {
                state.addresses.refusals.record(e.limit());
                return Err(ApiError(StatusCode::TOO_MANY_REQUESTS, e.to_string()));
            }
        }
    }
    // Validate the start of the body before creating or touching any channel, so that
    // something that is not fragmented MP4 leaves running channels exactly as they were.
    let mut probe = crate::origin::Fmp4Splitter::new();
    let mut head: Vec<Bytes> = Vec::new();
    let mut seen_init = false;
    while !seen_init {
        let Some(chunk) = stream.next().await else {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "body ended before a complete fragmented-MP4 init segment".into(),
            ));
        };
        let chunk =
            chunk.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading body: {e}")))?;
        let items = probe.push(&chunk).map_err(|e| {
            ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("not fragmented MP4: {e}"),
            )
        })?;
        seen_init = !items.is_empty();
        head.push(chunk);
    }
    let ch = match state.channel(&id) {
        Some(ch) => ch,
        None => {
            let ch = state
                .create_channel(&id, state.config.default_stream_kbps)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
            state.addresses.ingest_created(remote, &id);
            ch
        }
    };
    if ch.source_attached.swap(true, Ordering::SeqCst) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("channel {id:?} already has a live source"),
        ));
    }
    let mut live = LiveIngest::new(ch.clone());
    let mut total = 0u64;
    let mut result = Ok(());
    for chunk in head {
        total += chunk.len() as u64;
        if let Err(e) = live.push(&chunk).await {
            result = Err(e);
            break;
        }
    }
    while result.is_ok() {
        match stream.next().await {
            None => break,
            Some(Ok(chunk)) => {
                total += chunk.len() as u64;
                result = live.push(&chunk).await;
            }
            Some(Err(e)) => {
                result = Err(crate::source::ingest::IngestError::Io(e.to_string()));
            }
        }
    }
    ch.source_attached.store(false, Ordering::SeqCst);
    match result {
        Ok(()) => Ok((
            StatusCode::OK,
            Json(json!({ "channel": id, "bytes": total })),
        )
            .into_response()),
        Err(e) => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("ingest stopped after {total} bytes: {e}"),
        )),
    }
}
