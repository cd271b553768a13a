//! The signed stream on the peer's side (issue 13): packets from other peers are played and
//! forwarded only once their SHA-256 matches the origin's signed manifest.
//!
//! Manifests come on the control socket ([`protocol::manifest`]); a packet that arrives from a
//! peer before its manifest waits here, in a buffer bounded in count and bytes. A mismatch is a
//! forgery: the packet is dropped, fetched from the origin instead, and its sender reported once
//! per [`REPORT_EVERY_MS`]. Packets from the origin (its push, its HTTP fallback) come over the
//! server's own connections and are taken as they are.

use std::collections::{BTreeMap, HashMap};

use protocol::manifest::{packet_digest, Digest32, ManifestBook, ManifestError, StreamKey};
use protocol::PeerId;

/// Packets from peers waiting for their manifest, at most.
pub const PENDING_PACKETS: usize = 1024;
/// Bytes of packets waiting for their manifest, at most.
pub const PENDING_BYTES: usize = 8 << 20;
/// A packet whose manifest has not come within this long is dropped (its gap is fetched).
pub const PENDING_MS: f64 = 5000.0;
/// One report per forging neighbour per this long.
pub const REPORT_EVERY_MS: f64 = 5000.0;

/// What checking a packet from a peer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Its hash is the signed one.
    Genuine,
    /// Its hash is not the signed one: this is what it hashed to.
    Forged(Digest32),
    /// No manifest names it yet: it waits ([`Verifier::hold`]).
    Unknown,
}

pub struct Pending {
    pub from: Option<PeerId>,
    pub bytes: Vec<u8>,
    pub since: f64,
}

pub struct Verifier {
    book: ManifestBook,
    pending: BTreeMap<u64, Pending>,
    pending_bytes: usize,
    reported: HashMap<PeerId, f64>,
}

impl Verifier {
    pub fn new(key: StreamKey, channel: &str) -> Self {
        Verifier {
            book: ManifestBook::new(key, channel),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            reported: HashMap::new(),
        }
    }

    /// Verifies a manifest frame and keeps its digests; returns the packets it covers.
    pub fn add_manifest(&mut self, frame: &[u8]) -> Result<std::ops::Range<u64>, ManifestError> {
        self.book.add(frame)
    }

    pub fn check(&self, seq: u64, packet: &[u8]) -> Check {
        match self.book.digest(seq) {
            None => Check::Unknown,
            Some(d) => {
                let got = packet_digest(packet);
                if got == *d {
                    Check::Genuine
                } else {
                    Check::Forged(got)
                }
            }
        }
    }

    /// Keeps a packet until its manifest comes; false if the buffer is full (the packet is
    /// dropped and its gap fetched) or one for `seq` already waits.
    pub fn hold(&mut self, seq: u64, from: Option<PeerId>, bytes: &[u8], now: f64) -> bool {
        if self.pending.contains_key(&seq)
            || self.pending.len() >= PENDING_PACKETS
            || self.pending_bytes + bytes.len() > PENDING_BYTES
        {
            return false;
        }
        self.pending_bytes += bytes.len();
        self.pending.insert(
            seq,
            Pending {
                from,
                bytes: bytes.to_vec(),
                since: now,
            },
        );
        true
    }

    /// The waiting packets of `range` (their manifest just came).
    pub fn take_pending(&mut self, range: std::ops::Range<u64>) -> Vec<(u64, Pending)> {
        let seqs: Vec<u64> = self.pending.range(range).map(|(s, _)| *s).collect();
        seqs.into_iter()
            .filter_map(|s| self.pending.remove(&s).map(|p| (s, p)))
            .inspect(|(_, p)| self.pending_bytes -= p.bytes.len())
            .collect()
    }

    /// Drops waiting packets that are played already (`< next`) or waited too long, and
    /// digests of packets played; returns how many packets were dropped for waiting too long.
    pub fn expire(&mut self, next: Option<u64>, now: f64) -> u64 {
        let mut expired = 0;
        let bytes = &mut self.pending_bytes;
        self.pending.retain(|seq, p| {
            let played = next.is_some_and(|n| *seq < n);
            let stale = now - p.since > PENDING_MS;
            expired += u64::from(stale && !played);
            if played || stale {
                *bytes -= p.bytes.len();
            }
            !(played || stale)
        });
        if let Some(n) = next {
            // Keep a little behind the playhead: duplicates of played packets need no check.
            self.book.forget_below(n.saturating_sub(64));
        }
        self.reported.retain(|_, t| now - *t < REPORT_EVERY_MS);
        expired
    }

    /// Whether `peer` is to be reported now (once per [`REPORT_EVERY_MS`]).
    pub fn should_report(&mut self, peer: PeerId, now: f64) -> bool {
        match self.reported.get(&peer) {
            Some(t) if now - *t < REPORT_EVERY_MS => false,
            _ => {
                self.reported.insert(peer, now);
                true
            }
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn broken_chain(&self) -> u64 {
        self.book.broken_chain
    }
}
