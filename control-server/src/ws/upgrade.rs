//! The WebSocket upgrade of `/ws`, done here rather than by axum's `WebSocketUpgrade`, so that a
//! session owns tokio-tungstenite's stream and can send a large message as fragments.
//!
//! Why: tungstenite copies every frame it sends into a write buffer whose capacity never
//! shrinks. Through axum's socket every message is one frame, so a session that was once sent a
//! media packet (a tree root, a bridged peer: 16 KiB and more) kept that much memory for the
//! rest of its life. Sent as frames of at most [`FRAGMENT_BYTES`], a message costs the buffer
//! one fragment. Browsers reassemble fragmented messages themselves (RFC 6455, section 5.4).

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

/// A peer's control socket.
pub type PeerSocket = WebSocketStream<TokioIo<Upgraded>>;

/// Messages longer than this go out as fragments of this size.
pub const FRAGMENT_BYTES: usize = 2048;

/// Why a request to `/ws` is not a WebSocket upgrade this server accepts.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("a WebSocket upgrade is a GET request")]
    NotGet,
    #[error("this endpoint takes WebSocket connections (HTTP/1.1 with `Connection: upgrade` and `Upgrade: websocket`)")]
    NotAnUpgrade,
    #[error("WebSocket over HTTP/2 is not supported here; connect with HTTP/1.1")]
    Http2,
    #[error("the Sec-WebSocket-Key header is missing")]
    NoKey,
    #[error("only WebSocket version 13 is supported (Sec-WebSocket-Version)")]
    Version,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeError::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::NotAnUpgrade | UpgradeError::Version => StatusCode::UPGRADE_REQUIRED,
            UpgradeError::Http2 | UpgradeError::NoKey => StatusCode::BAD_REQUEST,
            UpgradeError::NotUpgradable => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

/// An accepted WebSocket upgrade request, not yet answered.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.version > Version::HTTP_11 {
            return Err(UpgradeError::Http2);
        }
        if parts.method != Method::GET {
            return Err(UpgradeError::NotGet);
        }
        if !header_has(&parts.headers, header::CONNECTION, "upgrade")
            || !header_has(&parts.headers, header::UPGRADE, "websocket")
        {
            return Err(UpgradeError::NotAnUpgrade);
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeError::Version);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeError::NoKey)?
            .clone();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and runs `session` on the socket once the connection
    /// is upgraded (in a task of its own).
    pub fn on_upgrade<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(PeerSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    session(socket).await;
                }
                Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(Body::empty());
        match response {
            Ok(r) => r,
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }
}

/// Sends `msg`, as fragments of at most [`FRAGMENT_BYTES`] when it is a longer text or binary
/// message (see the module's documentation); other messages go as they are.
pub async fn send_fragmented<S>(socket: &mut WebSocketStream<S>, msg: Message) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (payload, first) = match msg {
        Message::Text(t) if t.len() > FRAGMENT_BYTES => (bytes::Bytes::from(t), Data::Text),
        Message::Binary(b) if b.len() > FRAGMENT_BYTES => (b, Data::Binary),
        other => return socket.send(other).await,
    };
    let mut at = 0;
    while at < payload.len() {
        let end = (at + FRAGMENT_BYTES).min(payload.len());
        let opcode = if at == 0 { first } else { Data::Continue };
        let frame = Frame::message(
            payload.slice(at..end),
            OpCode::Data(opcode),
            end == payload.len(),
        );
        // Fed, not flushed: each frame is written as it comes (the write buffer's threshold is
        // 0), and the flush below waits for the last of them.
        socket.feed(Message::Frame(frame)).await?;
        at = end;
    }
    socket.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A server socket and a client that refuses any frame longer than a fragment, over an
    /// in-memory pipe.
    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(
            a,
            Role::Server,
            Some(WebSocketConfig::default().write_buffer_size(0)),
        )
        .await;
        let client = WebSocketStream::from_raw_socket(
            b,
            Role::Client,
            Some(WebSocketConfig::default().max_frame_size(Some(FRAGMENT_BYTES))),
        )
        .await;
        (server, client)
    }

    #[tokio::test]
    async fn long_messages_arrive_whole_from_frames_no_longer_than_a_fragment() {
        let (mut server, mut client) = pair().await;
        let binary: Vec<u8> = (0..5 * FRAGMENT_BYTES + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let text = "é".repeat(FRAGMENT_BYTES + 3); // a fragment boundary inside a character
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(client.next().await.expect("open").expect("valid frames"));
            }
            got
        });
        send_fragmented(&mut server, Message::Binary(binary.clone().into()))
            .await
            .expect("sent");
        send_fragmented(&mut server, Message::Text(text.clone().into()))
            .await
            .expect("sent");
        send_fragmented(
            &mut server,
            Message::Binary(vec![7u8; FRAGMENT_BYTES].into()),
        )
        .await
        .expect("sent");
        send_fragmented(&mut server, Message::Text("short".into()))
            .await
            .expect("sent");
        let got = reader.await.expect("reader");
        assert_eq!(got[0], Message::Binary(binary.into()));
        assert_eq!(got[1], Message::Text(text.into()));
        assert_eq!(got[2], Message::Binary(vec![7u8; FRAGMENT_BYTES].into()));
        assert_eq!(got[3], Message::Text("short".into()));
    }
}
