//! Server configuration and its validation.

use std::path::PathBuf;

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
    pub web_dir: PathBuf,
    /// Stream rate assumed for channels whose rate is not known from a file.
    pub default_stream_kbps: u32,
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
            web_dir: PathBuf::from("web"),
            default_stream_kbps: 1000,
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
        Ok(())
    }
}
