//! A download session names the live session it accompanies (claim 1): the server splits the
//! page's upload live-first and refuses companions that are unknown, not live, or of another
//! address.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{next_error, next_msg, send, Ws};
use control_server::config::Config;
use control_server::AppState;
use protocol::{ClientMsg, ErrorCode, PeerId, ServerMsg};

/// A server that sees clients' addresses (the companion check compares them).
async fn start() -> (SocketAddr, AppState) {
    let state = AppState::new(Config {
        file_kbps: 1000,
        ..Config::default()
    });
    state.start_demo_channel().expect("demo channel");
    state
        .start_file_channel("file", vec![5u8; 40_000])
        .expect("file channel");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = control_server::app(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    for _ in 0..200 {
        let ready = ["demo", "file"]
            .iter()
            .all(|c| state.channel(c).and_then(|c| c.live_position()).is_some());
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (addr, state)
}

/// Connects from `local` (another loopback address stands for another machine).
async fn connect_from(addr: SocketAddr, local: [u8; 4]) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((local, 0)))
        .expect("bind local address");
    let tcp = socket.connect(addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("websocket");
    ws
}

fn join(channel: &str, upload_kbps: u32, companion: Option<PeerId>) -> ClientMsg {
    ClientMsg::Join {
        version: protocol::PROTOCOL_VERSION,
        channel: channel.into(),
        upload_kbps,
        region: None,
        network: None,
        companion,
        relay_token: None,
        resume: None,
        connectivity: None,
        waypoint: None,
    }
}

#[tokio::test]
async fn download_beside_live_gets_the_upload_live_does_not_need() {
    let (addr, state) = start().await;
    let mut live = connect_from(addr, [127, 0, 0, 1]).await;
    send(&mut live, &join("demo", 1000, None)).await;
    let Some(ServerMsg::Welcome {
        peer_id: live_id,
        stream_kbps: live_kbps,
        file: None,
        ..
    }) = next_msg(&mut live).await
    else {
        panic!("live welcome expected");
    };
    let mut dl = connect_from(addr, [127, 0, 0, 1]).await;
    send(&mut dl, &join("file", 1000, Some(live_id))).await;
    let welcome = loop {
        match next_msg(&mut dl).await {
            Some(m @ ServerMsg::Welcome { .. }) => break m,
            Some(_) => continue,
            None => panic!("download session closed"),
        }
    };
    let ServerMsg::Welcome {
        file: Some(info),
        upload_kbps: Some(granted),
        ..
    } = welcome
    else {
        panic!("download welcome without file or share: {welcome:?}");
    };
    assert_eq!(
        Some(&info),
        state
            .channel("file")
            .and_then(|c| c.file().cloned())
            .as_ref()
    );
    assert_eq!((info.size, info.pieces), (40_000, 3));
    // Live keeps at least one stream's worth; the file gets the rest (at most its rate).
    assert_eq!(granted, (1000 - live_kbps.min(1000)).min(1000));
    assert!(granted < 1000);
}

#[tokio::test]
async fn bad_companions_are_refused() {
    let (addr, _state) = start().await;
    let mut live = connect_from(addr, [127, 0, 0, 1]).await;
    send(&mut live, &join("demo", 1000, None)).await;
    let Some(ServerMsg::Welcome {
        peer_id: live_id, ..
    }) = next_msg(&mut live).await
    else {
        panic!("live welcome expected");
    };
    // Unknown session.
    let mut ws = connect_from(addr, [127, 0, 0, 1]).await;
    send(&mut ws, &join("file", 1000, Some(PeerId(999_999)))).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadCompanion);
    // A session of another address.
    let mut other = connect_from(addr, [127, 0, 0, 2]).await;
    send(&mut other, &join("file", 1000, Some(live_id))).await;
    assert_eq!(next_error(&mut other).await, ErrorCode::BadCompanion);
    // A companion on a live channel (companions are for downloads).
    send(&mut ws, &join("demo", 1000, Some(live_id))).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadCompanion);
    // A download as companion of a download.
    send(&mut ws, &join("file", 1000, None)).await;
    let dl_id = loop {
        match next_msg(&mut ws).await {
            Some(ServerMsg::Welcome { peer_id, .. }) => break peer_id,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    let mut third = connect_from(addr, [127, 0, 0, 1]).await;
    send(&mut third, &join("file", 1000, Some(dl_id))).await;
    assert_eq!(next_error(&mut third).await, ErrorCode::BadCompanion);
}

#[test]
fn empty_files_and_name_clashes_are_start_up_errors() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let state = AppState::new(Config::default());
        assert!(matches!(
            state.start_file_channel("f", Vec::new()),
            Err(control_server::ServerError::EmptyFile(_))
        ));
        state.start_demo_channel().expect("demo");
        assert!(matches!(
            state.start_file_channel("demo", vec![1]),
            Err(control_server::ServerError::ChannelExists(_))
        ));
    });
}
