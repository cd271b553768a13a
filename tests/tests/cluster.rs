//! End-to-end: the control center as a cluster (issue 12). A real etcd, three control-server
//! processes, Chromium viewers redirected to the node that owns the channel's DCM. The owner
//! is killed (`kill -9`) or stopped (SIGTERM): another node owns the DCM within the lease TTL
//! and a heartbeat interval, the viewers reconnect to it keeping their ids and links, and their
//! video goes on byte-exact without a stall. Run by `cargo xtask test`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use e2e::cdp::{Browser, LaunchOptions, Page};
use e2e::cluster::{
    open_viewer, owner_index, page_stats, placed_peers, start_nodes, topology_links as links, Etcd,
    Node,
};
use e2e::console::{unexpected, VIEWER_PAGE};
use e2e::wait::wait_until;
use protocol::report::PeerReport;

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

const LEASE_TTL_S: u64 = 3;
const HEARTBEAT_MS: u64 = 1000;
const VIEWERS: usize = 6;

struct Cluster {
    etcd: Etcd,
    nodes: Vec<Node>,
    _browser: Browser,
    pages: Vec<Page>,
    _logs: tempfile::TempDir,
}

impl Cluster {
    /// etcd, three nodes, and [`VIEWERS`] viewers opened on the nodes in turn; returns the
    /// index of the node that owns channel `demo`. With `regions`, the channel is a hierarchy
    /// of that many named regions, viewer `i` hinting at region `i mod regions` (every page is
    /// on 127.0.0.1).
    async fn start(extra: &[&str], regions: Option<usize>) -> Result<(Cluster, usize)> {
        let logs = tempfile::Builder::new().prefix("e2e-cluster-").tempdir()?;
        let etcd = Etcd::start().await?;
        let ttl = LEASE_TTL_S.to_string();
        let hb = HEARTBEAT_MS.to_string();
        let mut args = vec!["--lease-ttl", &ttl, "--heartbeat-ms", &hb];
        args.extend_from_slice(extra);
        let topology = logs.path().join("topology.toml");
        let topology_arg = topology.to_string_lossy().to_string();
        if let Some(n) = regions {
            let mut toml = String::from(
                "[topology]\nk = 4\nfec_n = 2\nmesh_c = 3\nallow_region_hint = true\n",
            );
            for r in 0..n {
                toml.push_str(&format!("\n[[topology.region]]\nname = \"r{r}\"\n"));
            }
            std::fs::write(&topology, toml)?;
            args.extend_from_slice(&["--topology", &topology_arg]);
        }
        let nodes = start_nodes(3, &etcd, &web_dir(), logs.path(), &args).await?;
        // The DCM goes to the node a viewer (here: the locator) reaches first: the second one,
        // so that viewers opened on the others are redirected to it.
        let owner = owner_index(&nodes, 1, "demo").await?;
        let browser = Browser::launch(LaunchOptions::default()).await?;
        let mut pages = Vec::new();
        for i in 0..VIEWERS {
            let node = &nodes[i % nodes.len()];
            let region = regions.map(|n| format!("r{}", i % n));
            pages.push(
                open_viewer(
                    &browser,
                    node,
                    [3000, 1200][i % 2],
                    i == 0,
                    region.as_deref(),
                )
                .await?,
            );
        }
        Ok((
            Cluster {
                etcd,
                nodes,
                _browser: browser,
                pages,
                _logs: logs,
            },
            owner,
        ))
    }

    async fn stats(&self) -> Result<Vec<PeerReport>> {
        page_stats(&self.pages).await
    }

    /// Whether a viewer's verified bytes hash as `node`'s origin window does.
    async fn matches(&self, node: &Node, r: &PeerReport) -> Result<bool> {
        let Some(first) = r.verified_first_seq else {
            return Ok(false);
        };
        let v = node
            .get_json(&format!(
                "/api/channels/demo/hash?first={first}&count={}",
                r.verified_count
            ))
            .await?;
        Ok(v["hash"].as_str() == Some(r.verified_hash.as_str()))
    }

