//! A real cluster on this machine for the e2e tests of issue 12: a real `etcd` (Debian's
//! `etcd-server`) on its own ports and data directory, and control-server processes joined to
//! it, each of which a test can `kill -9`, stop with SIGTERM or restart. Everything listens on
//! 127.0.0.1; every process is ended by its PID when its handle is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Context, Result};
use protocol::report::PeerReport;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::wait::wait_until;

/// Where Debian's `etcd-server` puts etcd.
pub const ETCD: &str = "/usr/bin/etcd";

/// The secret the test clusters share.
pub const SECRET: &str = "e2e-cluster-secret-0123456789";

/// The operator token of the test nodes.
pub const OPERATOR_TOKEN: &str = "e2e-operator-token";

/// A port free on 127.0.0.1 now (the OS picks it; a test starts its server right after).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// `kill -9` of the process, if it runs, and waits for it.
async fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        signal(&c, rustix::process::Signal::KILL);
        let _ = c.wait().await;
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A single-member etcd.
pub struct Etcd {
    child: Option<Child>,
    pub url: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Result<Etcd> {
        if !Path::new(ETCD).is_file() {
            bail!("{ETCD} not found: install Debian's etcd-server (`cargo xtask test` does)");
        }
        let dir = tempfile::Builder::new()
            .prefix("e2e-etcd-")
            .tempdir()
            .context("creating etcd's data directory")?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let mut etcd = Etcd {
            child: None,
            url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir,
        };
        etcd.launch().await?;
        Ok(etcd)
    }

    async fn launch(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let child = Command::new(ETCD)
            .arg("--name")
            .arg("e2e")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e2e={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {ETCD}"))?;
        self.child = Some(child);
        let health = format!("{client}/health");
        wait_until(
            "etcd to answer /health",
            Duration::from_secs(15),
            Duration::from_millis(100),
            async || {
                let v: Value = reqwest::get(&health).await?.json().await?;
                anyhow::ensure!(v["health"] == "true", "etcd not healthy yet: {v}");
                Ok(())
            },
        )
        .await
    }

    /// Kills etcd (SIGKILL); [`Etcd::restart`] brings it back with the same data and ports.
    pub async fn kill(&mut self) {
        kill_child(&mut self.child).await;
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.launch().await
    }

    /// Its log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c, rustix::process::Signal::KILL);
        }
    }
}

/// The control-server binary the nodes run: `$P2P_SERVER_BIN`, else the one cargo built next
/// to this test (`cargo build -p control-server`, which `cargo xtask test` runs first).
pub fn server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("P2P_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/debug/deps/cluster-… → target/debug/control-server
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("control-server");
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build -p control-server` first (`cargo xtask test` does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// One control-server process joined to the cluster.
pub struct Node {
    child: Option<Child>,
    pub id: String,
    pub url: String,
    pub log_path: PathBuf,
}

impl Node {
    /// Starts node `id` on a free port, joined to `etcd`, serving `web_dir`, with `extra`
    /// arguments; waits until it answers.
    pub async fn start(
        id: &str,
        etcd: &Etcd,
        web_dir: &Path,
        logs: &Path,
        extra: &[&str],
    ) -> Result<Node> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let log_path = logs.join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(server_binary()?)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--web-dir")
            .arg(web_dir)
            .args(["--cluster-etcd", &etcd.url])
            .args(["--node-id", id])
            .args(["--advertise-url", &url])
            .args(["--operator-token", OPERATOR_TOKEN])
            .args(extra)
            .env("P2P_CLUSTER_SECRET", SECRET)
            .env("RUST_LOG", "info,tower_http=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a control-server node")?;
        let node = Node {
            child: Some(child),
            id: id.to_string(),
            url,
            log_path,
        };
        let probe = format!("{}/api/channels", node.url);
        wait_until(
            &format!("node {id} to answer"),
            Duration::from_secs(20),
            Duration::from_millis(100),
            async || {
                reqwest::get(&probe).await?.error_for_status()?;
                Ok(())
            },
        )
        .await
        .with_context(|| format!("node {id}'s log:\n{}", node.log()))?;
        Ok(node)
    }

    /// `kill -9`.
    pub async fn kill(&mut self) {
        kill_child(&mut self.child).await;
    }

    /// SIGTERM, then waits for the process to end (at most `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            signal(&c, rustix::process::Signal::TERM);
            if tokio::time::timeout(timeout, c.wait()).await.is_err() {
                signal(&c, rustix::process::Signal::KILL);
                bail!(
                    "node {} did not stop within {timeout:?} of SIGTERM",
                    self.id
                );
            }
        }
        Ok(())
    }

    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `GET path` on this node with the operator token; an error status is an error.
    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        Ok(reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await?
            .error_for_status()?)
    }

    /// `GET /api/operator/cluster` of this node.
    pub async fn cluster_view(&self) -> Result<Value> {
        self.get_json("/api/operator/cluster").await
    }

    /// The owner's URL of `channel`'s DCM as this node's locator answers it.
    pub async fn locate(&self, channel: &str) -> Result<String> {
        let v: Value = reqwest::get(format!("{}/api/locate?channel={channel}", self.url))
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["url"]
            .as_str()
            .map(String::from)
            .context("locate answered no url")
    }

    /// `GET /metrics` of this node (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        Ok(self.get("/metrics").await?.text().await?)
    }

    /// `GET path` on this node, as JSON (with the operator token).
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        Ok(self.get(path).await?.json().await?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c, rustix::process::Signal::KILL);
        }
    }
}

