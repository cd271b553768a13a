//! The sans-IO peer engine. Time and events go in ([`Engine::handle`]), actions come out
//! ([`Action`]); the web glue only moves bytes and timers. This makes the relay, reorder,
//! upload-cap and fallback logic testable natively with many engines in one process.
//!
//! Per packet: a packet of substream `i = seq mod k` arrives from the parent of tree `i` (or the
//! origin), is forwarded to this peer's children in tree `i` within the upload cap, held until
//! every earlier packet is present, then delivered in order to the player. A packet still missing
//! `fallback_after_ms` after a later one arrived is fetched from the origin over HTTP.
//!
//! Tiers (`Input::Instructions { tier: Some(..) }`, patent FIG. 3-7); `tier: None` is the flat
//! multi-tree above, unchanged:
//!
//! * **Mesh** (top tier). The peers of `tier.mesh` are neighbours; every packet seen for the first
//!   time, wherever it came from (mesh, origin push, tree parent, fetch, FEC recovery), is sent to
//!   each of them except the one it came from. Later copies are counted as duplicates and dropped
//!   (the held/next-deliver window is the duplicate filter).
//! * **Coded cluster** (middle tier, `tier.fec = Some { k, n }`): the plan has `k + n` trees. Data
//!   tree `i < k` relays packets with `seq mod k = i` as before; parity tree `k + j` relays parity
//!   frames ([`protocol::fec::ParityFrame`]) of shard `k + j` verbatim. Packets and frames go to a
//!   [`protocol::fec::GroupAssembler`]; packets it rebuilds count as `packets_recovered` and are
//!   then treated like received ones. A gap is fetched from the origin only `fallback_after_ms`
//!   after both its noticing and the moment its group's last packet became known to exist, so
//!   parity always gets its chance: losing up to `n` parents at once costs no origin fetch.
//! * **Feeds**: `tier.feeds` send substream `s` into another cluster's tree root. Plain feeds (and
//!   coded ones with `s < k`) send the matching packets; a coded feed with `s >= k` gets parity
//!   shard `s`, coded here once per group as soon as this peer has all `k` packets of it.
//! * `plays == false` (a recruited relay): everything above runs, but nothing is delivered.
//!
//! Every send, tree, mesh or feed, goes through the one upload token bucket and send queue.

mod catch_up;
pub mod deadline;
pub mod file;
mod handover;
mod heartbeat;
pub mod nat;
pub mod playout;
mod report;
mod tier;
mod upload;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use protocol::fec::{is_parity_frame, ParityFrame, Recovered};
use protocol::hash::{packet_hash, RangeHash};
use protocol::report::LatencyHistogram;
use protocol::{Packet, PeerId, Source, SubstreamPlan, TierName, TierPlan};

use catch_up::{CatchUp, Window};
use deadline::PlayerDeadline;
use handover::Handover;
use protocol::manifest::packet_digest;
use tier::Tiers;
use verify::{Check, Verifier};

pub use playout::{FragmentClock, PlayoutSizing};
pub use upload::TokenBucket;

/// Upload backlog (ms) that makes a peer report at once instead of at its next heartbeat.
pub const EARLY_HEARTBEAT_BACKLOG_MS: f64 = 300.0;

/// How long after a gap appeared a parent that has sent nothing since is reported in an early
/// heartbeat. Past the DCM's grace for dead links (`dead_grace_ms`, 400 ms after a packet was
/// made), so that the heartbeat shows the packet owed: a parent that claims to feed a link
/// that delivers nothing is moved on that one heartbeat (issue 13: a silent forwarder).
pub const QUIET_PARENT_REPORT_MS: f64 = 450.0;

/// Early heartbeats about one quiet parent, [`QUIET_PARENT_REPORT_MS`] apart (the server takes
/// a burst of three).
pub const QUIET_PARENT_REPORTS: u32 = 2;

/// How recent a packet from a peer that is not (yet) our parent must be to count as the first
/// packet of that peer's new link when our instructions then name it: instructions to the two
/// ends of a link travel on two WebSockets, and the parent's can win by a few milliseconds.
const EARLY_PARENT_MS: f64 = 1000.0;

/// Each packet from a peer lowers a substream's remembered lag by this factor (see
/// `Engine::path_lag`): a tree that became shallower is trusted again within tens of packets.
const PATH_LAG_DECAY: f64 = 0.9;

/// Share of the playout delay's slack past the fallback period that a gap waits for its tree's
/// usual lag where this peer forwards the substream (`Engine::path_patience`).
const FORWARDER_PATIENCE_SHARE: f64 = 1.0 / 8.0;

/// The same where this peer is a leaf of the substream's tree.
const LEAF_PATIENCE_SHARE: f64 = 1.0 / 2.0;

/// Fetched gaps remembered for the tree's late copy (`Engine::fetched_gaps`).
const FETCHED_GAPS: usize = 256;

/// Replaced parent links kept for statistics (a few moves per substream).
const PAST_LINKS: usize = 32;

/// A priming packet not sent within this long is dropped: by then the child has most likely
/// had the next packet of its substream, or fetched the gap from the origin.
const PRIME_TIMEOUT_MS: f64 = 1000.0;

/// The share of the upload burst a catch-up send leaves in the bucket (`catch_up.rs`).
const CATCH_UP_KEEPS: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Declared upload capacity; sends to children never exceed it.
    pub upload_kbps: u32,
    /// How long a gap may stay open before the packet is fetched from the origin.
    pub fallback_after_ms: f64,
    /// Packet counts as on time if playable within this long of its creation at the origin.
    /// A floor: the engine raises it (and `give_up_ms`) to the stream's fragment duration's
    /// [`PlayoutSizing`] once it knows it.
    pub playout_delay_ms: f64,
    /// A gap older than this is skipped (the player jumps over it) rather than waited for.
    pub give_up_ms: f64,
    /// Queued sends older than this are dropped: the child will have fetched them already.
    pub send_timeout_ms: f64,
    /// Fold every delivered payload into [`Engine::verified`] (FNV-1a, a few cycles a byte).
    /// The simulator turns it off and compares each delivered payload with the origin's itself
    /// (hashing was most of its CPU time); `verified` then counts packets without hashing.
    pub verify: bool,
    /// How long a moved tree link is kept after new instructions replace it, at most: the old
    /// parent keeps sending until the child's new parent delivers (see `handover.rs`); 0 turns
    /// the handover off.
    pub handover_ms: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            upload_kbps: 2000,
            fallback_after_ms: 600.0,
            playout_delay_ms: 2500.0,
            give_up_ms: 6000.0,
            send_timeout_ms: 1500.0,
            verify: true,
            handover_ms: 1500.0,
        }
    }
}

/// Where a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Peer(PeerId),
    /// Pushed by the origin on the control socket (this peer is a tree root).
    OriginPush,
    /// Fetched over HTTP because the swarm was too slow.
    OriginFetch,
}

#[derive(Debug)]
pub enum Input<'a> {
    Welcome {
        peer_id: PeerId,
        substreams: u32,
        start_seq: u64,
        live_seq: u64,
        /// The newest fragment's first packet (the Welcome's `live_start_seq`): from it on the
        /// catch-up waits a fallback period for the new parents' primes before the origin is
        /// asked. `None`: everything is fetched at once.
        live_start_seq: Option<u64>,
    },
    Instructions {
        plan: Vec<SubstreamPlan>,
        /// The peer's place in the hierarchy; `None` on a flat multi-tree channel.
        tier: Option<TierPlan>,
    },
    /// A media packet or a parity frame (told apart by the first byte).
    Packet {
        from: From,
        bytes: &'a [u8],
    },
    /// The origin's newest packet (from the control socket).
    LiveEdge {
        seq: u64,
    },
    /// A signed manifest (a binary frame starting with `M` on the control socket): the hashes
    /// of the packets that follow. It also says they exist, as a live-edge notice does.
    Manifest {
        bytes: &'a [u8],
    },
    /// A fallback fetch failed; `gone` when the origin no longer has the packet.
    FetchFailed {
        seq: u64,
        gone: bool,
    },
    /// The control connection dropped (`false`) or is back (`true`). While it is down the
    /// origin pushes nothing, so a tree whose parent is the origin gets its packets only by
    /// fetching: its gaps are fetched as soon as they are known, and its children keep being fed.
    Control {
        up: bool,
    },
    /// The data channel to `peer` closed (either end closed it, or it failed). Ends any
    /// handover through it (`handover.rs`); the plan is kept, as before: the control center,
    /// which sees departures, sends new instructions.
    LinkClosed {
        peer: PeerId,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this packet (or parity frame) on the data channel to `to`.
    Send { to: PeerId, packet: Rc<Vec<u8>> },
    /// Fetch packet `seq` from the origin over HTTP.
    Fetch { seq: u64 },
    /// In-order media bytes for the player (or, on a file channel, the piece `seq mod N`).
    Deliver { seq: u64, payload: Vec<u8> },
    /// A neighbour appeared in the plan: open a connection (the lower id offers).
    Connect { peer: PeerId },
    /// A neighbour left the plan: close the connection.
    Disconnect { peer: PeerId },
    /// `peer` sent packet `seq` hashing to `hash`, which is not the signed hash: tell the
    /// control center (`ClientMsg::Forged`).
    ReportForgery {
        peer: PeerId,
        seq: u64,
        hash: [u8; 32],
    },
}

