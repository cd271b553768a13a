//! One native peer: the control WebSocket, the links and the engine, wired together as the
//! browser's `peer-wasm/src/web/peer.rs` wires them (join, signaling relay, heartbeats,
//! fallback fetches, forgery reports, link failures), on tokio instead of the JS event loop.
//!
//! [`Peer`] holds the state and reacts to one event at a time, synchronously; [`run`] is the
//! thin async driver that waits for the next event (a control message, a datagram, a fetch
//! result, a timer) and hands it over. The engine's `Rc` packets make a peer `!Send`: it runs
//! on a current-thread runtime inside a `LocalSet` (see [`crate::swarm`]).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use peer_wasm::engine::{Action, Engine, EngineConfig, From, Input};
use protocol::report::PeerReport;
use protocol::{ClientMsg, PeerId, ServerMsg, PROTOCOL_VERSION};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

mod report;
mod url;

pub use url::ws_url;

use crate::fetch::{fetch_packet, Fetched};
use crate::link::{Link, LinkEvent, LINK_OPEN_TIMEOUT_MS};
use crate::{now_ms, Error};

/// The engine's periodic poll (gap fetches, heartbeats, link timeouts), as the page's.
const TICK_MS: f64 = 50.0;

/// How often the shared report is refreshed.
const REPORT_MS: f64 = 500.0;

/// Errors kept for the report (as the page keeps 50).
const MAX_ERRORS: usize = 50;

/// What a native peer is told to do.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Control center base URL (`http://host:port`).
    pub server: String,
    pub channel: String,
    pub upload_kbps: u32,
    /// Region to ask to be placed in (honoured only by servers allowing region hints).
    pub region: Option<String>,
    /// Access token (`?token=` on the control WebSocket).
    pub token: Option<String>,
    /// The origin's public key to insist on (64 hex digits), as the player's `public_key`.
    pub public_key: Option<String>,
    /// The address offered to neighbours as our ICE host candidate.
    pub ice_ip: IpAddr,
    /// Join as a waypoint server (FIG. 1, 3) with this operator token.
    pub waypoint_token: Option<String>,
    /// The NAT class to report (a waypoint in a data center is `open`; `None` reports none).
    pub connectivity: Option<protocol::Connectivity>,
}

struct Welcome {
    heartbeat_ms: f64,
    packet_url: String,
    stream_kbps: u32,
}

pub struct Peer {
    cfg: PeerConfig,
    engine: Engine,
    links: HashMap<PeerId, Link>,
    socket: Rc<UdpSocket>,
    local: SocketAddr,
    ctrl: mpsc::UnboundedSender<Message>,
    fetches: mpsc::UnboundedSender<(u64, Fetched)>,
    http: reqwest::Client,
    welcome: Option<Welcome>,
    started_ms: f64,
    last_tick: f64,
    last_heartbeat: f64,
    heartbeat_bytes: u64,
    heartbeats_sent: u64,
    links_failed: u64,
    forgeries_reported: u64,
    /// When sends held back by the upload cap are due (wall clock ms).
    wake_at: Option<f64>,
    errors: Vec<String>,
    link_events: Vec<LinkEvent>,
    /// Links given an input (datagram, timeout, signal, data to send) since they were last
    /// polled: [`Peer::poll_dirty`] drains their outputs once the event is handled, so that a
    /// packet forwarded to a child leaves at once rather than at the child link's next timer.
    dirty: BTreeSet<PeerId>,
    /// Datagrams the kernel refused (a full send buffer); SCTP resends what mattered.
    pub udp_send_errors: u64,
    done: bool,
}

