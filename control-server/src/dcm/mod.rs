//! The tokio driver of a channel's delivery coordinator manager. The decisions are the sans-IO
//! [`coordinator::Dcm`]'s; this module only moves its inputs and outputs: events from the
//! sessions and the origin go in with the wall clock's time, instructions and pushes go out to
//! the sessions' queues, the origin's push list is written through to the channel (so that a DCM
//! taking over keeps the roots fed), relay rounds go to the server's shared board, and the
//! core's counts are added to the channel's counters. [`supervise`] replaces a DCM that fails.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use coordinator::{Adopted, DcmConfig, DcmStats, Event, OutMsg, Output};
use protocol::{PeerId, ServerMsg};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use crate::channel::{now_ms, Attached, Channel};
use crate::config::Config;
pub use crate::events::{DcmEvent, Outbound, OutboundTx};
pub use coordinator::dcm::{
    bridge, history, planner, split, view, Census, CongestionRecord, PeerView, RepairRecord,
    TopologySnapshot,
};

/// Events handled, at most, between two slices of background work.
const EVENTS_PER_SLICE: usize = 256;

/// Outputs moved, at most, between two batches of events while background work remains.
const OUTPUTS_PER_SLICE: usize = 1000;
/// After an event woke the DCM's thread, it sleeps this long and takes what queued meanwhile,
/// as long as something did: under load the thread wakes about once per window instead of once
/// per heartbeat (a session's send wakes a thread parked on the queue: a system call on the
/// session's side, a context switch on this one), at the cost of this much more delay for what
/// arrives meanwhile. Idle, an event costs one extra timer wake-up.
const BATCH_WINDOW: Duration = Duration::from_millis(1);

/// One channel's DCM: the sans-IO core and the queues of the peers it steers.
pub struct Dcm {
    core: coordinator::Dcm,
    /// The core's parameters (a released DCM starts afresh with them).
    core_config: DcmConfig,
    channel: Arc<Channel>,
    outs: FxHashMap<PeerId, OutboundTx>,
    snapshots: HashMap<u64, oneshot::Sender<TopologySnapshot>>,
    next_token: u64,
    /// The core's counts already added to the channel's counters.
    counted: DcmStats,
    /// The last shared text converted for the WebSocket, so that a notice to thousands of peers
    /// is converted once.
    last_text: Option<(Arc<str>, tokio_tungstenite::tungstenite::Utf8Bytes)>,
    heartbeat_ms: u64,
    /// The epoch last written to the channel's attachments.
    epoch: u64,
    /// Set by [`Dcm::run`]: background work is then moved a slice at a time between events;
    /// driven directly (tests), it is done within the event.
    sliced: bool,
}

/// The core's parameters from the server's configuration and the channel.
pub fn dcm_config(channel: &Channel, config: &Config) -> DcmConfig {
    DcmConfig {
        channel: channel.name.clone(),
        k: config.substreams,
        heartbeat_ms: u64::from(config.heartbeat_ms),
        stream_kbps: channel.stream_kbps().max(1),
        topology: config
            .topology
            .clone()
            .filter(|t| t.applies_to(&channel.name)),
        origin_fanout: config.origin_fanout,
        max_fanout: config.max_fanout,
        cluster_max: config.cluster_max,
        max_bridges: config.max_bridges,
    }
}

impl Dcm {
    pub fn new(channel: Arc<Channel>, config: &Config) -> Self {
        let cfg = dcm_config(&channel, config);
        let core = coordinator::Dcm::new(cfg.clone(), now_ms());
        let mut dcm = Self::with_core(core, cfg, channel, FxHashMap::default());
        dcm.heartbeat_ms = u64::from(config.heartbeat_ms);
        dcm
    }

    fn with_core(
        core: coordinator::Dcm,
        core_config: DcmConfig,
        channel: Arc<Channel>,
        outs: FxHashMap<PeerId, OutboundTx>,
    ) -> Self {
        Dcm {
            core,
            core_config,
            channel,
            outs,
            snapshots: HashMap::new(),
            next_token: 0,
            counted: DcmStats::default(),
            last_text: None,
            heartbeat_ms: 1000,
            epoch: 0,
            sliced: false,
        }
    }

