//! The sans-IO peer engine. Time and events go in ([`Engine::handle`]), actions come out
//! ([`Action`]); the web glue only moves bytes and timers. This makes the relay, reorder,
//! upload-cap and fallback logic testable natively with many engines in one process.
//!
//! Per packet: a packet of substream `i = seq mod k` arrives from the parent of tree `i` (or the
//! origin), is forwarded to this peer's children in tree `i` within the upload cap, held until
//! every earlier packet is present, then delivered in order to the player. A packet still missing
//! `fallback_after_ms` after a later one arrived is fetched from the origin over HTTP.

mod upload;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;

use protocol::hash::{packet_hash, RangeHash};
use protocol::report::LatencyHistogram;
use protocol::{ChildLink, Heartbeat, Packet, ParentLink, PeerId, Source, SubstreamPlan};

pub use upload::TokenBucket;

/// Upload backlog (ms) that makes a peer report at once instead of at its next heartbeat.
pub const EARLY_HEARTBEAT_BACKLOG_MS: f64 = 300.0;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Declared upload capacity; sends to children never exceed it.
    pub upload_kbps: u32,
    /// How long a gap may stay open before the packet is fetched from the origin.
    pub fallback_after_ms: f64,
    /// Packet counts as on time if playable within this long of its creation at the origin.
    pub playout_delay_ms: f64,
    /// A gap older than this is skipped (the player jumps over it) rather than waited for.
    pub give_up_ms: f64,
    /// Queued sends older than this are dropped: the child will have fetched them already.
    pub send_timeout_ms: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            upload_kbps: 2000,
            fallback_after_ms: 600.0,
            playout_delay_ms: 2500.0,
            give_up_ms: 6000.0,
            send_timeout_ms: 1500.0,
        }
    }
}

/// Where a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Peer(PeerId),
    /// Pushed by the origin on the control socket (this peer is a tree root).
    OriginPush,
    /// Fetched over HTTP because the swarm was too slow.
    OriginFetch,
}

#[derive(Debug)]
pub enum Input<'a> {
    Welcome {
        peer_id: PeerId,
        substreams: u32,
        start_seq: u64,
        live_seq: u64,
    },
    Instructions {
        plan: Vec<SubstreamPlan>,
    },
    Packet {
        from: From,
        bytes: &'a [u8],
    },
    /// The origin's newest packet (from the control socket).
    LiveEdge {
        seq: u64,
    },
    /// A fallback fetch failed; `gone` when the origin no longer has the packet.
    FetchFailed {
        seq: u64,
        gone: bool,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this packet on the data channel to `to`.
    Send { to: PeerId, packet: Rc<Vec<u8>> },
    /// Fetch packet `seq` from the origin over HTTP.
    Fetch { seq: u64 },
    /// In-order media bytes for the player.
    Deliver { payload: Vec<u8> },
    /// A neighbour appeared in the plan: open a connection (the lower id offers).
    Connect { peer: PeerId },
    /// A neighbour left the plan: close the connection.
    Disconnect { peer: PeerId },
}

struct Held {
    packet: Rc<Vec<u8>>,
    created_ms: u64,
    arrived_ms: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_up: u64,
    pub packets_from_peers: u64,
    pub packets_from_origin: u64,
    pub origin_fallbacks: u64,
    pub duplicates: u64,
    pub invalid: u64,
    pub packets_played: u64,
    pub on_time: u64,
    pub late: u64,
    pub send_dropped: u64,
}

pub struct Engine {
    cfg: EngineConfig,
    me: Option<PeerId>,
    k: u32,
    plan: Vec<SubstreamPlan>,
    neighbours: BTreeSet<PeerId>,
    next_deliver: Option<u64>,
    highest_seen: Option<u64>,
    held: BTreeMap<u64, Held>,
    /// The last packets delivered (two per substream), to prime newly assigned children.
    recent: VecDeque<Rc<Vec<u8>>>,
    /// Missing seq → when the gap was noticed.
    gaps: BTreeMap<u64, f64>,
    in_flight: BTreeSet<u64>,
    bucket: TokenBucket,
    send_queue: VecDeque<(PeerId, Rc<Vec<u8>>, f64, u32)>,
    parent_last: Vec<(Option<u64>, Option<u64>)>,
    /// Per substream: when the current parent was assigned and when its first packet came.
    parent_timing: Vec<(f64, Option<f64>)>,
    child_last: HashMap<(PeerId, u32), (u64, u64)>,
    hb_seq: u64,
    backlog_reported: bool,
    pub counters: Counters,
    pub verified: Option<RangeHash>,
    pub latency: LatencyHistogram,
    pub first_delivery_ms: Option<f64>,
    now: f64,
}

