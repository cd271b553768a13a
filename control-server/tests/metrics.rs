//! `/metrics` parses as Prometheus text and reports what the server and the peers' heartbeats
//! say; the operator APIs need the operator token; CORS and the WebSocket origin and viewer-token
//! rules for embedding pages of other sites.

mod common;
mod prom;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{connect, join, send, start_server};
use control_server::config::Config;
use prom::{http, parse, Exposition};
use protocol::{ClientMsg, Heartbeat, PeerId};

fn heartbeat(id: PeerId, seq: u64, from_peers: u64, from_origin: u64) -> ClientMsg {
    // From JSON, so fields added to the heartbeat later (with serde defaults) need no edit here.
    let hb: Heartbeat = serde_json::from_value(serde_json::json!({
        "client_id": id.0,
        "seq": seq,
        // The server refuses clocks more than a day off.
        "local_ts_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        "parents": [],
        "children": [],
        "buffer": [],
        "bytes_from_peers": from_peers,
        "bytes_from_origin": from_origin,
        "bytes_up": from_peers / 2,
        "origin_fallbacks": 3,
    }))
    .expect("heartbeat JSON");
    ClientMsg::Heartbeat(hb)
}

async fn scrape(addr: std::net::SocketAddr) -> Exposition {
    let r = http(addr, "GET", "/metrics", &[])
        .await
        .expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    parse(&r.body).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{}", r.body))
}

