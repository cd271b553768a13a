//! `cargo xtask demo --cluster N`: a local etcd and N control-server nodes joined to it (issue
//! 12), each serving the demo channel; Ctrl-C stops them all.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::tools::ETCD;
use crate::util::{cargo, run};

/// The demo cluster's shared secret. Anyone who knows it can mint resume tokens and derive the
/// stream's signing key: a real cluster sets its own (`P2P_CLUSTER_SECRET`).
const DEMO_SECRET: &str = "demo-cluster-secret-change-me";

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run_cluster(
    nodes: u16,
    listen: SocketAddr,
    web: &std::path::Path,
    server_args: &[String],
) -> Result<()> {
    anyhow::ensure!((1..=16).contains(&nodes), "--cluster takes 1 to 16 nodes");
    run(cargo().args(["build", "--release", "-p", "control-server"]))?;
    let target = crate::build::target_dir()?;
    let server = target.join("release/control-server");
    let data = target.join("cluster-demo/etcd");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let host = listen.ip();
    let etcd_client = format!("http://{host}:{}", listen.port() + 100);
    let etcd_peer = format!("http://{host}:{}", listen.port() + 101);
    let mut children = Children(Vec::new());
    children.0.push(
        Command::new(ETCD)
            .args(["--name", "demo", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &etcd_client])
            .args(["--advertise-client-urls", &etcd_client])
            .args(["--listen-peer-urls", &etcd_peer])
            .args(["--initial-advertise-peer-urls", &etcd_peer])
            .args(["--initial-cluster", &format!("demo={etcd_peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {ETCD}"))?,
    );
    // The nodes refuse to start without etcd: wait until it takes connections.
    let etcd_addr = SocketAddr::new(host, listen.port() + 100);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::net::TcpStream::connect_timeout(&etcd_addr, std::time::Duration::from_millis(200))
        .is_err()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "etcd did not listen on {etcd_addr} within 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("etcd at {etcd_client} (data in {})", data.display());
    for i in 0..nodes {
        let addr = SocketAddr::new(host, listen.port() + i);
        let url = format!("http://{addr}");
        children.0.push(
            Command::new(&server)
                .args(["--listen", &addr.to_string(), "--web-dir"])
                .arg(web)
                .args(["--cluster-etcd", &etcd_client])
                .args(["--node-id", &format!("node{}", i + 1)])
                .args(["--advertise-url", &url])
                .args(server_args)
                .env("P2P_CLUSTER_SECRET", DEMO_SECRET)
                .spawn()
                .context("starting a control-server node")?,
        );
        println!("node{} at {url}", i + 1);
    }
    println!(
        "\nOpen http://{listen}/ (or any node) in two tabs; stop a node with `kill -9` and watch \
         its viewers move. Ctrl-C stops the cluster.\n"
    );
    // Ctrl-C reaches every process of the terminal's group; waiting on the nodes ends then.
    for c in children.0.iter_mut().skip(1) {
        let _ = c.wait();
    }
    Ok(())
}
