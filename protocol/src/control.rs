//! Control-channel messages (JSON text frames on the peer's WebSocket).
//!
//! Binary frames on the same socket carry [`crate::Packet`]s from the origin to the peers it
//! feeds directly (the roots of the multi-trees, and anyone whose parent is the origin).
//!
//! Session: the peer sends [`ClientMsg::Join`]; the server answers [`ServerMsg::Welcome`] and then
//! [`ServerMsg::Instructions`] whenever the peer's place in the trees changes. Peers exchange
//! WebRTC offers/answers/ICE through [`ClientMsg::Signal`] / [`ServerMsg::Signal`], which the server
//! relays only between peers it has linked. Heartbeats flow every `heartbeat_ms`.

use serde::{Deserialize, Serialize};

use crate::{Heartbeat, PeerId};

/// Version of this protocol; a `Join` with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest control message (text frame) the server accepts, in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// Peer → control center.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message of a session.
    Join {
        version: u32,
        channel: String,
        /// Upload capacity the peer offers to the swarm, in kbit/s (it caps itself to this).
        upload_kbps: u32,
        /// Region the page asks to be placed in. Honoured only when the server allows region
        /// hints (`allow_region_hint`, for tests on loopback); otherwise the address decides.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// Declared access network (`dsl`, `cable`, `fiber`, `mobile`, `satellite`, `other`): the
        /// optional sub-criterion of the server's region rules.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
        /// Token from a [`ServerMsg::Recruit`]: this session relays the channel for the control
        /// center without playing it (claims 19, 43).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_token: Option<String>,
        /// For a download session (a file channel): the live session of the same page it
        /// accompanies. The server then splits the declared `upload_kbps` between the two,
        /// live first (claim 1), and refuses a companion that is not a session of the same
        /// address with [`ErrorCode::BadCompanion`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        companion: Option<PeerId>,
        /// Set when the peer reconnects after its control connection dropped (a server of the
        /// cluster failed, or it was redirected): its peer id and the token of its
        /// [`ServerMsg::Cluster`]. The DCM then keeps its place in the trees, and its data
        /// channels keep running. A token that does not verify is refused with
        /// [`ErrorCode::BadResume`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
        /// What kind of NAT or firewall the peer is behind, when its ICE gathering finished
        /// before it joined (otherwise a [`ClientMsg::Connectivity`] follows). The DCM never
        /// links two peers whose classes cannot connect ([`Connectivity::can_pair`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connectivity: Option<Connectivity>,
        /// Set by a waypoint server (FIG. 1, 3: a relay the operator runs in a data center near
        /// a region that lacks capable peers): the operator's token, which the server checks
        /// ([`ErrorCode::BadWaypointToken`] otherwise). The DCM then lists it as a waypoint and
        /// counts its bytes apart; it is placed by its capacity and class like any peer, so it
        /// enters its region's top tier where the region lacks capable peers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waypoint: Option<String>,
    },
    /// The peer's connectivity, found after it joined (ICE gathering against the STUN servers
    /// takes up to a few seconds where UDP is blocked). Replaces an earlier report; the DCM
    /// re-places the peer's links its class cannot hold.
    Connectivity(Connectivity),
    /// WebRTC signaling for a peer the server linked us with.
    Signal { to: PeerId, signal: Signal },
    /// The FIG. 9 heartbeat.
    Heartbeat(Heartbeat),
    /// A data channel with `peer` (a parent or child the instructions named) never opened: the
    /// ICE attempt failed or timed out, typically both peers behind endpoint-dependent NATs or
    /// UDP blocked. The server never pairs the two again and re-places the child at once.
    LinkFailed { peer: PeerId },
    /// `peer` sent packet `seq` whose SHA-256 (`hash`, hex) is not the one the origin signed in
    /// the channel's manifest. The server checks the evidence against the origin's own hash; a
    /// peer that several of its neighbours report is evicted, a report that does not hold counts
    /// against its reporter.
    Forged {
        peer: PeerId,
        seq: u64,
        hash: String,
    },
    /// Orderly goodbye (closing the socket means the same).
    Leave,
}

