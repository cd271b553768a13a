//! Recruited relays across channels (claims 19, 43): the board the channels' DCMs share.
//!
//! Every tick, a hierarchical channel's DCM offers the peers that have upload to spare beyond
//! what their own channel asks of them ([`RelayBoard::offer`]). A DCM whose region lacks
//! capacity takes the best offer of *another* channel in that region ([`RelayBoard::recruit`]),
//! which yields a one-time token; the peer is sent [`protocol::ServerMsg::Recruit`] on its own
//! session and opens a second session that joins with the token ([`RelayBoard::redeem`]). That
//! session forwards the channel without playing it. The choice of peer is the pure
//! [`RelayRegistry`]; this module adds the sessions, tokens and bookkeeping around it.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use protocol::PeerId;

use coordinator::topology::hierarchy::RelayRegistry;
use coordinator::topology::region::Region;

use crate::events::OutboundTx;

/// A token is valid this long after it was issued (server ms).
pub const TOKEN_TTL_MS: u64 = 30_000;

/// What a redeemed token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub channel: String,
    pub region: Region,
    pub upload_kbps: u32,
    /// The recruited peer's session in the channel it watches.
    pub watcher: PeerId,
}

#[derive(Debug)]
struct Pending {
    grant: Grant,
    issued_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    registry: RelayRegistry,
    /// Channel name → the small integer the registry uses.
    channel_ids: HashMap<String, u32>,
    /// Control queues of the peers on offer (to send them `Recruit`).
    outs: HashMap<PeerId, OutboundTx>,
    /// Region of each peer on offer (to withdraw it).
    regions: HashMap<PeerId, Region>,
    tokens: HashMap<String, Pending>,
    /// Watchers currently relaying (not offered again), by their relay session.
    relaying: HashMap<PeerId, PeerId>,
    busy: HashSet<PeerId>,
}

/// Shared by every channel's DCM of one server.
#[derive(Debug, Default)]
pub struct RelayBoard {
    inner: Mutex<Inner>,
}

