//! Statistics a peer exposes to its page (`peer.stats()`): the stats panel shows them and the
//! benchmarks and end-to-end tests read them out of real browsers.

use serde::{Deserialize, Serialize};

use crate::{PeerId, SubstreamPlan};

/// Width of one latency histogram bucket.
pub const LATENCY_BUCKET_MS: u64 = 20;
/// Number of buckets; the last one also counts everything slower.
pub const LATENCY_BUCKETS: usize = 500;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub peer_id: Option<PeerId>,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    pub packets_from_peers: u64,
    pub packets_from_origin: u64,
    pub origin_fallbacks: u64,
    pub duplicates: u64,
    /// Packets delivered in order to the player (or the verifier).
    pub packets_played: u64,
    /// Payload bytes delivered in order to the player (or verified), each packet once.
    #[serde(default)]
    pub bytes_played: u64,
    /// Delivered packets that arrived before their playout deadline.
    pub on_time: u64,
    /// Delivered packets that arrived after it (or were skipped).
    pub late: u64,
    /// Hash of the contiguous packet range delivered so far.
    pub verified_first_seq: Option<u64>,
    pub verified_count: u64,
    pub verified_hash: String,
    /// Page load → first packet playable (first frame for playing viewers).
    pub startup_ms: Option<f64>,
    /// Sparse latency histogram (origin creation → playable): (bucket index, count).
    pub latency_hist: Vec<(u32, u64)>,
    pub stalls: u32,
    pub playing: bool,
    pub decoding: bool,
    pub current_time: f64,
    pub buffer_s: f64,
    pub plan: Vec<SubstreamPlan>,
    pub connected_peers: u32,
    pub errors: Vec<String>,
    pub stream_kbps: u32,
    pub upload_kbps: u32,
    /// Per substream: current parent, since when, and when its first packet arrived.
    #[serde(default)]
    pub links: Vec<LinkStat>,
    /// The last few parents the peer had before its current ones (oldest first), with
    /// `until_ms` set: a repair that delivered and was then superseded by another move still
    /// shows when it delivered.
    #[serde(default)]
    pub past_links: Vec<LinkStat>,
    #[serde(default)]
    pub heartbeats_sent: u64,
    /// Data channels that never opened (ICE failed or timed out), each reported to the
    /// control center.
    #[serde(default)]
    pub links_failed: u64,
    /// Cluster mode: times the control connection was re-established on a server of the
    /// cluster (after a failover or a drain), keeping the peer's id and links.
    #[serde(default)]
    pub control_resumes: u64,
    /// The server the control connection is open to (base URL).
    #[serde(default)]
    pub control_server: String,
    /// Wall clock (ms since the Unix epoch) when the control connection last dropped (the first
    /// drop of an outage, not the failed attempts to reconnect that follow), and when it was
    /// last re-established with the peer's id (cluster mode).
    #[serde(default)]
    pub control_lost_at_ms: Option<f64>,
    #[serde(default)]
    pub control_resumed_at_ms: Option<f64>,
    #[serde(default)]
    pub heartbeat_bytes: u64,
    /// Tier of the peer (`preferred`, `middle`, `bottom`); `None` on a flat channel.
    #[serde(default)]
    pub tier: Option<String>,
    /// Display name of the peer's region, when the channel has tiers.
    #[serde(default)]
    pub region: Option<String>,
    /// Packets rebuilt from parity (coded middle tier) instead of received.
    #[serde(default)]
    pub packets_recovered: u64,
    #[serde(default)]
    pub parity_frames_received: u64,
    /// Catch-up wants sent to new parents, and packets queued for children's wants
    /// (`protocol::want`).
    #[serde(default)]
    pub catch_up_asked: u64,
    #[serde(default)]
    pub catch_up_sent: u64,
    /// Flooding neighbours (top tier).
    #[serde(default)]
    pub mesh_neighbours: u32,
    /// `false` for a recruited relay that forwards the channel without playing it.
    #[serde(default = "yes")]
    pub plays: bool,
    /// Relay sessions this peer runs for other channels it was recruited into.
    #[serde(default)]
    pub relays: Vec<RelayReport>,
    /// The file this page downloads beside the live channel, if any (claim 1).
    #[serde(default)]
    pub download: Option<DownloadReport>,
    /// The signed stream (issue 13): set when packets from peers are checked.
    #[serde(default)]
    pub signed: Option<SignedReport>,
    /// The last few packets that missed their playout deadline (or were skipped), to tell
    /// why continuity fell.
    #[serde(default)]
    pub late_samples: Vec<LateSample>,
    /// The NAT class the page found (issue 15; `None` until known, or without the server's
    /// STUN responder).
    #[serde(default)]
    pub nat_class: Option<crate::control::NatClass>,
    /// Whether ICE gathering with the site's `ice_servers` produced a TURN `relay` candidate.
    #[serde(default)]
    pub turn: bool,
    /// Whether an open link's selected candidate pair has used a relay candidate (either side's;
    /// looked at every 2 s while the page has TURN, and kept once seen).
    #[serde(default)]
    pub turn_used: bool,
    /// The distinct server-reflexive mappings (address:port) the classification saw.
    #[serde(default)]
    pub nat_mappings: Vec<String>,
}

