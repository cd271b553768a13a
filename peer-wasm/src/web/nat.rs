//! The page's NAT probe (issue 15): asks the control server for its STUN URLs and for the
//! address it sees the page from (`GET /api/connectivity`), gathers ICE candidates against both
//! STUN ports (and the site's own `ice_servers`, for TURN) with a throw-away RTCPeerConnection,
//! and hands them to [`crate::engine::nat::classify`]. It runs beside the join, never before it.

use std::cell::RefCell;
use std::rc::Rc;

use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{RtcConfiguration, RtcPeerConnection, RtcPeerConnectionIceEvent, RtcSdpType};

use super::js_err;
use super::rtc::make_description;
use crate::engine::nat::{classify, Candidate, Classified};

/// Longest wait for ICE gathering to complete: STUN answers arrive within a round trip, and a
/// network that drops UDP would otherwise hold gathering for Chrome's retransmissions.
pub(crate) const GATHER_TIMEOUT_MS: i32 = 2000;

/// `GET /api/connectivity`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ServerView {
    #[serde(default)]
    pub stun: Vec<String>,
    #[serde(default)]
    pub observed: Option<String>,
}

pub(crate) async fn server_view(base_url: &str) -> Result<ServerView, String> {
    let url = format!("{base_url}/api/connectivity");
    let window = web_sys::window().ok_or("no window")?;
    let resp = JsFuture::from(window.fetch_with_str(&url))
        .await
        .map_err(|e| js_err("fetch /api/connectivity", &e))?;
    let resp: web_sys::Response = resp.dyn_into().map_err(|_| "fetch: not a Response")?;
    if !resp.ok() {
        // An older server without the endpoint: no STUN, no classification.
        return Ok(ServerView::default());
    }
    let text = JsFuture::from(resp.text().map_err(|e| js_err("reading body", &e))?)
        .await
        .map_err(|e| js_err("reading body", &e))?
        .as_string()
        .unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| format!("/api/connectivity: {e}"))
}

/// The `iceServers` value for the STUN URLs plus the site's own servers (`site`: a JS array or
/// undefined).
pub(crate) fn ice_servers_with(stun: &[String], site: &JsValue) -> JsValue {
    let arr = js_sys::Array::new();
    for url in stun {
        let server = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&server, &"urls".into(), &JsValue::from_str(url));
        arr.push(&server);
    }
    if let Some(site) = site.dyn_ref::<js_sys::Array>() {
        for s in site.iter() {
            arr.push(&s);
        }
    }
    arr.into()
}

/// Gathers candidates with `ice_servers` for at most [`GATHER_TIMEOUT_MS`], then classifies.
pub(crate) async fn probe(
    ice_servers: &JsValue,
    observed: Option<&str>,
) -> Result<Classified, String> {
    let cfg = RtcConfiguration::new();
    cfg.set_ice_servers(ice_servers);
    let pc = RtcPeerConnection::new_with_configuration(&cfg)
        .map_err(|e| js_err("RTCPeerConnection", &e))?;
    let lines: Rc<RefCell<Vec<String>>> = Rc::default();
    let mut resolve: Option<js_sys::Function> = None;
    let done = js_sys::Promise::new(&mut |res, _| resolve = Some(res));
    let resolve = resolve.ok_or("Promise did not call its executor")?;
    let seen = lines.clone();
    let finish = resolve.clone();
    let on_ice = Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(
        move |ev: RtcPeerConnectionIceEvent| match ev.candidate() {
            Some(c) => seen.borrow_mut().push(c.candidate()),
            // The end of gathering.
            None => {
                let _ = finish.call0(&JsValue::NULL);
            }
        },
    );
    pc.set_onicecandidate(Some(on_ice.as_ref().unchecked_ref()));
    let window = web_sys::window().ok_or("no window")?;
    let timer = window
        .set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, GATHER_TIMEOUT_MS)
        .map_err(|e| js_err("setTimeout", &e))?;
    // A data channel gives the offer something to gather for.
    let _dc = pc.create_data_channel("probe");
    let outcome = match make_description(&pc, RtcSdpType::Offer).await {
        Ok(_) => JsFuture::from(done)
            .await
            .map(|_| ())
            .map_err(|e| js_err("gathering", &e)),
        Err(e) => Err(e),
    };
    window.clear_timeout_with_handle(timer);
    pc.set_onicecandidate(None);
    pc.close();
    drop(on_ice);
    outcome?;
    let lines = lines.borrow();
    web_sys::console::log_1(&JsValue::from_str(&format!(
        "NAT probe gathered: {}",
        lines.join(" | ")
    )));
    let candidates: Vec<Candidate> = lines.iter().filter_map(|l| Candidate::parse(l)).collect();
    Ok(classify(&candidates, observed))
}
