//! What goes into a DCM and what comes out of it: the whole interface of the sans-IO core.
//!
//! A driver (the control server's tokio task, or the simulator) feeds [`Event`]s with the time
//! they happen, calls [`Dcm::handle_timeout`](super::Dcm::handle_timeout) when
//! [`Dcm::poll_timeout`](super::Dcm::poll_timeout) says, and moves every [`Output`] that
//! [`Dcm::poll_output`](super::Dcm::poll_output) yields to where it belongs (a peer's socket, the
//! relay board, the channel's records). No type here holds a socket, a queue or a clock.

use std::sync::Arc;

use bytes::Bytes;
use protocol::{Connectivity, Heartbeat, PeerId, ServerMsg, Signal};

use super::planner::Push;
use super::snapshot::TopologySnapshot;
use crate::topology::region::{Region, TopologyConfig};

/// A DCM's parameters: the channel's, fixed when it is created.
#[derive(Debug, Clone)]
pub struct DcmConfig {
    /// The channel's name (logs, snapshots, relay board).
    pub channel: String,
    /// Substreams `k`: packet `seq` belongs to tree `seq mod k`.
    pub k: u32,
    /// How often peers send heartbeats (ms); silence and ticks are measured in these.
    pub heartbeat_ms: u64,
    /// The stream's nominal rate (kbit/s) that capacities are planned against.
    pub stream_kbps: u32,
    /// The three-tier hierarchy's regions and parameters; `None`: one flat multi-tree.
    pub topology: Option<Arc<TopologyConfig>>,
    /// Peers the origin feeds directly per substream (flat channels).
    pub origin_fanout: u32,
    /// Most children one peer may feed, in substream units.
    pub max_fanout: u32,
    /// Largest cluster of a region's middle or bottom tier.
    pub cluster_max: usize,
    /// Most origin bridges open at once (make-before-break repair); 0 turns them off.
    pub max_bridges: usize,
}

impl DcmConfig {
    /// A flat channel with the control server's defaults.
    pub fn flat(channel: &str, stream_kbps: u32) -> Self {
        DcmConfig {
            channel: channel.to_string(),
            k: 4,
            heartbeat_ms: 1000,
            stream_kbps,
            topology: None,
            origin_fanout: 1,
            max_fanout: 16,
            cluster_max: 512,
            max_bridges: super::bridge::DEFAULT_MAX_BRIDGES,
        }
    }
}

