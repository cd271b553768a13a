//! Abuse limits (issue 13, the table in docs/protocol.md): each one is exceeded from one
//! address and refused with its error (or HTTP status) and its close reason, counted in
//! `p2p_limit_refusals_total{limit}`, while sessions under the limit, and other addresses, carry
//! on. Clients connect from 127.0.0.1 and 127.0.0.2 (both loopback) to be two addresses.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use control_server::config::Config;
use control_server::limits::AddressLimits;
use control_server::AppState;
use futures_util::{SinkExt, StreamExt};
use protocol::{ErrorCode, ServerMsg};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// Polls `cond` (an expression, which may `.await`) every 20 ms until it holds; panics after 10 s.
macro_rules! wait_for {
    ($what:expr, $cond:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !$cond {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

const HOME: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The server, with connect info so that sessions have addresses.
async fn start(config: Config) -> (SocketAddr, AppState) {
    start_server_with_addresses(config).await
}

async fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(IpAddr::V4(from), 0))
        .expect("bind source address");
    sock.connect(to).await.expect("connect")
}

/// A control WebSocket from source address `from`.
async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> Ws {
    let tcp = tcp_from(from, addr).await;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), MaybeTlsStream::Plain(tcp))
            .await
            .expect("websocket handshake");
    ws
}

