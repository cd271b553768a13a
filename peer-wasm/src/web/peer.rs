//! `P2pPeer`, the object the page creates: control WebSocket, links, player and the engine,
//! wired together. All JS callbacks hold a `Weak` to the shared state, so dropping the peer
//! (or calling `destroy`) ends everything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use protocol::report::{DownloadReport, PeerReport, RelayReport};
use protocol::{ClientMsg, Connectivity, PeerId, ServerMsg, PROTOCOL_VERSION};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{BinaryType, CloseEvent, HtmlVideoElement, MessageEvent, WebSocket};

use super::fetch::{fetch_bytes, Fetched};
use super::media::Media;
use super::nat;
use super::rtc::{Link, LinkEvent};
use super::{js_err, now_ms, perf_now};
use crate::engine::file::FileAssembler;
use crate::engine::{Action, Engine, EngineConfig, From, Input};

/// Options accepted by `new P2pPeer(options, video)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct Options {
    /// Control center base URL (http(s)://host:port); defaults to the page's origin.
    server: Option<String>,
    channel: String,
    upload_kbps: u32,
    /// Decode and play video (false: verify and relay bytes only).
    decode: bool,
    /// Passed to RTCPeerConnection as `iceServers`.
    ice_servers: Option<serde_json::Value>,
    /// Access token, sent as `?token=` on the control WebSocket (servers started with
    /// `--viewer-token` require it).
    token: Option<String>,
    /// Region to ask to be placed in (honoured only by servers allowing region hints).
    region: Option<String>,
    /// Declared access network (`dsl`, `cable`, `fiber`, `mobile`, `satellite`, `other`).
    network: Option<String>,
    /// The origin's ed25519 public key (64 hex digits) the site pins: the player refuses a
    /// stream signed with another key, or not signed at all.
    public_key: Option<String>,
    /// Set by the peer itself on the relay sessions it opens when recruited (not an option
    /// for pages).
    #[serde(skip)]
    relay_token: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            server: None,
            channel: "demo".into(),
            upload_kbps: 2000,
            decode: true,
            ice_servers: None,
            token: None,
            region: None,
            network: None,
            public_key: None,
            relay_token: None,
        }
    }
}

/// Relay sessions a page runs at most at once (a misbehaving server cannot make it open more).
const MAX_RELAY_SESSIONS: usize = 2;

/// The engine's periodic poll (gap fetches, heartbeats, link timeouts), ms.
const TICK_MS: i32 = 50;

/// Locator requests after which a peer whose server failed stops looking for another (16 in
/// the first 4 s, then one a second: about two minutes).
const GIVE_UP_AFTER: u32 = 120;

/// A control WebSocket that has not opened this long after it was created is closed, and the
/// peer looks again as after a refused connection (page ms). A server that black-holes packets
/// (a dead host, a firewall dropping them) would otherwise hold the peer for the browser's own
/// connect timeout, which can be minutes. An opening handshake (TCP, TLS, HTTP upgrade) takes a
/// few round trips: well under a second, a few over a poor mobile link.
const WS_CONNECT_TIMEOUT_MS: f64 = 5_000.0;

struct Welcome {
    heartbeat_ms: f64,
    packet_url: String,
    /// `packet_url` without the server's base URL (it moves with the peer in a cluster).
    packet_path: String,
    stream_kbps: u32,
}

/// Cluster mode (issue 12): what the peer needs to find its DCM again when its server fails.
struct ClusterInfo {
    resume_token: String,
    /// The cluster's servers (base URLs), where the locator is asked.
    nodes: Vec<String>,
}

/// Reconnection after the control connection dropped (cluster mode) or a redirect.
#[derive(Default)]
struct Reconnect {
    /// Set by a redirect: connect there next, without asking the locator.
    redirect_to: Option<String>,
    /// The server the page first connected to, when a redirect took it elsewhere before it
    /// knew the cluster: it goes back there if the server it was sent to fails.
    entry: Option<String>,
    /// The server whose connection dropped (not taken back from the locator while it still
    /// names it: its lease has not expired yet).
    failed: Option<String>,
    attempt: u32,
    /// Bumped by each new reconnection loop, so a stale one stops.
    generation: u64,
    /// Times the control connection was re-established.
    resumed: u64,
    /// Wall clock (ms since the epoch) of the last drop and of the last resume.
    lost_at_ms: Option<f64>,
    resumed_at_ms: Option<f64>,
}

/// A download session's own state (claim 1: the page receives a file beside the live channel).
/// The session itself is an ordinary [`Inner`]: its own WebSocket, engine and data channels.
struct Download {
    /// The page's live session, whose upload this download shares.
    live: Weak<RefCell<Inner>>,
    companion: PeerId,
    assembler: Option<FileAssembler>,
    /// Share of the page's upload the server granted the download.
    granted_kbps: Option<u32>,
    started_ms: f64,
    done_ms: Option<f64>,
    /// The verified file, once complete.
    bytes: Option<Vec<u8>>,
    digest: Option<String>,
}

struct Inner {
    me: Weak<RefCell<Inner>>,
    opts: Options,
    base_url: String,
    engine: Engine,
    ws: Option<WebSocket>,
    ws_closures: Vec<Closure<dyn FnMut(JsValue)>>,
    /// When the current control WebSocket was created (page ms; see [`WS_CONNECT_TIMEOUT_MS`]).
    ws_created_ms: f64,
    links: HashMap<PeerId, Link>,
    video: Option<HtmlVideoElement>,
    media: Option<Media>,
    welcome: Option<Welcome>,
    last_heartbeat: f64,
    heartbeat_bytes: u64,
    heartbeats_sent: u64,
    /// Data channels that never opened, reported to the control center.
    links_failed: u64,
    /// Forgery reports sent to the control center.
    forgeries_reported: u64,
    /// When a wake-up for sends held back by the upload cap is scheduled (page ms).
    wake_at: Option<f64>,
    tick: Option<(i32, Closure<dyn FnMut()>)>,
    errors: Vec<String>,
    destroyed: bool,
    ice_servers: JsValue,
    /// `Some` on a download session.
    download: Option<Download>,
    /// Sessions for other channels this peer was recruited to relay (claims 19, 43).
    relays: Vec<(String, Rc<RefCell<Inner>>)>,
    /// Set in cluster mode.
    cluster: Option<ClusterInfo>,
    reconnect: Reconnect,
    /// The NAT class, once the probe found it (issue 15; see `web::nat`). Sessions this page
    /// opens later (downloads, relays) start with it.
    connectivity: Option<Connectivity>,
    nat_mappings: Vec<String>,
    /// A `Join` went out on the current control connection (a class found later is then sent
    /// as its own message).
    join_sent: bool,
    /// Whether an open link's selected candidate pair uses a TURN relay.
    turn_used: bool,
    /// When links' `getStats` were last looked at for a relay (page clock, ms).
    stats_polled_ms: f64,
}

