//! What the operator sees of RTMP ingest: refused publishers (wrong key, a second publisher) and
//! the last error show in the overview's channel row and listener summary (the dashboard's
//! channel table) and in `/metrics`; a publisher that leaves is no longer counted.

mod common;
mod prom;
mod rtmp_client;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use control_server::config::Config;
use rtmp_client::{avc_sequence_header, send_seconds, Publisher};
use serde_json::Value;

const KEY: &str = "sekrit";
const TOKEN: &str = "operator-token";

async fn overview(addr: SocketAddr) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let r = prom::http(
        addr,
        "GET",
        "/api/operator/overview",
        &[("Authorization", &auth)],
    )
    .await
    .expect("overview");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("overview JSON")
}

async fn metrics(addr: SocketAddr) -> prom::Exposition {
    let r = prom::http(addr, "GET", "/metrics", &[])
        .await
        .expect("metrics");
    prom::parse(&r.body).expect("valid exposition")
}

#[tokio::test]
async fn refused_rtmp_publishers_show_in_the_overview_and_metrics() {
    let (addr, state) = start_server(Config {
        ingest_key: Some(KEY.into()),
        operator_token: Some(TOKEN.into()),
        ..Config::default()
    })
    .await;
    let rtmp = control_server::source::rtmp::listen("127.0.0.1:0".parse().expect("addr"), state)
        .await
        .expect("rtmp listener")
        .local_addr;
    let mut first = Publisher::publish(rtmp, &format!("cam?key={KEY}"))
        .await
        .expect("publish");
    first.video(0, avc_sequence_header()).await;
    send_seconds(&mut first, 0, 2).await;
    let second = Publisher::publish(rtmp, &format!("cam?key={KEY}")).await;
    assert!(second.is_err(), "a second publisher was let in");
    let wrong = Publisher::publish(rtmp, "cam?key=nope").await;
    assert!(wrong.err().is_some_and(|e| e.contains("wrong stream key")));
    // A wrong key for a channel that does not exist: the listener's last error only.
    let _ = Publisher::publish(rtmp, "nosuch?key=nope").await;

    let v = overview(addr).await;
    let cam = v["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "cam"))
        .expect("cam in the overview");
    let row = &cam["rtmp"];
    assert_eq!(row["publishing"], true, "{row}");
    assert_eq!(row["publishes"], 1, "{row}");
    assert_eq!(row["refusals"], 2, "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("wrong stream key")),
        "{row}"
    );
    assert!(
        v["channels"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["id"] != "nosuch")),
        "a refused name became a channel"
    );
    let listener = &v["rtmp"];
    assert_eq!(listener["listening"], format!("rtmp://{rtmp}/live"));
    assert_eq!(listener["publishers"], 1, "{listener}");
    assert_eq!(listener["refusals"]["key"], 2, "{listener}");
    assert_eq!(listener["refusals"]["busy"], 1, "{listener}");
    assert_eq!(listener["last_error"]["channel"], "nosuch", "{listener}");
    assert_eq!(listener["last_error"]["kind"], "key", "{listener}");
    let demo = v["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "demo"))
        .expect("demo");
    assert!(demo["rtmp"].is_null(), "RTMP never touched demo: {demo}");

    let m = metrics(addr).await;
    assert_eq!(m.types["p2p_rtmp_refusals_total"], "counter");
    assert_eq!(m.sum("p2p_rtmp_refusals_total", &[("reason", "key")]), 2.0);
    assert_eq!(m.sum("p2p_rtmp_refusals_total", &[("reason", "busy")]), 1.0);
    assert_eq!(
        m.sum("p2p_rtmp_refusals_total", &[("reason", "codec")]),
        0.0
    );
    assert_eq!(m.sum("p2p_rtmp_publishers", &[]), 1.0);
    assert_eq!(m.sum("p2p_rtmp_publishes_total", &[]), 1.0);

    // The publisher leaves (its connection drops): no publisher, nothing counted as refused.
    drop(first);
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(addr).await;
        if m.sum("p2p_rtmp_publishers", &[]) == 0.0 {
            assert_eq!(m.sum("p2p_rtmp_refusals_total", &[]), 3.0);
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the publisher stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = overview(addr).await;
    let cam = v["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "cam"))
        .expect("cam");
    assert_eq!(cam["rtmp"]["publishing"], false, "{cam}");
}
