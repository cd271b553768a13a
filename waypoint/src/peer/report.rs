//! The peer's statistics, the same [`PeerReport`] as the page's `stats()`: a viewer that
//! verifies and relays bytes without decoding.

use protocol::report::PeerReport;

use super::Peer;

impl Peer {
    /// The same statistics as the page's `stats()` (a viewer that verifies and relays bytes
    /// without decoding).
    pub fn report(&self) -> PeerReport {
        let mut r = PeerReport {
            startup_ms: self
                .engine
                .first_delivery_ms
                .map(|t| (t - self.started_ms).max(0.0)),
            connected_peers: self.links.values().filter(|l| l.is_open()).count() as u32,
            errors: self.errors.clone(),
            stream_kbps: self.welcome.as_ref().map_or(0, |w| w.stream_kbps),
            heartbeats_sent: self.heartbeats_sent,
            links_failed: self.links_failed,
            // Cluster mode's reconnection is the page's; a native peer stays on its server.
            control_server: self.cfg.server.trim_end_matches('/').to_string(),
            heartbeat_bytes: self.heartbeat_bytes,
            ..self.engine.report()
        };
        for l in &mut r.links {
            if let protocol::Source::Peer { id } = l.parent {
                l.parent_open_ms = self
                    .links
                    .get(&id)
                    .filter(|link| link.is_open())
                    .and_then(|link| link.opened_ms);
            }
        }
        if let Some(s) = r.signed.as_mut() {
            s.reports_sent = self.forgeries_reported;
        }
        r
    }
}