#[wasm_bindgen]
pub struct P2pPeer {
    inner: Rc<RefCell<Inner>>,
    /// The download session running beside the live one, if any (kept after it completes, for
    /// its statistics and the file).
    download: RefCell<Option<Rc<RefCell<Inner>>>>,
}

#[wasm_bindgen]
impl P2pPeer {
    /// `options`: `{ server?, channel, upload_kbps, decode, ice_servers?, token?, region?,
    /// network? }`; `video`: the element to
    /// play into (ignored when `decode` is false).
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue, video: Option<HtmlVideoElement>) -> Result<P2pPeer, JsError> {
        let opts: Options = if options.is_undefined() || options.is_null() {
            Options::default()
        } else {
            serde_wasm_bindgen::from_value(options)
                .map_err(|e| JsError::new(&format!("invalid options: {e}")))?
        };
        let base_url = match &opts.server {
            Some(s) => s.trim_end_matches('/').to_string(),
            None => web_sys::window()
                .and_then(|w| w.location().origin().ok())
                .ok_or_else(|| JsError::new("no server given and no page origin"))?,
        };
        let video = if opts.decode { video } else { None };
        Ok(P2pPeer {
            inner: Inner::create(opts, base_url, video, None),
            download: RefCell::new(None),
        })
    }

    /// Starts downloading the file of file channel `channel` beside the live channel, through
    /// the swarm (a second session: its own WebSocket, engine and data channels). The server
    /// gives it the part of `upload_kbps` the live channel does not need. Progress appears in
    /// `stats().download`; once `done`, `downloadBlob()` returns the file.
    pub fn download(&self, channel: String) -> Result<(), JsError> {
        if let Some(d) = self.download.borrow().as_ref() {
            let running = d.try_borrow().map(|d| !d.destroyed).unwrap_or(true);
            if running {
                return Err(JsError::new("a download is already running"));
            }
        }
        let (opts, base_url, companion) = {
            let live = self.inner.borrow();
            let companion = live
                .engine
                .peer_id()
                .ok_or_else(|| JsError::new("the live channel has not started yet"))?;
            let opts = Options {
                channel,
                decode: false,
                ..live.opts.clone()
            };
            (opts, live.base_url.clone(), companion)
        };
        let dl = Inner::create(
            opts,
            base_url,
            None,
            Some(Download {
                live: Rc::downgrade(&self.inner),
                companion,
                assembler: None,
                granted_kbps: None,
                started_ms: perf_now(),
                done_ms: None,
                bytes: None,
                digest: None,
            }),
        );
        {
            let mut d = dl.borrow_mut();
            let live = self.inner.borrow();
            d.connectivity = live.connectivity;
            d.ice_servers = live.ice_servers.clone();
            drop(live);
            d.connect().map_err(|e| JsError::new(&e))?;
            d.start_tick().map_err(|e| JsError::new(&e))?;
        }
        if let Some(old) = self.download.replace(Some(dl)) {
            if let Ok(mut o) = old.try_borrow_mut() {
                o.shutdown();
            }
        }
        Ok(())
    }

    /// The downloaded file as a `Blob` (`application/octet-stream`), once complete and
    /// verified against the server's digest; `undefined` before.
    #[wasm_bindgen(js_name = downloadBlob)]
    pub fn download_blob(&self) -> Result<Option<web_sys::Blob>, JsError> {
        let slot = self.download.borrow();
        let Some(dl) = slot.as_ref() else {
            return Ok(None);
        };
        let dl = dl.borrow();
        let Some(bytes) = dl.download.as_ref().and_then(|d| d.bytes.as_ref()) else {
            return Ok(None);
        };
        let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(bytes.as_slice()));
        let opts = web_sys::BlobPropertyBag::new();
        opts.set_type("application/octet-stream");
        web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &opts)
            .map(Some)
            .map_err(|e| JsError::new(&js_err("Blob", &e)))
    }

    /// Stops a running download (its session leaves; the live channel gets its upload back).
    #[wasm_bindgen(js_name = cancelDownload)]
    pub fn cancel_download(&self) {
        if let Some(d) = self.download.borrow().as_ref() {
            if let Ok(mut d) = d.try_borrow_mut() {
                d.shutdown();
            }
        }
    }

    /// Connects to the control center and starts receiving.
    pub fn start(&self) -> Result<(), JsError> {
        let mut inner = self.inner.borrow_mut();
        inner.connect().map_err(|e| JsError::new(&e))?;
        inner.start_tick().map_err(|e| JsError::new(&e))?;
        // Beside the join, never before it: the class follows when it is known.
        inner.start_nat_probe();
        Ok(())
    }

    /// A snapshot of the peer's statistics (see `protocol::report::PeerReport`).
    pub fn stats(&self) -> JsValue {
        let mut report = self.inner.borrow_mut().report();
        report.download = self
            .download
            .borrow()
            .as_ref()
            .and_then(|d| d.try_borrow().ok().and_then(|d| d.download_report()));
        serde_json::to_string(&report)
            .ok()
            .and_then(|s| js_sys::JSON::parse(&s).ok())
            .unwrap_or(JsValue::NULL)
    }

    /// Changes the upload cap (kbit/s) at run time.
    #[wasm_bindgen(js_name = setUploadKbps)]
    pub fn set_upload_kbps(&self, kbps: u32) {
        self.inner.borrow_mut().engine.set_upload_kbps(kbps);
    }

    /// Closes every connection and stops all timers; the object is inert afterwards.
    pub fn destroy(&self) {
        self.inner.borrow_mut().shutdown();
        self.cancel_download();
    }
}

