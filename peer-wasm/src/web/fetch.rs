//! Fallback fetches from the origin over HTTP.

use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use super::js_err;

pub(crate) enum Fetched {
    Bytes(Vec<u8>),
    /// 404: not produced yet.
    NotYet,
    /// 410: left the origin's window.
    Gone,
    Failed(String),
}

pub(crate) async fn fetch_bytes(url: &str) -> Fetched {
    let Some(window) = web_sys::window() else {
        return Fetched::Failed("no window".into());
    };
    let resp = match JsFuture::from(window.fetch_with_str(url)).await {
        Ok(r) => r,
        Err(e) => return Fetched::Failed(js_err("fetch", &e)),
    };
    let Ok(resp) = resp.dyn_into::<web_sys::Response>() else {
        return Fetched::Failed("fetch did not return a Response".into());
    };
    match resp.status() {
        200 => {}
        404 => return Fetched::NotYet,
        410 => return Fetched::Gone,
        s => return Fetched::Failed(format!("GET {url}: HTTP {s}")),
    }
    let buf = match resp.array_buffer() {
        Ok(p) => JsFuture::from(p).await,
        Err(e) => Err(e),
    };
    match buf {
        Ok(b) => Fetched::Bytes(js_sys::Uint8Array::new(&b).to_vec()),
        Err(e) => Fetched::Failed(js_err("reading body", &e)),
    }
}
