//! Server configuration and its validation.

use std::path::PathBuf;
use std::sync::Arc;

use coordinator::topology::region::TopologyConfig;

use thiserror::Error;

#[derive(Debug, Clone)]
pub struct Config {
    /// Substreams (trees) per channel: `k`.
    pub substreams: u32,
    pub heartbeat_ms: u32,
    /// Direct origin children per tree before the origin counts as overflow.
    pub origin_fanout: u32,
    /// Cap on a peer's fan-out in its interior tree.
    pub max_fanout: u32,
    /// Packets kept for joiners and fallback fetches.
    pub window_packets: usize,
    pub ingest_key: Option<String>,
    /// Address of the RTMP ingest listener (`--rtmp`, see `source::rtmp`): publishers push
    /// `rtmp://HOST:PORT/live/CHANNEL?key=KEY` with the `ingest_key`. `None` (the default): off.
    pub rtmp: Option<std::net::SocketAddr>,
    /// The STUN responder's two bound sockets (`--stun`, see `crate::stun`), advertised to
    /// pages by `GET /api/connectivity`. Empty (the default): no STUN.
    pub stun: Vec<std::net::SocketAddr>,
    pub web_dir: PathBuf,
    /// Stream rate assumed for channels whose rate is not known from a file.
    pub default_stream_kbps: u32,
    /// Token that opens the operator dashboard and its data APIs (`Authorization: Bearer T` or
    /// `?token=T`). `None`: a random one is generated at start-up (see `AppState::operator_token`),
    /// so operator data is never open by default.
    pub operator_token: Option<String>,
    /// Origins (`https://site.example[:port]`) whose pages may embed the player: they get CORS
    /// headers on the player, the wasm package, init segments and fallback packets, and their
    /// WebSocket upgrades are accepted. Empty (the default) allows every origin; `*` does too.
    pub allowed_origins: Vec<String>,
    /// Access token viewers must present (`?token=` on the control WebSocket) to join.
    /// `None` (the default): anyone may join.
    pub viewer_token: Option<String>,
    /// Secret of the signed viewer tokens (HS256 JWTs with `channel`, `exp`, optional `sub`,
    /// see `viewer_token`). `Some`: joining needs such a token (or the static `viewer_token`).
    pub token_secret: Option<String>,
    /// Regions and tier parameters. `Some`: every channel runs the three-tier hierarchy
    /// (preferred-node mesh, coded middle tier, bottom clusters); `None`: one flat multi-tree.
    pub topology: Option<Arc<TopologyConfig>>,
    /// Largest bottom cluster of the hierarchy (it splits above, merges below a quarter of it).
    pub cluster_max: usize,
    /// Rate at which the origin sends a file channel's carousel, kbit/s.
    pub file_kbps: u32,
    /// Origin bridges open at once per channel (a moved child fed by the origin until its new
    /// parent delivers, see `dcm::bridge`); 0 turns bridging off.
    pub max_bridges: usize,
    /// Where joiners of a live channel start: one fragment behind the newest (the origin
    /// serves that fragment) or at the newest (`coordinator::start`).
    pub start: coordinator::start::StartConfig,
    /// Seed of the origin's ed25519 key: every channel's stream is signed with it (issue 13).
    /// The default is a fresh key per process; `None`: streams are unsigned and peers relay
    /// packets unchecked.
    pub signing_seed: Option<[u8; 32]>,
    /// How long an evicted peer's address is refused, in seconds; 0: not at all.
    pub ban_secs: u64,
    /// Abuse limits per network address (sessions, joins, control traffic, ingest channels);
    /// see `crate::limits` and the table in docs/protocol.md.
    pub address_limits: crate::limits::AddressLimits,
    /// Limits of every control session (message rate and size, error budget).
    pub session_limits: crate::ws::SessionLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            substreams: 4,
            heartbeat_ms: 1000,
            origin_fanout: 1,
            max_fanout: 16,
            window_packets: 4096,
            ingest_key: None,
            rtmp: None,
            stun: Vec::new(),
            web_dir: PathBuf::from("web"),
            default_stream_kbps: 1000,
            operator_token: None,
            allowed_origins: Vec::new(),
            viewer_token: None,
            token_secret: None,
            topology: None,
            cluster_max: 512,
            file_kbps: 1000,
            max_bridges: coordinator::dcm::bridge::DEFAULT_MAX_BRIDGES,
            start: coordinator::start::StartConfig::default(),
            // Signed by default, with a key for this process (see `crate::signing`).
            signing_seed: crate::signing::random_seed().ok(),
            ban_secs: 600,
            address_limits: crate::limits::AddressLimits::default(),
            session_limits: crate::ws::SessionLimits::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("substreams must be between 1 and 16, got {0}")]
    Substreams(u32),
    #[error("heartbeat_ms must be between 100 and 60000, got {0}")]
    Heartbeat(u32),
    #[error("window_packets must be at least 64, got {0}")]
    Window(usize),
    #[error("max_fanout must be at least 1")]
    Fanout,
    #[error("allowed origin {0:?} is not of the form http(s)://host[:port] (or *)")]
    Origin(String),
    #[error("the token secret must be at least 32 bytes (256 bits, RFC 7518 §3.2), got {0}")]
    TokenSecret(usize),
    #[error("the operator token must be at least 8 characters")]
    OperatorToken,
    #[error("the topology's k = {topology} disagrees with --substreams {substreams}")]
    TopologyK { topology: u32, substreams: u32 },
    #[error("cluster_max must be at least 2")]
    ClusterMax,
    #[error("file_kbps must be between 8 and 1000000, got {0}")]
    FileKbps(u32),
    #[error("messages per second must be between 1 and 100000, got {0}")]
    MsgsPerSec(f64),
    #[error("the largest control message must be between 1024 and {max} bytes, got {0}", max = protocol::control::MAX_CONTROL_MESSAGE)]
    MessageBytes(usize),
    #[error("the error budget of a session must be at least 1")]
    MaxErrors,
    #[error("RTMP ingest (--rtmp) needs a stream key: add --ingest-key")]
    RtmpWithoutKey,
    #[error("--start-newest-after must be a share of a fragment between 0 and 100, got {0}")]
    StartNewestAfter(f64),
    #[error("--start-budget must be between 0 and 1000000 streams, got {0}")]
    StartBudget(f64),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=16).contains(&self.substreams) {
            return Err(ConfigError::Substreams(self.substreams));
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err(ConfigError::Heartbeat(self.heartbeat_ms));
        }
        if self.window_packets < 64 {
            return Err(ConfigError::Window(self.window_packets));
        }
        if self.max_fanout == 0 {
            return Err(ConfigError::Fanout);
        }
        if self.rtmp.is_some() && self.ingest_key.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::RtmpWithoutKey);
        }
        if !(8..=1_000_000).contains(&self.file_kbps) {
            return Err(ConfigError::FileKbps(self.file_kbps));
        }
        let start = self.start;
        if !(0.0..=100.0).contains(&start.newest_after) {
            return Err(ConfigError::StartNewestAfter(start.newest_after));
        }
        if !(0.0..=1_000_000.0).contains(&start.budget_streams) {
            return Err(ConfigError::StartBudget(start.budget_streams));
        }
        if let Some(o) = self
            .allowed_origins
            .iter()
            .find(|o| o.as_str() != "*" && !is_origin(o))
        {
            return Err(ConfigError::Origin(o.clone()));
        }
        if self.operator_token.as_ref().is_some_and(|t| t.len() < 8) {
            return Err(ConfigError::OperatorToken);
        }
        if let Some(s) = self
            .token_secret
            .as_ref()
            .filter(|s| s.len() < crate::viewer_token::MIN_SECRET_BYTES)
        {
            return Err(ConfigError::TokenSecret(s.len()));
        }
        if let Some(t) = &self.topology {
            if t.k != self.substreams {
                return Err(ConfigError::TopologyK {
                    topology: t.k,
                    substreams: self.substreams,
                });
            }
        }
        if self.cluster_max < 2 {
            return Err(ConfigError::ClusterMax);
        }
        let l = &self.session_limits;
        if !(1.0..=100_000.0).contains(&l.msgs_per_sec) {
            return Err(ConfigError::MsgsPerSec(l.msgs_per_sec));
        }
        if !(1024..=protocol::control::MAX_CONTROL_MESSAGE).contains(&l.max_message_bytes) {
            return Err(ConfigError::MessageBytes(l.max_message_bytes));
        }
        if l.max_errors == 0 {
            return Err(ConfigError::MaxErrors);
        }
        Ok(())
    }
}

/// Whether `s` is a serialized origin: `http://host` or `https://host:port`, nothing after.
pub fn is_origin(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_validated() {
        assert!(is_origin("https://site.example"));
        assert!(is_origin("http://127.0.0.1:8000"));
        assert!(!is_origin("site.example"));
        assert!(!is_origin("https://site.example/path"));
        assert!(!is_origin("https://"));
        let mut c = Config {
            allowed_origins: vec!["*".into(), "https://a.example".into()],
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.allowed_origins.push("a.example".into());
        assert!(matches!(c.validate(), Err(ConfigError::Origin(_))));
        c.allowed_origins.clear();
        c.operator_token = Some("short".into());
        assert!(matches!(c.validate(), Err(ConfigError::OperatorToken)));
        c.operator_token = None;
        c.token_secret = Some("too short".into());
        assert!(matches!(c.validate(), Err(ConfigError::TokenSecret(9))));
        c.token_secret = Some("x".repeat(32));
        assert!(c.validate().is_ok());
    }
}