impl Drop for P2pPeer {
    fn drop(&mut self) {
        if let Ok(mut i) = self.inner.try_borrow_mut() {
            i.shutdown();
        }
        self.cancel_download();
    }
}

/// How often links' statistics are searched for a relayed pair while none has been seen, ms.
const TURN_POLL_MS: f64 = 2000.0;

/// Whether an `RTCStatsReport` shows a selected (nominated, succeeded) candidate pair with a
/// `relay` candidate on either side.
fn uses_relay(report: &JsValue) -> bool {
    let get = |o: &JsValue, k: &str| js_sys::Reflect::get(o, &JsValue::from_str(k)).ok();
    let text = |o: &JsValue, k: &str| get(o, k).and_then(|v| v.as_string());
    let Ok(Some(entries)) = js_sys::try_iter(report) else {
        return false;
    };
    let mut relay_ids = std::collections::HashSet::new();
    let mut selected = Vec::new();
    for entry in entries.flatten() {
        let Some(stat) = get(&entry, "1") else {
            continue;
        };
        match text(&stat, "type").as_deref() {
            Some("local-candidate" | "remote-candidate")
                if text(&stat, "candidateType").as_deref() == Some("relay") =>
            {
                relay_ids.extend(text(&stat, "id"));
            }
            Some("candidate-pair") => {
                let nominated = get(&stat, "nominated").and_then(|v| v.as_bool()) == Some(true);
                if nominated && text(&stat, "state").as_deref() == Some("succeeded") {
                    selected.extend(text(&stat, "localCandidateId"));
                    selected.extend(text(&stat, "remoteCandidateId"));
                }
            }
            _ => {}
        }
    }
    selected.iter().any(|id| relay_ids.contains(id))
}

/// The tier's wire name (`preferred`, `middle`, `bottom`), as the server spells it.
/// Runs `f` on the shared state if it is still alive and not borrowed (events can only
/// arrive from the JS event loop, so a failed borrow means a bug, not a race; we skip).
fn with(me: &Weak<RefCell<Inner>>, f: impl FnOnce(&mut Inner)) {
    if let Some(rc) = me.upgrade() {
        if let Ok(mut inner) = rc.try_borrow_mut() {
            if !inner.destroyed {
                f(&mut inner);
            }
        }
    }
}

impl Inner {
    fn create(
        opts: Options,
        base_url: String,
        video: Option<HtmlVideoElement>,
        download: Option<Download>,
    ) -> Rc<RefCell<Inner>> {
        let ice_servers = match &opts.ice_servers {
            // As plain objects: `to_value` would make JSON objects `Map`s, which
            // RTCPeerConnection refuses ("Malformed RTCIceServer").
            Some(v) => {
                serde::Serialize::serialize(v, &serde_wasm_bindgen::Serializer::json_compatible())
                    .unwrap_or(JsValue::UNDEFINED)
            }
            None => JsValue::UNDEFINED,
        };
        let engine = Engine::new(
            EngineConfig {
                upload_kbps: opts.upload_kbps,
                ..EngineConfig::default()
            },
            now_ms(),
        );
        Rc::new_cyclic(|me| {
            RefCell::new(Inner {
                me: me.clone(),
                video,
                opts,
                base_url,
                engine,
                ws: None,
                ws_closures: Vec::new(),
                ws_created_ms: 0.0,
                links: HashMap::new(),
                media: None,
                welcome: None,
                last_heartbeat: 0.0,
                heartbeat_bytes: 0,
                heartbeats_sent: 0,
                links_failed: 0,
                forgeries_reported: 0,
                wake_at: None,
                tick: None,
                errors: Vec::new(),
                destroyed: false,
                ice_servers,
                download,
                relays: Vec::new(),
                cluster: None,
                reconnect: Reconnect::default(),
                connectivity: None,
                nat_mappings: Vec::new(),
                join_sent: false,
                turn_used: false,
                stats_polled_ms: 0.0,
            })
        })
    }

    /// Sets the live session's upload cap (from a download session; the live one is not
    /// borrowed then: both run on the JS event loop, one event at a time).
    fn set_live_upload(&self, kbps: u32) {
        if let Some(live) = self.download.as_ref().and_then(|d| d.live.upgrade()) {
            if let Ok(mut l) = live.try_borrow_mut() {
                l.engine.set_upload_kbps(kbps);
            }
        }
    }