    /// Every viewer served from `owner`, byte-exact, each substream delivered by its parent.
    async fn settled(&self, owner: &Node) -> Result<Vec<PeerReport>> {
        let reports = self.stats().await?;
        for (i, r) in reports.iter().enumerate() {
            ensure!(
                r.control_server == owner.url,
                "viewer {i} is connected to {:?}, not to the owner {}",
                r.control_server,
                owner.url
            );
            ensure!(
                r.verified_count > 20 && self.matches(owner, r).await?,
                "viewer {i} is not served byte-exact yet: verified {}",
                r.verified_count
            );
            ensure!(
                r.links.len() == r.plan.len()
                    && r.links.iter().all(|l| l.first_packet_ms.is_some()),
                "viewer {i} waits for a parent"
            );
        }
        Ok(reports)
    }

    /// Console errors other than the viewer page's usual ones and those about `dead` (the
    /// node that was killed: fetches and the WebSocket to it fail until peers move).
    fn unexpected_errors(&self, dead: &str) -> Vec<String> {
        let host = dead.trim_start_matches("http://").to_string();
        let mut errors = Vec::new();
        for (i, p) in self.pages.iter().enumerate() {
            let all = p.console_errors();
            let left: Vec<String> = unexpected(&all, VIEWER_PAGE)
                .into_iter()
                .filter(|e| !e.contains(&host))
                .map(|e| format!("viewer {i}: {e}"))
                .collect();
            errors.extend(left);
        }
        errors
    }
}

