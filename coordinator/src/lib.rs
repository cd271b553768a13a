//! # coordinator
//!
//! Everything the control center decides, as a sans-IO core (see quinn-proto beside quinn):
//!
//! * [`topology`]: the pure placement algorithms of the patent: regions (FIG. 2), preferred
//!   nodes and their c-connected flooding mesh (FIG. 3), coded middle and plain bottom clusters
//!   (FIG. 4, 5), the multi-tree (FIG. 6) and one channel's whole hierarchy (FIG. 7);
//! * [`dcm`]: the delivery coordinator manager, one per channel: joins, leaves, heartbeats and
//!   the view built from them, congestion detection and repair, origin bridges, top-tier
//!   re-evaluation, relay recruitment, restore after failover, and what the origin pushes;
//! * [`start`]: where a joiner starts, one fragment behind the newest or at it (the origin's
//!   egress in a crowd).
//!
//! This crate has no socket, runtime or clock in its dependencies, so the compiler proves that
//! the same code runs under the control server's tokio driver and under the simulator's
//! virtual clock. Time is `u64` milliseconds, given by the caller.

pub mod dcm;
pub mod start;
pub mod topology;

pub use dcm::{
    Adopted, Census, Dcm, DcmConfig, DcmStats, Event, OutMsg, Output, RelayRound, TopologySnapshot,
};
