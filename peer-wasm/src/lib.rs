//! # peer-wasm
//!
//! The browser peer. [`engine`] is the sans-IO core (relay, reorder, upload cap, origin
//! fallback, heartbeats), tested natively; [`web`] is the thin web-sys glue (control WebSocket,
//! WebRTC data channels, MediaSource, fetch) exposed to JavaScript as `P2pPeer`.

pub mod engine;
#[cfg(target_arch = "wasm32")]
pub mod web;

#[cfg(target_arch = "wasm32")]
pub use web::P2pPeer;