/// The newest packet `node` has cut of channel demo.
async fn live_seq(node: &Node) -> Result<u64> {
    node.get_json("/api/channels").await?["channels"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"] == "demo"))
        .and_then(|c| c["live_seq"].as_u64())
        .with_context(|| format!("node {}'s live edge", node.id))
}

/// P2P share of what the viewers received between two readings.
fn p2p_share(before: &[PeerReport], after: &[PeerReport]) -> f64 {
    let (mut peers, mut origin) = (0u64, 0u64);
    for (b, a) in before.iter().zip(after) {
        peers += a.bytes_from_peers.saturating_sub(b.bytes_from_peers);
        origin += a.bytes_from_origin.saturating_sub(b.bytes_from_origin);
    }
    peers as f64 / (peers + origin).max(1) as f64
}

/// Kills (or stops) the owner and checks everything the issue asks of a failover.
async fn fail_over(
    cluster: &mut Cluster,
    owner: usize,
    how: &str,
    min_links_kept: f64,
    max_stalls: u32,
) -> Result<()> {
    let owner_url = cluster.nodes[owner].url.clone();
    wait_until(
        "a settled swarm: every viewer on the owner, byte-exact, every parent delivering",
        Duration::from_secs(40),
        Duration::from_millis(500),
        async || cluster.settled(&cluster.nodes[owner]).await,
    )
    .await?;
    // The swarm's share before the failover (a small hierarchy's origin feeds its top tier
    // the whole stream, so its share is structurally lower than a flat channel's).
    let share_before = {
        let a = cluster.stats().await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        p2p_share(&a, &cluster.stats().await?)
    };
    let share_wanted = (share_before - 0.05).min(0.8);
    println!("{how}: P2P share before the failover {share_before:.2}");
    let before = wait_until(
        "a settled swarm: every viewer on the owner, byte-exact, every parent delivering",
        Duration::from_secs(40),
        Duration::from_millis(500),
        async || cluster.settled(&cluster.nodes[owner]).await,
    )
    .await?;
    for (i, r) in before.iter().enumerate().filter(|(_, r)| r.decoding) {
        println!(
            "{how}: viewer {i} plays at {:.2} s with {:.2} s buffered",
            r.current_time, r.buffer_s
        );
    }
    let topo_before = cluster.nodes[owner]
        .get_json("/api/channels/demo/topology")
        .await?;
    let links_before = links(&topo_before);
    let t0 = Instant::now();
    match how {
        "kill" => cluster.nodes[owner].kill().await,
        _ => {
            cluster.nodes[owner]
                .terminate(Duration::from_secs(10))
                .await?
        }
    }
    let killed_at = Instant::now();
    println!(
        "{how} of the owner {owner_url} took {} ms",
        t0.elapsed().as_millis()
    );
    let survivor = cluster
        .nodes
        .iter()
        .position(Node::alive)
        .ok_or_else(|| anyhow!("no node left"))?;
    // Another node owns the DCM within the lease TTL and a heartbeat interval.
    let new_owner_url = wait_until(
        "another node to own channel demo",
        Duration::from_secs(15),
        Duration::from_millis(50),
        async || {
            let url = cluster.nodes[survivor].locate("demo").await?;
            ensure!(url != owner_url, "the locator still names {url}");
            Ok(url)
        },
    )
    .await?;
    let owned_after = killed_at.elapsed();
    let new_owner = cluster
        .nodes
        .iter()
        .position(|n| n.url == new_owner_url)
        .ok_or_else(|| anyhow!("unknown new owner {new_owner_url}"))?;
    println!(
        "{how}: DCM owned again by {} after {} ms",
        cluster.nodes[new_owner].id,
        owned_after.as_millis()
    );
    let bound = Duration::from_secs(LEASE_TTL_S) + Duration::from_millis(HEARTBEAT_MS);
    // One more second for this test's own polling and a loaded machine.
    ensure!(
        owned_after <= bound + Duration::from_secs(1),
        "the DCM was owned again after {owned_after:?} (lease TTL + heartbeat: {bound:?})"
    );
    // Every viewer resumes on the new owner with its id.
    let resumed = wait_until(
        "every viewer to resume on the new owner",
        Duration::from_secs(15),
        Duration::from_millis(250),
        async || {
            let r = cluster.stats().await?;
            for (i, (a, b)) in r.iter().zip(&before).enumerate() {
                ensure!(
                    a.control_server == new_owner_url && a.control_resumes > b.control_resumes,
                    "viewer {i} is on {:?} (resumed {} times)",
                    a.control_server,
                    a.control_resumes
                );
                ensure!(a.peer_id == b.peer_id, "viewer {i} changed its id");
            }
            Ok(r)
        },
    )
    .await?;
    println!(
        "{how}: every viewer resumed {} ms after the failure",
        killed_at.elapsed().as_millis()
    );
    // The trees were rebuilt from the links the viewers kept.
    let links_after = wait_until(
        "the new owner to rebuild the trees",
        Duration::from_secs(10),
        Duration::from_millis(250),
        async || {
            let topo = cluster.nodes[new_owner]
                .get_json("/api/channels/demo/topology")
                .await?;
            let planned = placed_peers(&topo);
            ensure!(planned == VIEWERS, "{planned} of {VIEWERS} viewers placed");
            Ok(links(&topo))
        },
    )
    .await?;
    let kept = links_before.intersection(&links_after).count();
    let kept_share = kept as f64 / links_before.len().max(1) as f64;
    println!(
        "{how}: tree links kept {kept}/{} ({kept_share:.2})",
        links_before.len()
    );
    ensure!(
        kept_share >= min_links_kept,
        "only {kept}/{} tree links were kept: {links_before:?} -> {links_after:?}",
        links_before.len()
    );
    // Every viewer verifies past what was cut when it resumed, byte-exact, without a stall.
    let edge = live_seq(&cluster.nodes[new_owner]).await?;
    let after = wait_until(
        "every viewer to verify past the failover",
        Duration::from_secs(15),
        Duration::from_millis(500),
        async || {
            let after = cluster.stats().await?;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let end = a.verified_first_seq.unwrap_or(0) + a.verified_count;
                ensure!(
                    end > edge,
                    "viewer {i} verified up to {end}, the edge was {edge}"
                );
                ensure!(
                    a.verified_first_seq == b.verified_first_seq,
                    "viewer {i} restarted its stream"
                );
                ensure!(
                    cluster.matches(&cluster.nodes[new_owner], a).await?,
                    "viewer {i}'s bytes differ from the origin's"
                );
            }
            Ok(after)
        },
    )
    .await?;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        println!(
            "{how}: viewer {i}: origin fallbacks {} (+{}), from origin +{} B, from peers +{} B, \
             stalls +{}",
            a.origin_fallbacks,
            a.origin_fallbacks - b.origin_fallbacks,
            a.bytes_from_origin - b.bytes_from_origin,
            a.bytes_from_peers - b.bytes_from_peers,
            a.stalls - b.stalls
        );
    }
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        ensure!(
            a.stalls - b.stalls <= max_stalls,
            "viewer {i} stalled {} times: {:?}",
            a.stalls - b.stalls,
            a.errors
        );
    }
    // The swarm carries the stream again: P2P share ≥ 0.8 over 3 s, within 10 s of resuming.
    let share = wait_until(
        &format!("P2P share back to {share_wanted:.2} (0.8, or what it was if less)"),
        Duration::from_secs(10),
        Duration::from_millis(10),
        async || {
            let a = cluster.stats().await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let b = cluster.stats().await?;
            let share = p2p_share(&a, &b);
            ensure!(share >= share_wanted, "P2P share {share:.2}");
            Ok(share)
        },
    )
    .await?;
    let _ = resumed;
    println!("{how}: P2P share after the failover {share:.2}");
    if how == "term" {
        // Make-before-break: the peers moved before their server went, with no gap to fetch.
        let fetched: u64 = before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.origin_fallbacks - b.origin_fallbacks)
            .sum();
        ensure!(
            fetched == 0,
            "{fetched} fallback fetches while the stopped node handed over"
        );
    }
    // Operators see it: the failover by its cause, two nodes left, the redirects.
    let cause = if how == "kill" {
        "lease_expired"
    } else {
        "handover"
    };
    wait_until(
        "the new owner's /metrics to show the failover",
        Duration::from_secs(10),
        Duration::from_millis(250),
        async || {
            let m = cluster.nodes[new_owner].metrics().await?;
            for want in [
                format!("p2p_failovers_total{{cause=\"{cause}\"}} 1"),
                "p2p_cluster_nodes 2".to_string(),
                format!(
                    "p2p_dcm_owned{{node=\"{}\"}} 1",
                    cluster.nodes[new_owner].id
                ),
            ] {
                ensure!(m.contains(&want), "no {want:?} in /metrics");
            }
            Ok(())
        },
    )
    .await?;
    let mut redirects = 0;
    for n in cluster.nodes.iter().filter(|n| n.alive()) {
        let v = n.cluster_view().await?;
        redirects += v["redirects"].as_u64().unwrap_or(0);
    }
    ensure!(redirects > 0, "no node counted a redirect");
    let errors = cluster.unexpected_errors(&owner_url);
    ensure!(errors.is_empty(), "unexpected console errors: {errors:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd, Chromium and the built wasm package; run by cargo xtask test"]
