//! Distribution topology: which peer feeds which, per substream.
//!
//! Pure, sans-IO logic (state in, plan out) so it can be unit-tested and benchmarked natively; the
//! delivery coordinator managers own one instance per channel and turn its [`Changes`] into
//! instructions for the affected peers.
//!
//! The hierarchy of the patent (FIG. 2-7), one file per idea:
//!
//! * [`region`]: grouping peers into regions by configured rules (FIG. 2);
//! * [`mesh`]: preferred nodes and their c-connected flooding mesh, the top tier (FIG. 3);
//! * [`cluster`]: a cluster of a region's middle (erasure-coded) or bottom tier (FIG. 4, 5);
//! * [`multitree`]: the multi-tree each cluster runs (FIG. 6);
//! * [`hierarchy`]: one channel's whole hierarchy, its plans per peer, recruited relays and
//!   the live-over-file capacity split (FIG. 7, claims 1-10, 19, 43).

pub mod cluster;
pub mod hierarchy;
pub mod mesh;
pub mod multitree;
pub mod region;

pub use multitree::{Changes, MultiTree, MultiTreeConfig};
