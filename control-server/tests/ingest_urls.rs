//! `GET /api/ingest`, the data of the `/embed` page's "Go live" table: every channel's RTMP and
//! HTTP ingest URLs and a pulled channel's playlist; the stream key (and the playlist, which may
//! carry a CDN's token) only for a request with the operator token.

mod common;
mod prom;

use std::net::SocketAddr;

use common::*;
use control_server::config::Config;
use control_server::source::hls::{self, RenditionChoice};
use serde_json::Value;

const KEY: &str = "s3cret-key";
const TOKEN: &str = "operator-token";
const PLAYLIST: &str = "http://127.0.0.1:9/live/index.m3u8?cdn_token=abc";

async fn ingest(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let r = prom::http(addr, "GET", "/api/ingest", &headers)
        .await
        .expect("request");
    (r.status, r.body)
}

fn channel<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no channel {id} in {v}"))
}

#[tokio::test]
async fn ingest_urls_carry_the_key_for_the_operator_only() {
    let (addr, state) = start_server(Config {
        ingest_key: Some(KEY.into()),
        operator_token: Some(TOKEN.into()),
        ..Config::default()
    })
    .await;
    let rtmp =
        control_server::source::rtmp::listen("127.0.0.1:0".parse().expect("addr"), state.clone())
            .await
            .expect("rtmp listener")
            .local_addr;
    hls::start(&state, "pulled", PLAYLIST, RenditionChoice::default()).expect("pull");

    // Anyone: the URLs, with a placeholder for the key, and no playlist URL.
    let (status, body) = ingest(addr, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(KEY), "the key leaked: {body}");
    assert!(!body.contains("cdn_token"), "the playlist leaked: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["operator"], false);
    let demo = channel(&v, "demo");
    assert_eq!(
        demo["rtmp"]["url"],
        format!("rtmp://{rtmp}/live/demo?key=<your ingest key>")
    );
    assert_eq!(demo["http_path"], "/ingest/demo?key=<your ingest key>");
    assert!(channel(&v, "pulled")["hls_pull"]["url"].is_null());
    assert_eq!(
        v["rtmp"]["url"],
        format!("rtmp://{rtmp}/live/CHANNEL?key=<your ingest key>")
    );

    // The operator: the key, OBS's split, the playlist.
    let (status, body) = ingest(addr, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["operator"], true);
    let demo = channel(&v, "demo");
    assert_eq!(
        demo["rtmp"]["url"],
        format!("rtmp://{rtmp}/live/demo?key={KEY}")
    );
    assert_eq!(demo["rtmp"]["obs_server"], format!("rtmp://{rtmp}/live"));
    assert_eq!(demo["rtmp"]["obs_stream_key"], format!("demo?key={KEY}"));
    assert_eq!(demo["http_path"], format!("/ingest/demo?key={KEY}"));
    let pulled = channel(&v, "pulled");
    assert_eq!(pulled["hls_pull"]["url"], PLAYLIST);
    assert_eq!(v["http_path"], format!("/ingest/CHANNEL?key={KEY}"));

    // A wrong token is refused, not taken for "anyone".
    let (status, body) = ingest(addr, Some("not-the-token")).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains(KEY));
    state.pulls.stop("pulled").await;
}

#[tokio::test]
async fn a_server_without_ingest_lists_no_ingest_urls() {
    let (addr, _state) = start_server(Config::default()).await;
    let (status, body) = ingest(addr, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert!(v["rtmp"].is_null() && v["http_path"].is_null(), "{v}");
    let demo = channel(&v, "demo");
    assert!(
        demo["rtmp"].is_null() && demo["http_path"].is_null(),
        "{demo}"
    );
}
