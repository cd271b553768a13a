//! NAT classes (issue 15) through the real server: a class given in `Join` or reported later
//! with `ClientMsg::Connectivity` places the peer (two endpoint-dependent peers are never parent
//! and child), shows in the topology API and counts in `/metrics`.

mod common;
mod prom;

use std::time::{Duration, Instant};

use common::{connect, join, join_msg, next_msg, send, start_server};
use control_server::config::Config;
use prom::{http, operator_json, parse};
use protocol::{ClientMsg, Connectivity, NatClass, PeerId, ServerMsg, Source};

fn with_class(upload_kbps: u32, class: NatClass) -> ClientMsg {
    let mut m = join_msg(upload_kbps);
    if let ClientMsg::Join { connectivity, .. } = &mut m {
        *connectivity = Some(Connectivity { class, turn: false });
    }
    m
}

/// Each peer's parents by id, from the topology API.
fn parents(topo: &serde_json::Value) -> Vec<(u64, Vec<u64>)> {
    topo["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| {
            let id = p["id"].as_u64().expect("id");
            let plan: Vec<protocol::SubstreamPlan> =
                serde_json::from_value(p["plan"].clone()).expect("plan");
            let ps = plan
                .iter()
                .filter_map(|s| match s.parent {
                    Source::Peer { id } => Some(id.0),
                    Source::Origin => None,
                })
                .collect();
            (id, ps)
        })
        .collect()
}

#[tokio::test]
async fn nat_classes_place_peers_and_show_in_the_topology_and_metrics() {
    let (addr, state) = start_server(Config::default()).await;
    let token = state.operator_token().to_string();
    // Four endpoint-dependent peers with plenty of upload, and one that reports its class late.
    let mut edm = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(addr).await;
        send(&mut ws, &with_class(8000, NatClass::EndpointDependent)).await;
        match next_msg(&mut ws).await {
            Some(ServerMsg::Welcome { peer_id, .. }) => ids.push(peer_id),
            other => panic!("expected welcome, got {other:?}"),
        }
        edm.push(ws);
    }
    let mut late = connect(addr).await;
    let late_id = join(&mut late, 8000).await;
    send(
        &mut late,
        &ClientMsg::Connectivity(Connectivity {
            class: NatClass::EndpointIndependent,
            turn: false,
        }),
    )
    .await;
    let t0 = Instant::now();
    loop {
        let topo = operator_json(addr, "/api/channels/demo/topology", &token).await;
        let classes: Vec<(u64, Option<String>)> = topo["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["connectivity"]["class"].as_str().map(String::from),
                )
            })
            .collect();
        let late_known = classes
            .iter()
            .any(|(id, c)| *id == late_id.0 && c.as_deref() == Some("endpoint_independent"));
        if late_known {
            // Nobody hangs under a peer its class cannot reach: the endpoint-dependent peers
            // and the endpoint-independent one only under the origin.
            for (id, ps) in parents(&topo) {
                assert!(ps.is_empty(), "peer {id} hangs under peers {ps:?}");
            }
            let edm_seen = classes
                .iter()
                .filter(|(id, c)| {
                    ids.contains(&PeerId(*id)) && c.as_deref() == Some("endpoint_dependent")
                })
                .count();
            assert_eq!(edm_seen, 4, "{classes:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the late class never showed: {classes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An open peer joins: the others may hang under it, and it under them.
    let mut open = connect(addr).await;
    send(&mut open, &with_class(8000, NatClass::Open)).await;
    let open_id = match next_msg(&mut open).await {
        Some(ServerMsg::Welcome { peer_id, .. }) => peer_id,
        other => panic!("expected welcome, got {other:?}"),
    };
    let t0 = Instant::now();
    loop {
        let topo = operator_json(addr, "/api/channels/demo/topology", &token).await;
        let links = parents(&topo);
        // The open peer may hang under anyone; the others only under it.
        for (id, ps) in links.iter().filter(|(id, _)| *id != open_id.0) {
            assert!(
                ps.iter().all(|p| *p == open_id.0),
                "peer {id} hangs under {ps:?}, not only the open peer"
            );
        }
        if links
            .iter()
            .any(|(id, ps)| *id != open_id.0 && ps.contains(&open_id.0))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nobody was placed under the open peer: {links:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http(addr, "GET", "/metrics", &[]).await.expect("metrics");
    let e = parse(&r.body).expect("Prometheus text");
    let count = |class: &str| {
        e.sum(
            "p2p_viewers_by_nat_class",
            &[("channel", "demo"), ("class", class)],
        )
    };
    assert_eq!(count("endpoint_dependent"), 4.0);
    assert_eq!(count("endpoint_independent"), 1.0);
    assert_eq!(count("open"), 1.0);
    assert_eq!(count("unknown"), 0.0);
    drop((edm, late, open));
}