impl Engine {
    pub fn new(cfg: EngineConfig, now_ms: f64) -> Self {
        // A whole fragment reaches a forwarder at once and must go to all its children, so the
        // bucket holds a second of upload: the cap bounds the rate, not the burst.
        let bucket = TokenBucket::new(cfg.upload_kbps, 1000.0, now_ms);
        Engine {
            cfg,
            me: None,
            k: 1,
            plan: Vec::new(),
            neighbours: BTreeSet::new(),
            next_deliver: None,
            highest_seen: None,
            held: BTreeMap::new(),
            recent: VecDeque::new(),
            gaps: BTreeMap::new(),
            in_flight: BTreeSet::new(),
            bucket,
            send_queue: VecDeque::new(),
            parent_last: Vec::new(),
            parent_timing: Vec::new(),
            child_last: HashMap::new(),
            hb_seq: 0,
            backlog_reported: false,
            counters: Counters::default(),
            verified: None,
            latency: LatencyHistogram::default(),
            first_delivery_ms: None,
            now: now_ms,
        }
    }

    pub fn peer_id(&self) -> Option<PeerId> {
        self.me
    }

    pub fn plan(&self) -> &[SubstreamPlan] {
        &self.plan
    }

    pub fn substreams(&self) -> u32 {
        self.k
    }

    pub fn upload_kbps(&self) -> u32 {
        self.bucket.rate_kbps()
    }

    /// Changes the upload cap (a player option; also used to emulate a throttled uplink).
    pub fn set_upload_kbps(&mut self, kbps: u32) {
        self.bucket.set_rate(kbps);
    }

    /// Feeds one event at time `now_ms` (wall clock, ms); returns what to do.
    pub fn handle(&mut self, input: Input<'_>, now_ms: f64) -> Vec<Action> {
        self.now = now_ms;
        let mut out = Vec::new();
        match input {
            Input::Welcome {
                peer_id,
                substreams,
                start_seq,
                live_seq,
            } => {
                self.me = Some(peer_id);
                self.k = substreams.max(1);
                self.parent_last = vec![(None, None); self.k as usize];
                self.parent_timing = vec![(now_ms, None); self.k as usize];
                self.next_deliver = Some(start_seq);
                self.verified = Some(RangeHash::new(start_seq));
                // Everything from the random-access point up to the live edge already exists:
                // fetch it now instead of waiting for the trees (which only carry new packets).
                let noticed = now_ms - self.cfg.fallback_after_ms;
                for seq in start_seq..=live_seq.max(start_seq) {
                    self.gaps.insert(seq, noticed);
                }
                self.highest_seen = Some(live_seq.max(start_seq));
            }
            Input::Instructions { plan } => self.apply_plan(plan, &mut out),
            Input::Packet { from, bytes } => self.on_packet(from, bytes, &mut out),
            Input::FetchFailed { seq, gone } => {
                self.in_flight.remove(&seq);
                if gone {
                    self.skip_to_available(&mut out);
                } else if let Some(t) = self.gaps.get_mut(&seq) {
                    // Not produced yet: try again one fallback period later.
                    *t = now_ms;
                }
            }
            Input::LiveEdge { seq } => self.note_exists(seq),
            Input::Tick => {}
        }
        self.poll(&mut out);
        out
    }

    fn apply_plan(&mut self, plan: Vec<SubstreamPlan>, out: &mut Vec<Action>) {
        let mut next: BTreeSet<PeerId> = BTreeSet::new();
        for s in &plan {
            if let Source::Peer { id } = s.parent {
                next.insert(id);
            }
            next.extend(s.children.iter().copied());
            let i = s.index as usize;
            let changed = self
                .plan
                .iter()
                .find(|o| o.index == s.index)
                .map(|o| o.parent)
                != Some(s.parent);
            if changed && i < self.parent_last.len() {
                self.parent_last[i] = (None, None);
            }
            if changed && i < self.parent_timing.len() {
                self.parent_timing[i] = (self.now, None);
            }
        }
        for gone in self.neighbours.difference(&next) {
            out.push(Action::Disconnect { peer: *gone });
        }
        for new in next.difference(&self.neighbours) {
            out.push(Action::Connect { peer: *new });
        }
        let children: BTreeSet<(PeerId, u32)> = plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .collect();
        // A new child of substream i most likely lost its previous parent: hand it the newest
        // packet of i we have, so it is fed from the swarm at once instead of waiting for the
        // next one (or for the origin). A duplicate costs it one ignored packet.
        let old_children: BTreeSet<(PeerId, u32)> = self
            .plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .collect();
        for (child, sub) in children.difference(&old_children) {
            if let Some(p) = self.recent.iter().rev().find(|p| {
                protocol::packet::peek_seq(p).map(|q| protocol::substream_of(q, self.k))
                    == Some(*sub)
            }) {
                self.send_queue
                    .push_back((*child, p.clone(), self.now, *sub));
            }
        }
        self.child_last.retain(|key, _| children.contains(key));
        self.send_queue
            .retain(|(to, _, _, sub)| children.contains(&(*to, *sub)));
        self.neighbours = next;
        self.plan = plan;
    }

