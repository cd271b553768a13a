//! Per-peer history the DCM keeps: uptime, congestion events, and the capacity cap learned from
//! what the peer's heartbeats show it actually uploads. It decides the capacity a peer is placed
//! with, so a peer that declared more than it delivers stops being given children it cannot feed,
//! and gets its capacity back, step by step, once it has behaved for a while (hysteresis).

use protocol::PeerId;
use rustc_hash::FxHashMap;

/// A capped peer regains capacity after this long without congestion.
const RECOVER_AFTER_MS: u64 = 30_000;
/// Ignore further congestion reports about a peer for this long after capping it: its children
/// are being moved already.
const HOLD_MS: u64 = 2_000;

#[derive(Debug, Clone)]
struct Record {
    joined_ms: u64,
    declared_kbps: u32,
    cap_kbps: Option<u32>,
    congestion_events: u32,
    last_congestion_ms: Option<u64>,
    last_cap_ms: Option<u64>,
    /// Upload left to this session when it shares the page's upload with a download (claim 1).
    ceiling_kbps: Option<u32>,
}

/// Every peer's record (the DCM's history of the patent's claims 10 and 18; the hierarchy ranks
/// candidates by the [`crate::topology::mesh::History`] derived from it).
#[derive(Debug, Default)]
pub struct PeerRecords {
    peers: FxHashMap<PeerId, Record>,
}

impl PeerRecords {
    pub fn joined(&mut self, peer: PeerId, declared_kbps: u32, now: u64) {
        self.peers.insert(
            peer,
            Record {
                joined_ms: now,
                declared_kbps,
                cap_kbps: None,
                congestion_events: 0,
                last_congestion_ms: None,
                last_cap_ms: None,
                ceiling_kbps: None,
            },
        );
    }

    pub fn left(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
    }

    pub fn age_ms(&self, peer: PeerId, now: u64) -> Option<u64> {
        self.peers
            .get(&peer)
            .map(|r| now.saturating_sub(r.joined_ms))
    }

    pub fn congestion_events(&self, peer: PeerId) -> u32 {
        self.peers.get(&peer).map_or(0, |r| r.congestion_events)
    }

    pub fn effective_kbps(&self, peer: PeerId) -> Option<u32> {
        self.peers.get(&peer).map(|r| {
            let own = r
                .cap_kbps
                .map_or(r.declared_kbps, |c| c.min(r.declared_kbps));
            r.ceiling_kbps.map_or(own, |c| c.min(own))
        })
    }

    /// Sets (or lifts, with `None`) the share of the page's upload this session may use while
    /// a download of the same page runs beside it.
    pub fn set_ceiling(&mut self, peer: PeerId, kbps: Option<u32>) {
        if let Some(r) = self.peers.get_mut(&peer) {
            r.ceiling_kbps = kbps;
        }
    }

    /// Records a congestion event on one of `peer`'s uplinks; returns the new capacity to place
    /// it with, or `None` if it was capped moments ago.
    pub fn congested(&mut self, peer: PeerId, measured_kbps: Option<f64>, now: u64) -> Option<u32> {
        let r = self.peers.get_mut(&peer)?;
        r.congestion_events += 1;
        r.last_congestion_ms = Some(now);
        if r.last_cap_ms
            .is_some_and(|t| now.saturating_sub(t) < HOLD_MS)
        {
            return None;
        }
        let current = r.cap_kbps.unwrap_or(r.declared_kbps);
        // What it really managed to send, with a margin; halve when there is no measurement.
        let cap = match measured_kbps {
            Some(m) => ((m * 0.8) as u32).min(current / 2 + current / 4),
            None => current / 2,
        };
        r.cap_kbps = Some(cap);
        r.last_cap_ms = Some(now);
        Some(cap)
    }

    /// Capped peers that have been quiet long enough get half their lost capacity back.
    pub fn recovered(&mut self, now: u64) -> Vec<(PeerId, u32)> {
        let mut out = Vec::new();
        for (peer, r) in &mut self.peers {
            let (Some(cap), Some(last)) = (r.cap_kbps, r.last_congestion_ms) else {
                continue;
            };
            if now.saturating_sub(last) < RECOVER_AFTER_MS {
                continue;
            }
            let next = cap + (r.declared_kbps.saturating_sub(cap)) / 2 + 1;
            if next >= r.declared_kbps {
                r.cap_kbps = None;
                r.last_congestion_ms = None;
                out.push((*peer, r.declared_kbps));
            } else {
                r.cap_kbps = Some(next);
                r.last_congestion_ms = Some(now);
                out.push((*peer, next));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_caps_at_measured_upload_then_recovers_gradually() {
        let mut h = PeerRecords::default();
        let p = PeerId(1);
        h.joined(p, 2000, 0);
        assert_eq!(h.congested(p, Some(200.0), 1000), Some(160));
        // A second report right away does not cap again.
        assert_eq!(h.congested(p, Some(100.0), 1500), None);
        assert_eq!(h.effective_kbps(p), Some(160));
        assert_eq!(h.congestion_events(p), 2);
        assert!(h.recovered(10_000).is_empty());
        let back = h.recovered(40_000);
        assert_eq!(back.len(), 1);
        assert!(back[0].1 > 160 && back[0].1 < 2000);
        let mut t = 40_000;
        for _ in 0..20 {
            t += 31_000;
            h.recovered(t);
        }
        assert_eq!(h.effective_kbps(p), Some(2000));
    }

    #[test]
    fn a_peer_without_measurement_is_halved() {
        let mut h = PeerRecords::default();
        h.joined(PeerId(2), 1000, 0);
        assert_eq!(h.congested(PeerId(2), None, 5000), Some(500));
    }
}