struct Held {
    packet: Rc<Vec<u8>>,
    created_ms: u64,
    /// It starts a fragment (the player's unit).
    random_access: bool,
    arrived_ms: f64,
    /// The peer it came from; `None`: the origin, or rebuilt from parity.
    src: Option<PeerId>,
}

/// Late packets remembered for statistics ([`Engine::late_samples`]).
const LATE_SAMPLES: usize = 16;

/// How far beyond the newest packet known to exist a parity frame's group may end (packets):
/// tens of seconds of stream, far more than a coded tree runs ahead of the live-edge notices.
const PARITY_AHEAD: u64 = 512;

/// Why a queued send goes to its peer; decides whether it survives a plan change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Down tree `i` of the peer's own cluster.
    Tree(u32),
    Mesh,
    /// Root feed of substream `s` into another cluster.
    Feed(u32),
    /// Tree `i` to a former child while its new parent connects (`handover.rs`).
    Handover(u32),
    /// Tree `i`'s packets a new child asked for (`catch_up.rs`).
    CatchUp(u32),
}

/// A packet seen for the first time, on its way through [`Engine::accept`].
struct Fresh {
    seq: u64,
    packet: Rc<Vec<u8>>,
    created_ms: u64,
    /// The neighbour it came from (nothing goes back there).
    src: Option<PeerId>,
}

#[derive(Clone)]
struct Queued {
    to: PeerId,
    packet: Rc<Vec<u8>>,
    queued_ms: f64,
    via: Via,
    /// The sequence number the heartbeat reports for this send (for a parity frame, the last
    /// packet of its group), so the server compares every tree in one unit.
    report_seq: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    pub packets_from_peers: u64,
    pub packets_from_origin: u64,
    pub origin_fallbacks: u64,
    pub duplicates: u64,
    pub invalid: u64,
    pub packets_played: u64,
    /// Payload bytes handed to the player (or verified), each packet once.
    pub bytes_played: u64,
    pub on_time: u64,
    pub late: u64,
    pub send_dropped: u64,
    /// Packets rebuilt from parity instead of received.
    pub packets_recovered: u64,
    pub parity_frames_received: u64,
    /// Signed manifests taken, and frames refused (bad signature, wrong channel, garbage).
    pub manifests: u64,
    pub bad_manifests: u64,
    /// Packets from peers (or rebuilt from parity) whose hash was not the signed one.
    pub forged: u64,
    /// Packets from peers dropped unchecked: their manifest did not come in time, or the
    /// buffer of packets waiting for one was full.
    pub unverified_dropped: u64,
    /// Packets checked against a manifest and found genuine, and their bytes.
    pub verified_packets: u64,
    pub verified_bytes: u64,
    /// Packets from peers that arrived before their manifest, and how long they waited for it
    /// in all and at most (ms).
    pub manifest_waits: u64,
    pub manifest_wait_ms: f64,
    pub manifest_wait_max_ms: f64,
    /// Catch-up wants this peer sent its new parents, and packets it queued for children's
    /// wants (`catch_up.rs`).
    pub catch_up_asked: u64,
    pub catch_up_sent: u64,
}

pub struct Engine {
    cfg: EngineConfig,
    me: Option<PeerId>,
    k: u32,
    plan: Vec<SubstreamPlan>,
    /// The peers the plan links us to.
    neighbours: BTreeSet<PeerId>,
    /// Moved links kept until their replacements deliver.
    handover: Handover,
    /// The peers the driver was told to connect to (and not yet to disconnect from): the
    /// plan's neighbours and the handovers' peers.
    linked: BTreeSet<PeerId>,
    /// Linked peers whose data channel the driver reported closed.
    closed: BTreeSet<PeerId>,
    /// A handover ended: `linked` is brought up to date at the next poll.
    relink_due: bool,
    next_deliver: Option<u64>,
    highest_seen: Option<u64>,
    held: BTreeMap<u64, Held>,
    /// The packets delivered last (two fragments): to prime newly assigned children, and what a
    /// joining child asks for (`catch_up.rs`).
    window: Window,
    catch_up: CatchUp,
    /// Missing seq → when the gap was noticed.
    gaps: BTreeMap<u64, f64>,
    /// Fetches asked of the origin, and when.
    in_flight: BTreeMap<u64, f64>,
    /// How much media the player has ahead of its playhead, and the fetch round trip.
    deadline: PlayerDeadline,
    bucket: TokenBucket,
    send_queue: VecDeque<Queued>,
    /// Priming packets for new children: sent only when `send_queue` is empty and dropped after
    /// [`PRIME_TIMEOUT_MS`].
    prime_queue: VecDeque<Queued>,
    tiers: Tiers,
    /// Per tree: last seq received from its current parent and when.
    parent_last: Vec<(Option<u64>, Option<u64>)>,
    /// Per substream: when the current parent was assigned and when its first packet came.
    parent_timing: Vec<(f64, Option<f64>)>,
    /// Per substream: when the origin's bridge first delivered it after the current (peer)
    /// parent was assigned: the server pushes a moved substream until the new link delivers.
    bridged: Vec<Option<f64>>,
    /// Per substream: how much later than the others its packets arrive (ms, a decaying
    /// maximum of how long a packet known to exist took to come from a peer). Trees differ in
    /// depth and each hop's uplink serializes a fragment to its children one after another, so
    /// a substream carried by a deeper tree is routinely late; its gaps wait that much longer
    /// before the origin is asked, instead of fetching what is already on its way.
    path_lag: Vec<f64>,
    /// Gaps fetched from the origin, and when each was noticed: a copy its tree brings later
    /// still tells how late that tree runs (a tree a little slower than the patience would
    /// otherwise never be waited for again). At most [`FETCHED_GAPS`], oldest dropped.
    fetched_gaps: BTreeMap<u64, f64>,
    /// Fetches the origin answered "not produced yet", and until when the player's deadline
    /// does not ask for them again (a fallback period).
    not_yet: BTreeMap<u64, f64>,
    /// When the newest delivered packet was cut (the origin's clock).
    delivered_created_ms: Option<u64>,
    /// Per tree: the last packet of that tree a peer other than its parent sent us (peer, seq,
    /// when). A peer only sends a tree's packets to its children there, so this is a new parent
    /// whose instructions overtook ours (it primes us over a link that was already open).
    early_parent: Vec<Option<(PeerId, u64, f64)>>,
    /// The last [`PAST_LINKS`] parent links replaced by new instructions, for statistics.
    past_links: VecDeque<protocol::report::LinkStat>,
    child_last: HashMap<(PeerId, u32), (u64, u64)>,
    /// The live edge at a Welcome that joined a stream with history (`live_start_seq`): packets
    /// up to it existed before we joined.
    joined_live: Option<u64>,
    hb_seq: u64,
    /// On a hierarchy, the place the last instructions gave this peer, reported in heartbeats.
    place: Option<protocol::Place>,
    backlog_reported: bool,
    /// Per tree: since when its peer parent has sent nothing although a gap of the tree is old
    /// or was filled by another source, and how many early heartbeats said so already.
    quiet_parent: Vec<Option<(f64, u32)>>,
    /// A new parent delivered a substream the origin was bridging: the next heartbeat ends
    /// the bridge, so it is worth sending early.
    bridge_ended: bool,
    pub counters: Counters,
    pub verified: Option<RangeHash>,
    pub latency: LatencyHistogram,
    pub first_delivery_ms: Option<f64>,
    /// Set on a signed channel ([`Engine::set_stream_key`]).
    verifier: Option<Verifier>,
    /// The last few packets that arrived after their playout deadline, or were skipped.
    pub late_samples: VecDeque<protocol::report::LateSample>,
    /// The stream's fragment duration, learnt from the Welcome and the delivered packets, and
    /// the configured playout delay and give-up time it may only raise.
    fragments: FragmentClock,
    floor: (f64, f64),
    /// Whether the control connection (and with it the origin's push) is up.
    control_up: bool,
    now: f64,
}

impl Engine {
    pub fn new(cfg: EngineConfig, now_ms: f64) -> Self {
        // A whole fragment reaches a forwarder at once and must go to all its children, so the
        // bucket holds a second of upload: the cap bounds the rate, not the burst.
        let bucket = TokenBucket::new(cfg.upload_kbps, 1000.0, now_ms);
        Engine {
            floor: (cfg.playout_delay_ms, cfg.give_up_ms),
            fragments: FragmentClock::default(),
            cfg,
            me: None,
            k: 1,
            plan: Vec::new(),
            neighbours: BTreeSet::new(),
            handover: Handover::default(),
            linked: BTreeSet::new(),
            closed: BTreeSet::new(),
            relink_due: false,
            next_deliver: None,
            highest_seen: None,
            held: BTreeMap::new(),
            window: Window::default(),
            catch_up: CatchUp::default(),
            gaps: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            deadline: PlayerDeadline::default(),
            bucket,
            send_queue: VecDeque::new(),
            prime_queue: VecDeque::new(),
            tiers: Tiers::default(),
            parent_last: Vec::new(),
            parent_timing: Vec::new(),
            bridged: Vec::new(),
            path_lag: Vec::new(),
            fetched_gaps: BTreeMap::new(),
            not_yet: BTreeMap::new(),
            delivered_created_ms: None,
            early_parent: Vec::new(),
            past_links: VecDeque::new(),
            child_last: HashMap::new(),
            joined_live: None,
            hb_seq: 0,
            place: None,
            backlog_reported: false,
            quiet_parent: Vec::new(),
            bridge_ended: false,
            counters: Counters::default(),
            verified: None,
            latency: LatencyHistogram::default(),
            first_delivery_ms: None,
            verifier: None,
            late_samples: VecDeque::new(),
            control_up: true,
            now: now_ms,
        }
    }