/// Reads until the close frame (at most 10 s): the error codes and messages seen, and the close
/// reason (`Err` if the connection ended without one).
async fn until_close(ws: &mut Ws) -> (Vec<(ErrorCode, String)>, Result<String, String>) {
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let close = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => break Err("no close frame within 10 s".to_string()),
            Ok(None) => break Err("stream ended without a close frame".to_string()),
            Ok(Some(Err(e))) => break Err(format!("transport error: {e}")),
            Ok(Some(Ok(Message::Close(f)))) => {
                break Ok(f.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(ServerMsg::Error { code, message }) = serde_json::from_str(t.as_str()) {
                    errors.push((code, message));
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    (errors, close)
}

/// The session is alive: a malformed message is answered with `malformed`, not a close.
async fn assert_alive(ws: &mut Ws) {
    send_raw(ws, r#"{"type":"explode"}"#).await;
    assert_eq!(next_error(ws).await, ErrorCode::Malformed);
}

/// `p2p_limit_refusals_total{limit="…"}` as `/metrics` renders it.
async fn refusals(state: &AppState, limit: &str) -> u64 {
    let text = control_server::metrics::render(state).await;
    let prefix = format!("p2p_limit_refusals_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in the exposition"))
}

fn limits(l: AddressLimits) -> Config {
    Config {
        address_limits: l,
        // These sessions never send heartbeats: a slow run must not see them closed as silent
        // (the DCM's cut-off scales with the interval).
        heartbeat_ms: 60_000,
        ..Config::default()
    }
}

#[tokio::test]
async fn sessions_over_the_per_address_limit_are_refused_with_too_many_sessions() {
    let (addr, state) = start(limits(AddressLimits {
        sessions: 3,
        ..AddressLimits::default()
    }))
    .await;
    let mut joined = connect_from(HOME, addr).await;
    join(&mut joined, 1000).await;
    let mut idle = vec![
        connect_from(HOME, addr).await,
        connect_from(HOME, addr).await,
    ];
    assert_eq!(refusals(&state, "sessions_per_address").await, 0);

    // The fourth from the same address: the error names the limit, then the close frame.
    let mut fourth = connect_from(HOME, addr).await;
    let (errors, close) = until_close(&mut fourth).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, ErrorCode::TooManySessions);
    assert!(
        errors[0].1.contains("at most 3") && errors[0].1.contains("--max-sessions-per-address"),
        "{}",
        errors[0].1
    );
    let reason = close.expect("a close frame with its reason");
    assert!(reason.contains("too many sessions"), "{reason:?}");
    assert_eq!(refusals(&state, "sessions_per_address").await, 1);

    // The sessions under the limit never noticed; another address is not counted with them.
    assert_alive(&mut joined).await;
    let mut other = connect_from(OTHER, addr).await;
    join(&mut other, 1000).await;

    // A session that ends gives its slot back.
    drop(idle.pop());
    wait_for!("a freed slot to take a new session", {
        let mut ws = connect_from(HOME, addr).await;
        send(&mut ws, &join_msg(1000)).await;
        matches!(next_msg(&mut ws).await, Some(ServerMsg::Welcome { .. }))
    });
    assert_alive(&mut joined).await;
}

#[tokio::test]
async fn joins_over_the_per_minute_limit_are_refused_with_rate_limited() {
    let (addr, state) = start(limits(AddressLimits {
        joins_per_minute: 3,
        ..AddressLimits::default()
    }))
    .await;
    let mut first = connect_from(HOME, addr).await;
    join(&mut first, 1000).await;
    let mut socks = Vec::new();
    for _ in 0..2 {
        let mut ws = connect_from(HOME, addr).await;
        join(&mut ws, 1000).await;
        socks.push(ws);
    }
    let mut fourth = connect_from(HOME, addr).await;
    send(&mut fourth, &join_msg(1000)).await;
    let (errors, close) = until_close(&mut fourth).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, ErrorCode::RateLimited);
    assert!(
        errors[0].1.contains("at most 3 per minute") && errors[0].1.contains("try again in"),
        "{}",
        errors[0].1
    );
    assert!(close.expect("close frame").contains("too many joins"));
    assert_eq!(refusals(&state, "joins_per_minute").await, 1);
    // Joined sessions carry on; another address joins.
    assert_alive(&mut first).await;
    let mut other = connect_from(OTHER, addr).await;
    join(&mut other, 1000).await;
}

#[tokio::test]
async fn control_traffic_over_the_per_address_rate_is_dropped_with_rate_limited() {
    // 2000 B/s with a burst of 8000 B, shared by the address's sessions.
    let (addr, state) = start(limits(AddressLimits {
        control_bytes_per_sec: 2000,
        ..AddressLimits::default()
    }))
    .await;
    let mut heavy = connect_from(HOME, addr).await;
    join(&mut heavy, 1000).await;
    let mut neighbour = connect_from(HOME, addr).await;
    join(&mut neighbour, 1000).await;
    let mut other = connect_from(OTHER, addr).await;
    join(&mut other, 1000).await;
    // Messages the server takes without an answer, padded to ~1000 bytes.
    let padded = format!(
        r#"{{"type":"link_failed","peer":987654,"pad":"{}"}}"#,
        "x".repeat(950)
    );
    for _ in 0..12 {
        send_raw(&mut heavy, &padded).await;
    }
    let (code, message) = loop {
        match next_msg(&mut heavy).await {
            Some(ServerMsg::Error { code, message }) => break (code, message),
            Some(_) => continue,
            None => panic!("closed before an error"),
        }
    };
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(
        message.contains("exceeds 2000 bytes/s") && message.contains("--max-control-bytes-per-sec"),
        "{message}"
    );
    // One error per message over the rate (the flood of 12 had a burst of 8 to spend).
    let dropped = refusals(&state, "control_bytes_per_sec").await;
    assert!((1..=12).contains(&dropped), "{dropped}");
    // Another address is not affected at all: its messages are read and answered.
    assert_alive(&mut other).await;
    // Once the bucket refills, the address's sessions are read again (the heavy one was not
    // closed for it: only its error budget could do that).
    wait_for!("the address's bucket to refill", {
        send_raw(&mut neighbour, r#"{"type":"explode"}"#).await;
        next_error(&mut neighbour).await == ErrorCode::Malformed
    });
    // The rest of its refusals may still be queued, and a message sent while the bucket is
    // still short (the neighbour's probes spend it too) is refused as well, answered
    // `RateLimited` like them: read until nothing is pending, then send again. A few tries at
    // most, since each refusal spends the session's error budget.
    let mut tries = 0;
    'read_again: loop {
        send_raw(&mut heavy, r#"{"type":"explode"}"#).await;
        tries += 1;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), next_error(&mut heavy)).await {
                Ok(ErrorCode::RateLimited) => continue,
                Ok(code) => {
                    assert_eq!(code, ErrorCode::Malformed);
                    break 'read_again;
                }
                Err(_) => break,
            }
        }
        assert!(
            tries < 5,
            "the heavy session's messages were never read again"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn the_per_session_limits_are_counted_and_configurable() {
    let (addr, state) = start(Config {
        session_limits: control_server::SessionLimits {
            max_message_bytes: 2048,
            ..control_server::SessionLimits::default()
        },
        ..Config::default()
    })
    .await;
    // Signaling a peer the server did not link: not_linked, counted, the session carries on.
    let mut ws = connect_from(HOME, addr).await;
    join(&mut ws, 1000).await;
    send_raw(
        &mut ws,
        r#"{"type":"signal","to":424242,"signal":{"kind":"offer","sdp":"x"}}"#,
    )
    .await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::NotLinked);
    wait_for!(
        "not_linked to be counted",
        refusals(&state, "not_linked").await == 1
    );
    assert_alive(&mut ws).await;

    // A message over --max-message-bytes: too_large and the close.
    let big = format!(r#"{{"type":"leave","pad":"{}"}}"#, "x".repeat(3000));
    send_raw(&mut ws, &big).await;
    let (errors, close) = until_close(&mut ws).await;
    assert_eq!(
        errors.last().map(|e| e.0),
        Some(ErrorCode::TooLarge),
        "{errors:?}"
    );
    assert!(close.expect("close frame").contains("exceeds 2048"));
    assert_eq!(refusals(&state, "message_size").await, 1);

    // A flood over the message rate: rate_limited, counted.
    let mut flood = connect_from(HOME, addr).await;
    join(&mut flood, 1000).await;
    let (mut tx, mut rx) = flood.split();
    for _ in 0..400 {
        if tx
            .send(Message::Text(
                r#"{"type":"link_failed","peer":987654}"#.into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut limited = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
        if let Message::Text(t) = m {
            if let Ok(ServerMsg::Error { code, .. }) = serde_json::from_str(t.as_str()) {
                limited |= code == ErrorCode::RateLimited;
            }
        }
        if limited {
            break;
        }
    }
    assert!(limited, "no rate_limited error");
    assert!(refusals(&state, "messages_per_sec").await >= 1);
}

/// A minimal HTTP/1.1 PUT from source address `from`, returning (status, response text).
async fn put_from(from: Ipv4Addr, addr: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = tcp_from(from, addr).await;
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await
    }
    .await;
    read_response(&mut s).await
}

#[tokio::test]
async fn ingest_may_create_only_so_many_channels_per_address() {
    let (addr, state) = start(Config {
        ingest_key: Some("sekrit".into()),
        address_limits: AddressLimits {
            ingest_channels: 2,
            ..AddressLimits::default()
        },
        ..Config::default()
    })
    .await;
    let clip = control_server::DEMO_CLIP;
    for name in ["cam1", "cam2"] {
        let (status, text) =
            put_from(HOME, addr, &format!("/ingest/{name}?key=sekrit"), clip).await;
        assert_eq!(status, 200, "{text}");
    }
    let (status, text) = put_from(HOME, addr, "/ingest/cam3?key=sekrit", clip).await;
    assert_eq!(status, 429, "{text}");
    assert!(
        text.contains("already created 2 channels")
            && text.contains("--max-ingest-channels-per-address"),
        "{text}"
    );
    assert!(
        state.channel("cam3").is_none(),
        "a refused ingest created a channel"
    );
    assert_eq!(refusals(&state, "ingest_channels_per_address").await, 1);
    // Publishing again into a channel it created is not a new channel.
    let (status, text) = put_from(HOME, addr, "/ingest/cam1?key=sekrit", clip).await;
    assert_eq!(status, 200, "{text}");
    // Another address has its own allowance.
    let (status, text) = put_from(OTHER, addr, "/ingest/cam3?key=sekrit", clip).await;
    assert_eq!(status, 200, "{text}");
    // A channel that is gone no longer counts.
    state.remove_channel("cam2");
    let (status, text) = put_from(HOME, addr, "/ingest/cam4?key=sekrit", clip).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn under_the_default_limits_sixty_sessions_of_one_address_join() {
    // The e2e tests open ~60 pages from 127.0.0.1 within a minute.
    let (addr, state) = start(Config::default()).await;
    let mut socks = Vec::new();
    for _ in 0..60 {
        let mut ws = connect_from(HOME, addr).await;
        join(&mut ws, 1000).await;
        socks.push(ws);
    }
    for ws in socks.iter_mut().step_by(10) {
        assert_alive(ws).await;
    }
    for l in control_server::limits::Limit::ALL {
        assert_eq!(refusals(&state, l.label()).await, 0, "{}", l.label());
    }
}

#[tokio::test]
async fn refused_viewer_tokens_are_counted() {
    let (addr, state) = start(Config {
        token_secret: Some("s".repeat(32)),
        ..Config::default()
    })
    .await;
    let mut ws = connect_from(HOME, addr).await;
    send(&mut ws, &join_msg(1000)).await;
    let (errors, close) = until_close(&mut ws).await;
    assert_eq!(errors.first().map(|e| e.0), Some(ErrorCode::TokenInvalid));
    assert!(close.is_ok(), "{close:?}");
    assert_eq!(refusals(&state, "viewer_token").await, 1);
    assert_eq!(refusals(&state, "banned_address").await, 0);
}
