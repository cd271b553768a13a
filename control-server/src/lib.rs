//! # control-server
//!
//! The patent's control center (FIG. 1, FIG. 7) as an axum service:
//!
//! * [`origin`]: turns fragmented MP4 (demo loop, file, stdin, HTTP ingest) into numbered packets
//!   and keeps a bounded window of them for joiners and for peers' fallback fetches.
//! * [`topology`]: pure multi-tree construction (state in, plan out), unit-tested natively.
//! * [`dcm`]: a delivery coordinator manager per channel: a task that owns the channel's
//!   topology and peers' outbound queues and turns joins, leaves and heartbeats into
//!   instructions.
//! * [`ws`]: one WebSocket session per peer: parsing, validation, signaling relay.
//! * [`http`]: init segments, fallback packets, range hashes, topology, ingest.
//! * [`metrics`]: per-channel counters sampled every second (operator charts) and the
//!   Prometheus exposition at `/metrics`.
//! * [`operator`]: the operator token, the dashboard's data APIs, and the embedding rules
//!   (CORS and WebSocket origin checks).

pub mod channel;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod dcm;
pub mod events;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod origin;
pub mod relay;
pub mod signing;
pub mod source;
pub mod stun;
pub mod token;
pub mod viewer_token;
pub mod ws;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tokio::sync::mpsc;

pub use channel::{Channel, SharedChannel};
use config::Config;
pub use coordinator::topology;
use dcm::Dcm;
use origin::PacketWindow;
use protocol::PeerId;
pub use ws::SessionLimits;

/// The demo clip shipped in the repository: a 20 s test pattern, looped as a live channel.
pub const DEMO_CLIP: &[u8] = include_bytes!("../../web/media/demo.mp4");

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("channel {0:?} already exists")]
    ChannelExists(String),
    #[error("invalid channel name {0:?}: use 1-64 letters, digits, '-' or '_'")]
    BadChannelName(String),
    #[error("cannot start the channel's DCM: {0}")]
    Dcm(String),
    #[error("media: {0}")]
    Media(#[from] origin::Fmp4Error),
    #[error("file for channel {0:?} is empty: there is nothing to download")]
    EmptyFile(String),
}

/// What the server knows of a joined session, to check a download's `companion`.
#[derive(Clone)]
pub struct SessionInfo {
    pub remote: std::net::IpAddr,
    pub channel: SharedChannel,
    pub upload_kbps: u32,
    /// The session's queue: where a fresh resume token goes, and the close of a session whose
    /// peer reconnected on a new socket.
    pub(crate) out: events::OutboundTx,
    /// Tells this session apart from a later one of the same peer id (a resume that replaced
    /// it): only the registered session may unregister its peer.
    pub(crate) serial: u64,
    /// When the peer's newest resume token was issued (ms since the Unix epoch; cluster mode:
    /// read only by the re-issue task of the `cluster` feature).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) token_issued_ms: u64,
}

/// What [`AppState::register_session`] found under the peer id.
pub(crate) enum Registered {
    /// The id was free.
    Fresh,
    /// Another session of the same channel held it (a half-open socket after a network blip):
    /// it is replaced, and should be closed without its leave reaching the DCM.
    Replaced { old: events::OutboundTx },
    /// A session of another channel holds it: nothing was registered.
    InUse,
}

/// Shared server state: configuration and the channel registry.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub limits: SessionLimits,
    channels: Arc<RwLock<HashMap<String, SharedChannel>>>,
    next_peer: Arc<AtomicU64>,
    /// Per-channel series for the operator dashboard and running totals for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// The operator token in force: configured, or generated at start-up.
    operator_token: Arc<str>,
    /// Spare peers of all channels and recruit tokens (claims 19, 43).
    pub relays: Arc<relay::RelayBoard>,
    /// Joined sessions by peer id (a download names its live companion by id).
    sessions: Arc<RwLock<HashMap<PeerId, SessionInfo>>>,
    /// Per-address abuse limits and every limit's refusal counts (issue 13).
    pub addresses: Arc<limits::AddressTable>,
    /// Addresses of evicted peers and when their ban ends (issue 13).
    /// Keyed as the per-address limits are (an IPv6 subscriber's /64 counts as one address).
    bans: Arc<std::sync::Mutex<HashMap<limits::AddressKey, std::time::Instant>>>,
    /// Live HLS/CMAF playlists pulled into channels, with their status (issue 14).
    pub pulls: Arc<source::hls::PullBoard>,
    /// The RTMP listener's address, publishers, refusals and last errors (issue 14).
    pub rtmp: Arc<source::rtmp::RtmpBoard>,
    /// This node's membership of a cluster (issue 12), once joined; unset for a lone server.
    #[cfg(feature = "cluster")]
    cluster: Arc<std::sync::OnceLock<Arc<cluster::Cluster>>>,
}