    fn ws_url(&self) -> String {
        let b = &self.base_url;
        let rest = b
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| b.strip_prefix("http://").map(|r| format!("ws://{r}")))
            .unwrap_or_else(|| b.clone());
        match &self.opts.token {
            Some(t) => format!("{rest}/ws?token={}", js_sys::encode_uri_component(t)),
            None => format!("{rest}/ws"),
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let ws = WebSocket::new(&self.ws_url()).map_err(|e| js_err("WebSocket", &e))?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let me = self.me.clone();
        let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_| {
            with(&me, |i| {
                let join = ClientMsg::Join {
                    version: PROTOCOL_VERSION,
                    channel: i.opts.channel.clone(),
                    upload_kbps: i.opts.upload_kbps,
                    region: i.opts.region.clone(),
                    network: i.opts.network.clone(),
                    companion: i.download.as_ref().map(|d| d.companion),
                    relay_token: i.opts.relay_token.clone(),
                    resume: i.resume_claim(),
                    connectivity: i.connectivity,
                    waypoint: None,
                };
                i.send_ctrl(&join);
                i.join_sent = true;
            })
        });
        let me = self.me.clone();
        let on_message = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
            let Ok(ev) = ev.dyn_into::<MessageEvent>() else {
                return;
            };
            let data = ev.data();
            with(&me, |i| {
                if let Some(text) = data.as_string() {
                    i.on_server_text(&text);
                } else if data.is_instance_of::<js_sys::ArrayBuffer>() {
                    // A packet or, for coded roots the origin feeds, a parity frame (the engine
                    // tells them apart by the first byte), or a signed manifest.
                    let bytes = js_sys::Uint8Array::new(&data).to_vec();
                    if bytes.first() == Some(&protocol::manifest::MAGIC) {
                        i.feed(Input::Manifest { bytes: &bytes });
                    } else {
                        i.feed(Input::Packet {
                            from: From::OriginPush,
                            bytes: &bytes,
                        });
                    }
                }
            })
        });
        let me = self.me.clone();
        let on_close = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
            let reason = ev
                .dyn_into::<CloseEvent>()
                .map(|c| format!("control connection closed ({}): {}", c.code(), c.reason()))
                .unwrap_or_else(|_| "control connection closed".into());
            with(&me, |i| i.on_ws_closed(reason));
        });
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        self.ws_closures = vec![on_open, on_message, on_close];
        self.ws = Some(ws);
        self.ws_created_ms = now_ms();
        Ok(())
    }

    /// A control WebSocket still connecting after [`WS_CONNECT_TIMEOUT_MS`] is given up: it is
    /// closed (its handlers first, so that its close event does not come back) and the peer
    /// goes on as after a refused connection. From the tick, never from the socket's handlers.
    fn check_connect_timeout(&mut self, now: f64) {
        let Some(ws) = &self.ws else { return };
        if ws.ready_state() != WebSocket::CONNECTING
            || now - self.ws_created_ms < WS_CONNECT_TIMEOUT_MS
        {
            return;
        }
        ws.set_onopen(None);
        ws.set_onmessage(None);
        ws.set_onclose(None);
        let _ = ws.close();
        let reason = format!(
            "control connection to {} did not open within {} s",
            self.base_url,
            WS_CONNECT_TIMEOUT_MS / 1000.0
        );
        self.on_ws_closed(reason);
    }

    /// Finds the page's NAT class (see `web::nat`) and tells the control center. Links made
    /// once the server's STUN URLs are known also use the first one, beside the site's
    /// `ice_servers` (server-reflexive candidates are what lets peers behind NATs connect).
    fn start_nat_probe(&self) {
        let me = self.me.clone();
        let base = self.base_url.clone();
        let site = self.ice_servers.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let view = match nat::server_view(&base).await {
                Ok(v) => v,
                Err(e) => return with(&me, |i| i.error(format!("NAT probe: {e}"))),
            };
            let Some(first) = view.stun.first() else {
                return;
            };
            let links = nat::ice_servers_with(std::slice::from_ref(first), &site);
            with(&me, |i| i.set_ice_servers(links));
            let servers = nat::ice_servers_with(&view.stun, &site);
            match nat::probe(&servers, view.observed.as_deref()).await {
                Ok(found) => with(&me, |i| i.on_classified(found)),
                Err(e) => with(&me, |i| i.error(format!("NAT probe: {e}"))),
            }
        });
    }

    fn on_classified(&mut self, found: crate::engine::nat::Classified) {
        let c = found.connectivity;
        web_sys::console::log_1(&JsValue::from_str(&format!(
            "NAT class {:?}, TURN {}, mappings {:?}",
            c.class, c.turn, found.mappings
        )));
        self.nat_mappings = found.mappings;
        self.set_connectivity(c);
    }

    /// Takes the page's class (and tells the control center if this session has joined
    /// already), with the relay sessions it runs.
    fn set_connectivity(&mut self, c: Connectivity) {
        self.connectivity = Some(c);
        if self.join_sent {
            self.send_ctrl(&ClientMsg::Connectivity(c));
        }
        for (_, r) in &self.relays {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.set_connectivity(c);
            }
        }
    }

    /// The `iceServers` of links made from now on, this session's and its relay sessions'.
    fn set_ice_servers(&mut self, servers: JsValue) {
        for (_, r) in &self.relays {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.set_ice_servers(servers.clone());
            }
        }
        self.ice_servers = servers;
    }

    /// Looks at each open link's selected candidate pair: a relay candidate on either side
    /// means the link goes through TURN.
    fn poll_turn_used(&self) {
        let pcs: Vec<web_sys::RtcPeerConnection> = self
            .links
            .values()
            .filter(|l| l.is_open())
            .map(|l| l.pc().clone())
            .collect();
        if pcs.is_empty() {
            return;
        }
        let me = self.me.clone();
        wasm_bindgen_futures::spawn_local(async move {
            for pc in pcs {
                let Ok(report) = wasm_bindgen_futures::JsFuture::from(pc.get_stats()).await else {
                    continue;
                };
                if uses_relay(&report) {
                    with(&me, |i| i.turn_used = true);
                    return;
                }
            }
        });
    }

    fn start_tick(&mut self) -> Result<(), String> {
        let me = self.me.clone();
        let cb = Closure::<dyn FnMut()>::new(move || with(&me, |i| i.on_tick()));
        let window = web_sys::window().ok_or("no window")?;
        let id = window
            .set_interval_with_callback_and_timeout_and_arguments_0(
                cb.as_ref().unchecked_ref(),
                TICK_MS,
            )
            .map_err(|e| js_err("setInterval", &e))?;
        self.tick = Some((id, cb));
        Ok(())
    }

    fn error(&mut self, msg: String) {
        web_sys::console::warn_1(&JsValue::from_str(&msg));
        self.errors.push(msg);
        if self.errors.len() > 50 {
            self.errors.remove(0);
        }
    }

    fn send_ctrl(&mut self, msg: &ClientMsg) {
        let Some(ws) = &self.ws else { return };
        if ws.ready_state() != WebSocket::OPEN {
            return;
        }
        match serde_json::to_string(msg) {
            Ok(s) => {
                if let Err(e) = ws.send_with_str(&s) {
                    let m = js_err("websocket send", &e);
                    self.error(m);
                }
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
                mime,
                init_url,
                packet_url,
                start_seq,
                live_seq,
                live_start_seq,
                file,
                upload_kbps,
                public_key,
                channel,
                fragment_ms,
                ..
            } => {
                if let Some(w) = self.welcome.as_mut() {
                    // Back after a failover or a redirect: the stream, the player and the links
                    // go on as they were; only the server changed.
                    if self.engine.peer_id() == Some(peer_id) {
                        w.packet_url = format!("{}{}", self.base_url, w.packet_path);
                        self.reconnect.attempt = 0;
                        self.reconnect.failed = None;
                        self.reconnect.resumed += 1;
                        self.reconnect.resumed_at_ms = Some(js_sys::Date::now());
                        self.feed(Input::Control { up: true });
                        // Our links, at once: the new DCM rebuilds the trees from them.
                        self.last_heartbeat = 0.0;
                        return;
                    }
                    // A new id: the server did not take this peer back (its resume token was
                    // refused). It starts over as a new peer: new links, a new player.
                    web_sys::console::warn_1(&JsValue::from_str(&format!(
                        "rejoined as a new peer ({peer_id}): the server did not take the resume"
                    )));
                    self.start_over();
                }
                self.reconnect.attempt = 0;
                if let Some(ms) = fragment_ms {
                    self.engine.set_fragment_hint(f64::from(ms));
                }
                if let Err(e) = self.take_stream_key(public_key.as_deref(), &channel) {
                    // Playing a stream the site did not vouch for is worse than not playing.
                    self.error(e);
                    self.shutdown();
                    return;
                }
                if let Some(granted) = upload_kbps {
                    // The live session keeps the rest of the page's upload.
                    self.engine.set_upload_kbps(granted);
                    self.set_live_upload(self.opts.upload_kbps.saturating_sub(granted));
                }
                if let Some(d) = self.download.as_mut() {
                    d.granted_kbps = upload_kbps;
                    match file.map(FileAssembler::new) {
                        Some(Ok(a)) => d.assembler = Some(a),
                        Some(Err(e)) => self.error(e.to_string()),
                        None => self.error(format!(
                            "channel {} is not a file channel: nothing to download",
                            self.opts.channel
                        )),
                    }
                }
                self.welcome = Some(Welcome {
                    heartbeat_ms: f64::from(heartbeat_ms),
                    packet_url: format!("{}{}", self.base_url, packet_url),
                    packet_path: packet_url,
                    stream_kbps,
                });
                if let Some(video) = self.video.clone() {
                    let me = self.me.clone();
                    let pump = Rc::new(move || {
                        with(&me, |i| {
                            if let Some(m) = i.media.as_mut() {
                                m.pump();
                            }
                        })
                    });
                    match Media::new(video, mime, pump) {
                        Ok(mut m) => {
                            m.set_playout(self.engine.playout());
                            self.media = Some(m);
                        }
                        Err(e) => self.error(e),
                    }
                    let url = format!("{}{}", self.base_url, init_url);
                    let me = self.me.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let res = fetch_bytes(&url).await;
                        with(&me, |i| match res {
                            Fetched::Bytes(b) => {
                                if let Some(m) = i.media.as_mut() {
                                    m.set_init(b);
                                }
                            }
                            _ => i.error(format!("could not load init segment from {url}")),
                        });
                    });
                }
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
                if let Some(link) = self.links.get_mut(&from) {
                    link.on_signal(signal);
                }
            }
            ServerMsg::Error { code, message } => {
                if code == protocol::ErrorCode::BadResume {
                    // The token expired (this peer was cut off longer than the cluster's token
                    // lifetime) or was not taken: the server closes, and the next connection
                    // joins as a new peer (see the Welcome).
                    if let Some(c) = self.cluster.as_mut() {
                        c.resume_token.clear();
                    }
                }
                self.error(format!("server error {code:?}: {message}"))
            }
            ServerMsg::Recruit {
                channel,
                relay_token,
                upload_kbps,
            } => self.start_relay(channel, relay_token, upload_kbps),
            ServerMsg::Cluster {
                resume_token,
                nodes,
                ..
            } => {
                self.cluster = Some(ClusterInfo {
                    resume_token,
                    nodes: nodes
                        .into_iter()
                        .map(|n| n.trim_end_matches('/').to_string())
                        .collect(),
                })
            }
            // The connection closes next; `on_ws_closed` connects there.
            ServerMsg::Redirect { url, .. } => {
                if self.reconnect.entry.is_none() {
                    self.reconnect.entry = Some(self.base_url.clone());
                }
                // Redirects count as attempts: two nodes that disagree cannot bounce the peer
                // between them forever.
                self.reconnect.attempt += 1;
                self.reconnect.redirect_to = Some(url.trim_end_matches('/').to_string())
            }
        }
    }

    /// Drops what belonged to the peer's old id (its links, its engine, its player) before the
    /// Welcome of a new id is taken as a first one. The upload cap carries over.
    fn start_over(&mut self) {
        self.links.clear();
        self.media = None;
        self.welcome = None;
        self.engine = Engine::new(
            EngineConfig {
                upload_kbps: self.engine.upload_kbps(),
                ..EngineConfig::default()
            },
            now_ms(),
        );
        self.last_heartbeat = 0.0;
        self.reconnect.failed = None;
        if let Some(d) = self.download.as_mut() {
            d.assembler = None;
        }
    }

    /// The claim a reconnecting peer presents: its id and the cluster's token for it.
    fn resume_claim(&self) -> Option<protocol::Resume> {
        let c = self
            .cluster
            .as_ref()
            .filter(|c| !c.resume_token.is_empty())?;
        Some(protocol::Resume {
            peer: self.engine.peer_id()?,
            token: c.resume_token.clone(),
        })
    }

    /// The control connection closed. A lone server's peer reports it; in a cluster (or after a
    /// redirect) the peer finds its DCM's server and reconnects, while its data channels and
    /// player go on (fallback fetches go to another node meanwhile: every node cuts the same
    /// packets).
    fn on_ws_closed(&mut self, reason: String) {
        self.ws = None;
        self.join_sent = false;
        if self.destroyed {
            return;
        }
        // No origin push until a server takes this peer back: the trees it roots are fed by
        // fetching, at once. Not on a redirect, a planned move: the new owner resends what its
        // origin cut meanwhile (`coordinator/src/dcm/repair.rs`), so gaps wait as usual; if
        // that server does not answer, this runs again without the redirect.
        if self.reconnect.redirect_to.is_none() {
            self.feed(Input::Control { up: false });
        }
        if self.reconnect.attempt >= GIVE_UP_AFTER {
            self.error(format!("{reason}; gave up reconnecting"));
            return;
        }
        if let Some(url) = self.reconnect.redirect_to.take() {
            // Not from inside this socket's own close handler, which `connect` replaces.
            let me = self.me.clone();
            wasm_bindgen_futures::spawn_local(async move {
                with(&me, |i| i.reconnect_to(url));
            });
            return;
        }
        let Some(c) = &self.cluster else {
            // Sent elsewhere before it knew the cluster, and that server failed: back to the
            // server it came from (which redirects it to the DCM's owner of the moment).
            if let Some(entry) = self.reconnect.entry.clone() {
                self.reconnect.attempt += 1;
                let delay = 250.0 * (0.5 + js_sys::Math::random());
                let me = self.me.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    crate::web::rtc::sleep_ms(delay as i32).await;
                    with(&me, |i| {
                        if i.ws.is_none() {
                            i.reconnect_to(entry)
                        }
                    });
                });
                return;
            }
            self.error(reason);
            return;
        };
        web_sys::console::warn_1(&JsValue::from_str(&format!(
            "{reason}; finding the channel's server again"
        )));
        let failed = self.base_url.clone();
        if self.reconnect.failed.is_none() {
            // The first drop of this outage (not a failed attempt to reconnect).
            self.reconnect.lost_at_ms = Some(js_sys::Date::now());
        }
        // Fetch from another node until we know where to go.
        if let Some(other) = c.nodes.iter().find(|n| **n != failed).cloned() {
            if let Some(w) = self.welcome.as_mut() {
                w.packet_url = format!("{other}{}", w.packet_path);
            }
        }
        self.reconnect.failed = Some(failed);
        self.reconnect.generation += 1;
        self.locate_later(self.reconnect.generation);
    }

    /// Asks the cluster's locator where the channel's DCM runs now, after a jittered backoff,
    /// and reconnects there; tries again until it answers a live server.
    fn locate_later(&mut self, generation: u64) {
        let Some(c) = &self.cluster else { return };
        let attempt = self.reconnect.attempt;
        if attempt >= GIVE_UP_AFTER {
            // About two minutes: no node of the cluster answers for the channel.
            self.error(format!(
                "control connection closed: no server of the cluster took channel {} back",
                self.opts.channel
            ));
            return;
        }
        self.reconnect.attempt += 1;
        // Every 250 ms ±50 % for the first 4 s (a failover takes the lease TTL, 3 s by
        // default), then every second: a failed server's peers do not all come at once, and
        // each answer also brings the live edge (see below), which keeps the fallback fetches
        // within about a second of the live edge while no control connection tells it.
        let base = if attempt < 16 { 250.0 } else { 1000.0 };
        let delay = base * (0.5 + js_sys::Math::random());
        // Other nodes first, in turn; the failed one too, last (it may have been a blip).
        let failed = self.reconnect.failed.clone().unwrap_or_default();
        let mut nodes: Vec<String> = c.nodes.iter().filter(|n| **n != failed).cloned().collect();
        nodes.push(failed.clone());
        let node = nodes[attempt as usize % nodes.len()].clone();
        let url = format!(
            "{node}/api/locate?channel={}",
            String::from(js_sys::encode_uri_component(&self.opts.channel))
        );
        let me = self.me.clone();
        wasm_bindgen_futures::spawn_local(async move {
            crate::web::rtc::sleep_ms(delay as i32).await;
            let answer = match fetch_bytes(&url).await {
                Fetched::Bytes(b) => serde_json::from_slice::<serde_json::Value>(&b).ok(),
                _ => None,
            };
            let found = answer
                .as_ref()
                .and_then(|v| v.get("url")?.as_str().map(String::from));
            let live_seq = answer.as_ref().and_then(|v| v.get("live_seq")?.as_u64());
            with(&me, |i| {
                if i.reconnect.generation != generation || i.ws.is_some() {
                    return;
                }
                // Without a control connection no live-edge notice comes: the locator's tells
                // the engine which packets exist, so it fetches what its parents fail to bring.
                if let Some(seq) = live_seq {
                    i.feed(Input::LiveEdge { seq });
                }
                match found {
                    // A lone server answers "" for itself.
                    Some(u) if u.is_empty() => i.reconnect_to(node),
                    // The locator still names the failed server until its lease expires.
                    Some(u) if u.trim_end_matches('/') != failed || i.reconnect.attempt > 6 => {
                        i.reconnect_to(u.trim_end_matches('/').to_string())
                    }
                    _ => i.locate_later(generation),
                }
            });
        });
    }

    fn reconnect_to(&mut self, url: String) {
        self.base_url = url;
        self.ws_closures.clear();
        if let Err(e) = self.connect() {
            self.error(e);
        }
    }

    /// The stream's key from the Welcome, checked against the key the site pins (if any).
    fn take_stream_key(&mut self, offered: Option<&str>, channel: &str) -> Result<(), String> {
        let pinned = self.opts.public_key.as_deref().map(str::trim);
        let key = match (offered, pinned) {
            (None, None) => return Ok(()),
            (None, Some(_)) => {
                return Err(format!(
                    "stream_unsigned: channel {channel} is not signed, but the player pins a \
                     public key; refusing to play it"
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

    fn feed(&mut self, input: Input<'_>) {
        let actions = self.engine.handle(input, now_ms());
        self.run(actions);
        self.finish_download();
        self.wake_for_sends();
    }

    /// A send held back by the upload cap goes as soon as its tokens are there, not at the next
    /// 50 ms tick: each hop of a tree would otherwise add up to a tick to its packets (measured:
    /// latency p95 +100 ms in a 12-viewer swarm once nothing else happened to poll the engine
    /// right after a fragment arrived).
    fn wake_for_sends(&mut self) {
        let Some(wait) = self.engine.next_send_in_ms() else {
            return;
        };
        if self.destroyed || wait >= TICK_MS as f64 {
            return;
        }
        let now = now_ms();
        let at = now + wait;
        // One already scheduled, soon enough (a wake-up that could not run, its peer busy,
        // is stale after a tick and no longer counts).
        if self
            .wake_at
            .is_some_and(|t| t <= at + 1.0 && t >= now - f64::from(TICK_MS))
        {
            return;
        }
        self.wake_at = Some(at);
        let me = self.me.clone();
        wasm_bindgen_futures::spawn_local(async move {
            crate::web::rtc::sleep_ms(wait.ceil() as i32).await;
            with(&me, |i| {
                i.wake_at = None;
                if !i.destroyed {
                    i.feed(Input::Tick);
                }
            });
        });
    }

    /// A download session whose file is complete checks it, keeps it and leaves: the swarm's
    /// other downloaders are re-homed by the server, and the live channel gets the page's
    /// whole upload back.
    fn finish_download(&mut self) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        let Some(a) = d.assembler.as_ref() else {
            return;
        };
        if d.done_ms.is_some() || !a.is_complete() {
            return;
        }
        d.done_ms = Some(perf_now());
        let result = a.finish();
        match result {
            Ok(bytes) => {
                d.digest = Some(a.info().digest.clone());
                d.bytes = Some(bytes);
            }
            Err(e) => {
                d.digest = None;
                self.error(e.to_string());
            }
        }
        self.shutdown();
    }

    fn download_report(&self) -> Option<DownloadReport> {
        let d = self.download.as_ref()?;
        let c = &self.engine.counters;
        let info = d.assembler.as_ref().map(FileAssembler::info);
        Some(DownloadReport {
            channel: self.opts.channel.clone(),
            peer_id: self.engine.peer_id(),
            name: info.map(|i| i.name.clone()).unwrap_or_default(),
            size: info.map_or(0, |i| i.size),
            pieces: info.map_or(0, |i| i.pieces),
            pieces_have: d.assembler.as_ref().map_or(0, FileAssembler::pieces_have),
            done: d.bytes.is_some(),
            digest: d.digest.clone(),
            expected_digest: info.map(|i| i.digest.clone()).unwrap_or_default(),
            bytes_from_peers: c.bytes_from_peers,
            bytes_from_origin: c.bytes_from_origin,
            bytes_up: c.bytes_up,
            origin_fallbacks: c.origin_fallbacks,
            upload_kbps: self.engine.upload_kbps(),
            elapsed_ms: d.done_ms.map(|t| t - d.started_ms),
            plan: self.engine.plan().to_vec(),
            errors: self.errors.clone(),
        })
    }

    fn run(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, packet } => {
                    if let Some(l) = self.links.get_mut(&to) {
                        l.send(packet);
                    }
                }
                Action::Fetch { seq } => self.fetch(seq),
                Action::Deliver { seq, payload } => {
                    if let Some(a) = self.download.as_mut().and_then(|d| d.assembler.as_mut()) {
                        a.add(seq, &payload);
                    } else if let Some(m) = self.media.as_mut() {
                        m.push(payload);
                    }
                }
                Action::ReportForgery { peer, seq, hash } => {
                    self.forgeries_reported += 1;
                    self.send_ctrl(&ClientMsg::Forged {
                        peer,
                        seq,
                        hash: protocol::manifest::hex(&hash),
                    });
                }
                Action::Connect { peer } => {
                    // The answering side opens its end now too, without offering: packets the
                    // engine sends at once (a new child's priming packet) then wait in the link's
                    // queue until the data channel opens, instead of being dropped for want of a
                    // link while the offer is on its way.
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
        let me = self.me.clone();
        let sink = Rc::new(move |ev: LinkEvent| with(&me, |i| i.on_link_event(ev)));
        match Link::new(peer, &self.ice_servers, sink) {
            Ok(mut link) => {
                link.created_ms = now_ms();
                if offer {
                    link.offer();
                }
                self.links.insert(peer, link);
            }
            Err(e) => self.error(e),
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Signal(to, signal) => self.send_ctrl(&ClientMsg::Signal { to, signal }),
            LinkEvent::Packet(from, bytes) => self.feed(Input::Packet {
                from: From::Peer(from),
                bytes: &bytes,
            }),
            LinkEvent::Writable(peer) => {
                if let Some(l) = self.links.get_mut(&peer) {
                    if l.opened_ms.is_none() && l.is_open() {
                        l.opened_ms = Some(now_ms());
                    }
                    l.flush();
                }
            }
            LinkEvent::Channel(peer, dc) => {
                if let Some(l) = self.links.get_mut(&peer) {
                    l.attach_channel(dc);
                    // The channel may already be open when it is announced: send what waits.
                    if l.opened_ms.is_none() && l.is_open() {
                        l.opened_ms = Some(now_ms());
                    }
                    l.flush();
                }
            }
            LinkEvent::Closed(peer) => {
                // The engine keeps the plan; missing packets come from the origin until the
                // control center (which sees the departure) sends new instructions. A link that
                // never opened is reported: the control center pairs us with someone else.
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

    fn fetch(&mut self, seq: u64) {
        let Some(w) = &self.welcome else { return };
        let url = format!("{}{seq}", w.packet_url);
        let me = self.me.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let res = fetch_bytes(&url).await;
            with(&me, |i| match res {
                Fetched::Bytes(b) => i.feed(Input::Packet {
                    from: From::OriginFetch,
                    bytes: &b,
                }),
                Fetched::NotYet => i.feed(Input::FetchFailed { seq, gone: false }),
                Fetched::Gone => i.feed(Input::FetchFailed { seq, gone: true }),
                Fetched::Failed(e) => {
                    i.error(e);
                    i.feed(Input::FetchFailed { seq, gone: false });
                }
            });
        });
    }

    /// A data channel with `peer` never opened: tell the control center, which never pairs the
    /// two of us again.
    fn link_failed(&mut self, peer: PeerId) {
        self.links_failed += 1;
        self.send_ctrl(&ClientMsg::LinkFailed { peer });
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        // The engine fetches what the player is about to need at once (`engine/deadline.rs`).
        let slack = self
            .media
            .as_ref()
            .filter(|m| m.playing())
            .map(|m| m.buffer_ahead() * 1000.0);
        self.engine.set_player_slack(slack, now);
        self.feed(Input::Tick);
        self.check_connect_timeout(now);
        let stuck: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.opened_ms.is_none() && now - l.created_ms > crate::web::rtc::LINK_OPEN_TIMEOUT_MS
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in stuck {
            self.links.remove(&peer);
            self.link_failed(peer);
        }
        if !self.turn_used
            && self.connectivity.is_some_and(|c| c.turn)
            && now - self.stats_polled_ms >= TURN_POLL_MS
        {
            self.stats_polled_ms = now;
            self.poll_turn_used();
        }
        if let Some(w) = &self.welcome {
            // A stuck upload queue is reported at once, so children are moved before their
            // buffers drain.
            // (The server tolerates a burst of three heartbeats, so this need not wait.)
            let since = now - self.last_heartbeat;
            // Half an interval apart, an extra heartbeat always fits the server's budget.
            let early = since >= 150.0
                && self
                    .engine
                    .wants_early_heartbeat(since >= w.heartbeat_ms / 2.0);
            if early || now - self.last_heartbeat >= w.heartbeat_ms {
                self.last_heartbeat = now;
                if let Some(hb) = self.engine.heartbeat() {
                    // Binary (postcard) is ~8x smaller than JSON; the server takes both.
                    let frame = protocol::heartbeat::binary::encode(&hb);
                    self.heartbeat_bytes += frame.len() as u64;
                    self.heartbeats_sent += 1;
                    if let Some(ws) = &self.ws {
                        if ws.ready_state() == WebSocket::OPEN {
                            let _ = ws.send_with_u8_array(&frame);
                        }
                    }
                }
            }
        }
        if let Some(m) = self.media.as_mut() {
            m.set_playout(self.engine.playout());
            m.pump();
            let errs = m.take_errors();
            for e in errs {
                self.error(e);
            }
        }
    }

    /// Claims 19, 43: the control center asks this peer to relay another channel with upload it
    /// has to spare. A second session joins that channel with the token, relays within
    /// `upload_kbps` and plays nothing.
    fn start_relay(&mut self, channel: String, relay_token: String, upload_kbps: u32) {
        if self.opts.relay_token.is_some()
            || self.download.is_some()
            || self.relays.len() >= MAX_RELAY_SESSIONS
        {
            return self.error(format!("recruit for {channel:?} ignored: no relay slot"));
        }
        if upload_kbps > self.opts.upload_kbps {
            return self.error(format!(
                "recruit for {channel:?} asks {upload_kbps} kbit/s, more than the {} offered",
                self.opts.upload_kbps
            ));
        }
        let opts = Options {
            channel: channel.clone(),
            upload_kbps,
            decode: false,
            relay_token: Some(relay_token),
            ..self.opts.clone()
        };
        let relay = Inner::create(opts, self.base_url.clone(), None, None);
        let started = relay
            .try_borrow_mut()
            .map_err(|_| "relay session busy".to_string())
            .and_then(|mut r| {
                r.connectivity = self.connectivity;
                r.ice_servers = self.ice_servers.clone();
                r.connect()?;
                r.start_tick()
            });
        match started {
            Ok(()) => self.relays.push((channel, relay)),
            Err(e) => self.error(format!("cannot relay {channel:?}: {e}")),
        }
    }

    fn report(&mut self) -> PeerReport {
        let startup_ms = match &self.media {
            Some(m) => m.first_playing_ms(),
            None => self
                .engine
                .first_delivery_ms
                .map(|wall| perf_now() - (now_ms() - wall)),
        };
        let mut r = PeerReport {
            startup_ms,
            stalls: self.media.as_ref().map_or(0, Media::stalls),
            playing: self.media.as_ref().is_some_and(Media::playing),
            decoding: self.media.is_some(),
            current_time: self.media.as_ref().map_or(0.0, Media::current_time),
            buffer_s: self.media.as_ref().map_or(0.0, Media::buffer_ahead),
            connected_peers: self.links.values().filter(|l| l.is_open()).count() as u32,
            errors: self.errors.clone(),
            stream_kbps: self.welcome.as_ref().map_or(0, |w| w.stream_kbps),
            heartbeats_sent: self.heartbeats_sent,
            links_failed: self.links_failed,
            control_resumes: self.reconnect.resumed,
            control_server: self.base_url.clone(),
            control_lost_at_ms: self.reconnect.lost_at_ms,
            control_resumed_at_ms: self.reconnect.resumed_at_ms,
            heartbeat_bytes: self.heartbeat_bytes,
            nat_class: self.connectivity.map(|c| c.class),
            turn: self.connectivity.is_some_and(|c| c.turn),
            turn_used: self.turn_used,
            nat_mappings: self.nat_mappings.clone(),
            relays: self
                .relays
                .iter()
                .map(|(ch, r)| relay_report(ch, r))
                .collect(),
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

    fn shutdown(&mut self) {
        if self.destroyed {
            return;
        }
        self.send_ctrl(&ClientMsg::Leave);
        self.destroyed = true;
        if let Some((id, _cb)) = self.tick.take() {
            if let Some(w) = web_sys::window() {
                w.clear_interval_with_handle(id);
            }
        }
        if let Some(ws) = self.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        self.ws_closures.clear();
        self.links.clear();
        self.media = None;
        if self.download.is_some() {
            self.set_live_upload(self.opts.upload_kbps);
        }
        for (_, r) in self.relays.drain(..) {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.shutdown();
            }
        }
    }
}

/// A relay session's statistics as an entry of the peer that was recruited.
fn relay_report(channel: &str, relay: &Rc<RefCell<Inner>>) -> RelayReport {
    let Ok(mut i) = relay.try_borrow_mut() else {
        return RelayReport {
            channel: channel.to_string(),
            ..RelayReport::default()
        };
    };
    let r = i.report();
    RelayReport {
        channel: channel.to_string(),
        peer_id: r.peer_id,
        tier: r.tier,
        plays: r.plays,
        bytes_up: r.bytes_up,
        bytes_from_peers: r.bytes_from_peers,
        bytes_from_origin: r.bytes_from_origin,
        packets_from_peers: r.packets_from_peers,
        packets_played: r.packets_played,
        connected_peers: r.connected_peers,
        errors: r.errors,
    }
}