    /// The channel's stream is signed with `key`: from now on packets from peers are played
    /// and forwarded only once a manifest signed with it vouches for them.
    pub fn set_stream_key(&mut self, key: protocol::manifest::StreamKey, channel: &str) {
        self.verifier = Some(Verifier::new(key, channel));
    }

    /// The origin's measure of the stream's fragment duration (Welcome `fragment_ms`).
    pub fn set_fragment_hint(&mut self, ms: f64) {
        self.fragments.hint(ms);
        self.resize_playout();
    }

    /// How far behind the live edge to play, for the fragment duration known so far (the
    /// player reads it; the engine's own playout deadline follows it).
    pub fn playout(&self) -> PlayoutSizing {
        self.fragments.sizing()
    }

    fn resize_playout(&mut self) {
        let s = self.fragments.sizing();
        self.cfg.playout_delay_ms = s.playout_delay_ms.max(self.floor.0);
        self.cfg.give_up_ms = s.give_up_ms.max(self.floor.1);
    }

    /// The playout delay in force (ms): the configured one, or more for long fragments.
    pub fn playout_delay_ms(&self) -> f64 {
        self.cfg.playout_delay_ms
    }

    /// Whether packets from peers are checked against signed manifests.
    pub fn is_verifying(&self) -> bool {
        self.verifier.is_some()
    }

    pub fn peer_id(&self) -> Option<PeerId> {
        self.me
    }

    pub fn plan(&self) -> &[SubstreamPlan] {
        &self.plan
    }

    pub fn substreams(&self) -> u32 {
        self.k
    }

    /// Trees of the peer's own cluster: `k`, or `k + n` in a coded cluster.
    pub fn trees(&self) -> u32 {
        self.tiers.trees(self.k)
    }

    /// Since when the engine knows that `seq` is missing (`None`: not known missing) and
    /// whether it is being fetched from the origin: for diagnostics (the simulator's stall
    /// trace).
    pub fn gap_of(&self, seq: u64) -> (Option<f64>, bool) {
        (
            self.gaps.get(&seq).copied(),
            self.in_flight.contains_key(&seq),
        )
    }

    /// The peer's tier, `None` on a flat channel.
    pub fn tier(&self) -> Option<TierName> {
        self.tiers.tier_name()
    }

    pub fn tier_plan(&self) -> Option<&TierPlan> {
        self.tiers.plan.as_ref()
    }

    /// False for a recruited relay, which forwards but does not play.
    pub fn plays(&self) -> bool {
        self.tiers.plays()
    }

    /// Flooding neighbours (peers) of the top tier.
    pub fn mesh_neighbours(&self) -> &[PeerId] {
        &self.tiers.mesh
    }

    pub fn upload_kbps(&self) -> u32 {
        self.bucket.rate_kbps()
    }

    /// Changes the upload cap (a player option; also used to emulate a throttled uplink).
    pub fn set_upload_kbps(&mut self, kbps: u32) {
        self.bucket.set_rate(kbps);
    }

    /// Feeds one event at time `now_ms` (wall clock, ms); returns what to do.
    pub fn handle(&mut self, input: Input<'_>, now_ms: f64) -> Vec<Action> {
        self.now = now_ms;
        let mut out = Vec::new();
        match input {
            Input::Welcome {
                peer_id,
                substreams,
                start_seq,
                live_seq,
                live_start_seq,
            } => {
                self.me = Some(peer_id);
                // A welcome comes over a control connection that is up, the first one after a
                // redirect at join too (the page marked it down when the redirect closed).
                self.control_up = true;
                self.k = substreams.max(1);
                self.parent_last = vec![(None, None); self.k as usize];
                self.parent_timing = vec![(now_ms, None); self.k as usize];
                self.quiet_parent = vec![None; self.k as usize];
                self.bridged = vec![None; self.k as usize];
                self.path_lag = vec![0.0; self.k as usize];
                self.next_deliver = Some(start_seq);
                self.verified = Some(RangeHash::new(start_seq));
                self.open_start(start_seq, live_seq, live_start_seq, now_ms);
            }
            Input::Instructions { plan, tier } => self.apply_plan(plan, tier, &mut out),
            Input::Packet { from, bytes } => self.on_packet(from, bytes, &mut out),
            Input::FetchFailed { seq, gone } => {
                self.in_flight.remove(&seq);
                if gone {
                    self.skip_to_available(&mut out);
                } else if let Some(t) = self.gaps.get_mut(&seq) {
                    // Not produced yet: try again one fallback period later.
                    *t = now_ms;
                    let next = self.next_deliver.unwrap_or(0);
                    self.not_yet
                        .retain(|s, until| *s >= next && *until > now_ms);
                    self.not_yet
                        .insert(seq, now_ms + self.cfg.fallback_after_ms);
                }
            }
            Input::LiveEdge { seq } => self.note_exists(seq),
            Input::Control { up } => self.control_up = up,
            Input::LinkClosed { peer } => {
                if self.linked.contains(&peer) {
                    self.closed.insert(peer);
                }
                self.relink_due |= self.handover.closed(peer);
                // What waits for that link would be dropped by the glue after taking upload
                // tokens from the peers that still listen (a departed child's share of a
                // fragment, until the instructions without it arrive).
                self.send_queue.retain(|q| q.to != peer);
                self.prime_queue.retain(|q| q.to != peer);
            }
            Input::Manifest { bytes } => self.on_manifest(bytes, &mut out),
            Input::Tick => {}
        }
        self.poll(&mut out);
        out
    }

    /// The Welcome's start: what already exists from `start_seq` up to the live edge becomes
    /// gaps. Everything from the random-access point up to the live edge exists, and the trees
    /// only carry new packets: the older fragment is fetched now. The newest one is what the
    /// new parents hold: each primes its child with its newest packet of the tree as soon as the
    /// data channel opens, and sends the rest of the tree's share of that fragment when asked
    /// (`catch_up.rs`). So it waits for them as a fragment handed down the trees does (a
    /// fallback period, spread over most of a long fragment): the player starts on the older
    /// fragment meanwhile, and a joining crowd does not take two fragments each from the
    /// origin. A start after the newest packet (the next fragment, when the origin's start
    /// budget is spent: `coordinator::start`) makes no gap: nothing the player needs exists yet,
    /// and the trees bring it.
    fn open_start(
        &mut self,
        start_seq: u64,
        live_seq: u64,
        live_start_seq: Option<u64>,
        now_ms: f64,
    ) {
        if start_seq > live_seq {
            self.joined_live = None;
            self.highest_seen = Some(start_seq - 1);
            return;
        }
        let now_due = now_ms - self.cfg.fallback_after_ms;
        let primed_from = live_start_seq
            .filter(|s| (start_seq..=live_seq).contains(s))
            .unwrap_or(u64::MAX);
        let last = live_seq;
        let spread = self.burst_spread_ms();
        let newest = (last + 1).saturating_sub(primed_from).max(1);
        for seq in start_seq..=last {
            let t = if seq < primed_from {
                now_due
            } else {
                now_ms + spread * (seq - primed_from) as f64 / newest as f64
            };
            self.gaps.insert(seq, t);
        }
        if primed_from <= last {
            self.catch_up.open(primed_from, last);
        }
        self.joined_live = (primed_from <= last).then_some(last);
        self.highest_seen = Some(live_seq);
    }

