//! The simulated world: peers, links, the origin and the control plane, stepped one event at a
//! time in virtual time (earliest first). Nothing here reads the wall clock except to measure
//! the coordinator's CPU cost, so a seed reproduces a run exactly.

use std::rc::Rc;

use protocol::{Heartbeat, PeerId};

use peer_wasm::engine::EngineConfig;

use crate::control::{Control, ControlConfig, Down};
use crate::dist::Rng;
use crate::links::Links;
use crate::net::NetConfig;
use crate::origin::{OriginConfig, SyntheticOrigin};
use crate::peer::{index_of, SimPeer, TICK_MS};
use crate::queue::{ms, us, EventQueue, Micros};
use crate::wire::Wire;

/// The engine and coordinator see time as ms since an arbitrary epoch; starting it far from
/// zero keeps "x ms ago" arithmetic away from zero.
pub const EPOCH_MS: f64 = 1_000_000.0;

/// Control frames' size on the wire when small (WebSocket framing + JSON), bytes.
pub(crate) const CTRL_BYTES: usize = 300;

/// What a peer sends to the control center.
pub enum Up {
    Join,
    /// Reconnected to the new DCM's server with its resume token (the failover scenario).
    Resume,
    Heartbeat(Box<Heartbeat>),
    Leave,
    LinkFailed(PeerId),
}

/// What a fallback fetch found at the origin.
pub enum FetchReply {
    Packet(Rc<Vec<u8>>),
    NotYet,
    Gone,
}

/// What reaches a peer's access link from the network. It takes its turn on the peer's
/// downlink (one FIFO in the order things arrive) when it arrives, not when it was sent: a
/// packet held up in a slow sender's uplink must not hold up what other senders deliver first.
pub enum Arrival {
    Data {
        from: u32,
        gen: u32,
        packet: Rc<Vec<u8>>,
    },
    Down(Down, usize),
    Fetched(u64, FetchReply, usize),
}

pub enum Ev {
    Join(u32),
    /// Something reaches peer `.0`'s downlink (see [`Arrival`]).
    Arrive(u32, Arrival),
    Leave(u32),
    AtServer(u32, Up),
    AtPeer(u32, Down),
    Tick(u32),
    Fragment,
    /// A paced origin releases one packet.
    Release(u64),
    LinkOpen(u32, u32, u32),
    LinkFail(u32, u32, u32),
    /// The far end closed the data channel `(to, from)`: `to` learns it (if no new link
    /// between the two has been asked for since).
    LinkClosed(u32, u32),
    Data {
        to: u32,
        from: u32,
        gen: u32,
        packet: Rc<Vec<u8>>,
    },
    FetchAtOrigin(u32, u64),
    Fetched(u32, u64, FetchReply),
    CoordTimeout,
    /// Cut the upload of this many relaying peers (see `inject.rs`).
    Throttle(usize),
    /// Look for the coordinator's congestion reports on the throttled peers.
    CheckCongestion,
    /// The DCM's server dies (see [`crate::control::Control::fail`]).
    Failover,
    /// A peer whose control connection died finds the new DCM and resumes there.
    Resume(u32),
    /// A peer without a control connection asks another server's locator where its DCM is;
    /// the answer carries that server's newest packet (a live-edge notice).
    Locate(u32),
}

/// Parameters of one run.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    pub net: NetConfig,
    pub origin: OriginConfig,
    pub control: ControlConfig,
    /// Peers run engines and media flows (false: the control-only scenario).
    pub media: bool,
    /// The engines' settings (`upload_kbps` is each peer's own declaration).
    pub engine: EngineConfig,
    /// Where joiners start ([`coordinator::start`]), as the server's `--start-*` flags.
    pub start: coordinator::start::StartConfig,
}

