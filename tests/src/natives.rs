//! Native peers for the swarm harness (issue 15): one `waypoint` process (release build) holding
//! N peers, so that the benchmark measures the optimized native stack and its CPU apart from
//! the harness's. Its statistics come through the JSON file it rewrites every 5 s.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocol::report::PeerReport;

/// Where the `waypoint` binary is: `$P2P_WAYPOINT_BIN` (set by `cargo xtask swarm`, which
/// builds it in release), else `waypoint` beside this executable's target directory.
pub fn waypoint_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("P2P_WAYPOINT_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        for profile in ["release", "debug"] {
            let p = dir.join(profile).join("waypoint");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("no waypoint binary: build it with `cargo build --release -p waypoint` and set P2P_WAYPOINT_BIN")
}

pub struct NativePeers {
    child: Child,
    json: PathBuf,
    _dir: tempfile::TempDir,
    last: Mutex<Vec<PeerReport>>,
}

impl NativePeers {
    pub fn start(
        server: &str,
        channel: &str,
        n: usize,
        upload_kbps: &[u32],
        join_every_ms: u64,
    ) -> Result<NativePeers> {
        Self::spawn(server, channel, n, upload_kbps, join_every_ms, &[])
    }

    /// `n` waypoint servers (FIG. 1, 3): native peers that join with the operator token, on
    /// public addresses, each offering `upload_kbps`.
    pub fn start_waypoints(
        server: &str,
        channel: &str,
        n: usize,
        upload_kbps: u32,
        operator_token: &str,
    ) -> Result<NativePeers> {
        let role = [
            "--waypoint-token".to_string(),
            operator_token.to_string(),
            "--nat-class".to_string(),
            "open".to_string(),
        ];
        Self::spawn(server, channel, n, &[upload_kbps], 0, &role)
    }

    fn spawn(
        server: &str,
        channel: &str,
        n: usize,
        upload_kbps: &[u32],
        join_every_ms: u64,
        extra: &[String],
    ) -> Result<NativePeers> {
        let bin = waypoint_bin()?;
        let dir = tempfile::tempdir()?;
        let json = dir.path().join("natives.json");
        let uploads: Vec<String> = upload_kbps.iter().map(u32::to_string).collect();
        let child = Command::new(&bin)
            .args(["--server", server, "--channel", channel])
            .args(["--peers", &n.to_string()])
            .args(["--join-every-ms", &join_every_ms.to_string()])
            .args(["--upload-kbps", &uploads.join(",")])
            .args(extra)
            .arg("--json")
            .arg(&json)
            .env("RUST_LOG", "waypoint=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(NativePeers {
            child,
            json,
            _dir: dir,
            last: Mutex::new(Vec::new()),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peers' statistics as last written (every 5 s).
    pub fn reports(&self) -> Vec<PeerReport> {
        let fresh = std::fs::read(&self.json)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<PeerReport>>(&b).ok());
        let Ok(mut last) = self.last.lock() else {
            return fresh.unwrap_or_default();
        };
        if let Some(r) = fresh {
            *last = r;
        }
        last.clone()
    }

    /// Asks the process to leave (SIGTERM: every peer sends `Leave` and the final statistics
    /// are written), waits up to 10 s, then kills it; returns the final statistics. For
    /// debugging a run, `P2P_SWARM_NATIVES=PATH` keeps them (every peer's `PeerReport`).
    pub fn stop(self) -> Vec<PeerReport> {
        let reports = self.stop_process();
        if let Some(path) = std::env::var_os("P2P_SWARM_NATIVES") {
            if let Ok(json) = serde_json::to_vec(&reports) {
                let _ = std::fs::write(path, json);
            }
        }
        reports
    }

    /// [`NativePeers::stop`] without keeping the statistics in `P2P_SWARM_NATIVES` (for the
    /// waypoints, which would overwrite the viewers').
    pub fn stop_process(mut self) -> Vec<PeerReport> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.reports();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reports()
    }
}

impl Drop for NativePeers {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
