//! Web glue: everything here only moves bytes and timers between the browser and the
//! [`crate::engine::Engine`]. JS callbacks are owned by the Rust structs that registered them and
//! are detached when those structs drop; nothing is leaked with `Closure::forget`.

mod bench;
mod fetch;
mod media;
mod nat;
mod peer;
mod rtc;

pub use bench::verify_benchmark;
pub use peer::P2pPeer;

use wasm_bindgen::JsValue;

/// Turns a JS exception into a readable message, once, at the boundary.
pub(crate) fn js_err(context: &str, e: &JsValue) -> String {
    let detail = e
        .as_string()
        .or_else(|| {
            js_sys::Reflect::get(e, &JsValue::from_str("message"))
                .ok()
                .and_then(|m| m.as_string())
        })
        .unwrap_or_else(|| format!("{e:?}"));
    format!("{context}: {detail}")
}

pub(crate) fn now_ms() -> f64 {
    js_sys::Date::now()
}

pub(crate) fn perf_now() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

#[cfg(test)]
mod tests;