/// Something that happened to the channel, handed to [`Dcm::handle`](super::Dcm::handle).
#[derive(Debug)]
pub enum Event {
    /// A viewer joined (its session already sent it the Welcome).
    Join {
        peer: PeerId,
        upload_kbps: u32,
        /// The peer's region (classified by the session from its address, rules and hint).
        region: Region,
        /// A recruited relay's session (it forwards without playing).
        relay: bool,
        /// Its NAT class, when it knew it at join ([`Event::Connectivity`] otherwise).
        connectivity: Option<Connectivity>,
    },
    /// A viewer reconnected with a valid resume token (cluster mode: its server failed or handed
    /// the channel over, and this DCM took it). Its data channels kept running on its old
    /// instructions, so it is adopted as it is, not placed: a DCM with no peers starts
    /// collecting a round of heartbeats, as [`Dcm::take_over`](super::Dcm::take_over) does, and
    /// rebuilds the topology from the links they report; resumes within that window are
    /// adopted too. Outside that window a resume is placed like a join.
    Resume {
        peer: PeerId,
        upload_kbps: u32,
        region: Region,
        relay: bool,
        connectivity: Option<Connectivity>,
    },
    /// A peer of this DCM resumed on a new control connection to the same server while its old
    /// one was still open (a half-open socket after a network blip; its session was replaced,
    /// not ended). It keeps its id and its place: it is sent its instructions and the last
    /// manifests again (what went to the old socket may be lost), and its silence is measured
    /// from now. Ignored for a peer this DCM does not have (a driver sends
    /// [`Event::Resume`] then).
    Reconnect { peer: PeerId },
    /// The peer that just joined is a waypoint server the operator runs (its token was
    /// checked): listed as one in the topology, its bytes counted apart. It is placed by its
    /// capacity and class like any peer, so it enters its region's top tier where the region
    /// lacks capable peers (FIG. 3).
    Waypoint { peer: PeerId },
    /// A peer found (or revised) its NAT class after joining: from now on it is linked only
    /// with peers its class can reach, and its links that the class cannot hold are re-placed.
    Connectivity {
        peer: PeerId,
        connectivity: Connectivity,
    },
    /// A viewer's session ended.
    Leave { peer: PeerId },
    /// WebRTC signaling from one peer to another; relayed only between linked peers.
    Signal {
        from: PeerId,
        to: PeerId,
        signal: Signal,
    },
    /// A FIG. 9 heartbeat. `arrived_ms` is when it reached the server: a heartbeat that queued
    /// behind others is judged as of its arrival, not of when the DCM got to it.
    Heartbeat {
        peer: PeerId,
        heartbeat: Box<Heartbeat>,
        arrived_ms: u64,
    },
    /// `reporter`'s data channel with `peer` never opened (ICE failed or timed out): the two are
    /// never paired again, and a child of theirs is re-placed now. A report only moves the link
    /// between these two, so a peer that reports every link hurts only itself.
    LinkFailed { reporter: PeerId, peer: PeerId },
    /// New packets from the origin: pushed to the peers whose parent is the origin.
    Packets(Vec<(u64, Bytes)>),
    /// The origin's signed manifest of the packets that follow (issue 13): sent to every peer,
    /// before the packets it covers, and to each joiner with the few before it. On a signed
    /// channel it is also the live-edge notice (it names the newest packet), so no other is sent.
    Manifest(Bytes),
    /// `reporter` got packet `seq` from `accused` with a hash that is not the signed one; the
    /// driver says what the origin's own hash makes of it ([`super::hostile`]).
    ForgeryReport {
        reporter: PeerId,
        accused: PeerId,
        seq: u64,
        evidence: super::hostile::Evidence,
    },
    /// The download beside `peer` ended: it may use the page's whole upload again (from its
    /// next placement on).
    EndSplit { peer: PeerId },
    /// The origin measured a new stream rate (kbit/s).
    StreamRate { kbps: u32 },
    /// A topology snapshot is wanted; answered by [`Output::Snapshot`] with the same `token`
    /// once built (a slice at a time, see [`Dcm::poll_output`](super::Dcm::poll_output)).
    Snapshot { token: u64 },
}

/// A message for one peer's control socket.
#[derive(Debug, Clone)]
pub enum OutMsg {
    Msg(Box<ServerMsg>),
    /// A media packet (or parity frame) the origin pushes on the control socket.
    Packet(Bytes),
    /// A [`ServerMsg`] serialized once as JSON for many peers (live-edge notices).
    Text(Arc<str>),
}

/// What the DCM asks its driver to do, in order.
#[derive(Debug)]
pub enum Output {
    /// Send `msg` to `peer`. A driver whose queue to the peer is full closes the session rather
    /// than hold up the channel.
    Send { peer: PeerId, msg: OutMsg },
    /// Close `peer`'s session with `reason`; the DCM has already removed it.
    Close { peer: PeerId, reason: String },
    /// `peer` was proven hostile and removed: close its session with an `evicted` error and
    /// refuse its address for a while.
    Evict { peer: PeerId, reason: String },
    /// What the origin pushes to `peer` changed (empty: nothing any more), and the epoch of the
    /// instructions that said so. Kept by the driver outside the DCM, so that a DCM taking over
    /// after a failure keeps the roots fed ([`Dcm::take_over`](super::Dcm::take_over)).
    OriginFed {
        peer: PeerId,
        pushes: Vec<Push>,
        epoch: u64,
    },
    /// A round of relay recruitment (claims 19, 43) for the board the channels share.
    Relays(RelayRound),
    /// The snapshot asked for with [`Event::Snapshot`].
    Snapshot {
        token: u64,
        snapshot: Box<TopologySnapshot>,
    },
}

/// One round of relay management: which peers have upload to spare for other channels, and
/// which regions of this channel lack capacity. The driver offers and withdraws on the shared
/// board and, unless a recruit of this channel is still pending, recruits one relay of another
/// channel for the first region in `deficits` it can.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRound {
    /// (peer, its region, spare kbit/s).
    pub offers: Vec<(PeerId, Region, u32)>,
    pub withdrawals: Vec<PeerId>,
    pub deficits: Vec<Region>,
    /// What a recruit must be able to upload (kbit/s).
    pub need_kbps: u32,
}

