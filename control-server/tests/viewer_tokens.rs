//! Signed viewer tokens (`--token-secret`): checked at join, refused with distinct error codes
//! and a close frame naming the reason; a valid token (or the static viewer token) joins.

mod common;

use std::time::Duration;

use common::*;
use control_server::config::Config;
use control_server::viewer_token::{unix_now_s, ViewerClaims};
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use protocol::{ErrorCode, ServerMsg};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a site's secret of at least 32 bytes";

fn mint(secret: &str, channel: &str, exp: u64) -> String {
    let claims = ViewerClaims {
        channel: channel.into(),
        exp,
        sub: Some("viewer-1".into()),
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("mint")
}

/// Joins with `token` and returns the first control message and the close reason, if any.
async fn try_join(addr: std::net::SocketAddr, token: Option<&str>) -> (ServerMsg, Option<String>) {
    let url = match token {
        Some(t) => format!("ws://{addr}/ws?token={t}"),
        None => format!("ws://{addr}/ws"),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the upgrade is accepted: the token is checked at join");
    send(&mut ws, &join_msg(1000)).await;
    let first = next_msg(&mut ws).await.expect("an answer to join");
    if matches!(first, ServerMsg::Welcome { .. }) {
        return (first, None);
    }
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(f) = m {
                return f.map(|f| f.reason.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    (first, close)
}

fn code(m: &ServerMsg) -> Option<ErrorCode> {
    match m {
        ServerMsg::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn signed_tokens_are_checked_at_join_with_distinct_codes() {
    let (addr, _state) = start_server(Config {
        token_secret: Some(SECRET.into()),
        viewer_token: Some("static-token".into()),
        ..Config::default()
    })
    .await;
    let now = unix_now_s();

    let (m, _) = try_join(addr, Some(&mint(SECRET, "demo", now + 300))).await;
    assert!(matches!(m, ServerMsg::Welcome { .. }), "valid token: {m:?}");
    let (m, _) = try_join(addr, Some("static-token")).await;
    assert!(
        matches!(m, ServerMsg::Welcome { .. }),
        "static token: {m:?}"
    );

    let cases = [
        (
            Some(mint(SECRET, "demo", now - 3600)),
            ErrorCode::TokenExpired,
            "expired",
        ),
        (
            Some(mint(SECRET, "other", now + 300)),
            ErrorCode::TokenWrongChannel,
            "\"other\"",
        ),
        (
            Some(mint(
                "another secret, also 32 bytes long",
                "demo",
                now + 300,
            )),
            ErrorCode::TokenInvalid,
            "signature",
        ),
        (Some("not-a-jwt".into()), ErrorCode::TokenInvalid, "invalid"),
        (None, ErrorCode::TokenInvalid, "needs a viewer token"),
    ];
    for (token, want, words) in cases {
        let (m, close) = try_join(addr, token.as_deref()).await;
        assert_eq!(code(&m), Some(want), "{token:?}: {m:?}");
        let reason = close.unwrap_or_else(|| panic!("{want:?}: no close frame"));
        assert!(reason.contains(words), "{want:?}: close reason {reason:?}");
    }
}
