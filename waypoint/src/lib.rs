//! The native peer (issue 15): the browser's sans-IO peer engine (`peer_wasm::engine`) driven
//! by tokio, with WebRTC data channels from [`str0m`] (sans-IO WebRTC, like the engine), speaking
//! the same control protocol over tokio-tungstenite. It joins a channel as an ordinary viewer
//! that verifies and relays bytes (as the browser's non-decoding viewers do) and interoperates
//! with browser peers both ways: same signaling messages, same `p2p` data channel, one packet
//! per binary message.
//!
//! * [`link`]: one str0m `Rtc` per neighbour (sans-IO).
//! * [`peer`]: one peer's state and its async driver.
//! * [`swarm`]: many peers in one process, on worker threads.

pub mod fetch;
pub mod link;
pub mod peer;
pub mod swarm;

pub use peer::PeerConfig;
pub use swarm::{NativeSwarm, SwarmConfig};

use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control connection: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("control connection closed by the server {0}")]
    ControlClosed(String),
    #[error("WebRTC: {0}")]
    Rtc(String),
    #[error("SDP: {0}")]
    Sdp(String),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Wall clock in ms since the Unix epoch (the engine's clock, as `Date.now()` in the page:
/// packets carry their creation time at the origin).
pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Installs str0m's crypto (pure Rust). Idempotent.
pub fn init_crypto() {
    str0m::crypto::from_feature_flags().install_process_default();
}

/// The address to offer as our ICE host candidate: the first IPv4 address of an interface
/// that is up and not loopback (browsers gather no loopback candidates), else 127.0.0.1.
pub fn default_ice_ip() -> IpAddr {
    if_addrs::get_if_addrs()
        .ok()
        .and_then(|ifs| {
            ifs.into_iter()
                .filter(|i| !i.is_loopback())
                .map(|i| i.ip())
                .find(IpAddr::is_ipv4)
        })
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}
