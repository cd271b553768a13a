//! A channel: its media (init segment + packet window, written by the origin) and the handle of
//! the DCM that steers its peers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use coordinator::dcm::planner::Push;
use coordinator::start::{StartCandidates, StartConfig, StartPolicy};
use coordinator::topology::region::Region;

use crate::events::{DcmEvent, OutboundTx};
use crate::origin::{Cadence, InitSegment, Lookup, PacketWindow, Packetizer};
use crate::relay::RelayBoard;
use protocol::manifest::ManifestSigner;

/// Media state shared between the origin (writer) and HTTP/WebSocket readers.
pub struct Media {
    pub init: Option<InitSegment>,
    pub stream_kbps: u32,
    pub window: PacketWindow,
}

/// Where a joiner of a channel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPosition {
    /// Where playback starts (a random-access point one fragment behind the newest).
    pub start: u64,
    /// The newest fragment's first packet; `None` on a file channel.
    pub newest_fragment: Option<u64>,
    /// The newest packet.
    pub live: u64,
}

#[derive(Default)]
pub struct ChannelCounters {
    /// Bytes the origin pushed over WebSockets to the peers it feeds (bridges included).
    pub origin_push_bytes: AtomicU64,
    /// Of those, bytes pushed over bridges: to children whose new peer parent was connecting.
    pub origin_bridge_bytes: AtomicU64,
    /// Substreams bridged by the origin after a move (make-before-break repairs).
    pub bridges_opened: AtomicU64,
    /// Moves left unbridged because `max_bridges` were open already.
    pub bridges_refused: AtomicU64,
    /// Bytes served over HTTP as fallback / catch-up.
    pub fallback_bytes: AtomicU64,
    pub fallback_packets: AtomicU64,
    pub packets_produced: AtomicU64,
    /// Links the DCM found congested from heartbeats.
    pub congestion_events: AtomicU64,
    /// Topology repairs: children moved because of congestion, departures, or silent peers.
    pub repairs: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Heartbeats (or links in them) the DCM refused as implausible, by reason (in the order of
    /// `coordinator::dcm::plausible::Refusal::ALL`).
    pub heartbeats_refused: [AtomicU64; 4],
    /// Peers of other channels recruited to relay this one (claims 19, 43).
    pub relays_recruited: AtomicU64,
    /// DCM failures survived: each time the channel's DCM died and a new one took over.
    pub dcm_failovers: AtomicU64,
    /// Peers that resumed on a new connection while their old session here was still open
    /// (cluster mode): the new session took the old one's place.
    pub reconnects: AtomicU64,
    /// Time from a heartbeat's arrival at its session to the DCM having applied it.
    pub heartbeat_apply: ApplyHistogram,
    /// Bytes of signed manifests the origin made (each goes to every peer), and of the packets
    /// they cover.
    pub manifest_bytes: AtomicU64,
    pub media_bytes: AtomicU64,
    /// Manifest frames queued to peers (one per peer each).
    pub manifests_sent: AtomicU64,
    /// Forgery reports received from peers, and of those, false ones.
    pub forgery_reports: AtomicU64,
    pub false_reports: AtomicU64,
    /// Peers evicted as hostile.
    pub evictions: AtomicU64,
}

/// Lock-free histogram of microsecond durations in quarter-octave buckets (±10 %).
pub struct ApplyHistogram {
    buckets: [AtomicU64; 128],
}

impl Default for ApplyHistogram {
    fn default() -> Self {
        ApplyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ApplyHistogram {
    fn bucket(us: u64) -> usize {
        (((us as f64 + 1.0).log2() * 4.0) as usize).min(127)
    }

    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Upper edge (ms) of the bucket holding quantile `q`, over everything recorded.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        Self::quantile_of(&self.counts(), q)
    }

    /// The bucket counts, so that a reader can take the difference of two readings and get
    /// quantiles over a window of its choosing ([`ApplyHistogram::quantile_of`]).
    pub fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// Upper edge (ms) of the bucket holding quantile `q` of `counts` (bucket `i` holds
    /// durations below 2^((i+1)/4) - 1 µs).
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some((2f64.powf((i as f64 + 1.0) / 4.0) - 1.0) / 1000.0);
            }
        }
        None
    }
}

