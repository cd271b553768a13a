//! # protocol
//!
//! The one crate that owns every type crossing a wire in this system:
//!
//! * [`control`]: JSON messages on the control WebSocket between a browser peer and the
//!   control center ([`ClientMsg`] peer → server, [`ServerMsg`] server → peer), versioned by
//!   [`PROTOCOL_VERSION`].
//! * [`packet`]: the binary media packet that origins create and peers relay over WebRTC data
//!   channels (and that the origin serves over HTTP as fallback).
//! * [`heartbeat`]: the FIG. 9 heartbeat a peer sends every interval.
//! * [`hash`]: the content hash both the origin and the peers compute over packet ranges, so a
//!   test can prove a viewer reassembled exactly the origin's bytes.
//! * [`report`]: the statistics a peer exposes to its page (stats panel, benchmarks).
//! * [`fec`]: Reed-Solomon coding of packet groups for the coded middle tier, its parity frame
//!   wire format and the receiver's group assembler.
//! * [`mesh`]: the top tier's flooding rule with duplicate elimination.
//! * [`file`]: file channels (a carousel of pieces) and the file digest.
//! * [`manifest`]: the signed stream: the origin's ed25519-signed manifests of packet hashes
//!   that every peer checks before it plays or forwards a packet.
//! * [`want`]: a child's request to a new parent for the packets of a substream it lacks (the
//!   joiner's catch-up), on the data channel beside packets and parity frames.
//!
//! It compiles for native targets and for `wasm32-unknown-unknown`, and has no I/O.

pub mod control;
pub mod digest;
pub mod fec;
pub mod file;
pub mod hash;
pub mod heartbeat;
pub mod manifest;
pub mod mesh;
pub mod packet;
pub mod report;
pub mod rng;
pub mod want;

pub use control::{
    ClientMsg, Connectivity, ErrorCode, FecSpec, Feed, NatClass, Resume, ServerMsg, Signal, Source,
    SubstreamPlan, TierName, TierPlan, PROTOCOL_VERSION,
};
pub use digest::plan_digest;
pub use file::FileInfo;
pub use heartbeat::{ChildLink, Heartbeat, ParentLink, Place};
pub use packet::{Packet, PacketError, PacketHeader};

use serde::{Deserialize, Serialize};

/// Identifier the control center assigns to a peer for the lifetime of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// Substream that carries packet `seq` when the stream is split into `k` substreams
/// (the patent's multi-tree: packet `seq` travels down tree `seq mod k`).
pub fn substream_of(seq: u64, k: u32) -> u32 {
    if k == 0 {
        0
    } else {
        (seq % u64::from(k)) as u32
    }
}