/// Running totals the report is built from.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub events: u64,
    pub origin_push_bytes: u64,
    pub origin_fetch_bytes: u64,
    /// Origin egress per simulated second.
    pub egress_per_s: Vec<u64>,
    /// Of that, fallback fetches' bytes, and the coordinator's bridge bytes (cumulative, taken
    /// at the first egress of each second).
    pub fallback_per_s: Vec<u64>,
    pub fallback_by_tier_per_s: std::collections::BTreeMap<String, Vec<u64>>,
    pub bridge_total_at_s: Vec<u64>,
    pub repairs_ms: Vec<f64>,
    pub links_opened: u64,
    pub link_failures: u64,
    pub setup_ms: Vec<f64>,
    pub server_errors: u64,
    pub closed_by_server: u64,
    /// Joiners started one fragment behind the newest, and at the newest (late in a fragment,
    /// or beyond the origin's start budget).
    pub starts_older: u64,
    pub starts_newest_late: u64,
    pub starts_next_budget: u64,
    /// Throttled relays and when (engine ms).
    pub throttled: Vec<(PeerId, f64)>,
    /// Per throttled relay: throttle to the first congestion report naming it, ms (-1: none).
    pub detection_ms: Vec<f64>,
    /// Throttled relays the coordinator flagged within two heartbeat intervals.
    pub congestion_detected: usize,
    /// When the DCM's server died (the failover scenario), and the instructions peers received
    /// from its successor in the 10 s after.
    pub failover_at: Option<Micros>,
    pub instructions_after_failover: u64,
    /// Stalls of all peers when the server died.
    pub stalls_at_failover: u32,
}

pub struct World {
    pub cfg: WorldConfig,
    pub q: EventQueue<Ev>,
    pub peers: Vec<SimPeer>,
    pub links: Links,
    pub wire: Wire,
    pub origin: SyntheticOrigin,
    pub control: Control,
    pub start: coordinator::start::StartPolicy,
    pub rng: Rng,
    pub totals: Totals,
    pub(crate) coord_timer: Option<Micros>,
    /// The last shared text message parsed (many peers get the same `Arc<str>`).
    text_cache: Option<(std::sync::Arc<str>, protocol::ServerMsg)>,
}

impl World {
    pub fn new(cfg: WorldConfig) -> Self {
        let control = Control::new(cfg.control.clone(), EPOCH_MS as u64);
        let origin = SyntheticOrigin::new(cfg.origin, cfg.seed);
        let rng = Rng::stream(cfg.seed, 1);
        let start = coordinator::start::StartPolicy::new(cfg.start);
        let mut w = World {
            cfg,
            q: EventQueue::default(),
            peers: Vec::new(),
            links: Links::default(),
            wire: Wire::default(),
            origin,
            control,
            start,
            rng,
            totals: Totals::default(),
            coord_timer: None,
            text_cache: None,
        };
        w.q.at(0, Ev::Fragment);
        w
    }

    /// Virtual time as the engine and coordinator see it, ms.
    pub fn now_ms(&self) -> f64 {
        EPOCH_MS + ms(self.q.now())
    }

    /// With `SIM_TRACE_STALLS` set, one line on stderr per stall: the peer, its tier and age,
    /// the packet its player waits for and the parent of that packet's tree.
    pub(crate) fn trace_stall(&self, i: u32) {
        if std::env::var_os("SIM_TRACE_STALLS").is_none() {
            return;
        }
        let p = &self.peers[i as usize];
        let Some(e) = p.engine.as_ref() else {
            return;
        };
        let next = p.last_delivered.map_or(0, |l| l + 1);
        let sub = protocol::substream_of(next, e.substreams());
        let parent = e.plan().iter().find(|s| s.index == sub).map(|s| s.parent);
        let pj = self.tree_parent(i as usize, sub);
        eprintln!(
            "stall t={:.1}s peer={} tier={:?} age={:.1}s waits={} sub={} parent={:?} made={:?} gap_since={:?} fetching={} parent_has={:?} down_backlog_ms={:.0} down_kbps={:.0} parent_up_backlog_ms={:?} link={:?}",
            ms(self.q.now()) / 1000.0,
            i,
            e.tier(),
            ms(self.q.now().saturating_sub(p.joined_at)) / 1000.0,
            next,
            sub,
            parent,
            self.origin.packet(next).map(|q| q.created_ms as f64 - self.now_ms()),
            e.gap_of(next).0.map(|t| t - self.now_ms()),
            e.gap_of(next).1,
            pj.and_then(|j| self.peers.get(j)).map(|q| q.last_delivered),
            ms(self.wire.downlink_backlog(i as usize, self.q.now())),
            p.net.down_kbps,
            pj.map(|j| ms(self.wire.uplink_backlog(j, self.q.now())) as u64),
            pj.and_then(|j| self.link_ages(i, j)),
        );
    }