    fn on_packet(&mut self, from: From, bytes: &[u8], out: &mut Vec<Action>) {
        let Ok(p) = Packet::decode(bytes) else {
            self.counters.invalid += 1;
            return;
        };
        let seq = p.header.seq;
        let sub = protocol::substream_of(seq, self.k);
        match from {
            From::Peer(_) => {
                self.counters.bytes_from_peers += bytes.len() as u64;
                self.counters.packets_from_peers += 1;
            }
            From::OriginPush | From::OriginFetch => {
                self.counters.bytes_from_origin += bytes.len() as u64;
                self.counters.packets_from_origin += 1;
            }
        }
        self.in_flight.remove(&seq);
        if from == From::OriginFetch {
            self.counters.origin_fallbacks += 1;
        }
        if let Some(slot) = self.parent_last.get_mut(sub as usize) {
            let from_parent = match (from, self.plan.get(sub as usize).map(|s| s.parent)) {
                (From::Peer(id), Some(Source::Peer { id: pid })) => id == pid,
                (From::OriginPush, Some(Source::Origin)) => true,
                _ => false,
            };
            if from_parent {
                *slot = (Some(seq), Some(self.now as u64));
                if let Some(t) = self.parent_timing.get_mut(sub as usize) {
                    t.1.get_or_insert(self.now);
                }
            }
        }
        let Some(next) = self.next_deliver else {
            return; // not welcomed yet
        };
        if seq < next || self.held.contains_key(&seq) {
            self.counters.duplicates += 1;
            return;
        }
        let packet = Rc::new(bytes.to_vec());
        // Relay first: children wait on us, the player can wait a few microseconds.
        if let Some(s) = self.plan.iter().find(|s| s.index == sub) {
            for child in &s.children {
                if From::Peer(*child) != from {
                    self.send_queue
                        .push_back((*child, packet.clone(), self.now, sub));
                }
            }
        }
        self.note_exists(seq);
        self.gaps.remove(&seq);
        self.held.insert(
            seq,
            Held {
                packet,
                created_ms: p.header.created_ms,
                arrived_ms: self.now,
            },
        );
        self.deliver(out);
    }

    /// Packets up to `seq` exist at the origin: every one not yet here becomes a gap, and is
    /// fetched if the swarm does not deliver it within `fallback_after_ms`.
    fn note_exists(&mut self, seq: u64) {
        let Some(next) = self.next_deliver else {
            return;
        };
        let high = self.highest_seen.unwrap_or(next.saturating_sub(1));
        // Bounded: a bogus edge far ahead must not allocate millions of gaps.
        let upto = seq.min(high + 4096);
        for missing in (high + 1).max(next)..=upto {
            if !self.held.contains_key(&missing) {
                self.gaps.entry(missing).or_insert(self.now);
            }
        }
        self.highest_seen = Some(high.max(upto));
    }

    fn deliver(&mut self, out: &mut Vec<Action>) {
        while let Some(next) = self.next_deliver {
            let Some(h) = self.held.remove(&next) else {
                break;
            };
            let Ok(p) = Packet::decode(&h.packet) else {
                break;
            };
            let latency = (self.now - h.created_ms as f64).max(0.0);
            self.latency.record(latency as u64);
            // On time: the packet was here before its playout deadline.
            if h.arrived_ms <= h.created_ms as f64 + self.cfg.playout_delay_ms {
                self.counters.on_time += 1;
            } else {
                self.counters.late += 1;
            }
            self.counters.packets_played += 1;
            if let Some(v) = self.verified.as_mut() {
                v.push(packet_hash(p.payload));
            }
            self.first_delivery_ms.get_or_insert(self.now);
            self.recent.push_back(h.packet.clone());
            if self.recent.len() > 2 * self.k as usize {
                self.recent.pop_front();
            }
            out.push(Action::Deliver {
                payload: p.payload.to_vec(),
            });
            self.next_deliver = Some(next + 1);
        }
    }

    /// Jumps over a gap that cannot be filled, restarting verification after it.
    fn skip_to_available(&mut self, out: &mut Vec<Action>) {
        let Some(next) = self.next_deliver else {
            return;
        };
        if let Some((&first_held, _)) = self.held.iter().next() {
            let skipped = first_held - next;
            self.counters.late += skipped;
            self.gaps.retain(|s, _| *s > first_held);
            self.next_deliver = Some(first_held);
            // The verified range must stay contiguous; start a new one after the hole.
            self.verified = Some(RangeHash::new(first_held));
            self.deliver(out);
        }
    }

