//! Issue 13 at the server, over real WebSockets: the stream is signed (manifests on every
//! control socket, checkable with the key the HTTP API publishes), forgery reports that hold
//! evict the peer they prove and ban its address, and false reports count against their sender.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use protocol::manifest::{Manifest, ManifestBook, StreamKey};
use protocol::{ClientMsg, ErrorCode, PeerId, ServerMsg, Source};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Reads what is queued on `ws` for up to `wait`: the latest plan's peer parents, manifests,
/// error codes, and whether the socket closed.
#[derive(Default, Debug)]
struct Seen {
    parents: Vec<PeerId>,
    manifests: Vec<Vec<u8>>,
    errors: Vec<ErrorCode>,
    closed: bool,
}

async fn drain(ws: &mut Ws, wait: Duration, seen: &mut Seen) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(m) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return;
        };
        match m {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(t.as_str()) {
                Ok(ServerMsg::Instructions { substreams, .. }) => {
                    seen.parents = substreams
                        .iter()
                        .filter_map(|s| match s.parent {
                            Source::Peer { id } => Some(id),
                            Source::Origin => None,
                        })
                        .collect();
                }
                Ok(ServerMsg::Error { code, .. }) => seen.errors.push(code),
                _ => {}
            },
            Some(Ok(Message::Binary(b))) if b.first() == Some(&b'M') => {
                seen.manifests.push(b.to_vec())
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                seen.closed = true;
                return;
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    read_response(&mut s).await.1
}

#[tokio::test]
async fn manifests_reach_every_peer_signed_with_the_published_key_and_cover_the_packets() {
    let (addr, state) = start_server(control_server::config::Config::default()).await;
    let response = http_get(addr, "/api/channels/demo/key").await;
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    let json: serde_json::Value = serde_json::from_str(body).expect("json");
    let key = StreamKey::from_hex(json["public_key"].as_str().expect("key")).expect("valid key");
    let mut ws = connect(addr).await;
    join(&mut ws, 2000).await;
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.manifests.len() < 3 && tokio::time::Instant::now() < deadline {
        drain(&mut ws, Duration::from_millis(200), &mut seen).await;
    }
    assert!(seen.manifests.len() >= 3, "{seen:?}");
    let ch = state.channel("demo").expect("demo");
    let mut book = ManifestBook::new(key, "demo");
    let mut checked = 0;
    for frame in &seen.manifests {
        let range = book
            .add(frame)
            .expect("a manifest signed with the published key");
        for seq in range {
            if let Some(origin) = ch.packet_digest(seq) {
                assert_eq!(book.digest(seq), Some(&origin), "packet {seq}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    assert_eq!(book.broken_chain, 0, "consecutive manifests chain");
    let m = Manifest::decode(&seen.manifests[0]).expect("decode");
    assert_eq!(m.channel, "demo");
}

/// Joins `n` peers and lets their plans settle; returns sockets, ids and what each saw.
async fn swarm(addr: std::net::SocketAddr, n: usize) -> (Vec<Ws>, Vec<PeerId>, Vec<Seen>) {
    let mut socks = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut ws = connect(addr).await;
        ids.push(join(&mut ws, 4000).await);
        socks.push(ws);
    }
    let mut seen: Vec<Seen> = (0..n).map(|_| Seen::default()).collect();
    for (ws, s) in socks.iter_mut().zip(seen.iter_mut()) {
        drain(ws, Duration::from_millis(300), s).await;
    }
    (socks, ids, seen)
}

/// A peer that is the parent of two others: (its index, the two children's indices).
fn parent_of_two(ids: &[PeerId], seen: &[Seen]) -> Option<(usize, usize, usize)> {
    let mut children: HashMap<PeerId, Vec<usize>> = HashMap::new();
    for (i, s) in seen.iter().enumerate() {
        for p in &s.parents {
            if !children.entry(*p).or_default().contains(&i) {
                children.entry(*p).or_default().push(i);
            }
        }
    }
    children.into_iter().find_map(|(p, kids)| {
        let at = ids.iter().position(|x| *x == p)?;
        (kids.len() >= 2).then(|| (at, kids[0], kids[1]))
    })
}

#[tokio::test]
async fn a_forger_reported_by_two_children_is_evicted_and_its_address_banned() {
    let (addr, state) =
        start_server_with_addresses(control_server::config::Config::default()).await;
    let (mut socks, ids, mut seen) = swarm(addr, 8).await;
    let (forger, a, b) = parent_of_two(&ids, &seen).expect("a parent of two peers");
    let ch = state.channel("demo").expect("demo");
    let (_, live) = ch.live_position().expect("live");
    let report = |seq| ClientMsg::Forged {
        peer: ids[forger],
        seq,
        // Not the origin's hash of `seq`: what a bit-flipping parent would have sent.
        hash: "00".repeat(32),
    };
    send(&mut socks[a], &report(live)).await;
    send(&mut socks[b], &report(live)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen[forger].closed && tokio::time::Instant::now() < deadline {
        drain(
            &mut socks[forger],
            Duration::from_millis(100),
            &mut seen[forger],
        )
        .await;
    }
    assert!(seen[forger].closed, "the forger's session is closed");
    assert!(
        seen[forger].errors.contains(&ErrorCode::Evicted),
        "{:?}",
        seen[forger].errors
    );
    // Nobody is linked to it any more: every other peer's plan was rewritten without it.
    for (i, ws) in socks.iter_mut().enumerate() {
        if i != forger {
            drain(ws, Duration::from_millis(300), &mut seen[i]).await;
            assert!(
                !seen[i].parents.contains(&ids[forger]),
                "peer {} still under the evicted peer",
                ids[i]
            );
            assert!(!seen[i].closed, "an honest peer was closed");
        }
    }
    // Its address (127.0.0.1 here) is refused for the ban time.
    let mut again = connect(addr).await;
    send(&mut again, &join_msg(1000)).await;
    assert_eq!(next_error(&mut again).await, ErrorCode::Banned);
    let metrics = http_get(addr, "/metrics").await;
    assert!(
        metrics.contains("p2p_evictions_total{channel=\"demo\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn false_reports_evict_the_reporter_not_the_accused() {
    let (addr, state) = start_server(control_server::config::Config::default()).await;
    let (mut socks, ids, mut seen) = swarm(addr, 6).await;
    let liar = (0..ids.len())
        .find(|i| !seen[*i].parents.is_empty())
        .expect("a peer with a peer parent");
    let accused = seen[liar].parents[0];
    let ch = state.channel("demo").expect("demo");
    let (_, live) = ch.live_position().expect("live");
    // The true hash of a packet the accused forwarded: the evidence does not hold.
    let genuine = protocol::manifest::hex(&ch.packet_digest(live).expect("digest"));
    for _ in 0..3 {
        send(
            &mut socks[liar],
            &ClientMsg::Forged {
                peer: accused,
                seq: live,
                hash: genuine.clone(),
            },
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen[liar].closed && tokio::time::Instant::now() < deadline {
        drain(
            &mut socks[liar],
            Duration::from_millis(100),
            &mut seen[liar],
        )
        .await;
    }
    assert!(seen[liar].closed && seen[liar].errors.contains(&ErrorCode::Evicted));
    let at = ids.iter().position(|p| *p == accused).expect("accused");
    drain(&mut socks[at], Duration::from_millis(300), &mut seen[at]).await;
    assert!(!seen[at].closed, "the accused honest peer stays");
    // A malformed hash is a protocol error, not a report.
    let other = (0..ids.len())
        .find(|i| *i != liar && *i != at)
        .expect("peer");
    send_raw(
        &mut socks[other],
        &format!(
            r#"{{"type":"forged","peer":{},"seq":1,"hash":"zz"}}"#,
            accused.0
        ),
    )
    .await;
    assert_eq!(next_error(&mut socks[other]).await, ErrorCode::Malformed);
}