    /// The index of peer `i`'s parent in tree `sub` by its engine's plan, when that parent is
    /// a peer.
    fn tree_parent(&self, i: usize, sub: u32) -> Option<usize> {
        let e = self.peers.get(i)?.engine.as_ref()?;
        match e.plan().iter().find(|s| s.index == sub)?.parent {
            protocol::Source::Peer { id } => index_of(id),
            protocol::Source::Origin => None,
        }
    }

    /// The link between peers `i` and `j`: its state, and how long ago (ms) it was started and
    /// opened.
    fn link_ages(
        &self,
        i: u32,
        j: usize,
    ) -> Option<(crate::links::State, Option<f64>, Option<f64>)> {
        let l = self.links.get(i, j as u32)?;
        let ago = |t: Option<Micros>| t.map(|t| ms(self.q.now().saturating_sub(t)));
        Some((l.state, ago(l.started), ago(l.opened)))
    }

    /// Hops from the origin to peer `i` in tree `sub`, by the engines' plans (`None`: not
    /// linked to the origin through peers that are alive).
    pub(crate) fn depth(&self, i: usize, sub: u32) -> Option<usize> {
        let mut at = i;
        for d in 0..64 {
            let e = self.peers.get(at)?.engine.as_ref()?;
            match e.plan().iter().find(|s| s.index == sub)?.parent {
                protocol::Source::Origin => return Some(d),
                protocol::Source::Peer { id } => at = index_of(id)?,
            }
        }
        None
    }

    /// With `SIM_TRACE_FETCH` set, one line on stderr per fallback fetch the origin answers
    /// with a packet: the peer, its depth in the packet's tree, the parent there (its fan-out,
    /// uplink and backlog, whether it holds the packet) and how long ago the packet was made
    /// and its gap noticed. Fetches that recur for one parent's children point at a tree that
    /// is too slow, not at losses.
    pub(crate) fn trace_fetch(&self, i: u32, seq: u64) {
        if std::env::var_os("SIM_TRACE_FETCH").is_none() {
            return;
        }
        let p = &self.peers[i as usize];
        let Some(e) = p.engine.as_ref() else {
            return;
        };
        let sub = protocol::substream_of(seq, e.substreams());
        let pj = self.tree_parent(i as usize, sub);
        let parent_has = pj
            .and_then(|j| self.peers.get(j))
            .map(|q| q.last_delivered.is_some_and(|l| l >= seq));
        eprintln!(
            "fetch depth={:?} fanout={:?} t={:.2} peer={} age={:.1} seq={} sub={} parent={:?} made={:?} gap_since={:?} parent_has={:?} down_backlog_ms={:.0} parent_up_backlog_ms={:?} parent_up_kbps={:?} link={:?} my_up={}",
            self.depth(i as usize, sub),
            pj.and_then(|j| self.peers[j].engine.as_ref())
                .and_then(|q| q.plan().iter().find(|s| s.index == sub).map(|s| s.children.len())),
            ms(self.q.now()) / 1000.0,
            i,
            ms(self.q.now().saturating_sub(p.joined_at)) / 1000.0,
            seq,
            sub,
            pj,
            self.origin.packet(seq).map(|q| q.created_ms as f64 - self.now_ms()),
            e.gap_of(seq).0.map(|t| t - self.now_ms()),
            parent_has,
            ms(self.wire.downlink_backlog(i as usize, self.q.now())),
            pj.map(|j| ms(self.wire.uplink_backlog(j, self.q.now())) as u64),
            pj.map(|j| self.peers[j].net.up_kbps),
            pj.and_then(|j| self.link_ages(i, j)),
            p.net.up_kbps,
        );
    }

    pub(crate) fn now_ms_u64(&self) -> u64 {
        self.now_ms() as u64
    }

    /// Creates a peer that joins at `at`; returns its index.
    pub fn add_peer(&mut self, at: Micros) -> u32 {
        let index = self.peers.len();
        let mut rng = Rng::stream(self.cfg.seed, 0x1000_0000 + index as u64);
        let mut net = self.cfg.net.draw_peer(index, &mut rng);
        net.nat = self.cfg.net.nat_of(self.cfg.seed, index);
        let joined_ms = EPOCH_MS + ms(at);
        let engine = self.cfg.media.then_some(&self.cfg.engine);
        self.peers
            .push(SimPeer::new(index, net, engine, joined_ms, at));
        self.wire.grow(index + 1);
        self.q.at(at, Ev::Join(index as u32));
        index as u32
    }