/// A peer adopted by a DCM taking over (its session outlived the DCM that failed).
#[derive(Debug, Clone, Copy)]
pub struct Adopted {
    pub peer: PeerId,
    pub upload_kbps: u32,
    pub region: Region,
    pub relay: bool,
    /// The NAT class it reported, if any.
    pub connectivity: Option<Connectivity>,
    /// A waypoint server.
    pub waypoint: bool,
}

/// Counts since the DCM started; the driver adds their growth to the channel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DcmStats {
    pub heartbeats: u64,
    /// Times the flat trees were re-planned at a new measured stream rate.
    pub replans: u64,
    pub congestion_events: u64,
    pub repairs: u64,
    /// Substreams bridged by the origin after a move.
    pub bridges_opened: u64,
    /// Moves left unbridged because `max_bridges` were open already.
    pub bridges_refused: u64,
    /// Bytes the origin pushed over control sockets (bridges included).
    pub origin_push_bytes: u64,
    /// Of those, bytes pushed over bridges.
    pub origin_bridge_bytes: u64,
    /// Live-edge notices queued (one per peer each).
    pub edge_notices: u64,
    /// Reports of data channels that never opened, from peers the DCM knows.
    pub link_failures: u64,
    /// Signed manifests queued (one per peer each).
    pub manifests_sent: u64,
    /// Forgery reports from peers the DCM knows, and of those, false ones.
    pub forgery_reports: u64,
    pub false_reports: u64,
    /// Peers evicted as hostile.
    pub evictions: u64,
    /// Parents demoted because their children corroborated that they send nothing while their
    /// own heartbeats claim they do.
    pub silent_demoted: u64,
    /// Peers whose control connection was replaced by a new one, keeping their place
    /// ([`Event::Reconnect`]).
    pub reconnects: u64,
    /// Peers adopted as they were after a failover across servers ([`Event::Resume`]).
    pub resumes: u64,
    /// Packets the origin resent to the roots it feeds again after such a failover: those cut
    /// while they moved, past the newest each reported.
    pub resent_after_move: u64,
    /// Topologies rebuilt from heartbeats (takeovers), and the links the peers reported in them
    /// and of those, the links the rebuilt topology kept.
    pub recoveries: u64,
    pub links_reported: u64,
    pub links_kept: u64,
    /// Heartbeats (or links in them) refused as implausible, by reason.
    pub heartbeats_refused: super::plausible::RefusalCounts,
}

impl DcmStats {
    /// The sum of two DCMs' counts: a channel's totals across a takeover.
    pub fn plus(&self, o: &DcmStats) -> DcmStats {
        let mut refused = self.heartbeats_refused;
        for (a, b) in refused.0.iter_mut().zip(o.heartbeats_refused.0) {
            *a += b;
        }
        DcmStats {
            heartbeats: self.heartbeats + o.heartbeats,
            replans: self.replans + o.replans,
            congestion_events: self.congestion_events + o.congestion_events,
            repairs: self.repairs + o.repairs,
            bridges_opened: self.bridges_opened + o.bridges_opened,
            bridges_refused: self.bridges_refused + o.bridges_refused,
            origin_push_bytes: self.origin_push_bytes + o.origin_push_bytes,
            origin_bridge_bytes: self.origin_bridge_bytes + o.origin_bridge_bytes,
            edge_notices: self.edge_notices + o.edge_notices,
            link_failures: self.link_failures + o.link_failures,
            manifests_sent: self.manifests_sent + o.manifests_sent,
            forgery_reports: self.forgery_reports + o.forgery_reports,
            false_reports: self.false_reports + o.false_reports,
            evictions: self.evictions + o.evictions,
            silent_demoted: self.silent_demoted + o.silent_demoted,
            reconnects: self.reconnects + o.reconnects,
            resumes: self.resumes + o.resumes,
            resent_after_move: self.resent_after_move + o.resent_after_move,
            recoveries: self.recoveries + o.recoveries,
            links_reported: self.links_reported + o.links_reported,
            links_kept: self.links_kept + o.links_kept,
            heartbeats_refused: refused,
        }
    }
}