async fn a_killed_node_s_dcm_is_taken_over_and_its_viewers_play_on() -> Result<()> {
    run("kill").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd, Chromium and the built wasm package; run by cargo xtask test"]
async fn a_stopped_node_hands_its_dcm_over_before_it_goes() -> Result<()> {
    run("term").await
}

/// A hierarchical channel (the three tiers in three regions, by region hint) fails over too. Its
/// new owner restores the tiers, clusters and trees from the places and parents the heartbeats
/// report, so at least 80 % of the tree links are kept as on a flat channel; the viewers must
/// play on, and the swarm's P2P share come back to what it was. At most one stall per viewer
/// (see below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd, Chromium and the built wasm package; run by cargo xtask test"]
async fn a_hierarchical_channel_s_viewers_play_on_when_its_node_is_killed() -> Result<()> {
    // A top-tier viewer gets the whole stream from the origin's push: while its control
    // connection is down, every packet reaches it as a fallback fetch 600 ms or more after it
    // is known, which a buffer under 2 s does not always absorb (one stall in one of several
    // runs). A flat channel's viewers get most packets from peers and must not stall.
    run_with("kill", &[], Some(3), 0.8, 1).await
}

async fn run(how: &str) -> Result<()> {
    run_with(how, &[], None, 0.8, 0).await
}

async fn run_with(
    how: &str,
    extra: &[&str],
    regions: Option<usize>,
    min_links_kept: f64,
    max_stalls: u32,
) -> Result<()> {
    let (mut cluster, owner) = Cluster::start(extra, regions).await?;
    let mut result = Ok(());
    if let Some(n) = regions {
        result = wait_until(
            &format!("the hierarchy to span {n} regions"),
            Duration::from_secs(20),
            Duration::from_millis(250),
            async || {
                let topo = cluster.nodes[owner]
                    .get_json("/api/channels/demo/topology")
                    .await?;
                let seen = topo["hierarchy"]["regions"].as_array().map_or(0, Vec::len);
                ensure!(seen == n, "{seen} regions");
                Ok(())
            },
        )
        .await;
    }
    if result.is_ok() {
        result = fail_over(&mut cluster, owner, how, min_links_kept, max_stalls).await;
    }
    if result.is_err() {
        if let Ok(reports) = cluster.stats().await {
            for (i, r) in reports.iter().enumerate() {
                eprintln!(
                    "viewer {i} ({:?}) on {} resumed {}: errors {:?}",
                    r.peer_id, r.control_server, r.control_resumes, r.errors
                );
            }
        }
        for n in &cluster.nodes {
            eprintln!("--- {} log (tail) ---", n.id);
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    drop(cluster);
    result
}

/// Which nodes say they own channel demo's DCM.
async fn owners(cluster: &Cluster) -> Result<Vec<String>> {
    let mut owners = Vec::new();
    for n in cluster.nodes.iter().filter(|n| n.alive()) {
        let v = n.cluster_view().await?;
        if v["owned"]
            .as_array()
            .is_some_and(|o| o.iter().any(|d| d == "demo"))
        {
            owners.push(n.id.clone());
        }
    }
    Ok(owners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd, Chromium and the built wasm package; run by cargo xtask test"]
async fn viewers_play_on_while_etcd_is_down_and_the_cluster_heals() -> Result<()> {
    const OUTAGE: Duration = Duration::from_secs(20);
    let (mut cluster, owner) = Cluster::start(&[], None).await?;
    let before = wait_until(
        "a settled swarm",
        Duration::from_secs(40),
        Duration::from_millis(500),
        async || cluster.settled(&cluster.nodes[owner]).await,
    )
    .await?;
    cluster.etcd.kill().await;
    let down_at = Instant::now();
    // Nodes keep serving what they own; nobody takes anything over.
    while down_at.elapsed() < OUTAGE {
        let o = owners(&cluster).await?;
        ensure!(
            o == vec![cluster.nodes[owner].id.clone()],
            "with etcd down, demo is owned by {o:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mid = cluster.stats().await?;
    let edge_mid = live_seq(&cluster.nodes[owner]).await?;
    cluster.etcd.restart().await?;
    let back_at = Instant::now();
    wait_until(
        "every node to answer the owner again",
        Duration::from_secs(5),
        Duration::from_millis(100),
        async || {
            for n in &cluster.nodes {
                let url = n.locate("demo").await?;
                ensure!(url == cluster.nodes[owner].url, "{} answers {url}", n.id);
                let v = n.cluster_view().await?;
                let seen = v["nodes"].as_array().map_or(0, Vec::len);
                ensure!(seen == 3, "node {} sees {seen} nodes", n.id);
            }
            let o = owners(&cluster).await?;
            ensure!(o.len() == 1, "demo owned by {o:?}");
            Ok(())
        },
    )
    .await?;
    println!(
        "etcd back: the cluster answered again after {} ms",
        back_at.elapsed().as_millis()
    );
    let after = cluster.stats().await?;
    for (i, ((b, m), a)) in before.iter().zip(&mid).zip(&after).enumerate() {
        // Verified up to within a few fragments of what the origin had cut by the end.
        let end = m.verified_first_seq.unwrap_or(0) + m.verified_count;
        ensure!(
            end + 20 >= edge_mid && a.verified_count >= m.verified_count,
            "viewer {i} did not keep up while etcd was down: verified up to {end} of \
             {edge_mid}"
        );
        ensure!(a.stalls == b.stalls, "viewer {i} stalled");
        ensure!(
            cluster.matches(&cluster.nodes[owner], a).await?,
            "viewer {i}'s bytes differ from the origin's"
        );
    }
    let errors = cluster.unexpected_errors("no node died");
    ensure!(errors.is_empty(), "unexpected console errors: {errors:#?}");
    Ok(())
}