/// How a peer reaches the internet (FIG. 7: the topology is computed from "the connectivity to
/// the Internet (e.g., what kind of NAT/firewall the client is behind)"), as its ICE gathering
/// against two STUN servers shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatClass {
    /// A public address: no NAT, no filtering (its host candidate is what STUN sees; also a
    /// waypoint in a data center).
    Open,
    /// Behind a NAT that maps one local port to one public port whatever the destination (both
    /// STUN servers see the same mapping): reachable by hole punching from open and other
    /// endpoint-independent peers.
    EndpointIndependent,
    /// Behind a NAT that maps each destination to a new public port (the two STUN servers see
    /// different ports; "symmetric"): only open peers reach it.
    EndpointDependent,
    /// No STUN answer at all: outbound UDP is blocked. Without TURN it reaches no peer.
    UdpBlocked,
}

/// A peer's connectivity: its NAT class, and whether it has a TURN relay (a `relay` candidate
/// from the site's `ice_servers`), which lets it reach any peer that can send UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Connectivity {
    pub class: NatClass,
    #[serde(default)]
    pub turn: bool,
}

impl Connectivity {
    pub const OPEN: Connectivity = Connectivity {
        class: NatClass::Open,
        turn: false,
    };

    /// Whether a data channel between peers of these connectivities can open. Unknown (`None`)
    /// is assumed to connect, as every pair was before peers reported their class; a pair that
    /// fails anyway is reported with [`ClientMsg::LinkFailed`] and blocked. Conservative where
    /// the filtering decides: an endpoint-independent NAT usually filters by address and port
    /// (Linux masquerade, most home routers), which an endpoint-dependent peer's new port for
    /// each destination never gets through.
    pub fn can_pair(a: Option<Connectivity>, b: Option<Connectivity>) -> bool {
        use NatClass::*;
        let (Some(a), Some(b)) = (a, b) else {
            return match (a, b) {
                (Some(x), None) | (None, Some(x)) => x.class != UdpBlocked || x.turn,
                _ => true,
            };
        };
        if (a.class == UdpBlocked && !a.turn) || (b.class == UdpBlocked && !b.turn) {
            return false;
        }
        if a.turn || b.turn {
            // A relay address accepts whoever the relay's permission names (by address only).
            return true;
        }
        !matches!(
            (a.class, b.class),
            (EndpointDependent, EndpointDependent)
                | (EndpointDependent, EndpointIndependent)
                | (EndpointIndependent, EndpointDependent)
        )
    }

    /// Whether this peer reaches peers behind endpoint-independent NATs (most peers): false
    /// behind a symmetric NAT or with UDP blocked, such a peer is kept where few must reach it.
    pub fn reaches_most(self) -> bool {
        Connectivity::can_pair(
            Some(self),
            Some(Connectivity {
                class: NatClass::EndpointIndependent,
                turn: false,
            }),
        )
    }

    /// Whether this peer reaches any peer at all (false: UDP blocked without TURN).
    pub fn reaches_any(self) -> bool {
        Connectivity::can_pair(Some(self), Some(Connectivity::OPEN))
    }

    /// Whether this peer can pair with fewer than all others (it needs its partners chosen).
    pub fn is_restrictive(self) -> bool {
        self.class != NatClass::Open && !self.turn
    }
}