    fn apply_plan(
        &mut self,
        plan: Vec<SubstreamPlan>,
        tier: Option<TierPlan>,
        out: &mut Vec<Action>,
    ) {
        self.place = tier.as_ref().map(|t| protocol::Place {
            tier: t.tier,
            cluster: t.cluster,
            digest: protocol::plan_digest(&plan, Some(t)),
            origin_full: t.mesh.contains(&Source::Origin),
        });
        if self.tiers.apply(tier, self.k).is_err() {
            // A coded plan this peer cannot follow: the data trees still work, parity is ignored.
            self.counters.invalid += 1;
        }
        let trees = self.trees() as usize;
        self.parent_last.resize(trees, (None, None));
        self.parent_timing.resize(trees, (self.now, None));
        self.quiet_parent.resize(trees, None);
        self.bridged.resize(trees, None);
        let mut next: BTreeSet<PeerId> = self.tiers.neighbours().collect();
        for s in &plan {
            if let Source::Peer { id } = s.parent {
                next.insert(id);
            }
            next.extend(s.children.iter().copied());
            let i = s.index as usize;
            let changed = self
                .plan
                .iter()
                .find(|o| o.index == s.index)
                .map(|o| o.parent)
                != Some(s.parent);
            if changed && i < self.parent_last.len() {
                self.parent_last[i] = (None, None);
            }
            if changed {
                if let Some(q) = self.quiet_parent.get_mut(i) {
                    *q = None;
                }
            }
            let new_parent = match s.parent {
                Source::Peer { id } => Some(id),
                Source::Origin => None,
            };
            if changed && i < self.parent_timing.len() {
                if let Some(old) = self.plan.iter().find(|o| o.index == s.index) {
                    let (since, first) = self.parent_timing[i];
                    // Make-before-break: an old peer parent that delivered keeps its link
                    // until the new one delivers. If the replaced parent never delivered, a
                    // handover from the one before it goes on.
                    if let (Source::Peer { id: old_id }, Some(_)) = (old.parent, first) {
                        if self.cfg.handover_ms > 0.0 && !self.closed.contains(&old_id) {
                            self.handover.parent_changed(
                                s.index,
                                old_id,
                                self.now + self.cfg.handover_ms,
                            );
                        }
                    }
                    self.past_links.push_back(protocol::report::LinkStat {
                        substream: s.index,
                        parent: old.parent,
                        since_ms: since,
                        first_packet_ms: first,
                        parent_open_ms: None,
                        until_ms: Some(self.now),
                        bridged_ms: self.bridged.get(i).copied().flatten(),
                    });
                    while self.past_links.len() > PAST_LINKS {
                        self.past_links.pop_front();
                    }
                }
                self.parent_timing[i] = (self.now, None);
                if let Some(b) = self.bridged.get_mut(i) {
                    *b = None;
                }
                // The new parent already delivered (its instructions came first): that is its
                // first packet, received before we knew; count it from now, not from the next.
                if let (Source::Peer { id }, Some(Some((from, seq, at)))) =
                    (s.parent, self.early_parent.get(i))
                {
                    if *from == id && self.now - at <= EARLY_PARENT_MS {
                        let seq = *seq;
                        self.parent_timing[i].1 = Some(self.now);
                        if let Some(slot) = self.parent_last.get_mut(i) {
                            *slot = (Some(seq), Some(self.now as u64));
                        }
                    }
                }
            }
            if let Some(e) = self.early_parent.get_mut(i) {
                *e = None;
            }
            self.handover.parent_is(s.index, new_parent);
        }
        if let Some(me) = self.me {
            next.remove(&me);
        }
        let children: BTreeSet<(PeerId, u32)> = plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .collect();
        // A new child of data tree i most likely lost its previous parent: hand it the newest
        // packet of i we have, so it is fed from the swarm at once instead of waiting for the
        // next one (or for the origin). A duplicate costs it one ignored packet. Parity trees
        // are not primed: one stale shard rebuilds nothing on its own. Primes are extra load
        // (a repair can hand a parent a dozen children at once): they go after the stream, so
        // they never delay a packet its other children wait for.
        let old_children: BTreeSet<(PeerId, u32)> = self
            .plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .collect();
        for (child, sub) in children.difference(&old_children) {
            if let Some((seq, p)) = self.window.newest_of(*sub, self.k) {
                self.catch_up.primed(*child, *sub, seq);
                self.prime_queue.push_back(Queued {
                    to: *child,
                    packet: p.clone(),
                    queued_ms: self.now,
                    via: Via::Tree(*sub),
                    report_seq: seq,
                });
            }
        }
        self.child_last.retain(|key, _| children.contains(key));
        self.catch_up.keep_primed(&children);
        // Make-before-break: a former child is fed until its new parent delivers (it then
        // closes our link) or the handover's time is up.
        // Root feeds into other clusters are not handed over: measured, it cost the middle
        // nodes' upload more than it saved (docs/benchmarks.md, "make before break").
        if self.cfg.handover_ms > 0.0 {
            for (child, sub) in old_children.difference(&children) {
                if !self.closed.contains(child) {
                    self.handover
                        .child_moved(*child, *sub, self.now + self.cfg.handover_ms);
                }
            }
        }
        for (child, sub) in &children {
            self.handover.child_back(*child, *sub);
        }
        let mesh: BTreeSet<PeerId> = self.tiers.mesh.iter().copied().collect();
        let feeds: BTreeSet<(PeerId, u32)> = self
            .tiers
            .feeds
            .iter()
            .map(|f| (f.to, f.substream))
            .collect();
        let keep = |q: &Queued| match q.via {
            Via::Tree(sub) => children.contains(&(q.to, sub)),
            Via::Mesh => mesh.contains(&q.to),
            Via::Feed(sub) => feeds.contains(&(q.to, sub)),
            Via::Handover(sub) => self.handover.is_leaving(q.to, sub),
            Via::CatchUp(sub) => children.contains(&(q.to, sub)) || feeds.contains(&(q.to, sub)),
        };
        // Sends already queued to a former child go on as handover sends.
        for q in self
            .send_queue
            .iter_mut()
            .chain(self.prime_queue.iter_mut())
        {
            if let Via::Tree(sub) = q.via {
                if !children.contains(&(q.to, sub)) && self.handover.is_leaving(q.to, sub) {
                    q.via = Via::Handover(sub);
                }
            }
        }
        self.send_queue.retain(keep);
        self.prime_queue.retain(keep);
        self.neighbours = next;
        self.plan = plan;
        self.relink(out);
        // Wants that came before these instructions made their senders our children.
        for (child, sub) in children
            .difference(&old_children)
            .copied()
            .collect::<Vec<_>>()
        {
            if let Some(w) = self.catch_up.take(child, sub, self.now) {
                self.serve_want(child, w);
            }
        }
        self.ask_catch_up(out);
    }

    /// Asks each new peer parent of a data tree for the packets of the newest fragment at the
    /// Welcome that it has and we lack (`catch_up.rs`); sent after `relink`, which opened the
    /// link the want waits in.
    fn ask_catch_up(&mut self, out: &mut Vec<Action>) {
        let k = self.k;
        for s in &self.plan {
            let Source::Peer { id } = s.parent else {
                continue;
            };
            if s.index >= k {
                continue;
            }
            let gaps = &self.gaps;
            let lacks = |first: u64, last: u64| {
                gaps.range(first..=last)
                    .any(|(seq, _)| protocol::substream_of(*seq, k) == s.index)
            };
            if let Some(w) = self.catch_up.ask(id, s.index, self.next_deliver, lacks) {
                self.counters.catch_up_asked += 1;
                out.push(Action::Send {
                    to: id,
                    packet: Rc::new(w.encode()),
                });
            }
        }
    }

    /// A want from `from`: served if `from` is our child in its tree (or a cluster we feed that
    /// substream), else kept until our instructions say so.
    fn on_want(&mut self, from: From, bytes: &[u8]) {
        let From::Peer(peer) = from else {
            self.counters.invalid += 1;
            return;
        };
        let Ok(w) = protocol::want::Want::decode(bytes) else {
            self.counters.invalid += 1;
            return;
        };
        if w.substream >= self.k {
            self.counters.invalid += 1;
            return;
        }
        let ours = self
            .plan
            .iter()
            .any(|s| s.index == w.substream && s.children.contains(&peer))
            || self
                .tiers
                .feeds
                .iter()
                .any(|f| f.to == peer && f.substream == w.substream);
        if ours {
            self.serve_want(peer, w);
        } else {
            self.catch_up.hold(peer, w, self.now);
        }
    }

    /// Queues for `to` the packets of `w` this peer holds and has not queued for it already,
    /// from spare upload (the prime queue).
    fn serve_want(&mut self, to: PeerId, w: protocol::want::Want) {
        let w = self.catch_up.served_range(to, &w);
        let queued: BTreeSet<u64> = self
            .send_queue
            .iter()
            .chain(self.prime_queue.iter())
            .filter(|q| q.to == to)
            .map(|q| q.report_seq)
            .collect();
        for (seq, p) in self.window.wanted(&w, self.k) {
            if !queued.contains(&seq) {
                self.prime_queue.push_back(Queued {
                    to,
                    packet: p.clone(),
                    queued_ms: self.now,
                    via: Via::CatchUp(w.substream),
                    report_seq: seq,
                });
                self.counters.catch_up_sent += 1;
            }
        }
    }

    /// Tells the driver to connect to the peers the plan or a handover needs and to disconnect
    /// from the others.
    fn relink(&mut self, out: &mut Vec<Action>) {
        self.relink_due = false;
        let mut want: BTreeSet<PeerId> = self.neighbours.clone();
        want.extend(self.handover.peers());
        if let Some(me) = self.me {
            want.remove(&me);
        }
        for gone in self.linked.difference(&want) {
            self.closed.remove(gone);
            out.push(Action::Disconnect { peer: *gone });
        }
        for new in want.difference(&self.linked) {
            out.push(Action::Connect { peer: *new });
        }
        self.linked = want;
    }

