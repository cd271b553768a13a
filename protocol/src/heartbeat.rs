//! The FIG. 9 heartbeat: everything a delivery coordinator manager needs to rebuild the
//! distribution topology and to spot congested links by comparing, per link, the sequence number
//! the parent reports sent with the one the child reports received.

use serde::{Deserialize, Serialize};

use crate::{PeerId, Source};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// ClientID.
    pub client_id: PeerId,
    /// Heartbeat Seq: increases by one per heartbeat.
    pub seq: u64,
    /// Local Timestamp (ms, the peer's wall clock).
    pub local_ts_ms: u64,
    /// P1..Pk: parent `i` sends substream `i`.
    pub parents: Vec<ParentLink>,
    /// C1..Cm.
    pub children: Vec<ChildLink>,
    /// Buffersize S_i: packets of substream `i` held ahead of the playout point.
    pub buffer: Vec<u32>,
    /// Bytes received from peers / from the origin, bytes uploaded to peers (cumulative).
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    /// Packets fetched from the origin because the swarm did not deliver them in time.
    pub origin_fallbacks: u64,
}

/// What a child knows about one of its parents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    pub substream: u32,
    pub parent: Source,
    /// Sequence number of the last packet received from this parent, if any.
    pub last_seq: Option<u64>,
    /// Local time (ms) the last packet arrived from this parent.
    pub last_ts_ms: Option<u64>,
}

/// What a parent knows about one of its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildLink {
    pub substream: u32,
    pub child: PeerId,
    pub last_seq: Option<u64>,
    pub last_ts_ms: Option<u64>,
}