/// A viewer's session as the DCM knows it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub out: OutboundTx,
    pub upload_kbps: u32,
    pub region: Region,
    /// A recruited relay's session (it stays a relay under a new DCM).
    pub relay: bool,
    /// The NAT class the peer reported (it keeps it under a new DCM).
    pub connectivity: Option<protocol::Connectivity>,
    /// A waypoint server (it stays one under a new DCM).
    pub waypoint: bool,
}

/// What outlives a DCM: the sessions attached to the channel and what the origin pushes to whom
/// (neither the sessions nor the origin failed). The topology itself is not kept here: a DCM
/// that takes over rebuilds it from the peers' heartbeats. The DCM writes through on every
/// change and reads it back only when it takes over.
#[derive(Debug, Default)]
pub struct Attachments {
    pub sessions: HashMap<protocol::PeerId, Attached>,
    pub origin_fed: HashMap<protocol::PeerId, Vec<Push>>,
    /// Last instructions epoch sent, so epochs keep increasing across DCMs.
    pub epoch: u64,
}

pub struct Channel {
    pub name: String,
    /// Substreams `k` of the channel's trees (the origin cuts fragments to match).
    pub substreams: u32,
    /// Shared by all channels of a server: spare peers and recruit tokens.
    pub relays: Arc<RelayBoard>,
    /// Survives DCM failures (see [`Attachments`]).
    pub attachments: Mutex<Attachments>,
    pub media: RwLock<Media>,
    pub dcm: mpsc::Sender<DcmEvent>,
    /// True while a source is attached (a second ingest is refused).
    pub source_attached: AtomicBool,
    /// Cluster mode: this node has released the channel's DCM to another node (lost lease,
    /// fenced, drained) and has not claimed it back; the DCM turns joins away meanwhile.
    pub released: AtomicBool,
    pub counters: ChannelCounters,
    /// Set on a file channel (a carousel of the file's pieces, see the `source::carousel` module).
    pub file: OnceLock<protocol::FileInfo>,
    /// Signs a manifest of every published fragment (issue 13); `None`: an unsigned stream.
    signer: Option<Mutex<ManifestSigner>>,
    /// Spacing of the published fragments (issue 14): what joiners size their lag from.
    cadence: Mutex<Cadence>,
    /// Where joiners start: one fragment behind the newest, or at it (`coordinator::start`).
    start: Mutex<StartPolicy>,
}

impl Channel {
    pub fn new(
        name: String,
        stream_kbps: u32,
        window: PacketWindow,
        dcm: mpsc::Sender<DcmEvent>,
    ) -> Self {
        Channel {
            name,
            substreams: 1,
            relays: Arc::default(),
            attachments: Mutex::default(),
            media: RwLock::new(Media {
                init: None,
                stream_kbps,
                window,
            }),
            dcm,
            source_attached: AtomicBool::new(false),
            released: AtomicBool::new(false),
            counters: ChannelCounters::default(),
            file: OnceLock::new(),
            signer: None,
            cadence: Mutex::default(),
            start: Mutex::new(StartPolicy::new(StartConfig::default())),
        }
    }

    /// Chooses joiners' starts with `cfg` (the server's `--start-*` flags).
    pub fn with_start(mut self, cfg: StartConfig) -> Self {
        self.start = Mutex::new(StartPolicy::new(cfg));
        self
    }

    /// Signs the stream with the ed25519 key of seed `seed` (see [`protocol::manifest`]).
    pub fn with_signer(mut self, seed: &[u8; 32]) -> Self {
        self.signer = Some(Mutex::new(ManifestSigner::new(seed, &self.name)));
        self
    }

    /// The stream's public key (hex), if it is signed.
    pub fn public_key(&self) -> Option<String> {
        let signer = self.signer.as_ref()?.lock().ok()?;
        Some(signer.public_key().to_hex())
    }

    /// SHA-256 of packet `seq` as the origin cut it, while the window holds it: what a forgery
    /// report's evidence is checked against.
    pub fn packet_digest(&self, seq: u64) -> Option<protocol::manifest::Digest32> {
        match self.packet(seq) {
            Lookup::Found(bytes) => Some(protocol::manifest::packet_digest(&bytes)),
            Lookup::NotYet | Lookup::Evicted => None,
        }
    }

    /// Uses the server's shared relay board instead of a private one.
    pub fn with_relays(mut self, relays: Arc<RelayBoard>) -> Self {
        self.relays = relays;
        self
    }

