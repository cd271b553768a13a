//! Bad input from a peer gets a clear error, never a panic, and other viewers do not notice.

mod common;

use common::*;
use control_server::config::Config;
use protocol::{ClientMsg, ErrorCode, Heartbeat, PeerId, ServerMsg, Signal, PROTOCOL_VERSION};

/// A join with no region hint, network, companion or relay token.
fn join_msg(version: u32, channel: &str, upload_kbps: u32) -> ClientMsg {
    join_with(version, channel, upload_kbps, None, None)
}

fn join_with(
    version: u32,
    channel: &str,
    upload_kbps: u32,
    network: Option<&str>,
    relay_token: Option<&str>,
) -> ClientMsg {
    ClientMsg::Join {
        version,
        channel: channel.into(),
        upload_kbps,
        region: None,
        network: network.map(String::from),
        companion: None,
        relay_token: relay_token.map(String::from),
        resume: None,
        connectivity: None,
        waypoint: None,
    }
}

fn heartbeat(id: PeerId, seq: u64) -> ClientMsg {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ClientMsg::Heartbeat(Heartbeat {
        client_id: id,
        seq,
        local_ts_ms: now,
        parents: vec![],
        children: vec![],
        buffer: vec![],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up: 0,
        origin_fallbacks: 0,
        upload_kbps: 0,
        send_backlog_ms: 0,
        place: None,
    })
}

#[tokio::test]
async fn malformed_and_unknown_messages_get_errors_and_the_session_survives() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    send_raw(&mut ws, "this is not json").await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    send_raw(&mut ws, r#"{"type":"explode"}"#).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    send(&mut ws, &heartbeat(PeerId(1), 1)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::NotJoined);
    // Still usable afterwards.
    let id = join(&mut ws, 1000).await;
    assert!(id.0 > 0);
}

#[tokio::test]
async fn join_with_bad_version_channel_or_capacity_is_refused() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    send(&mut ws, &join_msg(99, "demo", 1)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::UnsupportedVersion);
    send(&mut ws, &join_msg(1, "nope", 1)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::UnknownChannel);
    send(&mut ws, &join_msg(1, "demo", u32::MAX)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadCapacity);
    // A relay token nobody issued, and a network type nobody knows.
    send(&mut ws, &join_with(1, "demo", 1, None, Some("forged"))).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadRelayToken);
    send(
        &mut ws,
        &join_with(1, "demo", 1, Some("carrier-pigeon"), None),
    )
    .await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    join(&mut ws, 500).await;
    send(&mut ws, &join_msg(1, "demo", 1)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::AlreadyJoined);
}

#[tokio::test]
async fn heartbeats_claiming_another_peer_or_going_backwards_are_refused() {
    let (addr, _state) = start_server(Config {
        heartbeat_ms: 100,
        ..Config::default()
    })
    .await;
    let mut ws = connect(addr).await;
    let me = join(&mut ws, 1000).await;
    send(&mut ws, &heartbeat(PeerId(me.0 + 1000), 1)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::WrongPeer);
    send(&mut ws, &heartbeat(me, 5)).await;
    tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    send(&mut ws, &heartbeat(me, 4)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    // A burst of three is tolerated (jitter, early reports); a flood is not.
    for seq in 6..12 {
        send(&mut ws, &heartbeat(me, seq)).await;
    }
    assert_eq!(next_error(&mut ws).await, ErrorCode::RateLimited);
}

#[tokio::test]
async fn heartbeats_with_absurd_timestamps_or_in_binary_garbage_are_refused() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    let me = join(&mut ws, 1000).await;
    let ClientMsg::Heartbeat(mut hb) = heartbeat(me, 1) else {
        unreachable!()
    };
    hb.local_ts_ms = 12;
    send(&mut ws, &ClientMsg::Heartbeat(hb)).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Binary(vec![1, 0xff, 0xff, 0xff].into()),
    )
    .await
    .expect("send");
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
    // A well-formed binary heartbeat is accepted (no error follows; the session stays).
    let ClientMsg::Heartbeat(hb) = heartbeat(me, 2) else {
        unreachable!()
    };
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Binary(
            protocol::heartbeat::binary::encode(&hb).into(),
        ),
    )
    .await
    .expect("send");
    send_raw(&mut ws, "garbage").await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::Malformed);
}

#[tokio::test]
async fn signaling_only_between_linked_peers() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut a = connect(addr).await;
    let ida = join(&mut a, 5000).await;
    let mut b = connect(addr).await;
    let idb = join(&mut b, 5000).await;
    let offer = Signal::Offer { sdp: "v=0".into() };
    // a and b are linked (two high-capacity peers feed each other in the multi-tree).
    send(
        &mut a,
        &ClientMsg::Signal {
            to: idb,
            signal: offer.clone(),
        },
    )
    .await;
    loop {
        match next_msg(&mut b).await {
            Some(ServerMsg::Signal { from, signal }) => {
                assert_eq!(from, ida);
                assert_eq!(signal, offer);
                break;
            }
            Some(_) => continue,
            None => panic!("b closed"),
        }
    }
    // A peer id nobody is linked with.
    send(
        &mut a,
        &ClientMsg::Signal {
            to: PeerId(987_654),
            signal: offer,
        },
    )
    .await;
    assert_eq!(next_error(&mut a).await, ErrorCode::NotLinked);
}