impl Peer {
    fn new(
        cfg: PeerConfig,
        socket: Rc<UdpSocket>,
        ctrl: mpsc::UnboundedSender<Message>,
        fetches: mpsc::UnboundedSender<(u64, Fetched)>,
        http: reqwest::Client,
    ) -> Result<Peer, Error> {
        let local = socket.local_addr()?;
        let now = now_ms();
        let engine = Engine::new(
            EngineConfig {
                upload_kbps: cfg.upload_kbps,
                ..EngineConfig::default()
            },
            now,
        );
        Ok(Peer {
            cfg,
            engine,
            links: HashMap::new(),
            socket,
            local,
            ctrl,
            fetches,
            http,
            welcome: None,
            started_ms: now,
            last_tick: now,
            last_heartbeat: f64::NEG_INFINITY,
            heartbeat_bytes: 0,
            heartbeats_sent: 0,
            links_failed: 0,
            forgeries_reported: 0,
            wake_at: None,
            errors: Vec::new(),
            link_events: Vec::new(),
            dirty: BTreeSet::new(),
            udp_send_errors: 0,
            done: false,
        })
    }

    fn join(&mut self) {
        self.send_ctrl(&ClientMsg::Join {
            version: PROTOCOL_VERSION,
            channel: self.cfg.channel.clone(),
            upload_kbps: self.cfg.upload_kbps,
            region: self.cfg.region.clone(),
            network: None,
            companion: None,
            relay_token: None,
            resume: None,
            connectivity: self.cfg.connectivity,
            waypoint: self.cfg.waypoint_token.clone(),
        });
    }

    fn error(&mut self, msg: String) {
        tracing::warn!(peer = ?self.engine.peer_id().map(|p| p.0), "{msg}");
        self.errors.push(msg);
        if self.errors.len() > MAX_ERRORS {
            self.errors.remove(0);
        }
    }

    fn send_ctrl(&mut self, msg: &ClientMsg) {
        match serde_json::to_string(msg) {
            Ok(s) => {
                // A closed writer means the control socket is gone; the run loop ends then.
                let _ = self.ctrl.send(Message::text(s));
            }
            Err(e) => self.error(format!("encoding control message: {e}")),
        }
    }

