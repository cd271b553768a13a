//! Resuming in cluster mode, against a real etcd (Debian's `etcd-server`, which `cargo xtask
//! test` installs) started by each test on its own ports and data directory, and a node served
//! in this process: resume tokens are re-issued to connected peers before they expire, an
//! expired or forged one is refused, and a resume onto the node where the peer's old session is
//! still open (half-open after a network blip) replaces that session, keeping the peer's place.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{connect, join_msg, next_error, send, Ws};
use control_server::cluster::{self, resume, ClusterConfig};
use control_server::config::Config;
use control_server::dcm::DcmEvent;
use control_server::AppState;
use futures_util::StreamExt;
use protocol::{ClientMsg, ErrorCode, Heartbeat, PeerId, ServerMsg};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const ETCD: &str = "/usr/bin/etcd";
const SECRET: &[u8] = b"cluster-resume-test-secret-0123";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

/// A single-member etcd, killed (by its PID) and its data removed when dropped.
struct Etcd {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        assert!(
            Path::new(ETCD).is_file(),
            "{ETCD} not found: install Debian's etcd-server (`cargo xtask test` does)"
        );
        let dir = std::env::temp_dir().join(format!(
            "cluster-resume-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        let (client, peer) = (
            format!("http://127.0.0.1:{}", free_port()),
            format!("http://127.0.0.1:{}", free_port()),
        );
        let child = Command::new(ETCD)
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        Etcd {
            child,
            url: client,
            dir,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node of a one-node cluster on `etcd`, serving the demo channel on 127.0.0.1.
async fn start_node(etcd: &Etcd, resume_ttl: Duration) -> (SocketAddr, AppState) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = ClusterConfig {
        etcd: vec![etcd.url.clone()],
        node_id: "a".into(),
        advertise_url: format!("http://{addr}"),
        lease_ttl_s: 3,
        secret: SECRET.to_vec(),
        prefix: "/test".into(),
        resume_ttl,
    };
    // etcd takes a moment to answer after it starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let joined = loop {
        match cluster::connect(config.clone()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("etcd not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("joining the cluster: {e}"),
        }
    };
    let state = AppState::new(Config {
        heartbeat_ms: 1000,
        ..Config::default()
    });
    state.join_cluster(joined);
    state.start_demo_channel().expect("demo channel");
    let app = control_server::app(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    wait_for("the demo channel's first fragment", || {
        state.channel("demo").and_then(|c| c.live_position())
    })
    .await;
    (addr, state)
}

/// Polls `f` until it gives something, for at most 10 s.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next control message or close frame, skipping packets and live-edge notices; `None`
/// after 5 s of nothing or when the connection ends.
async fn next(ws: &mut Ws) -> Option<Result<ServerMsg, String>> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        match m {
            Message::Text(t) => {
                let msg: ServerMsg = serde_json::from_str(t.as_str()).expect("JSON");
                if !matches!(msg, ServerMsg::LiveEdge { .. }) {
                    return Some(Ok(msg));
                }
            }
            Message::Close(frame) => {
                return Some(Err(frame.map(|f| f.reason.to_string()).unwrap_or_default()));
            }
            _ => {}
        }
    }
}

/// The peer's id and resume token from its Welcome and Cluster messages (instructions that come
/// before the Cluster message are skipped).
async fn welcomed(ws: &mut Ws) -> (PeerId, String) {
    let peer = match next(ws).await {
        Some(Ok(ServerMsg::Welcome { peer_id, .. })) => peer_id,
        other => panic!("expected a welcome, got {other:?}"),
    };
    loop {
        match next(ws).await {
            Some(Ok(ServerMsg::Cluster { resume_token, .. })) => return (peer, resume_token),
            Some(Ok(_)) => continue,
            other => panic!("expected the cluster message, got {other:?}"),
        }
    }
}

async fn join(ws: &mut Ws) -> (PeerId, String) {
    send(ws, &join_msg(4000)).await;
    welcomed(ws).await
}

fn resume_msg(peer: PeerId, token: &str) -> ClientMsg {
    let ClientMsg::Join {
        version,
        channel,
        upload_kbps,
        ..
    } = join_msg(4000)
    else {
        unreachable!("join_msg makes a join")
    };
    ClientMsg::Join {
        version,
        channel,
        upload_kbps,
        region: None,
        network: None,
        relay_token: None,
        companion: None,
        resume: Some(protocol::Resume {
            peer,
            token: token.to_string(),
        }),
        connectivity: None,
        waypoint: None,
    }
}

fn heartbeat(id: PeerId, seq: u64) -> ClientMsg {
    ClientMsg::Heartbeat(Heartbeat {
        client_id: id,
        seq,
        local_ts_ms: control_server::channel::now_ms(),
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

/// The demo channel's DCM's view of `peer`: its plan and how long it has been placed.
async fn placed(state: &AppState, peer: PeerId) -> Option<(Vec<protocol::SubstreamPlan>, f64)> {
    let ch = state.channel("demo")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    ch.dcm.send(DcmEvent::Snapshot { reply: tx }).await.ok()?;
    let snapshot = rx.await.ok()?;
    let view = snapshot.peers.into_iter().find(|p| p.id == peer)?;
    Some((view.plan, view.uptime_s))
}

#[tokio::test]
async fn a_resume_onto_the_node_where_the_old_session_is_still_open_takes_its_place() {
    let etcd = Etcd::start();
    let (addr, state) = start_node(&etcd, Duration::from_secs(600)).await;
    let mut old = connect(addr).await;
    let (peer, token) = join(&mut old).await;
    let mut other = connect(addr).await;
    let (other_peer, other_token) = join(&mut other).await;
    send(&mut old, &heartbeat(peer, 1)).await;
    let (plan_before, _) = wait_for_placed(&state, peer).await;

    // Somebody else's token, a forged one, and a genuine one of another peer cannot take it.
    let mut thief = connect(addr).await;
    send(&mut thief, &resume_msg(peer, &other_token)).await;
    assert_eq!(next_error(&mut thief).await, ErrorCode::BadResume);
    let mut thief = connect(addr).await;
    let forged = format!("{}.{}", control_server::channel::now_ms(), "00".repeat(32));
    send(&mut thief, &resume_msg(peer, &forged)).await;
    assert_eq!(next_error(&mut thief).await, ErrorCode::BadResume);
    assert!(state.session(peer).is_some(), "the peer's session stays");

    // The old socket goes half-open (this side stops reading); the peer comes back on a new one.
    let mut new = connect(addr).await;
    send(&mut new, &resume_msg(peer, &token)).await;
    let (resumed, fresh) = welcomed(&mut new).await;
    assert_eq!(resumed, peer, "the peer keeps its id");
    assert_ne!(fresh, token, "and gets a new token");
    // Its instructions again: those sent to the old socket may be lost.
    loop {
        match next(&mut new).await {
            Some(Ok(ServerMsg::Instructions { substreams, .. })) => {
                assert_eq!(substreams, plan_before, "the same place");
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected instructions, got {other:?}"),
        }
    }
    // The old session is closed, saying why.
    let reason = loop {
        match next(&mut old).await {
            Some(Ok(_)) => continue,
            Some(Err(reason)) => break reason,
            None => panic!("the old session ended without a close frame"),
        }
    };
    assert_eq!(reason, control_server::ws::REPLACED);
    drop(old);

    // The DCM kept the peer where it was (moved to the new session, not re-placed as a
    // joiner), and its old session's end was not taken for a departure.
    let counters = &state.channel("demo").expect("demo").counters;
    let reconnects = || {
        counters
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_for("the DCM to count the reconnect", || {
        (reconnects() > 0).then_some(())
    })
    .await;
    assert_eq!(reconnects(), 1);
    let (plan, _) = placed(&state, peer).await.expect("still placed");
    assert_eq!(plan, plan_before);
    assert!(placed(&state, other_peer).await.is_some());
    assert!(
        state.session(peer).is_some(),
        "registered to the new session"
    );
    // The new session works: a heartbeat claiming another peer is still refused, its own
    // heartbeats are taken.
    send(&mut new, &heartbeat(other_peer, 3)).await;
    assert_eq!(next_error(&mut new).await, ErrorCode::WrongPeer);
    let before = counters
        .heartbeats
        .load(std::sync::atomic::Ordering::Relaxed);
    send(&mut new, &heartbeat(peer, 4)).await;
    wait_for("the new session's heartbeat", || {
        (counters
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed)
            > before)
            .then_some(())
    })
    .await;
    // By now the old session's end (right after its close frame) would have reached the DCM
    // before that heartbeat, had it been reported.
    assert!(
        placed(&state, peer).await.is_some(),
        "the old session's end was taken for a departure"
    );

    // Leaving from the new session is a departure.
    send(&mut new, &ClientMsg::Leave).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while placed(&state, peer).await.is_some() {
        assert!(Instant::now() < deadline, "the peer's leave was lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(etcd);
}

async fn wait_for_placed(state: &AppState, peer: PeerId) -> (Vec<protocol::SubstreamPlan>, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = placed(state, peer).await.filter(|p| !p.0.is_empty()) {
            return p;
        }
        assert!(Instant::now() < deadline, "{peer} never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn resume_tokens_are_reissued_before_they_expire_and_expired_ones_are_refused() {
    let etcd = Etcd::start();
    let ttl = Duration::from_secs(3);
    let (addr, _state) = start_node(&etcd, ttl).await;
    let mut ws = connect(addr).await;
    let (peer, first) = join(&mut ws).await;
    send(&mut ws, &heartbeat(peer, 1)).await;
    // A fresh token comes unasked, well before the first expires (the page keeps the newest).
    let fresh = loop {
        match next(&mut ws).await {
            Some(Ok(ServerMsg::Cluster { resume_token, .. })) => break resume_token,
            Some(Ok(_)) => continue,
            other => panic!("expected a fresh token, got {other:?}"),
        }
    };
    assert_ne!(fresh, first);
    let issued = |t: &str| -> u64 {
        t.split_once('.')
            .and_then(|(ms, _)| ms.parse().ok())
            .expect("an issue time")
    };
    assert!(issued(&fresh) > issued(&first));
    assert!(
        issued(&fresh) < issued(&first) + ttl.as_millis() as u64,
        "re-issued after the first expired"
    );
    send(&mut ws, &ClientMsg::Leave).await;
    drop(ws);

    // A token older than the lifetime (as a peer cut off too long holds) is refused, and
    // says so; the peer then joins afresh, with a new id.
    let now = control_server::channel::now_ms();
    let expired = resume::token(SECRET, "demo", peer, now - ttl.as_millis() as u64 - 2_000);
    let mut late = connect(addr).await;
    send(&mut late, &resume_msg(peer, &expired)).await;
    match next(&mut late).await {
        Some(Ok(ServerMsg::Error {
            code: ErrorCode::BadResume,
            message,
        })) => assert!(message.contains("expired"), "{message}"),
        other => panic!("expected bad_resume, got {other:?}"),
    }
    let mut again = connect(addr).await;
    let (new_id, _) = join(&mut again).await;
    assert_ne!(new_id, peer);

    // The newest token still opens a resume.
    let mut back = connect(addr).await;
    send(&mut back, &resume_msg(peer, &fresh)).await;
    let (resumed, _) = welcomed(&mut back).await;
    assert_eq!(resumed, peer);
    drop(etcd);
}