    /// Whether a packet of tree `tree` from `from` came from that tree's current parent; if so,
    /// records `report_seq` as its progress.
    fn note_parent(&mut self, tree: u32, from: From, report_seq: u64) {
        let parent = self.plan.iter().find(|s| s.index == tree).map(|s| s.parent);
        let from_parent = match (from, parent) {
            (From::Peer(id), Some(Source::Peer { id: pid })) => id == pid,
            (From::OriginPush, Some(Source::Origin)) => true,
            _ => false,
        };
        if !from_parent {
            if from == From::OriginPush && matches!(parent, Some(Source::Peer { .. })) {
                // The origin bridges this tree while our new parent connects.
                if let Some(b) = self.bridged.get_mut(tree as usize) {
                    b.get_or_insert(self.now);
                }
            }
            if let From::Peer(id) = from {
                if self.handover.former_parent(tree) == Some(id) {
                    return; // the old parent, until the new one delivers
                }
                let i = tree as usize;
                if self.early_parent.len() <= i {
                    self.early_parent.resize(i + 1, None);
                }
                self.early_parent[i] = Some((id, report_seq, self.now));
            }
            return;
        }
        // The newest packet from it: a gap it fills later (or a catch-up packet) does not make
        // the link look behind.
        if let Some(slot) = self.parent_last.get_mut(tree as usize) {
            let newest = slot.0.map_or(report_seq, |s| s.max(report_seq));
            *slot = (Some(newest), Some(self.now as u64));
        }
        if let Some(q) = self.quiet_parent.get_mut(tree as usize) {
            *q = None;
        }
        if let Some(t) = self.parent_timing.get_mut(tree as usize) {
            if t.1.is_none() && self.bridged.get(tree as usize).is_some_and(|b| b.is_some()) {
                self.bridge_ended = true;
            }
            t.1.get_or_insert(self.now);
        }
        self.relink_due |= self.handover.new_parent_delivered(tree);
    }

    fn count_bytes(&mut self, from: From, len: usize) {
        match from {
            From::Peer(_) => self.counters.bytes_from_peers += len as u64,
            From::OriginPush | From::OriginFetch => self.counters.bytes_from_origin += len as u64,
        }
    }

    fn queue_tree(
        &mut self,
        tree: u32,
        packet: &Rc<Vec<u8>>,
        report_seq: u64,
        src: Option<PeerId>,
        spare: bool,
    ) {
        let children = self
            .plan
            .iter()
            .find(|s| s.index == tree)
            .map_or(&[][..], |s| &s.children[..]);
        for child in children {
            if Some(*child) != src {
                // From spare upload, as a catch-up is sent.
                let (queue, via) = if spare {
                    (&mut self.prime_queue, Via::CatchUp(tree))
                } else {
                    (&mut self.send_queue, Via::Tree(tree))
                };
                queue.push_back(Queued {
                    to: *child,
                    packet: packet.clone(),
                    queued_ms: self.now,
                    via,
                    report_seq,
                });
            }
        }
        // A former child is fed from spare upload only, as primes are: the old parent never
        // delays its real children's packets for it, nor reports the handover as backlog.
        for child in self.handover.leaving_children(tree) {
            if Some(child) != src && !self.closed.contains(&child) {
                self.prime_queue.push_back(Queued {
                    to: child,
                    packet: packet.clone(),
                    queued_ms: self.now,
                    via: Via::Handover(tree),
                    report_seq,
                });
            }
        }
    }

    fn on_packet(&mut self, from: From, bytes: &[u8], out: &mut Vec<Action>) {
        if protocol::want::is_want(bytes) {
            return self.on_want(from, bytes);
        }
        if is_parity_frame(bytes) {
            return self.on_parity(from, bytes, out);
        }
        let Ok(p) = Packet::decode(bytes) else {
            self.counters.invalid += 1;
            return;
        };
        let seq = p.header.seq;
        self.count_bytes(from, bytes.len());
        match from {
            From::Peer(_) => self.counters.packets_from_peers += 1,
            From::OriginPush | From::OriginFetch => self.counters.packets_from_origin += 1,
        }
        // A signed stream: what a peer sends is checked before anything else is done with it
        // (duplicates of what is already here need no check).
        if let (From::Peer(id), Some(v)) = (from, self.verifier.as_mut()) {
            let fresh =
                self.next_deliver.is_some_and(|n| seq >= n) && !self.held.contains_key(&seq);
            if !fresh {
                // A copy of a packet already here (mesh flooding, priming, a slow tree): harmless
                // to us, but a forged copy still proves its sender forges, and a forger whose
                // copies mostly lose the race to genuine ones must be found all the same.
                let forged = match self.held.get(&seq) {
                    Some(h) => (*h.packet != bytes).then(|| packet_digest(bytes)),
                    None => match v.check(seq, bytes) {
                        Check::Forged(got) => Some(got),
                        Check::Genuine | Check::Unknown => None,
                    },
                };
                if let Some(got) = forged {
                    self.counters.duplicates += 1;
                    return self.on_forged(Some(id), seq, got, false, out);
                }
            } else {
                match v.check(seq, bytes) {
                    Check::Genuine => {
                        self.counters.verified_packets += 1;
                        self.counters.verified_bytes += bytes.len() as u64;
                    }
                    Check::Forged(got) => return self.on_forged(Some(id), seq, got, true, out),
                    Check::Unknown => {
                        if !v.hold(seq, Some(id), bytes, self.now) {
                            self.counters.unverified_dropped += 1;
                        }
                        // It exists (as an unsigned stream would take it to): if no manifest
                        // vouches for it in time, the gap is fetched from the origin.
                        self.note_exists(seq);
                        return;
                    }
                }
            }
        }
        self.admit(from, seq, bytes, p.header.created_ms, out);
    }

    /// A packet received (and, on a signed stream, checked): relayed, held and delivered.
    fn admit(
        &mut self,
        from: From,
        seq: u64,
        bytes: &[u8],
        created_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let asked = self.in_flight.remove(&seq);
        if from == From::OriginFetch {
            self.counters.origin_fallbacks += 1;
            if let Some(at) = asked {
                self.deadline.note_fetch_rtt(self.now - at);
            }
        }
        self.note_parent(protocol::substream_of(seq, self.k), from, seq);
        let Some(next) = self.next_deliver else {
            return; // not welcomed yet
        };
        if seq < next || self.held.contains_key(&seq) {
            self.counters.duplicates += 1;
            // The tree's own copy of a gap we fetched: how late it ran.
            if let From::Peer(id) = from {
                let sub = protocol::substream_of(seq, self.k);
                let parent = self
                    .plan
                    .iter()
                    .any(|p| p.index == sub && p.parent == Source::Peer { id });
                if let Some(noticed) = self.fetched_gaps.remove(&seq).filter(|_| parent) {
                    self.note_path_lag(seq, Some(noticed));
                }
            }
            return;
        }
        let src = match from {
            From::Peer(id) => Some(id),
            _ => None,
        };
        self.accept(vec![Fresh {
            seq,
            packet: Rc::new(bytes.to_vec()),
            created_ms,
            src,
        }]);
        self.deliver(out);
    }

    /// A signed manifest: its packets exist, and those that came before it are checked now.
    fn on_manifest(&mut self, frame: &[u8], out: &mut Vec<Action>) {
        let Some(v) = self.verifier.as_mut() else {
            // An unsigned stream has no manifests; a frame like one is garbage.
            self.counters.bad_manifests += 1;
            return;
        };
        let range = match v.add_manifest(frame) {
            Ok(r) => r,
            Err(_) => {
                self.counters.bad_manifests += 1;
                return;
            }
        };
        self.counters.manifests += 1;
        let waiting = v.take_pending(range.clone());
        if let Some(last) = range.end.checked_sub(1).filter(|_| !range.is_empty()) {
            self.note_exists(last);
        }
        for (seq, p) in waiting {
            let waited = (self.now - p.since).max(0.0);
            self.counters.manifest_waits += 1;
            self.counters.manifest_wait_ms += waited;
            self.counters.manifest_wait_max_ms = self.counters.manifest_wait_max_ms.max(waited);
            let check = match self.verifier.as_ref() {
                Some(v) => v.check(seq, &p.bytes),
                None => Check::Unknown,
            };
            match check {
                Check::Genuine => {
                    self.counters.verified_packets += 1;
                    self.counters.verified_bytes += p.bytes.len() as u64;
                    let Ok(created_ms) = Packet::decode(&p.bytes).map(|d| d.header.created_ms)
                    else {
                        continue;
                    };
                    match p.from {
                        Some(id) => self.admit(From::Peer(id), seq, &p.bytes, created_ms, out),
                        None => {
                            // Rebuilt from parity before its manifest came.
                            if self.next_deliver.is_some_and(|n| seq >= n)
                                && !self.held.contains_key(&seq)
                            {
                                self.accept(vec![Fresh {
                                    seq,
                                    packet: Rc::new(p.bytes),
                                    created_ms,
                                    src: None,
                                }]);
                                self.deliver(out);
                            }
                        }
                    }
                }
                Check::Forged(got) => self.on_forged(p.from, seq, got, true, out),
                Check::Unknown => {}
            }
        }
    }

    /// Packet `seq` (from `from`, or rebuilt from parity when `None`) hashed to `got`, not to
    /// the signed hash: dropped, reported (once in a while per sender), and, when `refetch` (it
    /// is not here yet), fetched from the origin now rather than after the usual wait.
    fn on_forged(
        &mut self,
        from: Option<PeerId>,
        seq: u64,
        got: [u8; 32],
        refetch: bool,
        out: &mut Vec<Action>,
    ) {
        self.counters.forged += 1;
        if let (Some(id), Some(v)) = (from, self.verifier.as_mut()) {
            if v.should_report(id, self.now) {
                out.push(Action::ReportForgery {
                    peer: id,
                    seq,
                    hash: got,
                });
            }
        }
        if !refetch {
            return;
        }
        self.note_exists(seq);
        let due = self.now
            - self.cfg.fallback_after_ms
            - (self.cfg.playout_delay_ms - self.cfg.fallback_after_ms).max(0.0)
            - 1.0;
        if let Some(t) = self.gaps.get_mut(&seq) {
            *t = t.min(due.max(self.now - self.cfg.give_up_ms / 2.0));
        }
    }