    fn on_server_text(&mut self, text: &str) {
        let msg: ServerMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return self.error(format!("bad message from server: {e}")),
        };
        match msg {
            ServerMsg::Welcome {
                peer_id,
                heartbeat_ms,
                substreams,
                stream_kbps,
                packet_url,
                start_seq,
                live_seq,
                live_start_seq,
                upload_kbps,
                public_key,
                channel,
                fragment_ms,
                ..
            } => {
                if let Some(ms) = fragment_ms {
                    self.engine.set_fragment_hint(f64::from(ms));
                }
                if let Err(e) = self.take_stream_key(public_key.as_deref(), &channel) {
                    self.error(e);
                    self.shutdown();
                    return;
                }
                if let Some(granted) = upload_kbps {
                    self.engine.set_upload_kbps(granted);
                }
                self.welcome = Some(Welcome {
                    heartbeat_ms: f64::from(heartbeat_ms),
                    packet_url: format!("{}{}", self.cfg.server.trim_end_matches('/'), packet_url),
                    stream_kbps,
                });
                tracing::info!(peer = peer_id.0, start_seq, live_seq, "joined {channel}");
                self.feed(Input::Welcome {
                    peer_id,
                    substreams,
                    start_seq,
                    live_seq,
                    live_start_seq,
                });
            }
            ServerMsg::Instructions {
                substreams, tier, ..
            } => self.feed(Input::Instructions {
                plan: substreams,
                tier,
            }),
            ServerMsg::LiveEdge { seq } => self.feed(Input::LiveEdge { seq }),
            ServerMsg::Signal { from, signal } => {
                if !self.links.contains_key(&from) {
                    // The other side learned of the link first; answer its offer.
                    self.open_link(from, false);
                }
                let answer = match self.links.get_mut(&from) {
                    Some(link) => link.on_signal(signal),
                    None => return,
                };
                self.dirty.insert(from);
                match answer {
                    Ok(Some(signal)) => self.send_ctrl(&ClientMsg::Signal { to: from, signal }),
                    Ok(None) => {}
                    Err(e) => self.error(format!("signal from {}: {e}", from.0)),
                }
            }
            ServerMsg::Error { code, message } => {
                self.error(format!("server error {code:?}: {message}"))
            }
            ServerMsg::Recruit { channel, .. } => {
                // Relaying other channels (claims 19, 43) is the page's; not here yet.
                self.error(format!(
                    "recruit for {channel:?} ignored: no relay sessions"
                ))
            }
            // Cluster mode (issue 12): following redirects and resuming on another node is the
            // page's; a native peer joins a server that runs its channel's DCM.
            ServerMsg::Cluster { .. } => {}
            ServerMsg::Redirect { url, .. } => self.error(format!(
                "redirected to {url}: native peers do not follow redirects yet; point --server \
                 at the node that runs the channel"
            )),
        }
    }

    /// The stream's key from the Welcome, checked against the pinned one (if any); the same
    /// rules as the page's.
    fn take_stream_key(&mut self, offered: Option<&str>, channel: &str) -> Result<(), String> {
        let pinned = self.cfg.public_key.as_deref().map(str::trim);
        let key = match (offered, pinned) {
            (None, None) => return Ok(()),
            (None, Some(_)) => {
                return Err(format!(
                    "stream_unsigned: channel {channel} is not signed, but a public key is \
                     pinned; refusing to play it"
                ))
            }
            (Some(k), Some(p)) if !k.eq_ignore_ascii_case(p) => {
                return Err(format!(
                    "stream_key_mismatch: channel {channel} is signed with key {k}, not the \
                     pinned {p}; refusing to play it"
                ))
            }
            (Some(k), _) => k,
        };
        let key = protocol::manifest::StreamKey::from_hex(key)
            .map_err(|e| format!("stream_key_invalid: {e}"))?;
        self.engine.set_stream_key(key, channel);
        Ok(())
    }

    fn on_server_binary(&mut self, bytes: &[u8]) {
        // A signed manifest, or a packet (or parity frame) the origin pushes to a tree root.
        if bytes.first() == Some(&protocol::manifest::MAGIC) {
            self.feed(Input::Manifest { bytes });
        } else {
            self.feed(Input::Packet {
                from: From::OriginPush,
                bytes,
            });
        }
    }

    fn feed(&mut self, input: Input<'_>) {
        let actions = self.engine.handle(input, now_ms());
        self.run(actions);
        self.schedule_wake();
    }

    /// A send held back by the upload cap goes as soon as its tokens are there, not at the
    /// next tick (as the page's `wake_for_sends`).
    fn schedule_wake(&mut self) {
        if let Some(wait) = self.engine.next_send_in_ms() {
            let at = now_ms() + wait;
            if self.wake_at.is_none_or(|t| at < t) {
                self.wake_at = Some(at);
            }
        }
    }

    fn run(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, packet } => {
                    if let Some(l) = self.links.get_mut(&to) {
                        l.send(packet);
                        self.dirty.insert(to);
                    }
                }
                Action::Fetch { seq } => self.fetch(seq),
                // Verified by the engine (`EngineConfig::verify`); nothing plays it here.
                Action::Deliver { .. } => {}
                Action::ReportForgery { peer, seq, hash } => {
                    self.forgeries_reported += 1;
                    self.send_ctrl(&ClientMsg::Forged {
                        peer,
                        seq,
                        hash: protocol::manifest::hex(&hash),
                    });
                }
                Action::Connect { peer } => {
                    // The answering side opens its end now too, without offering, so that
                    // packets sent at once wait in the link's queue (as the page does).
                    let offerer = self.engine.peer_id().is_some_and(|me| me < peer);
                    if !self.links.contains_key(&peer) {
                        self.open_link(peer, offerer);
                    }
                }
                Action::Disconnect { peer } => {
                    self.links.remove(&peer);
                }
            }
        }
    }

    fn open_link(&mut self, peer: PeerId, offer: bool) {
        let mut link = match Link::new(peer, self.local, Instant::now(), now_ms()) {
            Ok(l) => l,
            Err(e) => return self.error(format!("link to {}: {e}", peer.0)),
        };
        if offer {
            match link.offer() {
                Ok(signal) => self.send_ctrl(&ClientMsg::Signal { to: peer, signal }),
                Err(e) => return self.error(format!("offer to {}: {e}", peer.0)),
            }
        }
        self.links.insert(peer, link);
        self.dirty.insert(peer);
    }

    fn fetch(&mut self, seq: u64) {
        let Some(w) = &self.welcome else { return };
        let url = format!("{}{seq}", w.packet_url);
        let http = self.http.clone();
        let tx = self.fetches.clone();
        tokio::task::spawn_local(async move {
            let res = fetch_packet(&http, &url).await;
            let _ = tx.send((seq, res));
        });
    }

    fn on_fetched(&mut self, seq: u64, res: Fetched) {
        match res {
            Fetched::Bytes(b) => self.feed(Input::Packet {
                from: From::OriginFetch,
                bytes: &b,
            }),
            Fetched::NotYet => self.feed(Input::FetchFailed { seq, gone: false }),
            Fetched::Gone => self.feed(Input::FetchFailed { seq, gone: true }),
            Fetched::Failed(e) => {
                self.error(e);
                self.feed(Input::FetchFailed { seq, gone: false });
            }
        }
    }

    fn on_datagram(&mut self, source: SocketAddr, bytes: &[u8]) {
        let now = Instant::now();
        let Some(peer) = self
            .links
            .iter()
            .find(|(_, l)| l.accepts(source, bytes, now))
            .map(|(p, _)| *p)
        else {
            return;
        };
        if let Some(l) = self.links.get_mut(&peer) {
            l.receive(source, bytes, now);
            self.dirty.insert(peer);
        }
    }

    /// Polls every link that was given an input, until none is left (a polled link can hand
    /// packets to the engine, whose forwards make other links dirty).
    fn poll_dirty(&mut self) {
        while let Some(peer) = self.dirty.pop_first() {
            self.poll_link(peer);
        }
    }

    /// Runs a link's outputs: datagrams out, packets into the engine, signals to the server.
    fn poll_link(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let mut events = std::mem::take(&mut self.link_events);
        let socket = &self.socket;
        let mut send_errors = 0;
        link.poll(
            now_ms(),
            |to, bytes| {
                if socket.try_send_to(bytes, to).is_err() {
                    send_errors += 1;
                }
            },
            &mut events,
        );
        self.udp_send_errors += send_errors;
        for ev in events.drain(..) {
            match ev {
                LinkEvent::Signal(signal) => {
                    self.send_ctrl(&ClientMsg::Signal { to: peer, signal })
                }
                LinkEvent::Packet(bytes) => self.feed(Input::Packet {
                    from: From::Peer(peer),
                    bytes: &bytes,
                }),
                LinkEvent::Closed => {
                    // The engine keeps the plan; missing packets come from the origin until the
                    // control center sends new instructions. A link that never opened is
                    // reported, so the control center pairs us with someone else.
                    if let Some(link) = self.links.remove(&peer) {
                        if link.opened_ms.is_none() {
                            self.link_failed(peer);
                        }
                    }
                    // A handover through this link (make-before-break) is over.
                    self.feed(Input::LinkClosed { peer });
                }
            }
        }
        self.link_events = events;
    }

    fn link_failed(&mut self, peer: PeerId) {
        self.links_failed += 1;
        self.send_ctrl(&ClientMsg::LinkFailed { peer });
    }

    /// The earliest moment something is due: a link's timer, the tick, or held-back sends.
    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut next_ms = self.last_tick + TICK_MS;
        if let Some(w) = self.wake_at {
            next_ms = next_ms.min(w);
        }
        let mut at = now + Duration::from_secs_f64(((next_ms - now_ms) / 1000.0).max(0.0));
        for l in self.links.values() {
            at = at.min(l.timeout());
        }
        at
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| l.timeout() <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(l) = self.links.get_mut(&peer) {
                l.handle_timeout(now);
                self.dirty.insert(peer);
            }
        }
        let t = now_ms();
        if self.wake_at.is_some_and(|w| w <= t) {
            self.wake_at = None;
            self.feed(Input::Tick);
        }
        if t - self.last_tick >= TICK_MS {
            self.last_tick = t;
            self.on_tick(t);
        }
    }

    /// The page's `on_tick`: engine poll, links that never opened, heartbeats.
    fn on_tick(&mut self, now: f64) {
        self.feed(Input::Tick);
        let stuck: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| l.opened_ms.is_none() && now - l.created_ms > LINK_OPEN_TIMEOUT_MS)
            .map(|(p, _)| *p)
            .collect();
        for peer in stuck {
            self.links.remove(&peer);
            self.link_failed(peer);
        }
        // Queues the SCTP send buffer held back (the buffered-amount-low event covers the
        // channel's own buffer, not the association's).
        for (p, l) in self.links.iter_mut() {
            if l.flush() {
                self.dirty.insert(*p);
            }
        }
        if let Some(w) = &self.welcome {
            let since = now - self.last_heartbeat;
            let early = since >= 150.0
                && self
                    .engine
                    .wants_early_heartbeat(since >= w.heartbeat_ms / 2.0);
            if early || since >= w.heartbeat_ms {
                self.last_heartbeat = now;
                if let Some(hb) = self.engine.heartbeat() {
                    let frame = protocol::heartbeat::binary::encode(&hb);
                    self.heartbeat_bytes += frame.len() as u64;
                    self.heartbeats_sent += 1;
                    let _ = self.ctrl.send(Message::binary(frame));
                }
            }
        }
    }

    /// Leaves the channel and closes every link.
    fn shutdown(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.send_ctrl(&ClientMsg::Leave);
        let _ = self.ctrl.send(Message::Close(None));
        self.links.clear();
    }
}