/// One packet that missed its playout deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LateSample {
    pub seq: u64,
    /// How long after its deadline it arrived (ms); negative: skipped, with the number of
    /// packets jumped over.
    pub late_ms: f64,
    /// The peer it came from; `None`: the origin (push or fallback) or rebuilt from parity.
    pub from: Option<PeerId>,
    /// When it was delivered (the page's clock, ms).
    pub at_ms: f64,
}

/// What a peer's checks of the signed stream found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignedReport {
    /// Manifests taken, and frames refused (bad signature, wrong channel, garbage).
    pub manifests: u64,
    pub bad_manifests: u64,
    /// Packets from peers checked and found genuine, and their bytes.
    pub verified_packets: u64,
    pub verified_bytes: u64,
    /// Packets whose hash was not the signed one (dropped, fetched from the origin).
    pub forged: u64,
    /// Packets dropped unchecked (no manifest in time, or the waiting buffer full).
    pub unverified_dropped: u64,
    /// Forgery reports sent to the control center.
    pub reports_sent: u64,
    /// Packets from peers that arrived before their manifest, and how long they waited for it
    /// in all and at most (ms).
    #[serde(default)]
    pub manifest_waits: u64,
    #[serde(default)]
    pub manifest_wait_ms: f64,
    #[serde(default)]
    pub manifest_wait_max_ms: f64,
}

/// Progress of a download session (a second session of the page, on a file channel).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DownloadReport {
    pub channel: String,
    pub peer_id: Option<PeerId>,
    /// File name, size and piece count once welcomed.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub pieces: u32,
    #[serde(default)]
    pub pieces_have: u32,
    /// All pieces here and the reassembled bytes match `expected_digest`.
    #[serde(default)]
    pub done: bool,
    /// Digest computed over the reassembled bytes (once complete), and the server's.
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub expected_digest: String,
    #[serde(default)]
    pub bytes_from_peers: u64,
    #[serde(default)]
    pub bytes_from_origin: u64,
    #[serde(default)]
    pub bytes_up: u64,
    #[serde(default)]
    pub origin_fallbacks: u64,
    /// Upload cap of the download session (its share of the page's upload).
    #[serde(default)]
    pub upload_kbps: u32,
    /// Start of the download → complete, ms.
    #[serde(default)]
    pub elapsed_ms: Option<f64>,
    #[serde(default)]
    pub plan: Vec<SubstreamPlan>,
    #[serde(default)]
    pub errors: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Timing of a peer's current parent for one substream (wall clock, ms since the Unix epoch),