impl AppState {
    pub fn new(config: Config) -> Self {
        let operator_token: Arc<str> = match config.operator_token.as_deref() {
            Some(t) if !t.is_empty() => t.into(),
            _ => token::random_token()
                .expect("the OS random source is needed for the operator token")
                .into(),
        };
        let session_limits = config.session_limits;
        let addresses = Arc::new(limits::AddressTable::new(config.address_limits));
        AppState {
            config: Arc::new(config),
            limits: session_limits,
            addresses,
            channels: Arc::default(),
            next_peer: Arc::new(AtomicU64::new(1)),
            metrics: Arc::default(),
            operator_token,
            relays: Arc::default(),
            sessions: Arc::default(),
            bans: Arc::default(),
            pulls: Arc::default(),
            rtmp: Arc::default(),
            #[cfg(feature = "cluster")]
            cluster: Arc::default(),
        }
    }

    /// Makes this server a node of `cluster`: peers whose DCM runs elsewhere are redirected
    /// there, and peer ids are drawn from a range of their own (ids must not collide when peers
    /// move between nodes). Call once, before serving.
    #[cfg(feature = "cluster")]
    pub fn join_cluster(&self, cluster: Arc<cluster::Cluster>) {
        let mut base = [0u8; 4];
        let _ = getrandom::fill(&mut base);
        // Ids stay below 2^53 (exact in JavaScript): 20 random bits above a 32-bit counter.
        let base = (u64::from(u32::from_le_bytes(base)) & 0xF_FFFF).max(1) << 32;
        self.next_peer.store(base, Ordering::Relaxed);
        cluster.run(self.clone());
        let _ = self.cluster.set(cluster);
    }