    /// The channel's substreams `k`, so that the origin cuts every fragment into a multiple
    /// of `k` equal packets (see [`crate::origin::packetizer`]).
    pub fn with_substreams(mut self, k: u32) -> Self {
        self.substreams = k.max(1);
        self
    }

    pub fn set_init(&self, init: InitSegment) {
        if let Ok(mut m) = self.media.write() {
            m.init = Some(init);
        }
    }

    pub fn set_stream_kbps(&self, kbps: u32) {
        if let Ok(mut m) = self.media.write() {
            m.stream_kbps = kbps.max(1);
        }
    }

    /// Init segment, MIME type and stream rate, once the source has sent its init segment.
    pub fn init(&self) -> Option<(Bytes, String, u32)> {
        let m = self.media.read().ok()?;
        m.init
            .as_ref()
            .map(|i| (Bytes::from(i.bytes.clone()), i.mime.clone(), m.stream_kbps))
    }

    /// `(start_seq, live_seq)`: where a joiner starts, and the newest packet. Joiners start one
    /// fragment behind the newest random-access point: the extra second of buffer absorbs a
    /// late packet or a repair without a stall, at the cost of a second of delay.
    /// On a file channel every packet is a starting point: a downloader starts at the newest.
    /// Bytes of the packets in the channel's window (see [`PacketWindow::held_bytes`]).
    pub fn window_bytes(&self) -> usize {
        self.media.read().map_or(0, |m| m.window.held_bytes())
    }

    pub fn live_position(&self) -> Option<(u64, u64)> {
        self.join_position().map(|p| (p.start, p.live))
    }

    /// Where a joiner starts ([`Channel::live_position`]), and where the newest fragment starts
    /// (live channels only).
    pub fn join_position(&self) -> Option<JoinPosition> {
        let m = self.media.read().ok()?;
        let latest = m.window.latest_seq()?;
        if self.file.get().is_some() {
            return Some(JoinPosition {
                start: latest,
                newest_fragment: None,
                live: latest,
            });
        }
        Some(JoinPosition {
            start: m.window.random_access_back(1)?,
            newest_fragment: m.window.random_access_back(0),
            live: latest,
        })
    }

    /// Where a peer that joins at `now_ms` starts: [`Channel::join_position`] with the start
    /// chosen by the channel's start policy (while the origin's start budget lasts, one
    /// fragment behind the newest, or the newest when the next fragment is near; beyond it the
    /// next fragment, after the newest packet; see `coordinator::start`). A file channel's
    /// position is unchanged.
    pub fn choose_join_position(&self, now_ms: u64) -> Option<JoinPosition> {
        let mut pos = self.join_position()?;
        let Some(newest) = pos.newest_fragment else {
            return Some(pos);
        };
        let newest_cut_ms = match self.packet(newest) {
            Lookup::Found(b) => protocol::Packet::decode(&b)
                .ok()
                .map(|p| p.header.created_ms),
            _ => None,
        }
        .unwrap_or(now_ms);
        let fragment_ms = self.fragment_ms().map_or(1000.0, f64::from);
        if let Ok(mut policy) = self.start.lock() {
            pos.start = policy
                .choose(
                    now_ms,
                    StartCandidates {
                        older: pos.start,
                        newest,
                        next: pos.live + 1,
                        newest_cut_ms,
                        fragment_ms,
                    },
                )
                .seq();
        }
        Some(pos)
    }

    /// The longest recent spacing of the published fragments (ms): how long a viewer's buffered
    /// end stands still between steps. `None` before two fragments (or a seed) are known.
    pub fn fragment_ms(&self) -> Option<u32> {
        self.cadence.lock().ok()?.fragment_ms()
    }

    /// A source that knows its fragments in advance (a looped clip) says how long they are.
    pub fn seed_fragment_ms(&self, ms: u32) {
        if let Ok(mut c) = self.cadence.lock() {
            c.seed(ms);
        }
    }

    /// Nominal rate: the live stream's, or a file carousel's.
    pub fn stream_kbps(&self) -> u32 {
        self.media.read().map_or(0, |m| m.stream_kbps)
    }

    /// The file this channel carries, if it is a file channel.
    pub fn file(&self) -> Option<&protocol::FileInfo> {
        self.file.get()
    }

