//! A session the server ends for bad input closes gracefully: the peer receives the last error
//! and a close frame naming the reason even while it is still sending (the server reads and
//! discards its input for a while instead of dropping the socket with unread input, which
//! would make the kernel reset the connection and throw away what the peer had not read).

mod common;

use std::time::Duration;

use common::*;
use control_server::config::Config;
use futures_util::{SinkExt, StreamExt};
use protocol::{ErrorCode, ServerMsg};
use tokio_tungstenite::tungstenite::Message;

/// What the peer saw before the connection ended: error codes, and the close frame's reason
/// (`Err` with the transport error if the connection broke without one).
struct Seen {
    errors: Vec<ErrorCode>,
    close: Result<String, String>,
}

/// Reads until the close frame or a transport error, for at most 15 s.
async fn read_until_close(mut rx: futures_util::stream::SplitStream<Ws>) -> Seen {
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let close = loop {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Err(_) => break Err("no close frame within 15 s".to_string()),
            Ok(None) => break Err("stream ended without a close frame".to_string()),
            Ok(Some(Err(e))) => break Err(format!("transport error: {e}")),
            Ok(Some(Ok(Message::Close(frame)))) => {
                break Ok(frame.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(ServerMsg::Error { code, .. }) = serde_json::from_str(t.as_str()) {
                    errors.push(code);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    };
    Seen { errors, close }
}

/// Sends `first`, then `msg` `n` times (or until the server stops taking them).
fn send_burst(
    mut tx: futures_util::stream::SplitSink<Ws, Message>,
    first: Option<String>,
    msg: &'static str,
    n: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(f) = first {
            if tx.send(Message::Text(f.into())).await.is_err() {
                return;
            }
        }
        for _ in 0..n {
            if tx.send(Message::Text(msg.into())).await.is_err() {
                return;
            }
        }
    })
}

const SIGNAL: &str = r#"{"type":"signal","to":424242,"signal":{"kind":"offer","sdp":"x"}}"#;

#[tokio::test]
async fn a_flooding_peer_receives_rate_limited_and_the_close_reason() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws, 1000).await;
    let (tx, rx) = ws.split();
    // The whole flood is sent before anything is read: the server has long stopped reading when
    // the peer looks at what it got.
    let _ = send_burst(tx, None, SIGNAL, 2000).await;
    let seen = read_until_close(rx).await;
    assert!(
        seen.errors.contains(&ErrorCode::RateLimited),
        "no rate_limited error among {:?} (close: {:?})",
        seen.errors,
        seen.close
    );
    let reason = seen.close.expect("the close frame");
    assert!(
        reason.contains("too many protocol errors") && reason.contains("rate_limited"),
        "close reason {reason:?}"
    );
}

#[tokio::test]
async fn a_peer_sending_too_large_a_message_receives_too_large_and_the_close_reason() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws, 1000).await;
    let (tx, rx) = ws.split();
    let huge = format!(r#"{{"type":"leave","pad":"{}"}}"#, "x".repeat(100_000));
    let _ = send_burst(tx, Some(huge), r#"{"type":"leave","pad":"after"}"#, 2000).await;
    let seen = read_until_close(rx).await;
    assert!(
        seen.errors.contains(&ErrorCode::TooLarge),
        "no too_large error among {:?} (close: {:?})",
        seen.errors,
        seen.close
    );
    let reason = seen.close.expect("the close frame");
    assert!(reason.contains("exceeds 65536"), "close reason {reason:?}");
}