/// A tree link of a topology snapshot: (peer, substream, parent as JSON).
pub type Link = (u64, u64, String);

/// The tree links of a topology snapshot's JSON (`GET /api/channels/{id}/topology`).
pub fn topology_links(topology: &Value) -> BTreeSet<Link> {
    let mut out = BTreeSet::new();
    for p in topology["peers"].as_array().into_iter().flatten() {
        let id = p["id"].as_u64().unwrap_or(0);
        for s in p["plan"].as_array().into_iter().flatten() {
            out.insert((
                id,
                s["index"].as_u64().unwrap_or(0),
                s["parent"].to_string(),
            ));
        }
    }
    out
}

/// Peers of a topology snapshot that are placed: in some tree, or in a tier of a hierarchy
/// (a DCM that is rebuilding from heartbeats lists its adopted peers with no plan yet).
pub fn placed_peers(topology: &Value) -> usize {
    topology["peers"].as_array().map_or(0, |ps| {
        ps.iter()
            .filter(|p| {
                p["plan"].as_array().is_some_and(|pl| !pl.is_empty()) || !p["tier"].is_null()
            })
            .count()
    })
}

/// Every page's `window.p2p.stats()`.
pub async fn page_stats(pages: &[crate::cdp::Page]) -> Result<Vec<PeerReport>> {
    let mut out = Vec::with_capacity(pages.len());
    for (i, p) in pages.iter().enumerate() {
        let json = p.eval("JSON.stringify(window.p2p.stats())").await?;
        let text = json
            .as_str()
            .ok_or_else(|| anyhow!("stats of viewer {i} are not a string"))?;
        out.push(serde_json::from_str(text).with_context(|| format!("viewer {i}'s stats"))?);
    }
    Ok(out)
}

/// Starts `n` nodes (`n1`, `n2`, …) joined to `etcd`, each with `args`, and waits until every
/// one sees them all.
pub async fn start_nodes(
    n: usize,
    etcd: &Etcd,
    web_dir: &Path,
    logs: &Path,
    args: &[&str],
) -> Result<Vec<Node>> {
    let mut nodes = Vec::with_capacity(n);
    for i in 1..=n {
        nodes.push(Node::start(&format!("n{i}"), etcd, web_dir, logs, args).await?);
    }
    wait_until(
        "every node to see the others",
        Duration::from_secs(10),
        Duration::from_millis(200),
        async || {
            for node in &nodes {
                let seen = node.cluster_view().await?["nodes"]
                    .as_array()
                    .map_or(0, Vec::len);
                anyhow::ensure!(seen == n, "node {} sees {seen} nodes of {n}", node.id);
            }
            Ok(())
        },
    )
    .await?;
    Ok(nodes)
}

/// The index of the node that owns `channel`'s DCM, as `nodes[ask]`'s locator answers (the
/// locator claims the DCM for that node when nobody owns it yet).
pub async fn owner_index(nodes: &[Node], ask: usize, channel: &str) -> Result<usize> {
    let url = nodes[ask].locate(channel).await?;
    nodes
        .iter()
        .position(|n| n.url == url)
        .ok_or_else(|| anyhow!("{channel} is owned by an unknown node {url}"))
}

/// Opens a viewer page of `channel` on `node` (a playing one in its own window), with a region
/// hint if given, and waits until its peer runs.
pub async fn open_viewer(
    browser: &crate::cdp::Browser,
    node: &Node,
    channel: &str,
    upload_kbps: u32,
    decode: bool,
    region: Option<&str>,
) -> Result<crate::cdp::Page> {
    let hint = region.map(|r| format!("&region={r}")).unwrap_or_default();
    let url = format!(
        "{}/?channel={channel}&upload={upload_kbps}&decode={}{hint}",
        node.url,
        u8::from(decode)
    );
    let page = browser
        .new_page_with(&url, crate::cdp::PageOptions { new_window: decode })
        .await?;
    page.wait_for("window.p2p !== undefined", Duration::from_secs(20))
        .await
        .with_context(|| format!("viewer page {url} did not start its peer"))?;
    Ok(page)
}
