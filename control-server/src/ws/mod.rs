//! Peer sessions on the control WebSocket: one task per connection that validates every
//! message, forwards well-formed ones to the channel's DCM and never lets one peer's bad input
//! reach another peer.

mod session;
mod upgrade;

pub use session::{ws_handler, SessionLimits, REPLACED};
pub use upgrade::{UpgradeError, FRAGMENT_BYTES};