/// Control center → peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        version: u32,
        peer_id: PeerId,
        channel: String,
        heartbeat_ms: u32,
        /// Number of substreams `k`; packet `seq` belongs to substream `seq mod k`.
        substreams: u32,
        /// Nominal stream rate in kbit/s.
        stream_kbps: u32,
        /// MIME type with codecs for `MediaSource.addSourceBuffer`.
        mime: String,
        /// URL of the init segment (relative to the server).
        init_url: String,
        /// URL prefix for fallback packet fetches; append the sequence number.
        packet_url: String,
        /// Sequence number of the newest random-access point; playback starts here.
        start_seq: u64,
        /// Newest packet the origin has produced.
        live_seq: u64,
        /// Set on a file channel: the file the packets carry (packet `seq` is piece
        /// `seq mod pieces`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<crate::FileInfo>,
        /// Upload (kbit/s) the server placed this session with, when it differs from the one
        /// declared: a download session's share after the live companion took what it needs.
        /// The peer caps its relaying to it (and its live session to the rest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_kbps: Option<u32>,
        /// The origin's ed25519 public key (hex) when the channel's stream is signed: binary
        /// frames starting with `M` on this socket are its manifests, and packets from peers
        /// are played and forwarded only once they match one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_key: Option<String>,
        /// How long the stream's fragments are (ms), as the origin measured them: the longest
        /// recent spacing of its publications. A player keeps more than a fragment behind the
        /// live edge so the next one arrives before the playhead runs out (2 s and 4 s keyframe
        /// intervals need more than the 1 s demo clip). Absent from older servers and before
        /// the origin knows; peers then measure it from the packets' `created_ms`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fragment_ms: Option<u32>,
        /// The newest fragment's first packet (live streams). The joiner fetches
        /// `start_seq..live_start_seq` from the origin at once, but gives the newest fragment a
        /// fallback period first: its new parents hand it their newest packet of each tree as
        /// soon as the data channel opens (priming), which for most streams is that fragment.
        /// Absent from older servers: everything is fetched at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live_start_seq: Option<u64>,
    },
    /// Where to receive each substream from and whom to feed it to. Replaces earlier ones.
    Instructions {
        epoch: u64,
        /// The trees of the peer's own cluster: `k` plain substreams, or `k + n` coded ones when
        /// `tier.fec` is set.
        substreams: Vec<SubstreamPlan>,
        /// The peer's place in the channel's hierarchy; `None` on a flat multi-tree channel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tier: Option<TierPlan>,
    },
    Signal {
        from: PeerId,
        signal: Signal,
    },
    /// Newest packet the origin has produced. Sent to every peer as packets are cut, so a peer
    /// notices packets its parents fail to deliver even when all of them go quiet.
    LiveEdge {
        seq: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The peer has upload to spare and another channel of its region lacks it: open a second
    /// session to `channel`, joining with `relay_token`, and relay it within `upload_kbps`
    /// without playing it (claims 19, 43).
    Recruit {
        channel: String,
        relay_token: String,
        upload_kbps: u32,
    },
    /// Cluster mode (FIG. 7): sent after the [`ServerMsg::Welcome`]. `dcm` is the logical id of
    /// the DCM that steers the peer; `resume_token` lets the peer keep its id when it reconnects
    /// ([`ClientMsg::Join`]'s `resume`); `nodes` are the cluster's servers (base URLs), where the
    /// peer asks `GET /api/locate?channel=` for the DCM's new server when its connection drops.
    /// Resume tokens expire: the server sends this again with a fresh token well before the last
    /// one does, and the peer keeps the newest.
    Cluster {
        dcm: String,
        resume_token: String,
        nodes: Vec<String>,
    },
    /// This server does not run the peer's DCM: connect to `url` (a server's base URL) and join
    /// there. The connection is closed after this message.
    Redirect {
        url: String,
        dcm: String,
    },
}

/// A peer's claim to its earlier place, presented when it reconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub peer: PeerId,
    pub token: String,
}

/// One substream's links for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubstreamPlan {
    pub index: u32,
    pub parent: Source,
    pub children: Vec<PeerId>,
}