    /// A DCM taking over from one that failed: it adopts the channel's sessions and the
    /// origin's push list as they were, and its core rebuilds the topology from one round of
    /// heartbeats ([`coordinator::Dcm::take_over`]).
    pub fn take_over(channel: Arc<Channel>, config: &Config, now: u64) -> Self {
        let mut outs = FxHashMap::default();
        let mut adopted = Vec::new();
        let (mut origin_fed, mut epoch) = (HashMap::new(), 0);
        if let Ok(a) = channel.attachments.lock() {
            for (peer, att) in &a.sessions {
                outs.insert(*peer, att.out.clone());
                adopted.push(Adopted {
                    peer: *peer,
                    upload_kbps: att.upload_kbps,
                    region: att.region,
                    relay: att.relay,
                    connectivity: att.connectivity,
                    waypoint: att.waypoint,
                });
            }
            origin_fed = a.origin_fed.clone();
            epoch = a.epoch;
        }
        adopted.sort_by_key(|a| a.peer);
        let cfg = dcm_config(&channel, config);
        let core = coordinator::Dcm::take_over(cfg.clone(), &adopted, origin_fed, epoch, now);
        let mut dcm = Self::with_core(core, cfg, channel, outs);
        dcm.heartbeat_ms = u64::from(config.heartbeat_ms);
        dcm
    }

    /// The sans-IO core (tests read its state).
    pub fn core(&self) -> &coordinator::Dcm {
        &self.core
    }

