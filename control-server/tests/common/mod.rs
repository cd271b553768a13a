//! Helpers shared by the server's integration tests: a server on 127.0.0.1:0 with the demo
//! channel, and WebSocket clients speaking the real protocol over tokio-tungstenite.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use control_server::config::Config;
use control_server::AppState;
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientMsg, ServerMsg};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn start_server(config: Config) -> (SocketAddr, AppState) {
    serve(config, false).await
}

/// Like [`start_server`], served with connect info, so that sessions have addresses (the
/// per-address limits and bans apply; without it every session is 0.0.0.0's and neither does).
pub async fn start_server_with_addresses(config: Config) -> (SocketAddr, AppState) {
    serve(config, true).await
}

async fn serve(config: Config, addresses: bool) -> (SocketAddr, AppState) {
    let state = AppState::new(config);
    state.start_demo_channel().expect("demo channel");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = control_server::app(state.clone());
    tokio::spawn(async move {
        let _ = if addresses {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        } else {
            axum::serve(listener, app).await
        };
    });
    // Wait for the first fragment so joins are accepted.
    for _ in 0..200 {
        if state
            .channel("demo")
            .and_then(|c| c.live_position())
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (addr, state)
}

pub async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    ws
}

pub async fn send(ws: &mut Ws, msg: &ClientMsg) {
    ws.send(Message::Text(
        serde_json::to_string(msg).expect("json").into(),
    ))
    .await
    .expect("send");
}

pub async fn send_raw(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .expect("send");
}

/// Next control message, skipping binary packets and live-edge notices.
pub async fn next_msg(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        match m {
            Message::Text(t) => {
                let msg: ServerMsg =
                    serde_json::from_str(t.as_str()).expect("server sent bad JSON");
                if !matches!(msg, ServerMsg::LiveEdge { .. }) {
                    return Some(msg);
                }
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// A plain `join` of the demo channel.
pub fn join_msg(upload_kbps: u32) -> ClientMsg {
    ClientMsg::Join {
        version: protocol::PROTOCOL_VERSION,
        channel: "demo".into(),
        upload_kbps,
        region: None,
        network: None,
        relay_token: None,
        companion: None,
        resume: None,
        connectivity: None,
        waypoint: None,
    }
}

pub async fn join(ws: &mut Ws, upload_kbps: u32) -> protocol::PeerId {
    send(ws, &join_msg(upload_kbps)).await;
    match next_msg(ws).await {
        Some(ServerMsg::Welcome { peer_id, .. }) => peer_id,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Waits for the next error message and returns its code.
pub async fn next_error(ws: &mut Ws) -> protocol::ErrorCode {
    loop {
        match next_msg(ws).await {
            Some(ServerMsg::Error { code, .. }) => return code,
            Some(_) => continue,
            None => panic!("connection closed before an error arrived"),
        }
    }
}

/// Reads an HTTP/1.1 response to the end (the request said `Connection: close`), for at most
/// 20 s: (status, the whole text). Status 0 if nothing parsable came.
pub async fn read_response(s: &mut TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}