    pub fn packet(&self, seq: u64) -> Lookup {
        match self.media.read() {
            Ok(m) => m.window.get(seq),
            Err(_) => Lookup::NotYet,
        }
    }

    pub fn range_hash(&self, first_seq: u64, count: u64) -> Option<protocol::hash::RangeHash> {
        self.media.read().ok()?.window.range_hash(first_seq, count)
    }

    /// Cuts one media fragment into packets, stores them and hands them to the DCM.
    pub async fn publish_fragment(
        &self,
        packetizer: &mut Packetizer,
        fragment: &[u8],
        random_access: bool,
    ) {
        self.publish_fragment_at(packetizer, fragment, random_access, now_ms())
            .await
    }

    /// [`Channel::publish_fragment`] with the packets stamped `created_ms` (a looped source
    /// stamps its timeline's time, so that every node of a cluster cuts identical packets).
    pub async fn publish_fragment_at(
        &self,
        packetizer: &mut Packetizer,
        fragment: &[u8],
        random_access: bool,
        created_ms: u64,
    ) {
        if let Ok(mut c) = self.cadence.lock() {
            c.note(created_ms);
        }
        let packets = packetizer.packetize(fragment, random_access, created_ms);
        let mut out = Vec::with_capacity(packets.len());
        if let Ok(mut m) = self.media.write() {
            for (i, p) in packets.into_iter().enumerate() {
                let Some(seq) = protocol::packet::peek_seq(&p) else {
                    continue;
                };
                let bytes = Bytes::from(p);
                m.window
                    .push(seq, bytes.clone(), random_access && i == 0)
                    .ok();
                out.push((seq, bytes));
            }
        }
        self.hand_to_dcm(out).await;
    }

    /// Stores ready-made packets (a file carousel's) and hands them to the DCM.
    pub async fn publish_packets(&self, packets: Vec<(u64, Vec<u8>)>) {
        let mut out = Vec::with_capacity(packets.len());
        if let Ok(mut m) = self.media.write() {
            for (seq, p) in packets {
                let bytes = Bytes::from(p);
                if m.window.push(seq, bytes.clone(), false).is_ok() {
                    out.push((seq, bytes));
                }
            }
        }
        self.hand_to_dcm(out).await;
    }

    async fn hand_to_dcm(&self, out: Vec<(u64, Bytes)>) {
        self.counters
            .packets_produced
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        // The manifest goes first: peers that get these packets from other peers can check
        // them as they come. Packets are consecutive within one publication.
        let manifests = match (&self.signer, out.first()) {
            (Some(signer), Some((first, _))) => signer.lock().map_or(Vec::new(), |mut s| {
                let packets: Vec<&[u8]> = out.iter().map(|(_, b)| b.as_ref()).collect();
                s.sign(*first, &packets)
            }),
            _ => Vec::new(),
        };
        self.counters.media_bytes.fetch_add(
            out.iter().map(|(_, b)| b.len() as u64).sum(),
            Ordering::Relaxed,
        );
        for m in manifests {
            let frame = Bytes::from(m.encode());
            self.counters
                .manifest_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            let _ = self.dcm.send(DcmEvent::Manifest(frame)).await;
        }
        // The DCM may lag; packets it misses are still in the window for fallback.
        let _ = self.dcm.send(DcmEvent::Packets(out)).await;
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub type SharedChannel = Arc<Channel>;

#[cfg(test)]
mod tests {
    use super::ApplyHistogram;
    use std::time::Duration;

    #[test]
    fn a_window_of_the_apply_histogram_leaves_earlier_records_out() {
        let h = ApplyHistogram::default();
        // A slow start (every peer joining at once)...
        for _ in 0..1000 {
            h.record(Duration::from_millis(400));
        }
        let before = h.counts();
        // ...then a steady window of fast applies.
        for _ in 0..1000 {
            h.record(Duration::from_micros(300));
        }
        let after = h.counts();
        let window: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let p99 = ApplyHistogram::quantile_of(&window, 0.99).expect("p99");
        assert!((0.3..0.4).contains(&p99), "window p99 {p99} ms");
        let all = h.quantile_ms(0.99).expect("p99");
        assert!(all > 300.0, "since start p99 {all} ms");
        assert_eq!(ApplyHistogram::quantile_of(&[0; 128], 0.5), None);
    }
}
