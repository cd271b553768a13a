//! HTTP ingest: fragmented MP4 becomes a live channel; anything else is refused with a clear
//! error and running channels are untouched.

mod common;

use std::time::Duration;

use common::*;
use control_server::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 PUT with a chunked body, returning (status, body).
async fn put(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    // The server may answer (and stop reading) before the body is complete: stop writing then.
    let _ = async {
        s.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(7_000) {
            s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            s.write_all(chunk).await?;
            s.write_all(b"\r\n").await?;
        }
        s.write_all(b"0\r\n\r\n").await
    }
    .await;
    read_response(&mut s).await
}

fn config() -> Config {
    Config {
        ingest_key: Some("sekrit".into()),
        ..Config::default()
    }
}

#[tokio::test]
async fn non_mp4_ingest_is_refused_and_the_running_channel_is_untouched() {
    let (addr, state) = start_server(config()).await;
    let demo = state.channel("demo").expect("demo");
    let before = demo.live_position();
    let (status, body) = put(
        addr,
        "/ingest/demo2?key=sekrit",
        b"\x89PNG\r\n\x1a\n not a video at all",
    )
    .await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("not fragmented MP4"), "{body}");
    assert!(
        state.channel("demo2").is_none(),
        "a refused ingest must not create a channel"
    );
    // Ingest into the running demo channel is refused: it already has a source.
    let (status, _) = put(addr, "/ingest/demo?key=sekrit", control_server::DEMO_CLIP).await;
    assert_eq!(status, 409);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        demo.live_position() > before,
        "demo channel stopped producing"
    );
}

#[tokio::test]
async fn wrong_key_is_forbidden() {
    let (addr, _state) = start_server(config()).await;
    let (status, body) = put(addr, "/ingest/x?key=nope", control_server::DEMO_CLIP).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn fragmented_mp4_ingest_becomes_a_channel_with_packets_and_init() {
    let (addr, state) = start_server(config()).await;
    let (status, body) = put(addr, "/ingest/cam1?key=sekrit", control_server::DEMO_CLIP).await;
    assert_eq!(status, 200, "{body}");
    let ch = state.channel("cam1").expect("channel created");
    let (init, mime, _) = ch.init().expect("init segment");
    assert!(mime.starts_with("video/mp4"), "{mime}");
    assert!(init.len() > 100);
    let (start, live) = ch.live_position().expect("packets");
    assert!(
        start > 0 && start <= live,
        "newest random-access point {start} of {live}"
    );
    // 20 fragments of ~56 kB each, in packets of at most 16 KiB.
    assert!(live >= 60, "only {live} packets");
    // Every byte of the clip after the init segment is in the packets, in order.
    let mut payload = Vec::new();
    for seq in 0..=live {
        match ch.packet(seq) {
            control_server::origin::Lookup::Found(b) => {
                payload.extend_from_slice(protocol::Packet::decode(&b).expect("packet").payload)
            }
            other => panic!("packet {seq}: {other:?}"),
        }
    }
    let expected = &control_server::DEMO_CLIP[init.len()..];
    // The file ends with an `mfra` index box, which is not media and is not sent.
    let tail = &expected[payload.len().min(expected.len())..];
    assert!(
        expected.starts_with(&payload) && (tail.is_empty() || &tail[4..8] == b"mfra"),
        "packets carry {} bytes, the clip after its init segment has {}",
        payload.len(),
        expected.len()
    );
    // A second source for a channel whose source ended is accepted again.
    assert!(!ch
        .source_attached
        .load(std::sync::atomic::Ordering::Relaxed));
}

/// A non-fragmented MP4 (`ftyp`, then a large `mdat`) uploaded slowly in chunks, as
/// `cat movie.mp4 | curl -T - URL` does: the publisher gets the 415 and its reason, and every
/// byte it sends is taken (no reset, no broken pipe), even though the server knew after the
/// first chunk.
#[tokio::test]
async fn a_slow_non_fragmented_upload_gets_its_415_without_a_broken_pipe() {
    let (addr, _state) = start_server(config()).await;
    let mut body = Vec::new();
    body.extend_from_slice(&[0, 0, 0, 16]);
    body.extend_from_slice(b"ftypisom\0\0\x02\0");
    let mdat_len: u32 = 3_000_000;
    body.extend_from_slice(&mdat_len.to_be_bytes());
    body.extend_from_slice(b"mdat");
    body.resize(8 + 16 + mdat_len as usize, 0x5a);

    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /ingest/movie?key=sekrit HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let (mut rd, mut wr) = s.into_split();
    // Read the answer concurrently, as curl does while it uploads.
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    });
    let mut sent = 0usize;
    for (i, chunk) in body.chunks(64 * 1024).enumerate() {
        let write = async {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(chunk).await?;
            wr.write_all(b"\r\n").await
        };
        if let Err(e) = write.await {
            panic!("send failure after {sent} of {} bytes: {e}", body.len());
        }
        sent += chunk.len();
        // Slowly: a few chunks at a time, as a pipe delivers them.
        if i % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wr.write_all(b"0\r\n\r\n").await.expect("last chunk");
    let text = reader.await.expect("reader");
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert_eq!(status, 415, "{text}");
    assert!(
        text.contains("not fragmented MP4") && text.contains("mdat"),
        "{text}"
    );
}
