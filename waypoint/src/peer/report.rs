//! The peer's statistics, the same [`PeerReport`] as the page's `stats()`: a viewer that
//! verifies and relays bytes without decoding.

use protocol::report::{PeerReport, SignedReport};
use protocol::TierName;

use super::Peer;

impl Peer {
    /// The same statistics as the page's `stats()` (a viewer that verifies and relays bytes
    /// without decoding).
    pub fn report(&self) -> PeerReport {
        let c = &self.engine.counters;
        let verified = self.engine.verified;
        PeerReport {
            peer_id: self.engine.peer_id(),
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
            startup_ms: self
                .engine
                .first_delivery_ms
                .map(|t| (t - self.started_ms).max(0.0)),
            latency_hist: self.engine.latency.sparse(),
            stalls: 0,
            playing: false,
            decoding: false,
            current_time: 0.0,
            buffer_s: 0.0,
            plan: self.engine.plan().to_vec(),
            connected_peers: self.links.values().filter(|l| l.is_open()).count() as u32,
            errors: self.errors.clone(),
            stream_kbps: self.welcome.as_ref().map_or(0, |w| w.stream_kbps),
            upload_kbps: self.engine.upload_kbps(),
            links: {
                let mut links = self.engine.link_stats();
                for l in &mut links {
                    if let protocol::Source::Peer { id } = l.parent {
                        l.parent_open_ms = self
                            .links
                            .get(&id)
                            .filter(|link| link.is_open())
                            .and_then(|link| link.opened_ms);
                    }
                }
                links
            },
            past_links: self.engine.past_links(),
            heartbeats_sent: self.heartbeats_sent,
            links_failed: self.links_failed,
            // Cluster mode's reconnection is the page's; a native peer stays on its server.
            control_resumes: 0,
            control_server: self.cfg.server.trim_end_matches('/').to_string(),
            control_lost_at_ms: None,
            control_resumed_at_ms: None,
            heartbeat_bytes: self.heartbeat_bytes,
            tier: self.engine.tier().map(tier_name),
            region: self.engine.tier_plan().map(|t| t.region.clone()),
            packets_recovered: c.packets_recovered,
            parity_frames_received: c.parity_frames_received,
            mesh_neighbours: self.engine.mesh_neighbours().len() as u32,
            plays: self.engine.plays(),
            relays: Vec::new(),
            download: None,
            late_samples: self.engine.late_samples.iter().cloned().collect(),
            signed: self.engine.is_verifying().then_some(SignedReport {
                manifests: c.manifests,
                bad_manifests: c.bad_manifests,
                verified_packets: c.verified_packets,
                verified_bytes: c.verified_bytes,
                forged: c.forged,
                unverified_dropped: c.unverified_dropped,
                reports_sent: self.forgeries_reported,
                manifest_waits: c.manifest_waits,
                manifest_wait_ms: c.manifest_wait_ms,
                manifest_wait_max_ms: c.manifest_wait_max_ms,
            }),
        }
    }
}

fn tier_name(t: TierName) -> String {
    match t {
        TierName::Preferred => "preferred",
        TierName::Middle => "middle",
        TierName::Bottom => "bottom",
    }
    .to_string()
}