impl RelayBoard {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A DCM that panicked while holding the lock leaves consistent-enough data: offers are
        // refreshed every tick.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channel_id(inner: &mut Inner, channel: &str) -> u32 {
        let next = inner.channel_ids.len() as u32;
        *inner.channel_ids.entry(channel.to_string()).or_insert(next)
    }

    /// `peer`, watching `channel` in `region`, can upload `spare_kbps` more. A peer already
    /// relaying for another channel is not offered again.
    pub fn offer(
        &self,
        channel: &str,
        region: Region,
        peer: PeerId,
        spare_kbps: u32,
        out: &OutboundTx,
    ) {
        let mut i = self.lock();
        if i.busy.contains(&peer) {
            return;
        }
        let id = Self::channel_id(&mut i, channel);
        i.registry.offer(id, region, peer, spare_kbps);
        i.outs.insert(peer, out.clone());
        i.regions.insert(peer, region);
    }

    /// Takes `peer` off the board (no spare capacity any more, or gone).
    pub fn withdraw(&self, peer: PeerId) {
        let mut i = self.lock();
        if let Some(r) = i.regions.remove(&peer) {
            i.registry.withdraw(r, peer);
        }
        i.outs.remove(&peer);
    }

    /// A session of any channel ended: forget it as a watcher on offer and, if it was a relay
    /// session, free the watcher it belonged to.
    pub fn session_ended(&self, peer: PeerId) {
        self.withdraw(peer);
        let mut i = self.lock();
        i.busy.remove(&peer);
        if let Some(watcher) = i.relaying.remove(&peer) {
            i.busy.remove(&watcher);
        }
    }

    /// The best peer of another channel in `region` with at least `min_kbps` to spare, with a
    /// fresh token and the queue to send it on; `None` when nobody qualifies.
    pub fn recruit(
        &self,
        channel: &str,
        region: Region,
        min_kbps: u32,
        now_ms: u64,
    ) -> Option<(String, u32, OutboundTx)> {
        // Before anything is taken from the board: without a token nobody is recruited.
        let token = crate::token::random_token()?;
        let mut i = self.lock();
        Self::expire(&mut i, now_ms);
        let id = Self::channel_id(&mut i, channel);
        let (peer, kbps) = i.registry.recruit(id, region, min_kbps)?;
        i.regions.remove(&peer);
        let out = i.outs.remove(&peer)?;
        i.busy.insert(peer);
        i.tokens.insert(
            token.clone(),
            Pending {
                grant: Grant {
                    channel: channel.to_string(),
                    region,
                    upload_kbps: kbps,
                    watcher: peer,
                },
                issued_ms: now_ms,
            },
        );
        Some((token, kbps, out))
    }

    /// Drops tokens nobody redeemed in time; their peers may be offered again.
    fn expire(i: &mut Inner, now_ms: u64) {
        let expired: Vec<String> = i
            .tokens
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.issued_ms) >= TOKEN_TTL_MS)
            .map(|(t, _)| t.clone())
            .collect();
        for t in expired {
            if let Some(p) = i.tokens.remove(&t) {
                i.busy.remove(&p.grant.watcher);
            }
        }
    }

    /// Whether a recruit for `channel` is still waiting for its peer to join.
    pub fn pending_for(&self, channel: &str, now_ms: u64) -> bool {
        let mut i = self.lock();
        Self::expire(&mut i, now_ms);
        i.tokens.values().any(|p| p.grant.channel == channel)
    }

    /// Redeems a token for a session joining `channel` as `relay`; each token works once.
    pub fn redeem(&self, token: &str, channel: &str, relay: PeerId, now_ms: u64) -> Option<Grant> {
        let mut i = self.lock();
        let p = i.tokens.remove(token)?;
        if p.grant.channel != channel || now_ms.saturating_sub(p.issued_ms) >= TOKEN_TTL_MS {
            i.busy.remove(&p.grant.watcher);
            return None;
        }
        i.relaying.insert(relay, p.grant.watcher);
        Some(p.grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[test]
    fn a_token_recruits_a_peer_of_another_channel_once() {
        let board = RelayBoard::default();
        let (tx, _rx) = mpsc::channel(4);
        let r = Region::Named(0);
        board.offer("live", r, PeerId(1), 3000, &tx);
        board.offer("live", Region::Named(1), PeerId(2), 9000, &tx);
        // Not for its own channel, nor from another region, nor above its spare.
        assert!(board.recruit("live", r, 100, 0).is_none());
        board.offer("live", r, PeerId(1), 3000, &tx);
        assert!(board.recruit("other", r, 5000, 0).is_none());
        let (token, kbps, _) = board.recruit("other", r, 1000, 0).expect("recruit");
        assert_eq!(kbps, 3000);
        // Busy: offering it again changes nothing until its relay session ends.
        board.offer("live", r, PeerId(1), 3000, &tx);
        assert!(board.recruit("other", r, 1000, 0).is_none());
        assert!(board.pending_for("other", 10));
        assert!(
            board.redeem(&token, "live", PeerId(7), 10).is_none(),
            "wrong channel"
        );
        board.offer("live", r, PeerId(1), 3000, &tx);
        let (token, _, _) = board.recruit("other", r, 1000, 20).expect("recruit");
        let g = board.redeem(&token, "other", PeerId(7), 30).expect("grant");
        assert_eq!((g.watcher, g.region, g.upload_kbps), (PeerId(1), r, 3000));
        assert!(
            board.redeem(&token, "other", PeerId(8), 30).is_none(),
            "used"
        );
        board.session_ended(PeerId(7));
        board.offer("live", r, PeerId(1), 3000, &tx);
        let (token, _, _) = board.recruit("other", r, 1000, 40).expect("free again");
        assert!(
            board
                .redeem(&token, "other", PeerId(9), 40 + TOKEN_TTL_MS)
                .is_none(),
            "expired"
        );
        // A token never redeemed frees its peer once it expires.
        board.offer("live", r, PeerId(1), 3000, &tx);
        let _unused = board.recruit("other", r, 1000, 100).expect("recruit");
        board.offer("live", r, PeerId(1), 3000, &tx);
        assert!(board.pending_for("other", 100 + TOKEN_TTL_MS - 1));
        assert!(!board.pending_for("other", 100 + TOKEN_TTL_MS));
        board.offer("live", r, PeerId(1), 3000, &tx);
        assert!(board
            .recruit("other", r, 1000, 100 + TOKEN_TTL_MS)
            .is_some());
    }
}