/// A peer's place in the three-tier hierarchy (patent FIG. 3-7) and its links outside its own
/// cluster's trees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPlan {
    pub tier: TierName,
    /// Display name of the peer's region.
    pub region: String,
    /// Logical id of the DCM managing the peer's cluster (`None`: the top tier's DCM).
    #[serde(default)]
    pub cluster: Option<u64>,
    /// `false` for a recruited relay: it forwards the channel but does not play it.
    #[serde(default = "yes")]
    pub plays: bool,
    /// Set on the middle tier: the peer's trees carry Reed-Solomon shards; tree `i < k` carries
    /// the packets with `seq mod k = i` (data shards travel as plain packets), tree `k + j`
    /// carries parity shard `j` of every group as a [`crate::fec`] parity frame.
    #[serde(default)]
    pub fec: Option<FecSpec>,
    /// Top tier: flooding neighbours. Every packet seen for the first time goes to all of them
    /// except the one it came from; `Source::Origin` means the origin pushes the full stream on
    /// the control socket.
    #[serde(default)]
    pub mesh: Vec<Source>,
    /// Tree roots of other clusters this peer feeds (preferred nodes feed the middle tier with
    /// coded shards, middle nodes feed bottom clusters with plain substreams).
    #[serde(default)]
    pub feeds: Vec<Feed>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierName {
    Preferred,
    Middle,
    Bottom,
}

/// Reed-Solomon parameters of a coded tier: `k` data and `n` parity shards per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FecSpec {
    pub k: u32,
    pub n: u32,
}

/// One root feed: send substream `substream` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feed {
    pub to: PeerId,
    pub substream: u32,
    /// `Some`: the receiving cluster is coded, `substream` is a shard index (`≥ k`: parity).
    #[serde(default)]
    pub fec: Option<FecSpec>,
}

/// Where a peer receives a substream from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    Origin,
    Peer { id: PeerId },
}

/// WebRTC signaling payloads, relayed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Signal {
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    Ice {
        candidate: String,
        sdp_mid: Option<String>,
        sdp_m_line_index: Option<u16>,
    },
}

/// Machine-readable error codes sent with [`ServerMsg::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    TooLarge,
    UnsupportedVersion,
    NotJoined,
    AlreadyJoined,
    UnknownChannel,
    NotLinked,
    WrongPeer,
    RateLimited,
    BadCapacity,
    /// A relay token that was never issued, was used, expired, or names another channel.
    BadRelayToken,
    /// A download session's `companion` is unknown, not live, or of another address.
    BadCompanion,
    /// The peer was proven to forward forged data (or to accuse honest peers) and is removed;
    /// its address is refused for a while.
    Evicted,
    /// The peer's address was evicted recently and is refused until the ban ends.
    Banned,
    /// The viewer token (`--token-secret`) has expired. The session is then closed.
    TokenExpired,
    /// The viewer token opens another channel. The session is then closed.
    TokenWrongChannel,
    /// The viewer token is missing, malformed or badly signed. The session is then closed.
    TokenInvalid,
    /// The peer's network address already has as many control sessions open as the server
    /// allows (`--max-sessions-per-address`). The session is then closed.
    TooManySessions,
    /// A `resume` whose token does not verify, names another peer or channel, or has expired
    /// (the message says which). The session is then closed; join afresh, without `resume`.
    BadResume,
    /// A `join` as a waypoint whose token is not the operator's. The session is then closed.
    BadWaypointToken,
    /// No server owns the channel's DCM right now (a failover is under way, or the cluster's
    /// coordination store is unreachable): reconnect after a short backoff.
    Unavailable,
}

#[cfg(test)]
mod tests {
    use super::{Connectivity, NatClass};

