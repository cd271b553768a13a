//! The part of a peer's [`PeerReport`] the engine knows: its counters, verified range, latency,
//! plan, links, tier and signed-stream checks. Its drivers (the page, the native peer) add what
//! only they know: playback, their sockets, their control connection.

use protocol::report::{PeerReport, SignedReport};
use protocol::TierName;

use super::Engine;

impl Engine {
    /// The engine's statistics; fields only a driver knows are left at their defaults.
    pub fn report(&self) -> PeerReport {
        let c = &self.counters;
        let verified = self.verified;
        PeerReport {
            peer_id: self.peer_id(),
            bytes_from_peers: c.bytes_from_peers,
            bytes_from_origin: c.bytes_from_origin,
            bytes_up: c.bytes_up,
            packets_from_peers: c.packets_from_peers,
            packets_from_origin: c.packets_from_origin,
            origin_fallbacks: c.origin_fallbacks,
            duplicates: c.duplicates,
            packets_played: c.packets_played,
            bytes_played: c.bytes_played,
            on_time: c.on_time,
            late: c.late,
            verified_first_seq: verified.map(|v| v.first_seq),
            verified_count: verified.map_or(0, |v| v.count),
            verified_hash: verified.map(|v| v.hex()).unwrap_or_default(),
            latency_hist: self.latency.sparse(),
            plan: self.plan().to_vec(),
            upload_kbps: self.upload_kbps(),
            links: self.link_stats(),
            past_links: self.past_links(),
            tier: self.tier().map(tier_name),
            region: self.tier_plan().map(|t| t.region.clone()),
            packets_recovered: c.packets_recovered,
            parity_frames_received: c.parity_frames_received,
            catch_up_asked: c.catch_up_asked,
            catch_up_sent: c.catch_up_sent,
            mesh_neighbours: self.mesh_neighbours().len() as u32,
            plays: self.plays(),
            late_samples: self.late_samples.iter().cloned().collect(),
            signed: self.is_verifying().then_some(SignedReport {
                manifests: c.manifests,
                bad_manifests: c.bad_manifests,
                verified_packets: c.verified_packets,
                verified_bytes: c.verified_bytes,
                forged: c.forged,
                unverified_dropped: c.unverified_dropped,
                reports_sent: 0,
                manifest_waits: c.manifest_waits,
                manifest_wait_ms: c.manifest_wait_ms,
                manifest_wait_max_ms: c.manifest_wait_max_ms,
            }),
            ..PeerReport::default()
        }
    }
}

/// A tier's name as reports spell it.
fn tier_name(t: TierName) -> String {
    match t {
        TierName::Preferred => "preferred",
        TierName::Middle => "middle",
        TierName::Bottom => "bottom",
    }
    .to_string()
}