#[tokio::test]
async fn oversize_message_closes_only_that_session() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut other = connect(addr).await;
    join(&mut other, 1000).await;
    let mut bad = connect(addr).await;
    let huge = format!(r#"{{"type":"leave","pad":"{}"}}"#, "x".repeat(200_000));
    // The server may close before the whole frame is read; either way no panic.
    let _ = futures_util::SinkExt::send(
        &mut bad,
        tokio_tungstenite::tungstenite::Message::Text(huge.into()),
    )
    .await;
    while next_msg(&mut bad).await.is_some() {}
    // The other viewer still gets packets.
    let got_packet = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use futures_util::StreamExt;
        while let Some(Ok(m)) = other.next().await {
            if m.is_binary() {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(got_packet, "the well-behaved peer stopped receiving");
}

#[tokio::test]
async fn flooding_is_rate_limited() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws, 1000).await;
    // The burst allowance is 2 s worth (200 messages); ten more trip the limiter without
    // exhausting the error budget (which would close the session).
    for _ in 0..210 {
        send_raw(
            &mut ws,
            r#"{"type":"signal","to":424242,"signal":{"kind":"offer","sdp":"x"}}"#,
        )
        .await;
    }
    let mut saw_rate_limit = false;
    while let Some(m) = next_msg(&mut ws).await {
        if let ServerMsg::Error {
            code: ErrorCode::RateLimited,
            ..
        } = m
        {
            saw_rate_limit = true;
            break;
        }
    }
    assert!(saw_rate_limit);
}

#[tokio::test]
async fn a_link_that_never_opened_is_re_planned_and_a_report_about_yourself_is_refused() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut a = connect(addr).await;
    let ida = join(&mut a, 5000).await;
    let mut b = connect(addr).await;
    let idb = join(&mut b, 5000).await;
    // Two strong peers feed each other: b has a as its parent in some substream.
    let under_a = |plan: &[protocol::SubstreamPlan]| {
        plan.iter()
            .any(|s| s.parent == protocol::Source::Peer { id: ida })
    };
    loop {
        match next_msg(&mut b).await {
            Some(ServerMsg::Instructions { substreams, .. }) if under_a(&substreams) => break,
            Some(_) => continue,
            None => panic!("b closed"),
        }
    }
    send(&mut b, &ClientMsg::LinkFailed { peer: ida }).await;
    loop {
        match next_msg(&mut b).await {
            Some(ServerMsg::Instructions { substreams, .. }) => {
                assert!(!under_a(&substreams), "{substreams:?}");
                break;
            }
            Some(_) => continue,
            None => panic!("b closed"),
        }
    }
    send(&mut b, &ClientMsg::LinkFailed { peer: idb }).await;
    assert_eq!(next_error(&mut b).await, ErrorCode::NotLinked);
}

#[tokio::test]
async fn a_resume_on_a_lone_server_is_refused_and_the_channel_goes_on() {
    let (addr, _state) = start_server(Config::default()).await;
    let mut other = connect(addr).await;
    let other_id = join(&mut other, 2000).await;
    let mut ws = connect(addr).await;
    let ClientMsg::Join {
        version,
        channel,
        upload_kbps,
        ..
    } = join_msg(PROTOCOL_VERSION, "demo", 2000)
    else {
        unreachable!("join_msg makes a join")
    };
    let forged = ClientMsg::Join {
        version,
        channel,
        upload_kbps,
        region: None,
        network: None,
        companion: None,
        relay_token: None,
        // Someone else's id, with a made-up token.
        resume: Some(protocol::Resume {
            peer: other_id,
            token: "00".repeat(32),
        }),
        connectivity: None,
        waypoint: None,
    };
    send(&mut ws, &forged).await;
    assert_eq!(next_error(&mut ws).await, ErrorCode::BadResume);
    // The peer whose id was claimed still has its session.
    send(&mut other, &heartbeat(other_id, 1)).await;
    send(&mut other, &ClientMsg::Leave).await;
}

/// Sends `head` (a request without a body) and returns the response's status and text.
async fn request(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    read_response(&mut s).await
}

#[tokio::test]
async fn requests_to_the_websocket_endpoint_that_are_not_upgrades_are_told_why() {
    let (addr, _state) = start_server(Config::default()).await;
    let plain = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (status, text) = request(addr, &plain).await;
    assert_eq!(status, 426, "{text}");
    assert!(text.contains("WebSocket connections"), "{text}");
    let old = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let (status, text) = request(addr, &old).await;
    assert_eq!(status, 426, "{text}");
    assert!(text.contains("version 13"), "{text}");
    let keyless = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: close, Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (status, text) = request(addr, &keyless).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Sec-WebSocket-Key"), "{text}");
    // And a real client still connects (the accept key is right) and joins.
    let mut ws = connect(addr).await;
    let me = join(&mut ws, 1000).await;
    assert!(me.0 > 0);
}