    #[test]
    fn nat_classes_pair_as_their_mappings_and_filters_allow() {
        use NatClass::*;
        let c = |class, turn| Some(Connectivity { class, turn });
        let all = [
            None,
            c(Open, false),
            c(EndpointIndependent, false),
            c(EndpointDependent, false),
            c(UdpBlocked, false),
            c(EndpointDependent, true),
            c(UdpBlocked, true),
        ];
        for a in all {
            for b in all {
                assert_eq!(Connectivity::can_pair(a, b), Connectivity::can_pair(b, a));
            }
        }
        assert!(Connectivity::can_pair(None, None));
        assert!(Connectivity::can_pair(
            c(Open, false),
            c(EndpointDependent, false)
        ));
        assert!(Connectivity::can_pair(
            c(EndpointIndependent, false),
            c(EndpointIndependent, false)
        ));
        assert!(!Connectivity::can_pair(
            c(EndpointIndependent, false),
            c(EndpointDependent, false)
        ));
        assert!(!Connectivity::can_pair(
            c(EndpointDependent, false),
            c(EndpointDependent, false)
        ));
        // UDP blocked reaches nobody without TURN, everybody (who has UDP) with it.
        for x in all {
            assert!(!Connectivity::can_pair(c(UdpBlocked, false), x));
        }
        assert!(Connectivity::can_pair(
            c(UdpBlocked, true),
            c(EndpointDependent, false)
        ));
        assert!(Connectivity::can_pair(
            c(EndpointDependent, true),
            c(EndpointDependent, false)
        ));
        assert!(!Connectivity::OPEN.is_restrictive());
        assert!(c(EndpointIndependent, false).unwrap().reaches_most());
        assert!(!c(EndpointDependent, false).unwrap().reaches_most());
        assert!(c(EndpointDependent, false).unwrap().reaches_any());
        assert!(!c(UdpBlocked, false).unwrap().reaches_any());
        assert!(c(EndpointIndependent, false).unwrap().is_restrictive());
        assert!(!c(UdpBlocked, true).unwrap().is_restrictive());
        let s = serde_json::to_string(&Connectivity {
            class: EndpointDependent,
            turn: false,
        })
        .unwrap();
        assert_eq!(s, r#"{"class":"endpoint_dependent","turn":false}"#);
    }

    use super::*;

    #[test]
    fn messages_are_internally_tagged_for_js() {
        let m = ClientMsg::Join {
            version: 1,
            channel: "demo".into(),
            upload_kbps: 2000,
            region: None,
            network: None,
            relay_token: None,
            companion: None,
            resume: None,
            connectivity: None,
            waypoint: None,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"join","version":1,"channel":"demo","upload_kbps":2000}"#
        );
        let plan = SubstreamPlan {
            index: 0,
            parent: Source::Peer { id: PeerId(7) },
            children: vec![PeerId(3)],
        };
        let s = serde_json::to_string(&plan).unwrap();
        assert_eq!(
            s,
            r#"{"index":0,"parent":{"kind":"peer","id":7},"children":[3]}"#
        );
    }

    #[test]
    fn welcome_without_fragment_ms_still_parses() {
        // What servers before issue 14 send: no `fragment_ms`.
        let old = r#"{"type":"welcome","version":1,"peer_id":4,"channel":"demo",
            "heartbeat_ms":1000,"substreams":4,"stream_kbps":450,"mime":"video/mp4",
            "init_url":"/i","packet_url":"/p/","start_seq":10,"live_seq":20}"#;
        let m: ServerMsg = serde_json::from_str(old).unwrap();
        assert!(matches!(
            m,
            ServerMsg::Welcome {
                fragment_ms: None,
                ..
            }
        ));
        // And a new one round-trips it (older peers ignore the unknown field).
        let mut v: serde_json::Value = serde_json::from_str(old).unwrap();
        v["fragment_ms"] = 2000.into();
        let m: ServerMsg = serde_json::from_value(v).unwrap();
        assert!(matches!(
            m,
            ServerMsg::Welcome {
                fragment_ms: Some(2000),
                ..
            }
        ));
    }

    #[test]
    fn unknown_message_type_is_an_error_not_a_panic() {
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"explode"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>("not json").is_err());
    }
}
