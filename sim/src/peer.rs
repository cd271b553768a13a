//! One simulated viewer: the real peer engine plus what the browser page keeps around it
//! (`peer-wasm/src/web/peer.rs`): the Welcome's heartbeat interval, heartbeat timing, the player,
//! and the simulator's own bookkeeping (ordering of its control socket, repairs it waits for).

use peer_wasm::engine::{Counters, Engine, EngineConfig};
use protocol::hash::RangeHash;
use protocol::{PeerId, SubstreamPlan};

use crate::net::PeerNet;
use crate::playout::Playout;
use crate::queue::Micros;

/// The glue's tick period (`setInterval(.., 50)`).
pub const TICK_MS: f64 = 50.0;

/// A substream whose parent left; repaired when a packet of it next arrives from anyone else.
#[derive(Debug, Clone, Copy)]
pub struct PendingRepair {
    pub substream: u32,
    pub old_parent: PeerId,
    pub since: Micros,
}

/// What is kept of a peer after it left (its engine is dropped).
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    pub counters: Counters,
    pub verified: Option<RangeHash>,
    pub latency: Vec<(u32, u64)>,
}

pub struct SimPeer {
    pub id: PeerId,
    pub net: PeerNet,
    /// `None` in the control-only scenario and after the peer left.
    pub engine: Option<Box<Engine>>,
    pub alive: bool,
    /// Scheduled to leave during the run (churn, mass failure).
    pub leaves: bool,
    pub joined_at: Micros,
    pub left_at: Option<Micros>,
    pub heartbeat_ms: Option<f64>,
    pub last_heartbeat_ms: f64,
    pub heartbeats_sent: u64,
    pub heartbeat_bytes: u64,
    pub playout: Playout,
    /// First sequence number of the current run of in-order deliveries, and the last one.
    pub run_start: u64,
    pub last_delivered: Option<u64>,
    /// Where the Welcome told it to start.
    pub start_seq: Option<u64>,
    /// Delivered payloads that differ from the origin's.
    pub mismatched: u64,
    /// Control socket ordering (a WebSocket is one TCP stream each way).
    pub ctrl_down_last: Micros,
    pub ctrl_up_last: Micros,
    /// Its control connection died with the DCM's server (the failover scenario) and it has
    /// not resumed yet: nothing goes up or comes down.
    pub ctrl_lost: bool,
    pub repairs: Vec<PendingRepair>,
    /// Control-only scenario: the last instructions (there is no engine to keep them).
    pub plan: Vec<SubstreamPlan>,
    pub stats: Option<PeerStats>,
}

impl SimPeer {
    pub fn new(
        index: usize,
        net: PeerNet,
        engine: Option<&EngineConfig>,
        now_ms: f64,
        joined_at: Micros,
    ) -> Self {
        let engine = engine.map(|cfg| {
            Box::new(Engine::new(
                EngineConfig {
                    upload_kbps: net.declared_kbps,
                    ..cfg.clone()
                },
                now_ms,
            ))
        });
        SimPeer {
            id: id_of(index),
            net,
            engine,
            alive: false,
            leaves: false,
            joined_at,
            left_at: None,
            heartbeat_ms: None,
            last_heartbeat_ms: f64::NEG_INFINITY,
            heartbeats_sent: 0,
            heartbeat_bytes: 0,
            playout: Playout::new(now_ms),
            run_start: 0,
            last_delivered: None,
            start_seq: None,
            mismatched: 0,
            ctrl_down_last: 0,
            ctrl_up_last: 0,
            ctrl_lost: false,
            repairs: Vec::new(),
            plan: Vec::new(),
            stats: None,
        }
    }

    /// Whether the glue would send a heartbeat on this tick (its `on_tick` policy): every
    /// `heartbeat_ms`, or early (at least 150 ms after the last) when the engine's upload queue
    /// got stuck or a bridged substream's new parent delivered.
    pub fn heartbeat_due(&mut self, now_ms: f64) -> bool {
        let Some(hb_ms) = self.heartbeat_ms else {
            return false;
        };
        let since = now_ms - self.last_heartbeat_ms;
        let early = since >= 150.0
            && self
                .engine
                .as_mut()
                .is_some_and(|e| e.wants_early_heartbeat(since >= hb_ms / 2.0));
        early || since >= hb_ms
    }

    /// Keeps the statistics and drops the engine (a departed page frees its memory).
    pub fn retire(&mut self) {
        if let Some(e) = self.engine.take() {
            self.stats = Some(PeerStats {
                counters: e.counters.clone(),
                verified: e.verified,
                latency: e.latency.sparse(),
            });
        }
    }

    /// Statistics, whether the peer is still here or not.
    pub fn stats(&self) -> PeerStats {
        match &self.engine {
            Some(e) => PeerStats {
                counters: e.counters.clone(),
                verified: e.verified,
                latency: e.latency.sparse(),
            },
            None => self.stats.clone().unwrap_or_default(),
        }
    }
}

/// Peer ids are the index plus one (the server's ids start at 1), so the lower id offers.
pub fn id_of(index: usize) -> PeerId {
    PeerId(index as u64 + 1)
}

pub fn index_of(id: PeerId) -> Option<usize> {
    usize::try_from(id.0.checked_sub(1)?).ok()
}