    fn poll(&mut self, out: &mut Vec<Action>) {
        // Fallback fetches for gaps that stayed open too long.
        let due: Vec<u64> = self
            .gaps
            .iter()
            .filter(|(seq, t)| {
                !self.in_flight.contains(seq) && self.now - **t >= self.cfg.fallback_after_ms
            })
            .map(|(s, _)| *s)
            .take(32)
            .collect();
        for seq in due {
            self.in_flight.insert(seq);
            out.push(Action::Fetch { seq });
        }
        // A gap at the head that nobody can fill for too long: skip it.
        if let (Some(next), Some((&first_gap, &t))) = (self.next_deliver, self.gaps.iter().next()) {
            if first_gap == next && self.now - t > self.cfg.give_up_ms && !self.held.is_empty() {
                self.skip_to_available(out);
            }
        }
        // Sends within the upload cap; stale ones are dropped.
        while let Some((to, packet, queued, sub)) = self.send_queue.front().cloned() {
            if self.now - queued > self.cfg.send_timeout_ms {
                self.send_queue.pop_front();
                self.counters.send_dropped += 1;
                continue;
            }
            if !self.bucket.try_take(packet.len(), self.now) {
                break;
            }
            self.send_queue.pop_front();
            self.counters.bytes_up += packet.len() as u64;
            if let Some(seq) = protocol::packet::peek_seq(&packet) {
                self.child_last.insert((to, sub), (seq, self.now as u64));
            }
            out.push(Action::Send { to, packet });
        }
    }

    /// Age of the oldest packet waiting for upload tokens, ms.
    pub fn send_backlog_ms(&self) -> f64 {
        self.send_queue
            .front()
            .map_or(0.0, |(_, _, queued, _)| (self.now - queued).max(0.0))
    }

    /// True once per backlog episode when the upload queue has been stuck for a while: the
    /// glue then sends a heartbeat at once so the DCM can move children before they starve.
    pub fn wants_early_heartbeat(&mut self) -> bool {
        let stuck = self.send_backlog_ms() > EARLY_HEARTBEAT_BACKLOG_MS;
        let fire = stuck && !self.backlog_reported;
        self.backlog_reported = stuck;
        fire
    }

    /// Packets held per substream ahead of the playout point (FIG. 9 Buffersize S_i).
    pub fn buffered_per_substream(&self) -> Vec<u32> {
        let mut v = vec![0u32; self.k as usize];
        for seq in self.held.keys() {
            if let Some(slot) = v.get_mut(protocol::substream_of(*seq, self.k) as usize) {
                *slot += 1;
            }
        }
        v
    }

    /// Builds the next FIG. 9 heartbeat.
    pub fn heartbeat(&mut self) -> Option<Heartbeat> {
        let me = self.me?;
        self.hb_seq += 1;
        let parents = self
            .plan
            .iter()
            .map(|s| {
                let (last_seq, last_ts_ms) = self
                    .parent_last
                    .get(s.index as usize)
                    .copied()
                    .unwrap_or((None, None));
                ParentLink {
                    substream: s.index,
                    parent: s.parent,
                    last_seq,
                    last_ts_ms,
                }
            })
            .collect();
        let children = self
            .plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .map(|(child, substream)| {
                let last = self.child_last.get(&(child, substream));
                ChildLink {
                    substream,
                    child,
                    last_seq: last.map(|l| l.0),
                    last_ts_ms: last.map(|l| l.1),
                }
            })
            .collect();
        Some(Heartbeat {
            client_id: me,
            seq: self.hb_seq,
            local_ts_ms: self.now as u64,
            parents,
            children,
            buffer: self.buffered_per_substream(),
            bytes_from_peers: self.counters.bytes_from_peers,
            bytes_from_origin: self.counters.bytes_from_origin,
            bytes_up: self.counters.bytes_up,
            origin_fallbacks: self.counters.origin_fallbacks,
            upload_kbps: self.bucket.rate_kbps(),
            send_backlog_ms: self.send_backlog_ms() as u32,
        })
    }

    /// Current parent per substream with its timing (for statistics).
    pub fn link_stats(&self) -> Vec<protocol::report::LinkStat> {
        self.plan
            .iter()
            .map(|s| {
                let (since, first) = self
                    .parent_timing
                    .get(s.index as usize)
                    .copied()
                    .unwrap_or((0.0, None));
                protocol::report::LinkStat {
                    substream: s.index,
                    parent: s.parent,
                    since_ms: since,
                    first_packet_ms: first,
                }
            })
            .collect()
    }

    pub fn neighbours(&self) -> impl Iterator<Item = &PeerId> {
        self.neighbours.iter()
    }
}

#[cfg(test)]
mod tests;