/// Polls `/metrics` until `ok` holds (the DCM takes heartbeats asynchronously).
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    ok: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let t0 = Instant::now();
    loop {
        let e = scrape(addr).await;
        if ok(&e) {
            return e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what} never held: {e:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const DEMO: [(&str, &str); 2] = [("channel", "demo"), ("region", "default")];

#[tokio::test]
async fn metrics_parse_and_match_heartbeats_and_origin_counters() {
    let (addr, state) = start_server(Config::default()).await;
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    let ida = join(&mut a, 1000).await;
    let idb = join(&mut b, 1000).await;
    send(&mut a, &heartbeat(ida, 1, 5_000, 1_000)).await;
    send(&mut b, &heartbeat(idb, 1, 7_000, 2_000)).await;
    // A fallback fetch: origin egress over HTTP.
    let live = state
        .channel("demo")
        .and_then(|c| c.live_position())
        .expect("live");
    let r = http(
        addr,
        "GET",
        &format!("/api/channels/demo/packets/{}", live.1),
        &[],
    )
    .await
    .expect("packet");
    assert_eq!(r.status, 200);

    let e = scrape_until(addr, "two viewers' heartbeats", |e| {
        e.sum("p2p_received_bytes_total", &[("source", "peers")]) == 12_000.0
    })
    .await;
    assert_eq!(
        e.sum(
            "p2p_viewers",
            &[
                ("channel", "demo"),
                ("region", "default"),
                ("tier", "multitree")
            ]
        ),
        2.0
    );
    assert_eq!(e.sum("p2p_dcms", &[("region", "default")]), 1.0);
    assert_eq!(
        e.sum(
            "p2p_received_bytes_total",
            &[DEMO[0], DEMO[1], ("source", "origin")]
        ),
        3_000.0
    );
    assert_eq!(e.sum("p2p_uploaded_bytes_total", &DEMO), 6_000.0);
    assert_eq!(e.sum("p2p_viewer_origin_fallbacks_total", &DEMO), 6.0);
    assert!(e.sum("p2p_heartbeats_total", &DEMO) >= 2.0);
    for (name, kind) in [
        ("p2p_viewers", "gauge"),
        ("p2p_dcms", "gauge"),
        ("p2p_received_bytes_total", "counter"),
        ("p2p_origin_egress_bytes_total", "counter"),
        ("p2p_heartbeats_total", "counter"),
        ("p2p_congestion_events_total", "counter"),
        ("p2p_repairs_total", "counter"),
        ("p2p_bridges_total", "counter"),
        ("p2p_origin_bridge_bytes_total", "counter"),
    ] {
        assert_eq!(e.types.get(name).map(String::as_str), Some(kind), "{name}");
        assert!(e.select(name, &[]).count() > 0, "no sample of {name}");
    }

    // Viewers leave: their bytes stay counted; the origin stops pushing, so the server's
    // counters are still and must match the exposition exactly.
    drop(a);
    drop(b);
    let e = scrape_until(addr, "viewers gone", |e| e.sum("p2p_viewers", &DEMO) == 0.0).await;
    assert_eq!(
        e.sum(
            "p2p_received_bytes_total",
            &[DEMO[0], DEMO[1], ("source", "peers")]
        ),
        12_000.0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = scrape(addr).await;
    let c = &state.channel("demo").expect("demo").counters;
    let push = c.origin_push_bytes.load(Ordering::Relaxed);
    let fallback = c.fallback_bytes.load(Ordering::Relaxed);
    assert!(fallback > 0, "fallback {fallback}");
    assert_eq!(
        e.sum(
            "p2p_origin_egress_bytes_total",
            &[DEMO[0], DEMO[1], ("path", "push")]
        ),
        push as f64
    );
    assert_eq!(
        e.sum(
            "p2p_origin_egress_bytes_total",
            &[DEMO[0], DEMO[1], ("path", "fallback")]
        ),
        fallback as f64
    );
    assert_eq!(
        e.sum("p2p_heartbeats_total", &DEMO),
        c.heartbeats.load(Ordering::Relaxed) as f64
    );
    assert_eq!(
        e.sum("p2p_origin_fallback_packets_total", &DEMO),
        c.fallback_packets.load(Ordering::Relaxed) as f64
    );

    // The charts' series has samples, one a second.
    let token = state.operator_token().to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = http(
        addr,
        "GET",
        "/api/operator/channels/demo/series?since=0",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("series");
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let samples = v["samples"].as_array().expect("samples");
    assert!(samples.len() >= 2, "{v}");
    let last = samples.last().expect("a sample");
    assert_eq!(last["bytes_from_peers"], 12_000);
    assert_eq!(last["origin_egress_bytes"], push + fallback);
}

/// The attack of issue 13: one heartbeat with counters at the top of the u64 range. It is
/// refused (counted by reason) and `/metrics` goes on reporting what honest heartbeats said.
#[tokio::test]
async fn absurd_heartbeat_counters_are_refused_and_stay_out_of_metrics() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut a = connect(addr).await;
    let id = join(&mut a, 1000).await;
    send(&mut a, &heartbeat(id, 1, 5_000, 1_000)).await;
    scrape_until(addr, "the honest heartbeat", |e| {
        e.sum("p2p_received_bytes_total", &[("source", "peers")]) == 5_000.0
    })
    .await;
    send(&mut a, &heartbeat(id, 2, u64::MAX - 10, 1_000)).await;
    let e = scrape_until(addr, "the refusal counted", |e| {
        e.sum(
            "p2p_heartbeats_refused_total",
            &[("reason", "counters_implausible")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        e.sum("p2p_received_bytes_total", &[("source", "peers")]),
        5_000.0
    );
    assert_eq!(e.sum("p2p_uploaded_bytes_total", &DEMO), 2_500.0);
    assert_eq!(
        e.types
            .get("p2p_heartbeats_refused_total")
            .map(String::as_str),
        Some("counter")
    );
}

#[tokio::test]
async fn operator_apis_need_the_operator_token() {
    let (addr, state) = start_server(Config::default()).await;
    let token = state.operator_token().to_string();
    assert!(state.operator_token_generated());
    assert_eq!(token.len(), 32, "a generated token: {token}");
    let bearer = format!("Bearer {token}");
    for path in [
        "/api/operator/overview",
        "/api/operator/channels/demo/graph",
        "/api/operator/channels/demo/series",
        "/api/channels/demo/topology",
    ] {
        let r = http(addr, "GET", path, &[]).await.expect("get");
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        assert!(r.header("www-authenticate").is_some());
        let r = http(
            addr,
            "GET",
            path,
            &[("Authorization", "Bearer wrong-token")],
        )
        .await
        .expect("get");
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = http(addr, "GET", path, &[("Authorization", &bearer)])
            .await
            .expect("get");
        assert_eq!(r.status, 200, "{path} with the token: {}", r.body);
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = http(addr, "GET", &format!("{path}{sep}token={token}"), &[])
            .await
            .expect("get");
        assert_eq!(r.status, 200, "{path} with ?token=");
    }
    // The overview's data shape: regions and tiers as lists, viewers per region and tier.
    let r = http(
        addr,
        "GET",
        "/api/operator/overview",
        &[("Authorization", &bearer)],
    )
    .await
    .expect("overview");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["regions"][0]["id"], "default");
    assert_eq!(v["regions"][0]["dcms"], 1);
    assert_eq!(v["tiers"][0]["id"], "multitree");
    assert_eq!(v["channels"][0]["id"], "demo");
    assert!(v["channels"][0]["totals"]["viewers_by_placement"].is_array());
    // Public things stay public.
    for path in ["/api/channels", "/api/channels/demo/stats", "/metrics"] {
        let r = http(addr, "GET", path, &[]).await.expect("get");
        assert_eq!(r.status, 200, "{path}");
    }
    // A configured token is used as is.
    let (_, state) = start_server(Config {
        operator_token: Some("operator-secret".into()),
        ..Config::default()
    })
    .await;
    assert_eq!(state.operator_token(), "operator-secret");
    assert!(!state.operator_token_generated());
}

#[tokio::test]
async fn embedding_rules_cors_origin_check_and_viewer_token() {
    // Default: any origin may embed.
    let (addr, _) = start_server(Config::default()).await;
    let site = ("Origin", "https://site.example");
    for path in ["/api/channels/demo/init", "/player.js", "/pkg/peer.js"] {
        let r = http(addr, "GET", path, &[site]).await.expect("get");
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://site.example"),
            "{path}: {:?}",
            r.headers
        );
    }
    // Not for operator or other APIs.
    let r = http(addr, "GET", "/api/channels/demo/stats", &[site])
        .await
        .expect("get");
    assert_eq!(r.header("access-control-allow-origin"), None);
    // A preflight is answered.
    let r = http(
        addr,
        "OPTIONS",
        "/api/channels/demo/packets/1",
        &[site, ("Access-Control-Request-Method", "GET")],
    )
    .await
    .expect("preflight");
    assert!(r.status < 300, "{}", r.status);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://site.example")
    );
    ws_status(addr, "/ws", Some("https://site.example"))
        .await
        .expect("any origin may connect by default");

    // Restricted to one origin.
    let (addr, _) = start_server(Config {
        allowed_origins: vec!["https://good.example".into()],
        viewer_token: Some("letmein".into()),
        ..Config::default()
    })
    .await;
    let r = http(
        addr,
        "GET",
        "/api/channels/demo/init",
        &[("Origin", "https://evil.example")],
    )
    .await
    .expect("get");
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = http(
        addr,
        "GET",
        "/api/channels/demo/init",
        &[("Origin", "https://good.example")],
    )
    .await
    .expect("get");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    assert_eq!(
        ws_status(addr, "/ws?token=letmein", Some("https://evil.example")).await,
        Err(403)
    );
    ws_status(addr, "/ws?token=letmein", Some("https://good.example"))
        .await
        .expect("allowed origin");
    let own = format!("http://{addr}");
    ws_status(addr, "/ws?token=letmein", Some(&own))
        .await
        .expect("the server's own pages");
    ws_status(addr, "/ws?token=letmein", None)
        .await
        .expect("non-browser clients send no Origin");
    // The viewer token.
    assert_eq!(ws_status(addr, "/ws", None).await, Err(401));
    assert_eq!(ws_status(addr, "/ws?token=nope", None).await, Err(401));
}

/// Opens a WebSocket (optionally with an Origin header); `Err(status)` if the upgrade is refused.
async fn ws_status(
    addr: std::net::SocketAddr,
    path: &str,
    origin: Option<&str>,
) -> Result<(), u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error;
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", o.parse().expect("header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket {path}: {e}"),
    }
}
