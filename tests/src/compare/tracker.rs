//! The local WebTorrent tracker P2P Media Loader's peers find each other through:
//! `bittorrent-tracker`'s server run with node (`web/compare/tracker.mjs`), WebSocket only, on
//! 127.0.0.1. The child process is ours and is killed when this is dropped.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Tracker {
    pub port: u16,
    child: Child,
}

impl Tracker {
    /// Starts the tracker from `web_dir` (where `node_modules` is) and waits for its port.
    pub async fn start(web_dir: &Path) -> Result<Tracker> {
        let mut child = Command::new("node")
            .current_dir(web_dir)
            .args(["compare/tracker.mjs", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the tracker with node (is Node.js installed?)")?;
        let stdout = child.stdout.take().context("tracker has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .context("the tracker did not start within 15 s")?
            .context("reading the tracker's output")?;
        let Some(port) = first
            .as_deref()
            .and_then(|l| l.strip_prefix("listening "))
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            bail!("the tracker did not say `listening PORT` but {first:?}");
        };
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!("tracker: {line}");
            }
        });
        tracing::info!(port, pid = child.id(), "tracker listening");
        Ok(Tracker { port, child })
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Stops the tracker (by its own process id, through the child handle).
    pub async fn stop(mut self) {
        if let Err(e) = self.child.kill().await {
            tracing::warn!("stopping the tracker: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[ignore = "needs Node.js and web/node_modules (npm ci); run by cargo xtask test"]
    async fn the_tracker_accepts_websocket_clients() -> Result<()> {
        let web = std::env::var_os("P2P_WEB_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../web"));
        let tracker = Tracker::start(&web).await?;
        let (ws, response) = tokio_tungstenite::connect_async(tracker.url()).await?;
        assert_eq!(response.status().as_u16(), 101);
        drop(ws);
        tracker.stop().await;
        Ok(())
    }
}
