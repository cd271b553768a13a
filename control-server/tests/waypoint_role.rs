//! A waypoint server (issue 15) joins with the operator token: listed as a waypoint in the
//! topology and `/metrics`; a wrong token is refused with `bad_waypoint_token`.

mod common;
mod prom;

use std::time::{Duration, Instant};

use common::{connect, join_msg, next_error, next_msg, send, start_server};
use control_server::config::Config;
use prom::{http, operator_json, parse};
use protocol::{ClientMsg, ErrorCode, ServerMsg};

fn as_waypoint(token: &str) -> ClientMsg {
    let mut m = join_msg(20_000);
    if let ClientMsg::Join {
        waypoint,
        connectivity,
        ..
    } = &mut m
    {
        *waypoint = Some(token.to_string());
        *connectivity = Some(protocol::Connectivity::OPEN);
    }
    m
}

#[tokio::test]
async fn a_waypoint_joins_with_the_operator_token_and_is_listed_as_one() {
    let (addr, state) = start_server(Config::default()).await;
    let token = state.operator_token().to_string();
    let mut bad = connect(addr).await;
    send(&mut bad, &as_waypoint("not-the-token")).await;
    assert_eq!(next_error(&mut bad).await, ErrorCode::BadWaypointToken);

    let mut wp = connect(addr).await;
    send(&mut wp, &as_waypoint(&token)).await;
    let id = match next_msg(&mut wp).await {
        Some(ServerMsg::Welcome { peer_id, .. }) => peer_id,
        other => panic!("expected welcome, got {other:?}"),
    };
    let mut viewer = connect(addr).await;
    send(&mut viewer, &join_msg(300)).await;
    assert!(matches!(
        next_msg(&mut viewer).await,
        Some(ServerMsg::Welcome { .. })
    ));
    let t0 = Instant::now();
    loop {
        let topo = operator_json(addr, "/api/channels/demo/topology", &token).await;
        let peers = topo["peers"].as_array().cloned().unwrap_or_default();
        let flagged: Vec<(u64, bool)> = peers
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["waypoint"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        if flagged.len() == 2 {
            assert_eq!(
                flagged.iter().filter(|(_, w)| *w).collect::<Vec<_>>(),
                vec![&(id.0, true)],
                "only the waypoint is one"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{topo}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http(addr, "GET", "/metrics", &[]).await.expect("metrics");
    let e = parse(&r.body).expect("Prometheus text");
    assert_eq!(e.sum("p2p_waypoints", &[("channel", "demo")]), 1.0);
    drop((wp, viewer));
}