/// Runs one peer until `stop` turns true or the control connection ends, publishing its
/// statistics into `report` twice a second. Must run inside a `LocalSet`.
pub async fn run(
    cfg: PeerConfig,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
    report: Arc<Mutex<PeerReport>>,
) -> Result<(), Error> {
    let socket = Rc::new(UdpSocket::bind(SocketAddr::new(cfg.ice_ip, 0)).await?);
    let url = ws_url(&cfg.server, cfg.token.as_deref());
    // tungstenite zeroes its whole read buffer (128 KiB by default) before every read; with a
    // few hundred peers that memset was a tenth of their CPU. Packets pushed by the origin are
    // far larger than 8 KiB and are simply read in several chunks.
    let ws_config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    // Heartbeats and signals are small and latency matters: no Nagle.
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config), true).await?;
    let (mut sink, mut stream) = ws.split();
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::task::spawn_local(async move {
        while let Some(m) = ctrl_rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
    });
    let (fetch_tx, mut fetch_rx) = mpsc::unbounded_channel();
    let mut peer = Peer::new(cfg, socket.clone(), ctrl_tx, fetch_tx, http)?;
    peer.join();
    let mut buf = vec![0u8; 2048];
    let mut last_report = f64::NEG_INFINITY;
    let result = loop {
        let deadline = tokio::time::Instant::from_std(peer.next_deadline());
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => peer.on_server_text(t.as_str()),
                Some(Ok(Message::Binary(b))) => peer.on_server_binary(&b),
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    break Err(Error::ControlClosed(why));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(e.into()),
                None => break Err(Error::ControlClosed(String::new())),
            },
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => peer.on_datagram(from, &buf[..n]),
                Err(e) => tracing::debug!("udp receive: {e}"),
            },
            Some((seq, res)) = fetch_rx.recv() => peer.on_fetched(seq, res),
            _ = tokio::time::sleep_until(deadline) => peer.on_timer(),
            _ = stop.changed() => break Ok(()),
        }
        peer.poll_dirty();
        if peer.done {
            break Ok(());
        }
        let t = now_ms();
        if t - last_report >= REPORT_MS {
            last_report = t;
            if let Ok(mut r) = report.lock() {
                *r = peer.report();
            }
        }
    };
    if let Err(e) = &result {
        peer.error(e.to_string());
    }
    // The last statistics, with the links still counted.
    if let Ok(mut r) = report.lock() {
        *r = peer.report();
    }
    peer.shutdown();
    // Let the Leave go out (bounded: a dead server must not hold the peer).
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    result
}