    /// Runs every event up to `until` (virtual µs).
    pub fn run_until(&mut self, until: Micros) {
        while let Some(ev) = self.q.pop_until(until) {
            self.totals.events += 1;
            self.step(ev);
        }
        self.q.advance_to(until);
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Join(i) => self.on_join(i),
            Ev::Leave(i) => self.on_leave(i),
            Ev::AtServer(i, up) => self.at_server(i, up),
            Ev::AtPeer(i, down) => self.at_peer(i, down),
            Ev::Arrive(i, a) => self.on_arrive(i, a),
            Ev::Tick(i) => self.on_tick(i),
            Ev::Fragment => self.on_fragment(),
            Ev::Release(seq) => self.on_release(seq),
            Ev::LinkOpen(a, b, gen) => self.on_link_open(a, b, gen),
            Ev::LinkFail(a, b, gen) => self.on_link_fail(a, b, gen),
            Ev::LinkClosed(to, from) => self.on_link_closed(to, from),
            Ev::Data {
                to,
                from,
                gen,
                packet,
            } => self.on_data(to, from, gen, &packet),
            Ev::FetchAtOrigin(i, seq) => self.fetch_at_origin(i, seq),
            Ev::Fetched(i, seq, reply) => self.on_fetched(i, seq, reply),
            Ev::Throttle(n) => self.throttle(n),
            Ev::CheckCongestion => self.check_congestion(),
            Ev::Failover => self.fail_over(),
            Ev::Resume(i) => self.on_resume(i),
            Ev::Locate(i) => self.on_locate(i),
            Ev::CoordTimeout => {
                self.coord_timer = None;
                let now = self.now_ms_u64();
                if self.control.poll_timeout().is_some_and(|t| t <= now) {
                    self.control.handle_timeout(now);
                }
                self.drain_control();
            }
        }
    }

    fn on_join(&mut self, i: u32) {
        let p = &mut self.peers[i as usize];
        p.alive = true;
        self.send_up(i, Up::Join, CTRL_BYTES);
    }

    fn on_leave(&mut self, i: u32) {
        let now = self.q.now();
        let Some(p) = self.peers.get_mut(i as usize) else {
            return;
        };
        if !p.alive {
            return;
        }
        // Its children lose a parent: each such substream is a repair to measure.
        let me = p.id;
        let children: Vec<(PeerId, u32)> = match &p.engine {
            Some(e) => e
                .plan()
                .iter()
                .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
                .collect(),
            None => Vec::new(),
        };
        let neighbours: Vec<PeerId> = p
            .engine
            .as_ref()
            .map(|e| e.neighbours().copied().collect())
            .unwrap_or_default();
        // The Leave goes out before the page is gone.
        self.send_up(i, Up::Leave, CTRL_BYTES);
        let p = &mut self.peers[i as usize];
        p.alive = false;
        p.left_at = Some(now);
        p.retire();
        for (child, sub) in children {
            if let Some(c) = index_of(child).and_then(|c| self.peers.get_mut(c)) {
                if c.alive {
                    c.repairs.push(crate::peer::PendingRepair {
                        substream: sub,
                        old_parent: me,
                        since: now,
                    });
                }
            }
        }
        for n in neighbours {
            if let Some(j) = index_of(n) {
                self.close_link(i, j as u32);
            }
        }
    }

    fn at_peer(&mut self, i: u32, down: Down) {
        let p = &self.peers[i as usize];
        if !p.alive || p.ctrl_lost {
            return;
        }
        match down {
            Down::Msg(m) => self.on_server_msg(i, *m),
            Down::Packet(b) => self.feed_packet(i, peer_wasm::engine::From::OriginPush, &b),
            Down::Text(t) => {
                let cached = self
                    .text_cache
                    .as_ref()
                    .filter(|(a, _)| std::sync::Arc::ptr_eq(a, &t))
                    .map(|(_, m)| m.clone());
                let msg = match cached {
                    Some(m) => m,
                    None => match serde_json::from_str::<protocol::ServerMsg>(&t) {
                        Ok(m) => {
                            self.text_cache = Some((t.clone(), m.clone()));
                            m
                        }
                        Err(_) => {
                            self.totals.server_errors += 1;
                            return;
                        }
                    },
                };
                self.on_server_msg(i, msg);
            }
            Down::Close => {
                self.totals.closed_by_server += 1;
                self.on_leave(i);
            }
        }
    }

    fn on_server_msg(&mut self, i: u32, msg: protocol::ServerMsg) {
        use peer_wasm::engine::Input;
        use protocol::ServerMsg;
        match msg {
            ServerMsg::Welcome {
                peer_id,
                heartbeat_ms,
                substreams,
                start_seq,
                live_seq,
                live_start_seq,
                ..
            } => {
                let p = &mut self.peers[i as usize];
                p.heartbeat_ms = Some(f64::from(heartbeat_ms));
                p.run_start = start_seq;
                p.start_seq = Some(start_seq);
                let phase = self.rng.below(us(TICK_MS).max(1));
                if self.cfg.media {
                    // The server's Welcome carries the origin's measure of the fragments, which
                    // the glue hands the engine; the simulated origin's is configured.
                    let fragment_ms = f64::from(self.origin.cfg.fragment_ms);
                    if let Some(e) = self.peers[i as usize].engine.as_mut() {
                        e.set_fragment_hint(fragment_ms);
                    }
                    self.feed(
                        i,
                        Input::Welcome {
                            peer_id,
                            substreams,
                            start_seq,
                            live_seq,
                            live_start_seq,
                        },
                    );
                    self.q.after(phase, Ev::Tick(i));
                } else {
                    // Control-only: heartbeats only, at their interval.
                    self.q.after(phase, Ev::Tick(i));
                }
            }
            ServerMsg::Instructions {
                substreams, tier, ..
            } => {
                if self
                    .totals
                    .failover_at
                    .is_some_and(|t| self.q.now() < t + 10_000_000)
                {
                    self.totals.instructions_after_failover += 1;
                }
                if self.cfg.media {
                    self.feed(
                        i,
                        Input::Instructions {
                            plan: substreams,
                            tier,
                        },
                    );
                } else {
                    self.peers[i as usize].plan = substreams;
                }
            }
            ServerMsg::LiveEdge { seq } => self.feed(i, Input::LiveEdge { seq }),
            ServerMsg::Error { .. } => self.totals.server_errors += 1,
            // Signals are not simulated (links are set up directly); relays are not recruited
            // across channels in a one-channel run; the simulated control center is one server.
            ServerMsg::Signal { .. }
            | ServerMsg::Recruit { .. }
            | ServerMsg::Cluster { .. }
            | ServerMsg::Redirect { .. } => {}
        }
    }

    fn on_tick(&mut self, i: u32) {
        if !self.peers[i as usize].alive {
            return;
        }
        let now = self.now_ms();
        if self.cfg.media {
            let p = &mut self.peers[i as usize];
            let stalls = p.playout.stalls;
            p.playout.advance(now);
            let slack = p.playout.slack();
            if let Some(e) = p.engine.as_mut() {
                e.set_player_slack(slack, now);
            }
            if p.playout.stalls > stalls {
                self.trace_stall(i);
            }
            self.feed(i, peer_wasm::engine::Input::Tick);
            let p = &mut self.peers[i as usize];
            if p.heartbeat_due(now) {
                p.last_heartbeat_ms = now;
                let hb = p.engine.as_mut().and_then(|e| e.heartbeat());
                if let Some(hb) = hb {
                    self.send_heartbeat(i, hb);
                }
            }
            self.q.after(us(TICK_MS), Ev::Tick(i));
        } else {
            let hb = crate::control_only::heartbeat(&mut self.peers[i as usize], &self.origin, now);
            self.send_heartbeat(i, hb);
            let every = self.peers[i as usize].heartbeat_ms.unwrap_or(1000.0);
            self.q.after(us(every), Ev::Tick(i));
        }
    }

    pub(crate) fn send_heartbeat(&mut self, i: u32, hb: Heartbeat) {
        // Binary (postcard) frames, as the glue sends them.
        let frame = protocol::heartbeat::binary::encode(&hb);
        let p = &mut self.peers[i as usize];
        p.heartbeats_sent += 1;
        p.heartbeat_bytes += frame.len() as u64;
        self.send_up(i, Up::Heartbeat(Box::new(hb)), frame.len() + 8);
    }
}