    /// A parity frame: relayed down its tree, then given to the assembler.
    fn on_parity(&mut self, from: From, bytes: &[u8], out: &mut Vec<Action>) {
        let Ok(f) = ParityFrame::decode(bytes) else {
            self.counters.invalid += 1;
            return;
        };
        self.count_bytes(from, bytes.len());
        self.counters.parity_frames_received += 1;
        // A frame for a group far beyond anything known to exist is garbage or hostile: taken,
        // it would move the assembler's window past every real group (found by fuzzing).
        let known = self.highest_seen.or(self.next_deliver).unwrap_or(0);
        if f.last_seq() > known.saturating_add(PARITY_AHEAD) {
            self.counters.invalid += 1;
            return;
        }
        let tree = u32::from(f.index);
        self.note_parent(tree, from, f.last_seq());
        if self.next_deliver.is_none() {
            return;
        }
        if !self.tiers.first_parity_sight(f.group, f.index) {
            self.counters.duplicates += 1;
            return;
        }
        let src = match from {
            From::Peer(id) => Some(id),
            _ => None,
        };
        self.queue_tree(tree, &Rc::new(bytes.to_vec()), f.last_seq(), src, false);
        // The frame proves its whole group exists.
        self.note_exists(f.last_seq());
        let rebuilt = match self.tiers.coded.as_mut() {
            Some(c) => c.assembler.add_parity(&f),
            None => Ok(Vec::new()),
        };
        let fresh = self.recovered(rebuilt);
        self.accept(fresh);
        self.deliver(out);
    }

    /// The packets of `rebuilt` not already here, ready for [`Engine::accept`].
    fn recovered(
        &mut self,
        rebuilt: Result<Vec<Recovered>, protocol::fec::FecError>,
    ) -> Vec<Fresh> {
        let Ok(rebuilt) = rebuilt else {
            // Parity that does not fit the packets: nothing rebuilt, the origin fills in.
            self.counters.invalid += 1;
            return Vec::new();
        };
        let mut fresh = Vec::new();
        for r in rebuilt {
            let new =
                self.next_deliver.is_some_and(|n| r.seq >= n) && !self.held.contains_key(&r.seq);
            let Ok(p) = Packet::decode(&r.packet) else {
                continue;
            };
            if new {
                if let Some(v) = self.verifier.as_mut() {
                    match v.check(r.seq, &r.packet) {
                        Check::Genuine => {}
                        Check::Forged(_) => {
                            // Forged parity (data packets are checked before they are coded
                            // with): nobody to blame for sure; the origin fills the gap.
                            self.counters.forged += 1;
                            continue;
                        }
                        Check::Unknown => {
                            v.hold(r.seq, None, &r.packet, self.now);
                            continue;
                        }
                    }
                }
                self.counters.packets_recovered += 1;
                self.in_flight.remove(&r.seq);
                fresh.push(Fresh {
                    seq: r.seq,
                    created_ms: p.header.created_ms,
                    packet: Rc::new(r.packet),
                    src: None,
                });
            }
        }
        fresh
    }

    /// Packets seen for the first time (received, fetched or rebuilt): each is relayed down its
    /// tree, flooded to the mesh, handed to the feeds, held for delivery, and shown to the
    /// assembler (which may rebuild others of its group, accepted the same way).
    fn accept(&mut self, mut work: Vec<Fresh>) {
        while let Some(Fresh {
            seq,
            packet,
            created_ms,
            src,
        }) = work.pop()
        {
            // Relay first: children wait on us, the player can wait a few microseconds. What
            // existed before we joined (our start, fetched or caught up) goes to our children
            // from spare upload: a child of long standing has it already, and in front of its
            // live packets it cost a joiner's uplink two fragments (the swarm, 4 s fragments);
            // a child that joined moments before us may still need it (the simulator's crowds).
            let start = self.joined_live.is_some_and(|live| seq <= live);
            self.relay(seq, &packet, src, start);
            self.note_exists(seq);
            let known_since = self.gaps.remove(&seq);
            if src.is_some() {
                self.note_path_lag(seq, known_since);
            }
            // A gap its tree's parent did not fill (rebuilt from parity, fetched, or from
            // another peer): that parent may have gone quiet.
            if let Some(noticed) = known_since {
                let sub = protocol::substream_of(seq, self.k);
                let from_parent = self.plan.iter().any(|p| {
                    p.index == sub && src.is_some_and(|s| p.parent == Source::Peer { id: s })
                });
                if !from_parent {
                    self.note_quiet_parent(sub as usize, noticed);
                }
            }
            let rebuilt = self.tiers.assemble_packet(seq, &packet);
            self.held.insert(
                seq,
                Held {
                    random_access: Packet::decode(&packet)
                        .is_ok_and(|p| p.header.is_random_access()),
                    packet,
                    created_ms,
                    arrived_ms: self.now,
                    src,
                },
            );
            work.extend(self.recovered(rebuilt));
        }
    }

    /// Queues a fresh packet for our children in its tree, mesh neighbours and the clusters we
    /// feed (parity too, for a coded cluster's roots).
    fn relay(&mut self, seq: u64, packet: &Rc<Vec<u8>>, src: Option<PeerId>, start: bool) {
        self.queue_tree(protocol::substream_of(seq, self.k), packet, seq, src, start);
        for i in 0..self.tiers.mesh.len() {
            let to = self.tiers.mesh[i];
            if Some(to) != src {
                self.queue(to, packet, Via::Mesh, seq);
            }
        }
        for (to, sub) in self.tiers.data_feeds(seq, self.k) {
            if Some(to) != src {
                self.queue(to, packet, Via::Feed(sub), seq);
            }
        }
        for (to, sub, frame) in self.tiers.parity_for(seq, packet) {
            let report_seq = ParityFrame::decode(&frame).map_or(seq, |f| f.last_seq());
            self.queue(to, &frame, Via::Feed(sub), report_seq);
        }
    }

    fn queue(&mut self, to: PeerId, packet: &Rc<Vec<u8>>, via: Via, report_seq: u64) {
        self.send_queue.push_back(Queued {
            to,
            packet: packet.clone(),
            queued_ms: self.now,
            via,
            report_seq,
        });
    }

    /// Packets up to `seq` exist at the origin: every one not yet here becomes a gap, and is
    /// fetched if the swarm does not deliver it within `fallback_after_ms`.
    fn note_exists(&mut self, seq: u64) {
        let Some(next) = self.next_deliver else {
            return;
        };
        let high = self.highest_seen.unwrap_or(next.saturating_sub(1));
        // Bounded: a bogus edge far ahead must not allocate millions of gaps.
        let upto = seq.min(high + 4096);
        let first = (high + 1).max(next);
        // A whole fragment becomes known at once (its manifest, a live-edge notice), but a tree
        // hands its packets down one after another: with long fragments the last ones come most
        // of a fragment's duration later, so each gap's clock starts where its packet is due.
        let spread = self.burst_spread_ms();
        let m = (upto + 1).saturating_sub(first);
        let burst = m > u64::from(self.k);
        for missing in first..=upto {
            if !self.held.contains_key(&missing) {
                let due = if burst {
                    spread * (missing - first) as f64 / m as f64
                } else {
                    0.0
                };
                self.gaps.entry(missing).or_insert(self.now + due);
            }
        }
        // Coded cluster: a group's parity can only be made once its last packet exists, so the
        // fallback clock of its gaps starts no earlier than that.
        if let Some(c) = &self.tiers.coded {
            if upto > high {
                let k = u64::from(c.params.k());
                let lo = (high + 1) / k * k;
                for (seq, t) in self.gaps.range_mut(lo..=upto) {
                    if c.group_end(*seq) <= upto {
                        *t = t.max(self.now);
                    }
                }
            }
        }
        self.highest_seen = Some(high.max(upto));
    }

    /// A gap of tree `tree`, open since `noticed`, is old or was filled by another source: if
    /// the tree's peer parent (assigned before the gap, not being bridged) delivered before and
    /// has sent nothing since, it is quiet until it sends again.
    fn note_quiet_parent(&mut self, tree: usize, noticed: f64) {
        let peer_parent = self
            .plan
            .iter()
            .any(|p| p.index as usize == tree && matches!(p.parent, Source::Peer { .. }));
        let assigned_before = self
            .parent_timing
            .get(tree)
            .is_some_and(|(since, _)| *since <= noticed);
        let bridged = self.bridged.get(tree).is_some_and(|b| b.is_some());
        // It delivered before (a link that never did may never have opened: the glue reports
        // that when the data channel times out) and nothing since.
        let silent_since = self
            .parent_last
            .get(tree)
            .is_some_and(|(_, at)| at.is_some_and(|at| (at as f64) < noticed));
        if peer_parent && assigned_before && !bridged && silent_since {
            if let Some(q) = self.quiet_parent.get_mut(tree) {
                q.get_or_insert((noticed, 0));
            }
        }
    }