/// from which benchmarks measure how long a repair took.
/// A relay session a recruited peer runs for another channel (it forwards, never plays).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayReport {
    pub channel: String,
    pub peer_id: Option<PeerId>,
    pub tier: Option<String>,
    pub plays: bool,
    pub bytes_up: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub packets_from_peers: u64,
    pub packets_played: u64,
    pub connected_peers: u32,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStat {
    pub substream: u32,
    pub parent: crate::Source,
    pub since_ms: f64,
    pub first_packet_ms: Option<f64>,
    /// When the data channel to this parent last opened (wall clock ms; `None`: not open, or
    /// the parent is the origin). Filled in by the page, which owns the connections.
    #[serde(default)]
    pub parent_open_ms: Option<f64>,
    /// When the peer stopped receiving this substream from this parent (past links only).
    #[serde(default)]
    pub until_ms: Option<f64>,
    /// When the origin's bridge first delivered this substream after this (peer) parent was
    /// assigned: the server pushes a moved substream on the control socket until the new link
    /// delivers (make-before-break repair).
    #[serde(default)]
    pub bridged_ms: Option<f64>,
}

/// Fixed-bucket latency histogram that merges across peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; LATENCY_BUCKETS],
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, ms: u64) {
        let i = ((ms / LATENCY_BUCKET_MS) as usize).min(LATENCY_BUCKETS - 1);
        self.counts[i] += 1;
    }

    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    pub fn merge_sparse(&mut self, sparse: &[(u32, u64)]) {
        for (i, c) in sparse {
            if let Some(slot) = self.counts.get_mut(*i as usize) {
                *slot += c;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper edge (ms) of the bucket holding quantile `q` (0..=1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some((i as u64 + 1) * LATENCY_BUCKET_MS);
            }
        }
        Some(LATENCY_BUCKETS as u64 * LATENCY_BUCKET_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_without_tier_fields_still_parse() {
        let mut v = serde_json::to_value(PeerReport::default()).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for f in [
                "tier",
                "region",
                "packets_recovered",
                "parity_frames_received",
                "mesh_neighbours",
                "plays",
            ] {
                o.remove(f);
            }
        }
        let r: PeerReport = serde_json::from_value(v).unwrap_or_default();
        assert!(r.plays, "a report from before tiers is a playing peer");
        assert_eq!(r.tier, None);
    }

    #[test]
    fn quantiles_of_merged_histograms() {
        let mut a = LatencyHistogram::default();
        for ms in [10, 30, 50, 70] {
            a.record(ms);
        }
        let mut b = LatencyHistogram::default();
        b.merge_sparse(&a.sparse());
        b.record(100_000);
        assert_eq!(b.total(), 5);
        assert_eq!(b.quantile(0.5), Some(60));
        assert_eq!(
            b.quantile(1.0),
            Some(LATENCY_BUCKETS as u64 * LATENCY_BUCKET_MS)
        );
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }
}

/// Percentiles of a sample, `{p50, p95, max}`, as every benchmark's JSON reports them (the
/// browser swarm and the simulator alike). Nearest-rank: `p95` is the smallest value with at
/// least 95 % of the sample at or below it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Pct {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Pct {
    pub fn of(mut v: Vec<f64>) -> Pct {
        if v.is_empty() {
            return Pct::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[(((v.len() as f64) * q).ceil() as usize).clamp(1, v.len()) - 1];
        Pct {
            p50: at(0.5),
            p95: at(0.95),
            max: v[v.len() - 1],
        }
    }
}

#[cfg(test)]
mod pct_tests {
    use super::Pct;

    #[test]
    fn percentiles_are_nearest_rank_and_empty_is_zero() {
        assert_eq!(Pct::of(Vec::new()), Pct::default());
        let p = Pct::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.max), (50.0, 95.0, 100.0));
        let one = Pct::of(vec![7.0]);
        assert_eq!((one.p50, one.p95, one.max), (7.0, 7.0, 7.0));
    }
}