    /// The cluster this server is a node of, if any.
    #[cfg(feature = "cluster")]
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.cluster.get()
    }

    /// Joined sessions, and heartbeats handled so far (all channels).
    pub fn load(&self) -> (u64, u64) {
        let peers = self.sessions.read().map_or(0, |m| m.len() as u64);
        let heartbeats = self
            .channels
            .read()
            .map(|m| {
                m.values()
                    .map(|c| c.counters.heartbeats.load(Ordering::Relaxed))
                    .sum()
            })
            .unwrap_or(0);
        (peers, heartbeats)
    }

    /// Refuses `addr` for the configured ban time (an evicted peer's address). Sessions without
    /// a known address (a server embedded without connect info) all share one, and are not
    /// banned.
    pub(crate) fn ban(&self, addr: std::net::IpAddr) {
        let secs = self.config.ban_secs;
        let Some(key) = limits::AddressKey::of(addr).filter(|_| secs > 0) else {
            return;
        };
        if let Ok(mut b) = self.bans.lock() {
            let now = std::time::Instant::now();
            b.retain(|_, until| *until > now);
            b.insert(key, now + std::time::Duration::from_secs(secs));
            self.metrics.record_ban();
        }
        tracing::warn!(%addr, secs, "address banned");
    }

    /// How long `addr` stays refused, if it is.
    pub(crate) fn banned(&self, addr: std::net::IpAddr) -> Option<std::time::Duration> {
        let key = limits::AddressKey::of(addr)?;
        let b = self.bans.lock().ok()?;
        let until = b.get(&key)?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// Registers a joined session under its peer id. A session that holds the id already is
    /// replaced only if it is of the same channel and `replace` says so (a verified resume).
    pub(crate) fn register_session(
        &self,
        peer: PeerId,
        info: SessionInfo,
        replace: bool,
    ) -> Registered {
        let Ok(mut m) = self.sessions.write() else {
            return Registered::InUse;
        };
        match m.get(&peer) {
            None => {
                m.insert(peer, info);
                Registered::Fresh
            }
            Some(old) if replace && Arc::ptr_eq(&old.channel, &info.channel) => {
                let old = old.out.clone();
                m.insert(peer, info);
                Registered::Replaced { old }
            }
            Some(_) => Registered::InUse,
        }
    }

    /// Unregisters session `serial` of `peer`; false (and nothing done) if another session
    /// holds the id now (a resume replaced this one).
    pub(crate) fn unregister_session(&self, peer: PeerId, serial: u64) -> bool {
        let Ok(mut m) = self.sessions.write() else {
            return false;
        };
        if m.get(&peer).is_some_and(|s| s.serial == serial) {
            m.remove(&peer);
            return true;
        }
        false
    }

    /// Notes that session `serial` of `peer` was sent a resume token issued at `issued_ms`.
    #[cfg(feature = "cluster")]
    pub(crate) fn token_reissued(&self, peer: PeerId, serial: u64, issued_ms: u64) {
        if let Ok(mut m) = self.sessions.write() {
            if let Some(s) = m.get_mut(&peer).filter(|s| s.serial == serial) {
                s.token_issued_ms = issued_ms;
            }
        }
    }

    /// Calls `f` on every joined session (under the registry's read lock: keep it short).
    #[cfg(feature = "cluster")]
    pub(crate) fn each_session(&self, mut f: impl FnMut(PeerId, &SessionInfo)) {
        if let Ok(m) = self.sessions.read() {
            for (peer, s) in m.iter() {
                f(*peer, s);
            }
        }
    }

    pub fn session(&self, peer: PeerId) -> Option<SessionInfo> {
        self.sessions.read().ok()?.get(&peer).cloned()
    }

    /// The token that opens the operator dashboard and APIs (configured or generated).
    pub fn operator_token(&self) -> &str {
        &self.operator_token
    }

    /// Whether the operator token was generated at start-up (not configured).
    pub fn operator_token_generated(&self) -> bool {
        self.config
            .operator_token
            .as_deref()
            .is_none_or(str::is_empty)
    }

    pub(crate) fn channels_weak(&self) -> std::sync::Weak<RwLock<HashMap<String, SharedChannel>>> {
        Arc::downgrade(&self.channels)
    }

    pub fn next_peer_id(&self) -> PeerId {
        PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed))
    }

    pub fn channel(&self, name: &str) -> Option<SharedChannel> {
        self.channels.read().ok()?.get(name).cloned()
    }

    pub fn channel_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .channels
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Creates a channel and starts its DCM task. Must run inside a tokio runtime.
    ///
    /// In a cluster, a channel created here exists only here (a live ingest, an HLS pull):
    /// this node claims its DCM at once, so that viewers who reach other nodes are sent here.
    pub fn create_channel(
        &self,
        name: &str,
        stream_kbps: u32,
    ) -> Result<SharedChannel, ServerError> {
        let ch = self.create_replicated_channel(name, stream_kbps)?;
        #[cfg(feature = "cluster")]
        if let Some(cluster) = self.cluster().cloned() {
            let name = name.to_string();
            let channels = self.channels_weak();
            tokio::spawn(async move {
                // Until it is claimed (by us, or by whoever took it first), or the channel ends:
                // an etcd blip must not leave a channel only this node runs without an owner.
                let mut backoff = std::time::Duration::from_millis(250);
                loop {
                    match cluster.claim(&name).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(channel = %name, "cannot claim the new channel's DCM yet: {e}")
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    let exists = channels
                        .upgrade()
                        .and_then(|m| m.read().ok().map(|m| m.contains_key(&name)))
                        .unwrap_or(false);
                    if !exists {
                        break;
                    }
                }
            });
        }
        Ok(ch)
    }

    /// Creates a channel that every node of a cluster runs alike (a looped file on the shared
    /// timeline, a download): its DCM goes to the node the first viewer reaches.
    pub fn create_replicated_channel(
        &self,
        name: &str,
        stream_kbps: u32,
    ) -> Result<SharedChannel, ServerError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(ServerError::BadChannelName(name.to_string()));
        }
        let mut map = self
            .channels
            .write()
            .map_err(|_| ServerError::ChannelExists(name.to_string()))?;
        if map.contains_key(name) {
            return Err(ServerError::ChannelExists(name.to_string()));
        }
        let (tx, rx) = mpsc::channel(4096);
        let window = PacketWindow::new(self.config.window_packets, 2_000_000);
        let mut channel = Channel::new(name.to_string(), stream_kbps, window, tx)
            .with_relays(self.relays.clone())
            .with_substreams(self.config.substreams)
            .with_start(self.config.start);
        if let Some(seed) = &self.config.signing_seed {
            channel = channel.with_signer(seed);
        }
        let ch = Arc::new(channel);
        let dcm = Dcm::new(ch.clone(), &self.config);
        // The DCM runs on its own thread: with tens of thousands of sessions sharing the
        // runtime's workers, a task would wait behind them and heartbeats would queue up.
        let thread_name = format!("dcm-{name}");
        let config = self.config.clone();
        let supervised = ch.clone();
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(dcm::supervise(dcm, supervised, config, rx)),
                    Err(e) => tracing::error!("cannot start the DCM runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            return Err(ServerError::Dcm(e.to_string()));
        }
        map.insert(name.to_string(), ch.clone());
        drop(map);
        metrics::ensure_sampler(self);
        Ok(ch)
    }

    pub fn remove_channel(&self, name: &str) {
        if let Ok(mut map) = self.channels.write() {
            map.remove(name);
        }
    }

    /// Starts the embedded demo channel `demo`.
    pub fn start_demo_channel(&self) -> Result<SharedChannel, ServerError> {
        self.start_looped_channel("demo", DEMO_CLIP.to_vec())
    }

    /// Publishes the demo clip itself for download as channel `demo-file` (saved as
    /// `demo.mp4`), so the demo page can offer a download beside the live channel.
    pub fn start_demo_file_channel(&self) -> Result<SharedChannel, ServerError> {
        self.start_file_channel_as("demo-file", "demo.mp4", DEMO_CLIP.to_vec())
    }

    /// Publishes a fragmented MP4 file as an endless live channel (looped, timeline continuous).
    pub fn start_looped_channel(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<SharedChannel, ServerError> {
        self.start_looped_channel_at(name, data, channel::now_ms())
    }

    /// Like [`AppState::start_looped_channel`], on a timeline that began at `start_ms` (ms
    /// since the Unix epoch): the nodes of a cluster share it, so they cut identical packets.
    pub fn start_looped_channel_at(
        &self,
        name: &str,
        data: Vec<u8>,
        start_ms: u64,
    ) -> Result<SharedChannel, ServerError> {
        let clip = source::ingest::LoopedClip::parse(data)?;
        let ch = self.create_replicated_channel(name, clip.stream_kbps())?;
        ch.set_init(clip.init.clone());
        ch.seed_fragment_ms(clip.max_fragment_ms());
        ch.source_attached.store(true, Ordering::Relaxed);
        tokio::spawn(source::ingest::run_looped(ch.clone(), clip, start_ms));
        Ok(ch)
    }

    /// Publishes a file for download as a carousel of pieces (any file type): packet `seq`
    /// carries piece `seq mod N`, sent round after round at `config.file_kbps`.
    /// The browser saves it under the channel's name; see [`AppState::start_file_channel_as`].
    pub fn start_file_channel(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<SharedChannel, ServerError> {
        self.start_file_channel_as(name, name, data)
    }

    /// Like [`AppState::start_file_channel`], with the name the browser saves the file under.
    pub fn start_file_channel_as(
        &self,
        name: &str,
        file_name: &str,
        data: Vec<u8>,
    ) -> Result<SharedChannel, ServerError> {
        let carousel = source::carousel::Carousel::new(file_name, data)
            .ok_or_else(|| ServerError::EmptyFile(name.to_string()))?;
        let ch = self.create_replicated_channel(name, self.config.file_kbps)?;
        let _ = ch.file.set(carousel.info.clone());
        ch.source_attached.store(true, Ordering::Relaxed);
        tokio::spawn(source::carousel::run_carousel(
            ch.clone(),
            carousel,
            self.config.file_kbps,
        ));
        Ok(ch)
    }

    /// Publishes fragmented MP4 arriving on standard input (e.g. piped from ffmpeg).
    pub fn start_stdin_channel(&self, name: &str) -> Result<SharedChannel, ServerError> {
        let ch = self.create_channel(name, self.config.default_stream_kbps)?;
        ch.source_attached.store(true, Ordering::Relaxed);
        let c = ch.clone();
        tokio::spawn(async move {
            if let Err(e) = source::ingest::run_reader(c.clone(), tokio::io::stdin()).await {
                tracing::error!(channel = %c.name, "stdin ingest stopped: {e}");
            }
            c.source_attached.store(false, Ordering::Relaxed);
        });
        Ok(ch)
    }
}

/// The whole HTTP + WebSocket application.
pub fn app(state: AppState) -> axum::Router {
    http::router(state)
}

/// Serves the app until `shutdown` completes (then lets open requests finish).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

/// Serves the app until Ctrl-C.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await?;
    Ok(())
}