    /// A packet of `seq`'s substream came from a peer, `known_since` after the engine learnt
    /// that it existed (`None`: before). The substream's lag rises at once to a late arrival
    /// and decays by a tenth with each packet.
    fn note_path_lag(&mut self, seq: u64, known_since: Option<f64>) {
        let sub = protocol::substream_of(seq, self.k) as usize;
        let sample = known_since.map_or(0.0, |t| (self.now - t).max(0.0));
        if let Some(lag) = self.path_lag.get_mut(sub) {
            *lag = sample.max(*lag * PATH_LAG_DECAY);
        }
    }

    /// How long past `fallback_after_ms` a gap of `seq`'s substream waits for its tree: the
    /// substream's usual lag, capped at a share of the slack the playout delay leaves (1 900 ms
    /// by default).
    ///
    /// * Where this peer forwards the substream (children in its tree, a cluster it feeds, the
    ///   top-tier mesh), an eighth (237 ms): its fetch also feeds everyone below it, whose own
    ///   clocks learn of the packet late when it is late here (in the simulator's hierarchy a
    ///   longer wait there cost bottom-tier stalls).
    /// * Where it is a leaf and its player plays, half, less any spread of a long fragment's
    ///   burst (950 ms for 1 s fragments, never under an eighth): only its own player waits on
    ///   it, and a player about to run out fetches at once anyway (`deadline.rs`). (A player
    ///   that has not started has no such deadline: an eighth; with half, the simulator's
    ///   hierarchy started 0.17 s later at the 95th percentile.) The tail of a deep tree routinely
    ///   delivers 0.8-1 s after a packet was cut; an eighth fetched it from the origin every time
    ///   (the simulator's flash crowd settled at 63 streams of fallbacks a second for 10 000
    ///   peers; 7 with this, docs/benchmarks.md).
    fn path_patience(&self, seq: u64) -> f64 {
        let sub = protocol::substream_of(seq, self.k);
        let slack = (self.cfg.playout_delay_ms - self.cfg.fallback_after_ms).max(0.0);
        let forwards = self
            .plan
            .iter()
            .any(|p| p.index == sub && !p.children.is_empty())
            || !self.tiers.mesh.is_empty()
            || self.tiers.feeds_packet(seq, self.k);
        // A player not started yet has no deadline to fetch by: its start waits on these gaps.
        let playing = self.deadline.remaining_ms(self.now).is_some();
        let cap = if forwards || !playing {
            slack * FORWARDER_PATIENCE_SHARE
        } else {
            (slack * LEAF_PATIENCE_SHARE - self.burst_spread_ms())
                .max(slack * FORWARDER_PATIENCE_SHARE)
        };
        self.path_lag
            .get(sub as usize)
            .copied()
            .unwrap_or(0.0)
            .min(cap)
    }

    /// Over how long the packets of a fragment that became known at once are expected from the
    /// trees (ms): two thirds of a long fragment (the DCM plans the trees of such a stream so
    /// that a forwarder's uplink is filled to two thirds at most, and a forwarder pushes a
    /// fragment down a hop in that time), within half the slack the playout delay leaves a
    /// fetch. Fragments up to 1.5 s (the demo clip's 1 s) are not spread: the trees carry them
    /// within the fallback period already. The DCM's congestion detector reads the same
    /// (`coordinator/src/dcm/production.rs`). Not the whole fragment: the playout lag (two
    /// fragments) leaves the fragment one duration from its creation to its first frame, which
    /// a fetch of its last packets must also fit in.
    fn burst_spread_ms(&self) -> f64 {
        let d = self.fragments.fragment_ms().unwrap_or(0.0);
        if d < 1500.0 {
            return 0.0;
        }
        let slack = (self.cfg.playout_delay_ms - self.cfg.fallback_after_ms).max(0.0) / 2.0;
        (d * 2.0 / 3.0).min(slack)
    }

    /// Whether `seq`'s data tree has the origin as this peer's parent, or the origin pushes
    /// this peer the whole stream (its neighbour in the top-tier mesh).
    fn origin_fed(&self, seq: u64) -> bool {
        let sub = protocol::substream_of(seq, self.k);
        self.plan
            .iter()
            .any(|p| p.index == sub && p.parent == Source::Origin)
            || self
                .tiers
                .plan
                .as_ref()
                .is_some_and(|t| t.mesh.contains(&Source::Origin))
    }

    /// Whether the gap at `seq`, open since `t`, is to be fetched from the origin now.
    /// While the player is about to run out of media: the end (exclusive) of the fragment it
    /// needs next, the one holding the next packet to deliver (the first held packet after it
    /// that starts a fragment; every known gap when none is held yet).
    fn urgent_below(&self) -> Option<u64> {
        if !self.deadline.urgent(self.now) {
            return None;
        }
        let next = self.next_deliver?;
        let end = self
            .held
            .range(next + 1..)
            .find(|(_, h)| h.random_access)
            .map_or(u64::MAX, |(s, _)| *s);
        Some(end)
    }

    /// The player is about to run dry and nothing says the next packets exist (every tree late
    /// and no live-edge notice): the fragment clock does. Once a fragment's duration (and a
    /// fifth) has passed since the newest delivered packet was cut, the next fragment has been
    /// cut too: its first packet of each substream is a gap (the origin answers "not yet" if
    /// the clock was wrong, and is not asked again for a fallback period).
    fn infer_next_exists(&mut self) {
        let Some(next) = self.next_deliver else {
            return;
        };
        if self.held.contains_key(&next) || self.gaps.contains_key(&next) {
            return;
        }
        let (Some(cut), Some(d)) = (self.delivered_created_ms, self.fragments.fragment_ms()) else {
            return;
        };
        if self.now - cut as f64 >= 1.2 * d {
            self.note_exists(next + u64::from(self.k) - 1);
        }
    }

    /// The player has `slack_ms` of media buffered ahead of its playhead (`None`: it does not
    /// play): gaps of the fragment it needs next are fetched at once when that is about to run
    /// out (`deadline.rs`). Drivers whose player cannot tell never call it.
    pub fn set_player_slack(&mut self, slack_ms: Option<f64>, now_ms: f64) {
        self.deadline.set_slack(slack_ms, now_ms);
    }

    fn fetch_due(&self, seq: u64, t: f64) -> bool {
        if !self.control_up && self.origin_fed(seq) {
            // Nothing will come down this tree until a control connection is back.
            return self.now >= t;
        }
        let waited = self.now - t - self.path_patience(seq);
        match &self.tiers.coded {
            None => waited >= self.cfg.fallback_after_ms,
            // Until the group's end is known its parity cannot exist yet. A stream that pauses
            // mid-group still gets its packet from the origin, after half the playout delay
            // (or two fallback periods if longer) rather than never.
            Some(c) => {
                let end_known = self.highest_seen.is_some_and(|h| c.group_end(seq) <= h);
                let patience =
                    (2.0 * self.cfg.fallback_after_ms).max(self.cfg.playout_delay_ms / 2.0);
                (end_known && waited >= self.cfg.fallback_after_ms) || waited >= patience
            }
        }
    }

    fn deliver(&mut self, out: &mut Vec<Action>) {
        while let Some(next) = self.next_deliver {
            let Some(h) = self.held.remove(&next) else {
                break;
            };
            let Ok(p) = Packet::decode(&h.packet) else {
                break;
            };
            let latency = (self.now - h.created_ms as f64).max(0.0);
            self.latency.record(latency as u64);
            self.delivered_created_ms = Some(h.created_ms);
            let known = self.fragments.fragment_ms();
            self.fragments.note(h.created_ms);
            if self.fragments.fragment_ms() != known {
                self.resize_playout();
            }
            // On time: the packet was here before its playout deadline.
            if h.arrived_ms <= h.created_ms as f64 + self.cfg.playout_delay_ms {
                self.counters.on_time += 1;
            } else {
                self.counters.late += 1;
                self.late_samples.push_back(protocol::report::LateSample {
                    seq: next,
                    late_ms: h.arrived_ms - h.created_ms as f64 - self.cfg.playout_delay_ms,
                    from: h.src,
                    at_ms: self.now,
                });
                while self.late_samples.len() > LATE_SAMPLES {
                    self.late_samples.pop_front();
                }
            }
            self.counters.packets_played += 1;
            self.counters.bytes_played += p.payload.len() as u64;
            if let Some(v) = self.verified.as_mut() {
                v.push(if self.cfg.verify {
                    packet_hash(p.payload)
                } else {
                    0
                });
            }
            self.first_delivery_ms.get_or_insert(self.now);
            self.window.push(h.packet.clone(), self.k);
            // A recruited relay verifies and forwards but has no player.
            if self.tiers.plays() {
                out.push(Action::Deliver {
                    seq: next,
                    payload: p.payload.to_vec(),
                });
            }
            self.next_deliver = Some(next + 1);
        }
    }

