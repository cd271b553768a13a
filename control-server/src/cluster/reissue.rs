//! Fresh resume tokens for connected peers: a peer must never hold an expired token, since it
//! learns that only when it needs the token (its server failed). Each joined session is sent a
//! new [`protocol::ServerMsg::Cluster`] when its token reaches the time
//! [`super::resume::reissue_due_ms`] sets (about half its lifetime, spread by peer id), and the
//! peer keeps the newest it got.

use std::sync::Arc;
use std::time::Duration;

use protocol::{PeerId, ServerMsg};

use super::Cluster;
use crate::channel::now_ms;
use crate::events::{Outbound, OutboundTx};
use crate::AppState;

/// How often the sessions are looked over: a sixteenth of the lifetime, at most a second, so a
/// token is re-issued well within the eighth of the lifetime that [`reissue_due_ms`]'s spread
/// leaves (and new tokens go out a few at a time, not all in one sweep).
///
/// [`reissue_due_ms`]: super::resume::reissue_due_ms
fn period(ttl_ms: u64) -> Duration {
    Duration::from_millis((ttl_ms / 16).clamp(50, 1000))
}

/// Runs for the node's life.
pub(super) async fn run(cluster: Arc<Cluster>, state: AppState) {
    let ttl_ms = cluster.resume_ttl_ms();
    let mut tick = tokio::time::interval(period(ttl_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep(&cluster, &state, ttl_ms, now_ms());
    }
}

/// Sends a fresh token to every session whose token is due at `now`.
fn sweep(cluster: &Cluster, state: &AppState, ttl_ms: u64, now: u64) {
    let mut due: Vec<(PeerId, u64, String, OutboundTx)> = Vec::new();
    state.each_session(|peer, s| {
        if super::resume::reissue_due_ms(s.token_issued_ms, peer, ttl_ms) <= now {
            due.push((peer, s.serial, s.channel.name.clone(), s.out.clone()));
        }
    });
    if due.is_empty() {
        return;
    }
    let nodes = cluster.node_urls();
    let mut sent = 0usize;
    for (peer, serial, channel, out) in due {
        let msg = ServerMsg::Cluster {
            resume_token: cluster.resume_token(&channel, peer, now),
            dcm: channel,
            nodes: nodes.clone(),
        };
        // A full queue (a slow peer) is tried again at the next sweep.
        if out.try_send(Outbound::msg(msg)).is_ok() {
            state.token_reissued(peer, serial, now);
            sent += 1;
        }
    }
    tracing::debug!(sent, "re-issued resume tokens");
}
