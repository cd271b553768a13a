//! # control-server
//!
//! The patent's control center (FIG. 1, FIG. 7) as an axum service:
//!
//! * [`origin`]: turns fragmented MP4 (demo loop, file, stdin, HTTP ingest) into numbered packets
//!   and keeps a bounded window of them for joiners and for peers' fallback fetches.
//! * [`topology`]: pure multi-tree construction (state in, plan out), unit-tested natively.
//! * [`dcm`]: a delivery coordinator manager per channel: a task that owns the channel's
//!   topology and sessions and turns joins, leaves and heartbeats into instructions.
//! * [`ws`]: one WebSocket session per peer: parsing, validation, signaling relay.
pub mod origin;
pub mod topology;