    /// Jumps over a gap that cannot be filled, restarting verification after it.
    fn skip_to_available(&mut self, out: &mut Vec<Action>) {
        let Some(next) = self.next_deliver else {
            return;
        };
        if let Some((&first_held, _)) = self.held.iter().next() {
            let skipped = first_held - next;
            self.counters.late += skipped;
            self.late_samples.push_back(protocol::report::LateSample {
                seq: next,
                // Skipped: `late_ms` is the number of packets jumped over, negated.
                late_ms: -(skipped as f64),
                from: None,
                at_ms: self.now,
            });
            while self.late_samples.len() > LATE_SAMPLES {
                self.late_samples.pop_front();
            }
            self.gaps.retain(|s, _| *s > first_held);
            self.next_deliver = Some(first_held);
            // The verified range must stay contiguous; start a new one after the hole.
            self.verified = Some(RangeHash::new(first_held));
            self.deliver(out);
        }
    }

    fn poll(&mut self, out: &mut Vec<Action>) {
        if self.handover.expire(self.now) || self.relink_due {
            self.relink(out);
        }
        if let Some(v) = self.verifier.as_mut() {
            self.counters.unverified_dropped += v.expire(self.next_deliver, self.now);
        }
        // Fallback fetches for gaps that stayed open too long, and for those the player is
        // about to need (`deadline.rs`).
        let urgent_below = self.urgent_below();
        if urgent_below.is_some() {
            self.infer_next_exists();
        }
        let now = self.now;
        let due: Vec<(u64, f64, bool)> = self
            .gaps
            .iter()
            .filter(|(seq, _)| !self.in_flight.contains_key(seq))
            .filter(|(seq, _)| self.not_yet.get(seq).is_none_or(|until| *until <= now))
            .filter_map(|(seq, t)| {
                let late = self.fetch_due(*seq, *t);
                (late || urgent_below.is_some_and(|b| *seq < b)).then_some((*seq, *t, late))
            })
            .take(32)
            .collect();
        for (seq, noticed, late) in due {
            self.in_flight.insert(seq, self.now);
            self.fetched_gaps.insert(seq, noticed);
            while self.fetched_gaps.len() > FETCHED_GAPS {
                self.fetched_gaps.pop_first();
            }
            // The tree missed even its usual lag: it is failing, not slow. Its next gaps are
            // fetched without the extra patience until its packets flow again. (A gap fetched
            // for the player's deadline says nothing of its tree.)
            let sub = protocol::substream_of(seq, self.k) as usize;
            if let Some(lag) = self.path_lag.get_mut(sub).filter(|_| late) {
                *lag = 0.0;
            }
            out.push(Action::Fetch { seq });
        }
        // Gaps open for a while whose tree's parent has sent nothing since.
        let now = self.now;
        let quiet: Vec<(usize, f64)> = self
            .gaps
            .iter()
            .take(64)
            .filter(|(_, t)| now - **t >= QUIET_PARENT_REPORT_MS)
            .map(|(seq, t)| (protocol::substream_of(*seq, self.k) as usize, *t))
            .collect();
        for (tree, noticed) in quiet {
            self.note_quiet_parent(tree, noticed);
        }
        // A gap at the head that nobody can fill for too long: skip it.
        if let (Some(next), Some((&first_gap, &t))) = (self.next_deliver, self.gaps.iter().next()) {
            if first_gap == next && self.now - t > self.cfg.give_up_ms && !self.held.is_empty() {
                self.skip_to_available(out);
            }
        }
        // Sends within the upload cap; stale ones are dropped, and so are those for a link
        // that closed (no upload is spent on them).
        while let Some(q) = self.send_queue.front() {
            if self.now - q.queued_ms > self.cfg.send_timeout_ms {
                self.send_queue.pop_front();
                self.counters.send_dropped += 1;
                continue;
            }
            if self.closed.contains(&q.to) {
                self.send_queue.pop_front();
                continue;
            }
            if !self.bucket.try_take(q.packet.len(), self.now) {
                break;
            }
            let Some(q) = self.send_queue.pop_front() else {
                break;
            };
            out.push(self.sent(q));
        }
        // Primes only once the stream itself is out (see `prime_queue`).
        while self.send_queue.is_empty() {
            let Some(q) = self.prime_queue.front() else {
                break;
            };
            let sent_newer = match q.via {
                Via::Tree(sub) => self
                    .child_last
                    .get(&(q.to, sub))
                    .is_some_and(|(seq, _)| *seq >= q.report_seq),
                Via::Mesh | Via::Feed(_) | Via::Handover(_) | Via::CatchUp(_) => false,
            };
            // A catch-up packet is useless once the child's fallback clock for it ran out (it
            // has fetched it from the origin): a fallback period, more for a long fragment.
            let timeout = match q.via {
                Via::CatchUp(_) => {
                    PRIME_TIMEOUT_MS.max(self.cfg.fallback_after_ms + self.burst_spread_ms())
                }
                _ => PRIME_TIMEOUT_MS,
            };
            // Stale, or the child already had a packet of that tree from us, or the link closed:
            // useless now.
            if self.now - q.queued_ms > timeout || sent_newer || self.closed.contains(&q.to) {
                self.prime_queue.pop_front();
                continue;
            }
            // A catch-up takes the upload the stream leaves over, but not the burst the next
            // fragment needs: spent on a joiner, it made the forwarder late on the next fragment
            // and the control center took it for congestion (the swarm, 4 s fragments).
            let keep = match q.via {
                Via::CatchUp(_) => CATCH_UP_KEEPS,
                _ => 0.0,
            };
            if !self.bucket.try_take_keeping(q.packet.len(), keep, self.now) {
                break;
            }
            let Some(q) = self.prime_queue.pop_front() else {
                break;
            };
            out.push(self.sent(q));
        }
    }

    /// Accounts for a queued packet leaving now, and the action that sends it.
    fn sent(&mut self, q: Queued) -> Action {
        self.counters.bytes_up += q.packet.len() as u64;
        if let Via::Tree(sub) = q.via {
            let last = self
                .child_last
                .entry((q.to, sub))
                .or_insert((q.report_seq, 0));
            *last = (last.0.max(q.report_seq), self.now as u64);
        }
        Action::Send {
            to: q.to,
            packet: q.packet,
        }
    }

    /// How long until the first queued send can go (ms; 0: now), `None` with nothing queued.
    /// Sends leave only when the engine is polled, so a driver that polls on a coarse timer
    /// wakes it then: otherwise a packet held back by the upload cap waits for the next event,
    /// up to a whole tick per hop.
    pub fn next_send_in_ms(&self) -> Option<f64> {
        let head = self.send_queue.front().or(self.prime_queue.front())?;
        Some(self.bucket.wait_ms(head.packet.len(), self.now))
    }

    /// Upload backlog, ms: how long the oldest packet waiting for upload tokens has waited, or
    /// how long the newest will wait at the current rate, whichever is longer (primes not
    /// included: they are optional, and the stream goes first). The second is known the moment
    /// a fragment is queued, so an uplink that cannot carry it says so at once instead of
    /// after waiting out [`EARLY_HEARTBEAT_BACKLOG_MS`].
    pub fn send_backlog_ms(&self) -> f64 {
        let waited = self
            .send_queue
            .front()
            .map_or(0.0, |q| (self.now - q.queued_ms).max(0.0));
        if self.send_queue.is_empty() {
            return waited;
        }
        let queued: usize = self.send_queue.iter().map(|q| q.packet.len()).sum();
        // Capped: a zero rate (a paused uplink) must still encode as a number.
        let ahead = self.bucket.wait_ms(queued, self.now).min(60_000.0);
        waited.max(ahead)
    }

    /// True once per backlog episode when the upload queue has been stuck for a while: the
    /// glue then sends a heartbeat at once so the DCM can move children before they starve.
    /// With `spare` (the server's heartbeat budget allows one more now), also true once after
    /// a new parent first delivered a substream the origin was bridging: the DCM closes the
    /// bridge on that heartbeat, which spares the origin up to an interval of duplicates.
    ///
    /// Also true when a peer parent has sent nothing for [`QUIET_PARENT_REPORT_MS`] since a gap
    /// of its tree appeared, and once more a period later ([`QUIET_PARENT_REPORTS`] in all): the
    /// DCM then sees the link dead while the parent may claim to feed it, and moves this peer at
    /// once.
    pub fn wants_early_heartbeat(&mut self, spare: bool) -> bool {
        let stuck = self.send_backlog_ms() > EARLY_HEARTBEAT_BACKLOG_MS;
        let mut fire = stuck && !self.backlog_reported;
        self.backlog_reported = stuck;
        let now = self.now;
        for (since, reported) in self.quiet_parent.iter_mut().flatten() {
            // A second report one period later: the parent's own heartbeat may not have shown
            // the packet sent yet when the first was read (it is judged against the later of
            // the two).
            let due = QUIET_PARENT_REPORT_MS * f64::from(*reported + 1);
            if *reported < QUIET_PARENT_REPORTS && now - *since >= due {
                *reported += 1;
                fire = true;
            }
        }
        let bridge = spare && self.bridge_ended;
        if fire || bridge {
            self.bridge_ended = false;
        }
        fire || bridge
    }

    /// Whether a handover (make-before-break) keeps the link to `peer`: only then does its
    /// close change anything here ([`Input::LinkClosed`]).
    pub fn hands_over(&self, peer: PeerId) -> bool {
        self.handover.peers().any(|p| p == peer)
    }

    /// Every peer this one keeps a data channel to: the plan's neighbours and the handovers'.
    pub fn neighbours(&self) -> impl Iterator<Item = &PeerId> {
        self.linked.iter()
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
#[cfg(test)]
mod verify_tests;
