//! Distribution topology: which peer feeds which, per substream.
//!
//! Pure, sans-IO logic (state in, plan out) so it can be unit-tested and benchmarked natively; the
//! delivery coordinator managers own one instance per channel and turn its [`Changes`] into
//! instructions for the affected peers.

pub mod multitree;

pub use multitree::{Changes, MultiTree, MultiTreeConfig};