    /// Runs until the event channel closes. Takes the receiver by reference so that, when this
    /// DCM fails, its supervisor hands the same queue to the DCM that takes over.
    pub async fn run(mut self, events: &mut mpsc::Receiver<DcmEvent>) {
        use futures_util::FutureExt;
        self.sliced = true;
        let interval = Duration::from_millis(self.heartbeat_interval_ms());
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'run: loop {
            if !self.core.has_background() {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => self.handle(ev),
                        None => break,
                    },
                    _ = tick.tick() => self.on_tick(now_ms()),
                }
                // Batches: what arrives within a window is taken at once, without a wake-up each.
                let mut taken = 0;
                while !self.core.has_background() {
                    if taken < EVENTS_PER_SLICE {
                        tokio::time::sleep(BATCH_WINDOW).await;
                    } else {
                        // A full slice: more is queued; let the runtime breathe, then go on.
                        tokio::task::yield_now().await;
                    }
                    taken = 0;
                    while taken < EVENTS_PER_SLICE {
                        match events.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => break 'run,
                        }
                        taken += 1;
                    }
                    if tick.tick().now_or_never().is_some() {
                        self.on_tick(now_ms());
                    }
                    if taken == 0 {
                        break;
                    }
                }
                continue;
            }
            // Queued events first, then one slice of the background work.
            for _ in 0..EVENTS_PER_SLICE {
                match events.try_recv() {
                    Ok(ev) => self.handle(ev),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => break 'run,
                }
            }
            if tick.tick().now_or_never().is_some() {
                self.on_tick(now_ms());
            }
            self.drain(OUTPUTS_PER_SLICE);
            // Let the runtime breathe (timers, the reply just sent).
            tokio::task::yield_now().await;
        }
        tracing::debug!(channel = %self.channel.name, "DCM stopped");
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        self.heartbeat_ms.max(100)
    }

    /// The periodic work of the core, with the stream rate the origin measures now.
    pub fn on_tick(&mut self, now: u64) {
        let kbps = self.channel.stream_kbps();
        if kbps > 0 {
            self.core.handle(Event::StreamRate { kbps }, now);
        }
        self.core.handle_timeout(now);
        self.drain_ready();
    }

    /// Handles one event and moves the outputs it produced (background work stays for
    /// [`Dcm::run`] to do a slice at a time; driven directly, as in tests, it is done at once).
    pub fn handle(&mut self, ev: DcmEvent) {
        let now = now_ms();
        match ev {
            DcmEvent::Join {
                peer,
                upload_kbps,
                region,
                relay,
                out,
                resumed,
                connectivity,
                waypoint,
            } => {
                if self.channel.released.load(Ordering::Relaxed) {
                    // The join raced a release: this node no longer runs the DCM.
                    let refusal = ServerMsg::Error {
                        code: protocol::ErrorCode::Unavailable,
                        message: format!(
                            "this server no longer runs channel {:?}; reconnect",
                            self.channel.name
                        ),
                    };
                    let _ = out.try_send(Outbound::msg(refusal));
                    let _ = out.try_send(Box::new(Outbound::Close("moved".into())));
                    return;
                }
                // The peer resumed on a new connection while this DCM still has it (its old
                // session, half-open, was replaced): the new session takes its place as it is.
                let reconnect = resumed && self.core.has_peer(peer);
                if reconnect {
                    // An offer on the relay board holds the old session's queue.
                    self.channel.relays.withdraw(peer);
                }
                if let Ok(mut a) = self.channel.attachments.lock() {
                    a.sessions.insert(
                        peer,
                        Attached {
                            out: out.clone(),
                            upload_kbps,
                            region,
                            relay,
                            connectivity,
                            waypoint,
                        },
                    );
                }
                self.outs.insert(peer, out);
                if reconnect {
                    tracing::info!(channel = %self.channel.name, %peer, "peer reconnected; its new session keeps its place");
                    self.core.handle(Event::Reconnect { peer }, now);
                    self.drain_ready();
                    return;
                }
                let ev = if resumed {
                    Event::Resume {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                        connectivity,
                    }
                } else {
                    Event::Join {
                        peer,
                        upload_kbps,
                        region,
                        relay,
                        connectivity,
                    }
                };
                self.core.handle(ev, now);
                if waypoint {
                    self.core.handle(Event::Waypoint { peer }, now);
                }
            }
            DcmEvent::Leave { peer } => {
                self.forget(peer);
                self.core.handle(Event::Leave { peer }, now);
            }
            DcmEvent::Signal { from, to, signal } => {
                self.core.handle(Event::Signal { from, to, signal }, now)
            }
            DcmEvent::Heartbeat {
                peer,
                heartbeat,
                received,
            } => {
                // Judged as of its arrival: a heartbeat that queued behind others (a busy
                // server) must not make its peer look late for packets cut meanwhile.
                let waited = received.elapsed();
                let arrived_ms = now.saturating_sub(waited.as_millis() as u64);
                self.core.handle(
                    Event::Heartbeat {
                        peer,
                        heartbeat,
                        arrived_ms,
                    },
                    now,
                );
                self.channel.counters.heartbeat_apply.record(waited);
            }
            DcmEvent::Connectivity { peer, connectivity } => {
                if let Ok(mut a) = self.channel.attachments.lock() {
                    if let Some(s) = a.sessions.get_mut(&peer) {
                        s.connectivity = Some(connectivity);
                    }
                }
                self.core
                    .handle(Event::Connectivity { peer, connectivity }, now)
            }
            DcmEvent::LinkFailed { reporter, peer } => {
                self.core.handle(Event::LinkFailed { reporter, peer }, now)
            }
            DcmEvent::Packets(packets) => self.core.handle(Event::Packets(packets), now),
            DcmEvent::Manifest(frame) => self.core.handle(Event::Manifest(frame), now),
            DcmEvent::Forged {
                reporter,
                accused,
                seq,
                evidence,
            } => self.core.handle(
                Event::ForgeryReport {
                    reporter,
                    accused,
                    seq,
                    evidence,
                },
                now,
            ),
            DcmEvent::Snapshot { reply } => {
                let token = self.next_token;
                self.next_token += 1;
                self.snapshots.insert(token, reply);
                self.core.handle(Event::Snapshot { token }, now);
            }
            DcmEvent::Census {
                lagging_after_ms,
                reply,
            } => {
                let _ = reply.send(self.core.census(lagging_after_ms));
            }
            DcmEvent::SplitUpload {
                peer,
                capacity_kbps,
                file_rate_kbps,
                reply,
            } => {
                let _ = reply.send(self.core.split_upload(peer, capacity_kbps, file_rate_kbps));
            }
            DcmEvent::EndSplit { peer } => self.core.handle(Event::EndSplit { peer }, now),
            DcmEvent::Release { url } => self.release(url, now),
            DcmEvent::InjectFailure => {
                panic!("injected DCM failure (channel {})", self.channel.name)
            }
        }
        self.drain_ready();
    }

    /// Hands the channel's peers over (see [`DcmEvent::Release`]): each is told where to go
    /// and its session closed; the core starts afresh, so that when this server owns the DCM
    /// again its peers resume into a DCM that rebuilds from their heartbeats.
    fn release(&mut self, url: Option<String>, now: u64) {
        let dcm = self.channel.name.clone();
        let msg = match url {
            Some(url) => ServerMsg::Redirect { url, dcm },
            None => ServerMsg::Error {
                code: protocol::ErrorCode::Unavailable,
                message: format!("this server no longer runs channel {dcm:?}; reconnect"),
            },
        };
        let peers: Vec<PeerId> = self.outs.keys().copied().collect();
        tracing::warn!(channel = %self.channel.name, peers = peers.len(), "releasing the channel's DCM");
        for peer in peers {
            if let Some(out) = self.outs.get(&peer) {
                let _ = out.try_send(Outbound::msg(msg.clone()));
                let _ = out.try_send(Box::new(Outbound::Close("moved to another server".into())));
            }
            self.forget(peer);
        }
        let config = self.core_config.clone();
        self.core = coordinator::Dcm::new(config, now);
        self.counted = DcmStats::default();
        self.epoch = 0;
        if let Ok(mut a) = self.channel.attachments.lock() {
            a.origin_fed.clear();
        }
    }

    /// Moves the outputs that are ready now; without a runtime loop (tests), the background
    /// work too.
    fn drain_ready(&mut self) {
        if self.sliced {
            while self.core.has_ready_output() {
                let Some(out) = self.core.poll_output() else {
                    break;
                };
                self.apply(out);
            }
            self.count();
        } else {
            self.drain(usize::MAX);
        }
    }

    /// Moves up to `budget` outputs to where they belong.
    fn drain(&mut self, budget: usize) {
        for _ in 0..budget {
            let Some(out) = self.core.poll_output() else {
                break;
            };
            self.apply(out);
        }
        self.count();
    }

    fn apply(&mut self, out: Output) {
        match out {
            Output::Send { peer, msg } => {
                let msg = match msg {
                    OutMsg::Msg(m) => Outbound::Msg(m),
                    OutMsg::Packet(b) => Outbound::Packet(b),
                    OutMsg::Text(t) => Outbound::Text(self.text(t)),
                };
                self.send(peer, Box::new(msg));
            }
            Output::Close { peer, reason } => {
                if let Some(out) = self.outs.get(&peer) {
                    let _ = out.try_send(Box::new(Outbound::Close(reason)));
                }
                self.forget(peer);
            }
            Output::Evict { peer, reason } => {
                if let Some(out) = self.outs.get(&peer) {
                    let _ = out.try_send(Box::new(Outbound::Evict(reason)));
                }
                self.forget(peer);
            }
            Output::OriginFed {
                peer,
                pushes,
                epoch,
            } => {
                if let Ok(mut a) = self.channel.attachments.lock() {
                    a.epoch = epoch;
                    if pushes.is_empty() {
                        a.origin_fed.remove(&peer);
                    } else {
                        a.origin_fed.insert(peer, pushes);
                    }
                }
            }
            Output::Relays(round) => self.relay_round(round),
            Output::Snapshot { token, snapshot } => {
                if let Some(reply) = self.snapshots.remove(&token) {
                    let _ = reply.send(*snapshot);
                }
            }
        }
    }

    /// Converts a shared text once for all the peers it goes to.
    fn text(&mut self, t: Arc<str>) -> tokio_tungstenite::tungstenite::Utf8Bytes {
        if let Some((last, bytes)) = &self.last_text {
            if Arc::ptr_eq(last, &t) {
                return bytes.clone();
            }
        }
        let bytes = tokio_tungstenite::tungstenite::Utf8Bytes::from(t.as_ref());
        self.last_text = Some((t, bytes.clone()));
        bytes
    }

    fn send(&mut self, peer: PeerId, msg: Box<Outbound>) {
        let Some(out) = self.outs.get(&peer) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = out.try_send(msg) {
            // A peer that cannot keep up with its control queue is cut loose rather than
            // allowed to hold up every other viewer of the channel.
            tracing::warn!(%peer, "outbound queue full; closing session");
            let _ = out.try_send(Box::new(Outbound::Close("outbound queue full".into())));
        }
    }

    /// A session gone (left, or closed by the DCM): its queue, attachment and relay offers.
    fn forget(&mut self, peer: PeerId) {
        self.outs.remove(&peer);
        if let Ok(mut a) = self.channel.attachments.lock() {
            a.sessions.remove(&peer);
            a.origin_fed.remove(&peer);
        }
        self.channel.relays.session_ended(peer);
    }

    /// Claims 19, 43: the core's offers and withdrawals go to the board the channels share,
    /// and, unless a recruit of this channel is pending, one relay is recruited for the first
    /// short region another channel can help.
    fn relay_round(&mut self, round: coordinator::RelayRound) {
        let board = self.channel.relays.clone();
        let name = &self.channel.name;
        for (peer, region, spare) in round.offers {
            if let Some(out) = self.outs.get(&peer) {
                board.offer(name, region, peer, spare, out);
            }
        }
        for peer in round.withdrawals {
            board.withdraw(peer);
        }
        let now = now_ms();
        if board.pending_for(name, now) {
            return;
        }
        for region in round.deficits {
            let Some((relay_token, upload_kbps, out)) =
                board.recruit(name, region, round.need_kbps, now)
            else {
                continue;
            };
            tracing::info!(channel = %name, upload_kbps, "recruiting a relay from another channel");
            let msg = ServerMsg::Recruit {
                channel: name.clone(),
                relay_token,
                upload_kbps,
            };
            let _ = out.try_send(Outbound::msg(msg));
            self.channel
                .counters
                .relays_recruited
                .fetch_add(1, Ordering::Relaxed);
            break;
        }
    }

    /// Adds what the core counted since the last call to the channel's counters, and keeps the
    /// epoch of the newest instructions with the channel (a DCM taking over goes on from it).
    fn count(&mut self) {
        let epoch = self.core.epoch();
        if epoch != self.epoch {
            self.epoch = epoch;
            if let Ok(mut a) = self.channel.attachments.lock() {
                a.epoch = epoch;
            }
        }
        let s = self.core.stats();
        let was = std::mem::replace(&mut self.counted, s);
        let c = &self.channel.counters;
        let add = |counter: &std::sync::atomic::AtomicU64, now: u64, before: u64| {
            if now > before {
                counter.fetch_add(now - before, Ordering::Relaxed);
            }
        };
        add(&c.heartbeats, s.heartbeats, was.heartbeats);
        for (i, counter) in c.heartbeats_refused.iter().enumerate() {
            add(
                counter,
                s.heartbeats_refused.0[i],
                was.heartbeats_refused.0[i],
            );
        }
        add(
            &c.congestion_events,
            s.congestion_events,
            was.congestion_events,
        );
        add(&c.repairs, s.repairs, was.repairs);
        add(&c.reconnects, s.reconnects, was.reconnects);
        add(&c.bridges_opened, s.bridges_opened, was.bridges_opened);
        add(&c.bridges_refused, s.bridges_refused, was.bridges_refused);
        add(
            &c.origin_push_bytes,
            s.origin_push_bytes,
            was.origin_push_bytes,
        );
        add(
            &c.origin_bridge_bytes,
            s.origin_bridge_bytes,
            was.origin_bridge_bytes,
        );
        add(&c.manifests_sent, s.manifests_sent, was.manifests_sent);
        add(&c.forgery_reports, s.forgery_reports, was.forgery_reports);
        add(&c.false_reports, s.false_reports, was.false_reports);
        add(&c.evictions, s.evictions, was.evictions);
    }
}

/// Runs a channel's DCM and replaces it when it fails (panics): the resource service locator's
/// job within one server. The DCM that takes over adopts the sessions and the origin's push
/// list and rebuilds the topology from heartbeats ([`Dcm::take_over`]). Ends when the channel's
/// event queue closes.
pub async fn supervise(
    first: Dcm,
    channel: Arc<Channel>,
    config: Arc<Config>,
    mut events: mpsc::Receiver<DcmEvent>,
) {
    use futures_util::FutureExt;
    let mut next = Some(first);
    loop {
        let dcm = match next.take() {
            Some(d) => d,
            None => Dcm::take_over(channel.clone(), &config, now_ms()),
        };
        match std::panic::AssertUnwindSafe(dcm.run(&mut events))
            .catch_unwind()
            .await
        {
            Ok(()) => break,
            Err(_) => {
                channel
                    .counters
                    .dcm_failovers
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(channel = %channel.name, "DCM failed; a new one takes over");
            }
        }
    }
}
