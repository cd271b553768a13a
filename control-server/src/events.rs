//! The messages between a channel's sessions, its origin and its DCM driver: a leaf module, so
//! that the channel, the sessions and the DCM all depend on it and not on each other.

use bytes::Bytes;
use coordinator::dcm::split::UploadSplit;
use coordinator::topology::region::Region;
use coordinator::TopologySnapshot;
use protocol::{Heartbeat, PeerId, ServerMsg, Signal};
use tokio::sync::{mpsc, oneshot};

/// What a session's task sends to its WebSocket.
#[derive(Debug)]
pub enum Outbound {
    Msg(Box<ServerMsg>),
    Packet(Bytes),
    /// A message serialized once for many peers (live-edge notices).
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Close(String),
    /// The DCM evicted the peer: the session sends an `evicted` error with the reason, closes,
    /// and refuses the peer's address for the configured time.
    Evict(String),
}

impl Outbound {
    pub fn msg(m: ServerMsg) -> Box<Self> {
        Box::new(Outbound::Msg(Box::new(m)))
    }
}

/// Boxed in the queue: a tokio channel allocates its first block of 32 slots up front, and
/// tens of thousands of idle sessions' queues must stay small (8 bytes a slot, not 40).
pub type OutboundTx = mpsc::Sender<Box<Outbound>>;

/// What the sessions, the origin and the operator APIs send to a channel's DCM driver.
#[derive(Debug)]
pub enum DcmEvent {
    Join {
        peer: PeerId,
        upload_kbps: u32,
        /// The peer's region (classified by the session from its address, rules and hint).
        region: Region,
        /// A recruited relay's session (it forwards without playing).
        relay: bool,
        out: OutboundTx,
        /// The peer presented a valid resume token (cluster mode): it is adopted with its
        /// links, not placed ([`coordinator::Event::Resume`]).
        resumed: bool,
        /// Its NAT class, when it knew it at join.
        connectivity: Option<protocol::Connectivity>,
        /// A waypoint server the operator runs (its token checked).
        waypoint: bool,
    },
    /// The peer's NAT class, found after it joined.
    Connectivity {
        peer: PeerId,
        connectivity: protocol::Connectivity,
    },
    Leave {
        peer: PeerId,
    },
    Signal {
        from: PeerId,
        to: PeerId,
        signal: Signal,
    },
    Heartbeat {
        peer: PeerId,
        heartbeat: Box<Heartbeat>,
        /// When the session received it (to judge it as of its arrival, and to measure how long
        /// applying it takes).
        received: std::time::Instant,
    },
    /// `reporter`'s data channel with `peer` never opened.
    LinkFailed {
        reporter: PeerId,
        peer: PeerId,
    },
    /// New packets from the origin: pushed to the peers whose parent is the origin.
    Packets(Vec<(u64, Bytes)>),
    /// The origin's signed manifest of the packets that follow (issue 13).
    Manifest(Bytes),
    /// `reporter` got packet `seq` from `accused` with a hash that is not the signed one, and
    /// what the origin's own hash says of it.
    Forged {
        reporter: PeerId,
        accused: PeerId,
        seq: u64,
        evidence: coordinator::dcm::hostile::Evidence,
    },
    Snapshot {
        reply: oneshot::Sender<TopologySnapshot>,
    },
    /// What the metrics sampler needs each second ([`coordinator::Dcm::census`]): answered at
    /// once, without copying plans or heartbeats.
    Census {
        lagging_after_ms: u64,
        reply: oneshot::Sender<coordinator::Census>,
    },
    /// A download session of the same page asks for its share of the page's upload (claim 1):
    /// this (live) DCM decides the split, live first, keeps `peer` within its share from now on,
    /// and answers `None` if `peer` is not one of its sessions.
    SplitUpload {
        peer: PeerId,
        capacity_kbps: u32,
        file_rate_kbps: u32,
        reply: oneshot::Sender<Option<UploadSplit>>,
    },
    /// The download beside `peer` ended: it may use the page's whole upload again (from its
    /// next placement on).
    EndSplit {
        peer: PeerId,
    },
    /// Fault injection for failover tests and drills: the DCM panics, as a bug would make it.
    /// Its supervisor starts a new DCM, which rebuilds the topology from heartbeats.
    InjectFailure,
    /// This server no longer owns the channel's DCM (its lease was lost, or it drains): every
    /// peer is told to reconnect, to `url` when the new owner is known, and the DCM starts
    /// afresh with no peers.
    Release {
        url: Option<String>,
    },
}
