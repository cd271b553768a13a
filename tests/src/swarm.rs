//! Swarm harness: an in-process control server with the demo channel and N real headless
//! Chromium viewer pages, each running the wasm peer. Used by the end-to-end tests and by
//! `cargo xtask swarm`. Statistics are read out of the pages (`window.p2p.stats()`), and every
//! viewer's reassembled bytes are checked against the origin's by range hash.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use control_server::config::Config;
use control_server::dcm::{DcmEvent, TopologySnapshot};
use control_server::AppState;
use protocol::report::{LatencyHistogram, PeerReport};
use serde::Serialize;

use crate::cdp::{Browser, LaunchOptions, Page, PageOptions};
use crate::console::{ensure_only_expected, Allowed};
pub use crate::source::{SourceClip, SourceInfo};
use crate::wait::wait_until;

/// Parameters of one swarm run (see `cargo xtask swarm --help`).
#[derive(Debug, Clone)]
pub struct SwarmArgs {
    /// Number of viewer pages.
    pub viewers: usize,
    /// How long to run, in seconds.
    pub seconds: u64,
    /// Upload capacities in kbit/s, cycled over the viewers.
    pub upload_kbps: Vec<u32>,
    /// How many viewers actually play the video.
    pub playing: usize,
    /// Where to write a JSON report, if anywhere.
    pub json: Option<PathBuf>,
    /// Seed for the run's randomness.
    pub seed: u64,
    /// Directory served by the control server (`<repo>/web`).
    pub web_dir: PathBuf,
    /// Percentage of viewers that leave per minute (each replaced by a new one).
    pub churn: f64,
    /// Relaying viewers whose upload is cut to a fraction mid-run.
    pub throttle: usize,
    /// `0`: one flat multi-tree. `R ≥ 1`: the three-tier hierarchy with `R` configured regions,
    /// viewers assigned round-robin (by region hint: every page is on 127.0.0.1).
    pub regions: usize,
    /// Run the stream unsigned (peers relay without checking), to measure what signing costs.
    pub unsigned: bool,
    /// A fragmented-MP4 file looped as the live channel instead of the demo clip.
    pub source: Option<PathBuf>,
    /// Open the viewers one by one over this many seconds of the run (the playing ones spread
    /// among them) instead of all before it starts: joiners throughout the run. 0: all first.
    pub join_over: u64,
    /// `web_dir` was built elsewhere and is served as it is (`--web-dir`).
    pub prebuilt: bool,
    /// Native peers (`waypoint/`, issue 15) beside the pages, all in one `waypoint` process
    /// ([`crate::natives`]); their upload capacities cycle through `upload_kbps` too.
    pub native_viewers: usize,
    /// Milliseconds between two native peers' joins.
    pub native_join_every_ms: u64,
    /// Waypoint servers (native peers with the operator token, issue 15), started before the
    /// viewers, in a `waypoint` process of their own; not viewers.
    pub waypoints: usize,
}

/// A `[topology]` config with `regions` named regions `r0`, `r1`, … that pages may hint at.
pub fn hinted_topology(
    regions: usize,
    k: u32,
) -> Result<control_server::topology::region::TopologyConfig> {
    let mut toml =
        format!("[topology]\nk = {k}\nfec_n = 2\nmesh_c = 3\nallow_region_hint = true\n");
    for r in 0..regions {
        toml.push_str(&format!("\n[[topology.region]]\nname = \"r{r}\"\n"));
    }
    Ok(control_server::topology::region::TopologyConfig::from_toml(
        &toml,
    )?)
}

/// One viewer page.
pub struct Viewer {
    /// `None` once the page is closed.
    pub page: Option<Page>,
    pub decode: bool,
    pub upload_kbps: u32,
    /// Last statistics read from the page (kept after the page is closed).
    pub last: Option<PeerReport>,
    /// The page's console errors when it was closed (see [`Swarm::console_errors`]).
    pub errors_at_close: Vec<String>,
}

/// A running swarm.
pub struct Swarm {
    pub addr: SocketAddr,
    pub state: AppState,
    pub browser: Browser,
    pub viewers: Vec<Viewer>,
    server: tokio::task::JoinHandle<()>,
    pub peak_rss_mb: f64,
    pub peak_pss_mb: f64,
    /// Region names viewers are hinted into, round-robin (empty: flat channel, no hints).
    pub regions: Vec<String>,
    /// The channel viewers watch and the checks read (`demo` unless set).
    pub channel: String,
    /// What the `demo` channel loops: the demo clip or `--source`.
    pub source: SourceInfo,
    /// Wall clock when the server started (ms since the Unix epoch).
    started_ms: f64,
    /// Native peers beside the pages (issue 15), if any.
    pub natives: Option<crate::natives::NativePeers>,
    /// Waypoint servers ([`Swarm::add_waypoints`]).
    pub waypoints: Option<crate::natives::NativePeers>,
}

impl Swarm {
    /// Starts the control server (demo channel) on 127.0.0.1 and a headless Chromium.
    pub async fn start(web_dir: PathBuf) -> Result<Swarm> {
        Swarm::start_with(web_dir, 0).await
    }

    /// Like [`Swarm::start`]; `regions ≥ 1` runs the three-tier hierarchy with that many
    /// configured regions.
    pub async fn start_with(web_dir: PathBuf, regions: usize) -> Result<Swarm> {
        Swarm::start_configured(web_dir, regions, |c| c).await
    }

    /// Like [`Swarm::start_with`], with the server's configuration adjusted by `configure`
    /// (e.g. a file carousel's rate). More channels can be started on `swarm.state` afterwards
    /// (e.g. [`AppState::start_file_channel`]).
    pub async fn start_configured(
        web_dir: PathBuf,
        regions: usize,
        configure: impl FnOnce(Config) -> Config,
    ) -> Result<Swarm> {
        Swarm::start_source(web_dir, regions, configure, SourceClip::demo()?).await
    }

    /// Like [`Swarm::start_configured`], with channel `demo` looping `source` (the demo clip or
    /// any fragmented-MP4 file, see [`SourceClip::load`]).
    pub async fn start_source(
        web_dir: PathBuf,
        regions: usize,
        configure: impl FnOnce(Config) -> Config,
        source: SourceClip,
    ) -> Result<Swarm> {
        if !web_dir.join("pkg/peer.js").is_file() {
            bail!(
                "{} has no built wasm package (pkg/peer.js): run `cargo xtask test` or \
                 `cargo xtask swarm`, which build it first",
                web_dir.display()
            );
        }
        let base = Config::default();
        let topology = if regions > 0 {
            Some(std::sync::Arc::new(hinted_topology(
                regions,
                base.substreams,
            )?))
        } else {
            None
        };
        let config = configure(Config {
            web_dir,
            topology,
            ..base
        });
        let state = AppState::new(config);
        state
            .start_looped_channel("demo", source.bytes)
            .with_context(|| format!("starting channel demo with {}", source.name))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = control_server::app(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        let browser = Browser::launch(LaunchOptions::default()).await?;
        // Let the origin cut its first fragment so joiners have a random-access point.
        wait_until(
            "the demo channel's first packets",
            Duration::from_secs(10),
            Duration::from_millis(50),
            async || {
                state
                    .channel("demo")
                    .and_then(|c| c.live_position())
                    .context("no packet cut yet")
            },
        )
        .await?;
        Ok(Swarm {
            addr,
            state,
            browser,
            viewers: Vec::new(),
            server,
            peak_rss_mb: 0.0,
            peak_pss_mb: 0.0,
            regions: (0..regions).map(|r| format!("r{r}")).collect(),
            channel: "demo".into(),
            source: source.info,
            started_ms: wall_ms(),
            natives: None,
            waypoints: None,
        })
    }

    /// Opens a viewer page; decoding viewers get their own (visible) window so Chromium does not
    /// pause their video as a background tab.
    pub async fn add_viewer(&mut self, upload_kbps: u32, decode: bool) -> Result<usize> {
        let region = if self.regions.is_empty() {
            String::new()
        } else {
            format!(
                "&region={}",
                self.regions[self.viewers.len() % self.regions.len()]
            )
        };
        let url = format!(
            "http://{}/?channel={}&upload={upload_kbps}&decode={}{region}",
            self.addr,
            self.channel,
            u8::from(decode)
        );
        let page = self
            .browser
            .new_page_with(&url, PageOptions { new_window: decode })
            .await?;
        if let Err(e) = page
            .wait_for("window.p2p !== undefined", Duration::from_secs(20))
            .await
        {
            bail!(
                "viewer page {url} did not start its peer: {e:#}; console errors: {:?}",
                page.console_errors()
            );
        }
        self.viewers.push(Viewer {
            page: Some(page),
            decode,
            upload_kbps,
            last: None,
            errors_at_close: Vec::new(),
        });
        Ok(self.viewers.len() - 1)
    }

    /// Starts `n` native peers in one `waypoint` process (see [`crate::natives`]), joining
    /// `join_every_ms` apart, with upload capacities cycled from `upload_kbps`. Once only.
    pub fn add_natives(&mut self, n: usize, upload_kbps: &[u32], join_every_ms: u64) -> Result<()> {
        ensure!(self.natives.is_none(), "native peers are already running");
        let server = format!("http://{}", self.addr);
        self.natives = Some(crate::natives::NativePeers::start(
            &server,
            &self.channel,
            n,
            upload_kbps,
            join_every_ms,
        )?);
        Ok(())
    }

    /// Starts `n` waypoint servers in one `waypoint` process, each offering `upload_kbps`, with
    /// the operator token. Once only.
    pub fn add_waypoints(&mut self, n: usize, upload_kbps: u32) -> Result<()> {
        ensure!(self.waypoints.is_none(), "waypoints are already running");
        let server = format!("http://{}", self.addr);
        self.waypoints = Some(crate::natives::NativePeers::start_waypoints(
            &server,
            &self.channel,
            n,
            upload_kbps,
            self.state.operator_token(),
        )?);
        Ok(())
    }

    /// The waypoints' latest statistics (empty without waypoints).
    pub fn waypoint_stats(&self) -> Vec<PeerReport> {
        self.waypoints
            .as_ref()
            .map_or_else(Vec::new, crate::natives::NativePeers::reports)
    }

    /// The native peers' latest statistics (empty without native peers; refreshed every 5 s).
    pub fn native_stats(&self) -> Vec<PeerReport> {
        self.natives
            .as_ref()
            .map_or_else(Vec::new, crate::natives::NativePeers::reports)
    }

    /// Reads a viewer's statistics (or the last ones, if its page is closed).
    pub async fn stats(&mut self, i: usize) -> Result<PeerReport> {
        let v = self
            .viewers
            .get_mut(i)
            .ok_or_else(|| anyhow!("no viewer {i}"))?;
        let Some(page) = &v.page else {
            return v
                .last
                .clone()
                .ok_or_else(|| anyhow!("viewer {i} closed without stats"));
        };
        let json = page
            .eval("JSON.stringify(window.p2p.stats())")
            .await
            .with_context(|| format!("reading stats of viewer {i}"))?;
        let text = json
            .as_str()
            .ok_or_else(|| anyhow!("stats of viewer {i} are not a string: {json}"))?;
        let report: PeerReport =
            serde_json::from_str(text).with_context(|| format!("parsing stats of viewer {i}"))?;
        v.last = Some(report.clone());
        Ok(report)
    }

    pub async fn all_stats(&mut self) -> Result<Vec<PeerReport>> {
        let mut out = Vec::with_capacity(self.viewers.len());
        for i in 0..self.viewers.len() {
            out.push(self.stats(i).await?);
        }
        self.peak_rss_mb = self.peak_rss_mb.max(self.browser.rss_mb());
        self.peak_pss_mb = self.peak_pss_mb.max(self.browser.pss_mb());
        Ok(out)
    }

    /// Closes a viewer's page (its peer vanishes as if the tab was closed).
    pub async fn close_viewer(&mut self, i: usize) -> Result<()> {
        self.stats(i).await.ok();
        let v = self
            .viewers
            .get_mut(i)
            .ok_or_else(|| anyhow!("no viewer {i}"))?;
        let page = v
            .page
            .take()
            .ok_or_else(|| anyhow!("viewer {i} is already closed"))?;
        v.errors_at_close = page.console_errors();
        page.close()
            .await
            .with_context(|| format!("closing viewer {i}"))
    }

    /// Whether a viewer's reassembled bytes equal the origin's for the same packet range.
    /// `None` when the viewer has verified nothing yet.
    pub fn matches_origin(&self, r: &PeerReport) -> Option<bool> {
        let first = r.verified_first_seq?;
        if r.verified_count == 0 {
            return None;
        }
        let ch = self.state.channel(&self.channel)?;
        let origin = ch.range_hash(first, r.verified_count)?;
        Some(origin.hex() == r.verified_hash)
    }

    /// Console errors of every viewer page so far, closed pages included, each prefixed with
    /// `viewer N: `.
    pub fn console_errors(&self) -> Vec<String> {
        self.viewers
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                let errors = match &v.page {
                    Some(page) => page.console_errors(),
                    None => v.errors_at_close.clone(),
                };
                errors.into_iter().map(move |e| format!("viewer {i}: {e}"))
            })
            .collect()
    }

    /// Fails if any viewer page (closed ones included) logged a console error that `allowed`
    /// does not list.
    pub fn ensure_no_unexpected_console_errors(&self, allowed: &[Allowed]) -> Result<()> {
        ensure_only_expected("the viewer pages", &self.console_errors(), allowed)
    }

    /// The newest packet the demo channel's origin has cut.
    pub fn latest_seq(&self) -> Result<u64> {
        self.state
            .channel(&self.channel)
            .and_then(|c| c.live_position())
            .map(|(_, latest)| latest)
            .context("the demo channel has cut no packet")
    }

    pub async fn topology(&self) -> Result<TopologySnapshot> {
        self.topology_of(&self.channel).await
    }

    /// The DCM's current topology of any channel (e.g. a file channel's downloaders).
    pub async fn topology_of(&self, channel: &str) -> Result<TopologySnapshot> {
        let ch = self
            .state
            .channel(channel)
            .ok_or_else(|| anyhow!("channel {channel:?} is gone"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        ch.dcm
            .send(DcmEvent::Snapshot { reply: tx })
            .await
            .map_err(|_| anyhow!("DCM stopped"))?;
        Ok(rx.await?)
    }

    /// Runs the verification benchmark in the first open page and estimates each viewer's
    /// verification CPU from it (left at zero if no page can run it).
    async fn measure_verification(
        &self,
        g: &mut SigningReport,
        reports: &[PeerReport],
        seconds: u64,
    ) {
        let Some(page) = self.viewers.iter().find_map(|v| v.page.as_ref()) else {
            return;
        };
        let Ok(v) = page
            .eval("import('/pkg/peer.js').then((m) => m.verifyBenchmark(8, 200))")
            .await
        else {
            return;
        };
        g.sha256_mb_per_s = v["sha256_mb_per_s"].as_f64().unwrap_or(0.0);
        g.manifest_verify_us = v["manifest_verify_us"].as_f64().unwrap_or(0.0);
        let (n, secs) = (reports.len().max(1) as f64, seconds.max(1) as f64);
        let manifests: u64 = reports
            .iter()
            .filter_map(|r| r.signed.as_ref())
            .map(|s| s.manifests)
            .sum();
        if g.sha256_mb_per_s > 0.0 {
            let hash_s = g.verified_bytes as f64 / n / secs / (g.sha256_mb_per_s * 1e6);
            let manifest_s = manifests as f64 / n / secs * g.manifest_verify_us / 1e6;
            g.verify_cpu_percent = (hash_s + manifest_s) * 100.0;
        }
    }

    /// The signed stream's figures, `None` if the channel is unsigned.
    fn signing_report(&self, reports: &[PeerReport]) -> Option<SigningReport> {
        let ch = self.state.channel(&self.channel)?;
        ch.public_key()?;
        let c = &ch.counters;
        let manifest = c.manifest_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let media = c.media_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let signed: Vec<_> = reports.iter().filter_map(|r| r.signed.as_ref()).collect();
        let sum = |f: &dyn Fn(&protocol::report::SignedReport) -> u64| -> u64 {
            signed.iter().map(|s| f(s)).sum()
        };
        let overhead = if media > 0 {
            manifest as f64 / media as f64
        } else {
            0.0
        };
        Some(SigningReport {
            manifest_bytes_per_s: overhead * f64::from(self.stream_kbps()) * 125.0,
            manifest_overhead: overhead,
            verified_packets: sum(&|s| s.verified_packets),
            verified_bytes: sum(&|s| s.verified_bytes),
            forged: sum(&|s| s.forged),
            unverified_dropped: sum(&|s| s.unverified_dropped),
            bad_manifests: sum(&|s| s.bad_manifests),
            manifest_waits: sum(&|s| s.manifest_waits),
            manifest_wait_avg_ms: signed.iter().map(|s| s.manifest_wait_ms).sum::<f64>()
                / sum(&|s| s.manifest_waits).max(1) as f64,
            manifest_wait_max_ms: signed
                .iter()
                .map(|s| s.manifest_wait_max_ms)
                .fold(0.0, f64::max),
            verifying_viewers: signed.len(),
            ..SigningReport::default()
        })
    }

    pub fn stream_kbps(&self) -> u32 {
        self.state
            .channel(&self.channel)
            .and_then(|c| c.init())
            .map_or(0, |i| i.2)
    }

    /// (substreams bridged, bytes pushed over bridges) by the demo channel's origin.
    pub fn bridge_counters(&self) -> (u64, u64) {
        self.state.channel(&self.channel).map_or((0, 0), |c| {
            (
                c.counters.bridges_opened.load(Ordering::Relaxed),
                c.counters.origin_bridge_bytes.load(Ordering::Relaxed),
            )
        })
    }

    pub fn origin_counters(&self) -> (u64, u64) {
        self.state.channel(&self.channel).map_or((0, 0), |c| {
            (
                c.counters.origin_push_bytes.load(Ordering::Relaxed),
                c.counters.fallback_bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// Summarizes the current statistics of all viewers (closed ones with their last stats).
    pub async fn report(&mut self, seconds: u64) -> Result<SwarmReport> {
        let mut reports = self.all_stats().await?;
        let pages = reports.len();
        reports.extend(self.native_stats());
        let topo = self.topology().await?;
        let mut r = SwarmReport::from_reports(self, &reports, seconds);
        if let Some(g) = r.signing.as_mut() {
            self.measure_verification(g, &reports, seconds).await;
        }
        r.tree_depth_max = topo.max_depth;
        for p in &topo.peers {
            if let Some(t) = &p.tier {
                let name = serde_json::to_value(t.tier)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                *r.tiers.entry(name).or_insert(0) += 1;
            }
        }
        r.regions = topo.hierarchy.as_ref().map_or(0, |h| h.regions.len());
        let k = f64::from(topo.substreams.max(1));
        r.origin_copies = topo
            .peers
            .iter()
            .flat_map(|p| &p.origin_pushes)
            .map(|x| match x {
                control_server::dcm::planner::Push::Full => 1.0,
                _ => 1.0 / k,
            })
            .sum();
        let live = self.viewers.iter().filter(|v| v.page.is_some()).count() + reports.len() - pages;
        r.native_viewers = reports.len() - pages;
        let waypoints = self.waypoint_stats();
        r.waypoints = waypoints.len();
        r.waypoint_bytes_up = waypoints.iter().map(|w| w.bytes_up).sum();
        let total = r.bytes_from_peers + r.bytes_from_origin;
        r.p2p_share_excluding_waypoints = if total > 0 {
            r.bytes_from_peers.saturating_sub(r.waypoint_bytes_up) as f64 / total as f64
        } else {
            0.0
        };
        r.p2p_share_limit_structural = if live > 0 {
            (1.0 - r.origin_copies / live as f64).max(0.0)
        } else {
            0.0
        };
        r.congestion_links_reported = topo.congestion.len();
        r.congestion_log = topo
            .congestion
            .iter()
            .map(|c| {
                serde_json::json!({
                    "at_s": (c.at_ms as f64 - self.started_ms) / 1000.0,
                    "parent": c.link.parent,
                    "child": c.link.child,
                    "substream": c.link.substream,
                    "behind": c.link.behind,
                    "parent_side": c.link.parent_side,
                })
            })
            .collect();
        Ok(r)
    }

    pub async fn shutdown(mut self) {
        if let Some(n) = self.waypoints.take() {
            let _ = tokio::task::spawn_blocking(move || n.stop_process()).await;
        }
        if let Some(n) = self.natives.take() {
            // Waits for the process to leave: off the runtime's worker.
            let _ = tokio::task::spawn_blocking(move || n.stop()).await;
        }
        drop(self.browser);
        self.server.abort();
    }
}

/// Percentiles of a sample: the same {p50, p95, max} in every benchmark's JSON.
pub use protocol::report::Pct;

/// The swarm benchmark's JSON (field names are a contract; add, don't rename).
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    pub viewers: usize,
    pub seconds: u64,
    pub stream_kbps: u32,
    pub substreams: u32,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub p2p_share: f64,
    pub p2p_share_limit: f64,
    pub startup_ms: Pct,
    pub latency_ms: Pct,
    pub continuity: f64,
    pub stalls: u32,
    pub mismatched_viewers: usize,
    pub tree_depth_max: u32,
    pub peak_rss_mb_per_viewer: f64,
    /// Viewers that verified no packet at all (also a failure).
    pub viewers_without_data: usize,
    pub playing_viewers: usize,
    pub origin_fallbacks: u64,
    /// Joiners' catch-up wants to their new parents, and packets the parents queued for them
    /// (`protocol::want`).
    pub catch_up_asked: u64,
    pub catch_up_sent: u64,
    /// Bytes the server sent: pushed to tree roots over WebSockets, and served over HTTP.
    pub server_push_bytes: u64,
    pub server_fallback_bytes: u64,
    /// Of `server_push_bytes`, the bridges' (moved children fed while their new parent
    /// connected), and how many substreams were bridged.
    pub server_bridge_bytes: u64,
    pub bridges_opened: u64,
    pub bytes_up: u64,
    /// Failure or throttle injected → child receiving that substream again: from the origin's
    /// bridge (pushed on the control socket while the new parent connects) or from the new
    /// parent, whichever came first.
    pub repair_ms: Pct,
    /// Injected → the new *peer* parent's first packet (the figure `repair_ms` was before
    /// bridges), over the repairs whose new parent delivered before the run ended.
    pub repair_peer_ms: Pct,
    /// Repairs the origin's bridge finished before the new parent delivered.
    pub repairs_bridged: usize,
    /// Of those, repairs whose new parent had not delivered by the end of the run.
    pub repairs_peer_unfinished: usize,
    pub repairs_measured: usize,
    pub repairs_unfinished: usize,
    /// The measured repairs split in two: injected → the child's page has its new parent (its
    /// link's `since_ms`: departure or congestion seen, DCM decided, instructions delivered) and
    /// new parent assigned → first packet from it (connection set-up, priming, next packet).
    pub repair_assign_ms: Pct,
    pub repair_connect_ms: Pct,
    /// Repairs whose new parent was already the child's neighbour when the repair was injected
    /// (a link of the DCM's plan in some other tree, so normally an open connection), and the
    /// assigned → first packet time of those and of the others.
    pub repairs_reused_link: usize,
    pub repair_connect_reused_ms: Pct,
    pub repair_connect_new_link_ms: Pct,
    /// The connect part of repairs over new links split again: assigned → the data channel to
    /// the new parent open, and (all repairs to a peer) channel open or assigned, whichever is
    /// later → first packet.
    pub repair_channel_open_ms: Pct,
    pub repair_open_to_packet_ms: Pct,
    /// Repairs whose new parent is the origin (a tree slot pushed over the control socket, not
    /// an HTTP fallback; still counted in `repair_ms`).
    pub repairs_to_origin: usize,
    /// Repairs finished by a new parent that a later move had replaced by the time the run
    /// looked (counted at its own first packet, not the later parent's).
    pub repairs_by_replaced_link: usize,
    /// `repair_ms` by cause.
    pub repair_departure_ms: Pct,
    pub repair_throttle_ms: Pct,
    /// Throttled relays (each one injected congestion event).
    pub congestion_injected: usize,
    /// Throttled relays the DCM flagged within two heartbeat intervals.
    pub congestion_detected: usize,
    /// Congested links the DCM reported in all (any time, any parent).
    pub congestion_links_reported: usize,
    /// Of those, links whose parent was not a throttled relay (its children's complaints, or
    /// its own backlog after a repair handed it many children): false or secondary alarms.
    pub congestion_links_unthrottled: usize,
    /// The DCM's congestion records at the end of the run, for diagnosis: each link with
    /// `at_s` (seconds into the run), `behind` (fragments) and `parent_side`.
    pub congestion_log: Vec<serde_json::Value>,
    /// Per throttled relay: throttle → first congestion report naming it (ms; -1 = never).
    pub detection_ms: Vec<f64>,
    /// Children of a throttled relay the DCM left with it (its reduced capacity still feeds
    /// them); not counted as repairs.
    pub repairs_kept: usize,
    pub heartbeat_bytes_avg: f64,
    pub heartbeat_ms: u32,
    /// Viewer pages opened in all (churn replaces viewers).
    pub viewer_sessions: usize,
    pub departures: usize,
    pub peak_pss_mb_per_viewer: f64,
    /// Hierarchy runs: peers per tier (`preferred`, `middle`, `bottom`) at the end; empty on a
    /// flat channel.
    pub tiers: std::collections::BTreeMap<String, usize>,
    /// Regions with peers (hierarchy runs).
    pub regions: usize,
    /// Streams' worth the origin pushes under the final topology (a full-stream mesh neighbour
    /// counts 1, a substream 1/k), and the P2P share that leaves at best: `1 − copies / N`.
    pub origin_copies: f64,
    pub p2p_share_limit_structural: f64,
    /// Payload bytes the viewers played (each packet once), and the share of them the server
    /// did not have to send: `1 − (push + fallback bytes) / bytes_played`. Unlike `p2p_share`
    /// (received bytes, which on a hierarchy include mesh duplicates and parity), this counts
    /// useful bytes only.
    pub bytes_played: u64,
    pub p2p_share_useful: f64,
    /// The signed stream (issue 13); `None` when the run was unsigned.
    pub signing: Option<SigningReport>,
    /// What the channel looped (issue 14): the demo clip or `--source`, its rate and its
    /// fragment and keyframe spacing.
    pub source: SourceInfo,
    /// Seconds over which viewers joined (`--join-over`; 0: all before the run).
    pub join_over_s: u64,
    /// Stalls per playing viewer, in the order they were opened (stalls of closed pages kept).
    pub stalls_per_playing_viewer: Vec<u32>,
    /// The playing viewers' stall messages (`viewer N: stall at T s (buffered …)`), to see where
    /// in the media each stall happened.
    pub stall_messages: Vec<String>,
    /// Native peers among `viewers` (issue 15; one `waypoint` process, see
    /// [`Swarm::add_natives`]).
    pub native_viewers: usize,
    /// CPU over the run, percent of one core (from /proc): the native peers' process, the
    /// harness process (the control server and origin, and the browser driver), and Chromium
    /// (every process of it). Zero when not measured.
    pub native_cpu_percent: f64,
    pub harness_cpu_percent: f64,
    pub browser_cpu_percent: f64,
    /// Waypoint servers (`--waypoints`), what they uploaded, their process's CPU (percent of a
    /// core), and the share of the viewers' bytes that came from viewers, waypoints not counted
    /// (`p2p_share` counts a waypoint as a peer).
    pub waypoints: usize,
    pub waypoint_bytes_up: u64,
    pub waypoint_cpu_percent: f64,
    pub p2p_share_excluding_waypoints: f64,
}

/// What the signed stream cost and found in a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SigningReport {
    /// Manifest bytes the origin made per second, and per media byte it cut (every viewer gets
    /// each manifest once, so this is also each viewer's overhead on the stream it receives).
    pub manifest_bytes_per_s: f64,
    pub manifest_overhead: f64,
    /// Over all viewers: packets from peers checked and found genuine, forged ones, ones
    /// dropped unchecked, manifests refused.
    pub verified_packets: u64,
    pub verified_bytes: u64,
    pub forged: u64,
    pub unverified_dropped: u64,
    pub bad_manifests: u64,
    /// Packets from peers that arrived before their manifest, their mean and longest wait (ms).
    pub manifest_waits: u64,
    pub manifest_wait_avg_ms: f64,
    pub manifest_wait_max_ms: f64,
    /// Viewers that checked packets (all of them on a signed stream).
    pub verifying_viewers: usize,
    /// Measured in the first open viewer page with the release wasm: SHA-256 throughput and
    /// the cost of taking one manifest (see `peer-wasm/src/web/bench.rs`).
    pub sha256_mb_per_s: f64,
    pub manifest_verify_us: f64,
    /// What checking cost each viewer, as a share of one core: its verified bytes over the
    /// hashing throughput plus its manifests times the cost of one (an estimate from the
    /// measured rates, not a profile).
    pub verify_cpu_percent: f64,
}

impl SwarmReport {
    fn from_reports(swarm: &Swarm, reports: &[PeerReport], seconds: u64) -> SwarmReport {
        let n = reports.len();
        let b0: u64 = reports.iter().map(|r| r.bytes_from_origin).sum();
        let b1: u64 = reports.iter().map(|r| r.bytes_from_peers).sum();
        let mut hist = LatencyHistogram::default();
        for r in reports {
            hist.merge_sparse(&r.latency_hist);
        }
        let lat = |q| hist.quantile(q).unwrap_or(0) as f64;
        let on_time: u64 = reports.iter().map(|r| r.on_time).sum();
        let late: u64 = reports.iter().map(|r| r.late).sum();
        let mismatched = reports
            .iter()
            .filter(|r| swarm.matches_origin(r) == Some(false))
            .count();
        let without = reports
            .iter()
            .filter(|r| swarm.matches_origin(r).is_none())
            .count();
        let (push, fallback) = swarm.origin_counters();
        SwarmReport {
            viewers: n,
            seconds,
            stream_kbps: swarm.stream_kbps(),
            substreams: swarm.state.config.substreams,
            bytes_from_origin: b0,
            bytes_from_peers: b1,
            p2p_share: if b0 + b1 > 0 {
                b1 as f64 / (b0 + b1) as f64
            } else {
                0.0
            },
            // The origin must send at least one full copy of the stream into the swarm
            // (the k tree roots each get 1/k of it): 1 - 1/N.
            p2p_share_limit: if n > 0 { 1.0 - 1.0 / n as f64 } else { 0.0 },
            startup_ms: Pct::of(reports.iter().filter_map(|r| r.startup_ms).collect()),
            latency_ms: Pct {
                p50: lat(0.5),
                p95: lat(0.95),
                max: lat(1.0),
            },
            continuity: if on_time + late > 0 {
                on_time as f64 / (on_time + late) as f64
            } else {
                0.0
            },
            stalls: reports.iter().map(|r| r.stalls).sum(),
            mismatched_viewers: mismatched,
            tree_depth_max: 0,
            peak_rss_mb_per_viewer: if n > 0 {
                swarm.peak_rss_mb / n as f64
            } else {
                0.0
            },
            viewers_without_data: without,
            playing_viewers: reports.iter().filter(|r| r.decoding).count(),
            origin_fallbacks: reports.iter().map(|r| r.origin_fallbacks).sum(),
            catch_up_asked: reports.iter().map(|r| r.catch_up_asked).sum(),
            catch_up_sent: reports.iter().map(|r| r.catch_up_sent).sum(),
            server_push_bytes: push,
            server_bridge_bytes: swarm.bridge_counters().1,
            bridges_opened: swarm.bridge_counters().0,
            server_fallback_bytes: fallback,
            bytes_up: reports.iter().map(|r| r.bytes_up).sum(),
            repair_ms: Pct::default(),
            repair_peer_ms: Pct::default(),
            repairs_bridged: 0,
            repairs_peer_unfinished: 0,
            repairs_measured: 0,
            repairs_unfinished: 0,
            repair_assign_ms: Pct::default(),
            repair_connect_ms: Pct::default(),
            repairs_reused_link: 0,
            repair_connect_reused_ms: Pct::default(),
            repair_connect_new_link_ms: Pct::default(),
            repair_channel_open_ms: Pct::default(),
            repair_open_to_packet_ms: Pct::default(),
            repairs_to_origin: 0,
            repairs_by_replaced_link: 0,
            repair_departure_ms: Pct::default(),
            repair_throttle_ms: Pct::default(),
            congestion_injected: 0,
            congestion_detected: 0,
            congestion_links_reported: 0,
            congestion_links_unthrottled: 0,
            congestion_log: Vec::new(),
            detection_ms: Vec::new(),
            repairs_kept: 0,
            heartbeat_bytes_avg: {
                let (b, n) = reports.iter().fold((0u64, 0u64), |(b, n), r| {
                    (b + r.heartbeat_bytes, n + r.heartbeats_sent)
                });
                if n > 0 {
                    b as f64 / n as f64
                } else {
                    0.0
                }
            },
            heartbeat_ms: swarm.state.config.heartbeat_ms,
            viewer_sessions: n,
            departures: swarm.viewers.iter().filter(|v| v.page.is_none()).count(),
            tiers: Default::default(),
            regions: 0,
            origin_copies: 0.0,
            p2p_share_limit_structural: 0.0,
            bytes_played: reports.iter().map(|r| r.bytes_played).sum(),
            p2p_share_useful: {
                let played: u64 = reports.iter().map(|r| r.bytes_played).sum();
                if played > 0 {
                    (1.0 - (push + fallback) as f64 / played as f64).max(0.0)
                } else {
                    0.0
                }
            },
            peak_pss_mb_per_viewer: if n > 0 {
                swarm.peak_pss_mb / n as f64
            } else {
                0.0
            },
            signing: swarm.signing_report(reports),
            source: swarm.source.clone(),
            join_over_s: 0,
            stalls_per_playing_viewer: reports
                .iter()
                .filter(|r| r.decoding)
                .map(|r| r.stalls)
                .collect(),
            stall_messages: stall_messages(reports),
            native_viewers: 0,
            native_cpu_percent: 0.0,
            harness_cpu_percent: 0.0,
            browser_cpu_percent: 0.0,
            waypoints: 0,
            waypoint_bytes_up: 0,
            waypoint_cpu_percent: 0.0,
            p2p_share_excluding_waypoints: 0.0,
        }
    }

    /// Human-readable table, each figure next to its limit or target where one exists.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("| {k:<24} | {v:<40} |\n"));
        match &self.signing {
            None => row("signed stream", "off (--unsigned)".into()),
            Some(g) => row(
                "signed stream",
                format!(
                    "manifests {:.0} B/s = {:.2} % of the stream (target ≤ 1 %); {} viewers \
                     verified {} packets ({} waited for their manifest: {:.0} ms on average, {:.0} \
                     at most), forged {}, dropped unchecked {}; SHA-256 {:.0} MB/s, {:.0} µs a \
                     manifest: ~{:.3} % of a core per viewer",
                    g.manifest_bytes_per_s,
                    g.manifest_overhead * 100.0,
                    g.verifying_viewers,
                    g.verified_packets,
                    g.manifest_waits,
                    g.manifest_wait_avg_ms,
                    g.manifest_wait_max_ms,
                    g.forged,
                    g.unverified_dropped,
                    g.sha256_mb_per_s,
                    g.manifest_verify_us,
                    g.verify_cpu_percent
                ),
            ),
        }
        row("source", self.source.summary());
        row(
            "viewers (playing)",
            format!("{} ({})", self.viewers, self.playing_viewers),
        );
        row("seconds", self.seconds.to_string());
        if self.native_viewers > 0 {
            row(
                "native viewers",
                format!(
                    "{} of them; CPU % of a core: natives {:.0} ({:.2} per peer), harness {:.0}, \
                     Chromium {:.0}",
                    self.native_viewers,
                    self.native_cpu_percent,
                    self.native_cpu_percent / self.native_viewers as f64,
                    self.harness_cpu_percent,
                    self.browser_cpu_percent
                ),
            );
        }
        if self.waypoints > 0 {
            row(
                "waypoints",
                format!(
                    "{} of them uploaded {} B; CPU {:.0} % of a core; p2p_share without them {:.3}",
                    self.waypoints,
                    self.waypoint_bytes_up,
                    self.waypoint_cpu_percent,
                    self.p2p_share_excluding_waypoints
                ),
            );
        }
        row(
            "stream",
            format!(
                "{} kbit/s in {} substreams",
                self.stream_kbps, self.substreams
            ),
        );
        row(
            "p2p_share",
            format!(
                "{:.3} (limit 1-1/N = {:.3})",
                self.p2p_share, self.p2p_share_limit
            ),
        );
        row(
            "p2p_share_useful",
            format!(
                "{:.3} (1 - server bytes / bytes played; structural limit 1-copies/N = {:.3})",
                self.p2p_share_useful, self.p2p_share_limit_structural
            ),
        );
        if !self.tiers.is_empty() {
            row(
                "tiers (regions)",
                format!("{:?} ({})", self.tiers, self.regions),
            );
        }
        row("bytes from origin", self.bytes_from_origin.to_string());
        row("bytes from peers", self.bytes_from_peers.to_string());
        row("origin fallbacks (pkts)", self.origin_fallbacks.to_string());
        row(
            "catch-up wants / packets sent",
            format!("{} / {}", self.catch_up_asked, self.catch_up_sent),
        );
        row(
            "startup ms p50/p95/max",
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.startup_ms.p50, self.startup_ms.p95, self.startup_ms.max
            ),
        );
        row(
            "latency ms p50/p95/max",
            format!(
                "{:.0} / {:.0} / {:.0}",
                self.latency_ms.p50, self.latency_ms.p95, self.latency_ms.max
            ),
        );
        row("continuity", format!("{:.4} (ideal 1)", self.continuity));
        row(
            "stalls",
            format!(
                "{} (ideal 0; per playing viewer {:?})",
                self.stalls, self.stalls_per_playing_viewer
            ),
        );
        for m in &self.stall_messages {
            row("  stall", m.clone());
        }
        row(
            "mismatched_viewers",
            format!("{} (must be 0)", self.mismatched_viewers),
        );
        row(
            "viewers_without_data",
            self.viewers_without_data.to_string(),
        );
        row("tree_depth_max", self.tree_depth_max.to_string());
        row(
            "repair ms p50/p95/max",
            format!(
                "{:.0} / {:.0} / {:.0} (n={}, kept {}, unfinished {}; target p95 ≤ {})",
                self.repair_ms.p50,
                self.repair_ms.p95,
                self.repair_ms.max,
                self.repairs_measured,
                self.repairs_kept,
                self.repairs_unfinished,
                2 * self.heartbeat_ms
            ),
        );
        row(
            "repair to new peer ms",
            format!(
                "{:.0} / {:.0} / {:.0} (p50/p95/max; bridged first {}, peer unfinished {})",
                self.repair_peer_ms.p50,
                self.repair_peer_ms.p95,
                self.repair_peer_ms.max,
                self.repairs_bridged,
                self.repairs_peer_unfinished
            ),
        );
        row(
            "repair: assign / connect",
            format!(
                "p95 {:.0} / {:.0} (p50 {:.0} / {:.0}); reused link {}, to origin {}",
                self.repair_assign_ms.p95,
                self.repair_connect_ms.p95,
                self.repair_assign_ms.p50,
                self.repair_connect_ms.p50,
                self.repairs_reused_link,
                self.repairs_to_origin
            ),
        );
        row(
            "congestion detected",
            format!(
                "{} of {} injected within 2 intervals ({} links reported, {} not of a throttled parent)",
                self.congestion_detected,
                self.congestion_injected,
                self.congestion_links_reported,
                self.congestion_links_unthrottled
            ),
        );
        row(
            "detection ms per throttle",
            format!("{:?}", self.detection_ms),
        );
        row(
            "heartbeat bytes avg",
            format!("{:.0}", self.heartbeat_bytes_avg),
        );
        row(
            "sessions (departures)",
            format!("{} ({})", self.viewer_sessions, self.departures),
        );
        row(
            "peak RSS MB per viewer",
            format!("{:.0}", self.peak_rss_mb_per_viewer),
        );
        s
    }
}

use protocol::rng::XorShift as Rng;

/// A child whose substream lost its parent at `at_ms` (departure or throttle).
#[derive(Debug, Clone)]
struct PendingRepair {
    child: protocol::PeerId,
    substream: u32,
    old_parent: protocol::PeerId,
    at_ms: f64,
    throttle: bool,
    /// The child's neighbours (parents and children in any tree) when the repair was injected.
    neighbours: Vec<protocol::PeerId>,
    /// When the origin's bridge first delivered the substream after the move, if it did, and
    /// when the child's page had its new parent.
    bridged_ms: Option<f64>,
    assigned_ms: Option<f64>,
}

/// One finished repair, with its parts (see [`SwarmReport::repair_assign_ms`]).
#[derive(Debug, Clone, Copy)]
struct Repaired {
    /// Injected → the substream flowing again, from the origin's bridge or the new parent.
    total_ms: f64,
    /// Injected → the new parent's first packet (`None`: only the bridge delivered by the end).
    peer_ms: Option<f64>,
    /// The bridge delivered before the new parent did.
    bridged: bool,
    assign_ms: f64,
    connect_ms: f64,
    reused_link: bool,
    to_origin: bool,
    throttle: bool,
    /// Data channel to the new parent open, ms after the assignment (negative: open before).
    open_ms: Option<f64>,
    replaced: bool,
}

/// The players' stall reports, each with its viewer's index.
pub fn stall_messages(reports: &[PeerReport]) -> Vec<String> {
    reports
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.errors
                .iter()
                .filter(|e| e.contains("stall at"))
                .map(move |e| format!("viewer {i}: {e}"))
        })
        .collect()
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The children of `parent`, per substream, from the DCM's topology.
fn children_of(
    topo: &TopologySnapshot,
    parent: protocol::PeerId,
    at_ms: f64,
    throttle: bool,
) -> Vec<PendingRepair> {
    let neighbours = |child: protocol::PeerId| -> Vec<protocol::PeerId> {
        topo.peers
            .iter()
            .filter(|p| p.id == child)
            .flat_map(|p| p.plan.iter())
            .flat_map(|sp| {
                let parent = match sp.parent {
                    protocol::Source::Peer { id } => Some(id),
                    protocol::Source::Origin => None,
                };
                parent.into_iter().chain(sp.children.iter().copied())
            })
            .collect()
    };
    topo.peers
        .iter()
        .filter(|p| p.id == parent)
        .flat_map(|p| {
            p.plan.iter().flat_map(move |sp| {
                sp.children.iter().map(move |c| PendingRepair {
                    child: *c,
                    substream: sp.index,
                    old_parent: parent,
                    at_ms,
                    throttle,
                    neighbours: neighbours(*c),
                    bridged_ms: None,
                    assigned_ms: None,
                })
            })
        })
        .collect()
}

/// `cargo xtask swarm`: N viewers for S seconds, progress while running, table + JSON at the end.
pub async fn run(args: SwarmArgs) -> Result<()> {
    if args.viewers == 0 {
        bail!("--viewers must be at least 1");
    }
    if args.upload_kbps.is_empty() {
        bail!("--upload-kbps needs at least one value");
    }
    if !(0.0..=100.0).contains(&args.churn) {
        bail!("--churn is a percentage of viewers per minute, 0..=100");
    }
    if args.throttle > args.viewers {
        bail!("--throttle cannot exceed --viewers");
    }
    let mut rng = Rng::seeded(args.seed);
    let started = Instant::now();
    let unsigned = args.unsigned;
    let source = match &args.source {
        Some(path) => SourceClip::load(path)?,
        None => SourceClip::demo()?,
    };
    eprintln!("swarm: source {}", source.info.summary());
    let mut swarm = Swarm::start_source(
        args.web_dir.clone(),
        args.regions,
        |c| Config {
            signing_seed: if unsigned { None } else { c.signing_seed },
            // Every native peer is a session from 127.0.0.1: the per-address limits (128
            // sessions, 240 joins a minute) would refuse a few hundred of them.
            address_limits: if args.native_viewers + args.waypoints > 0 {
                control_server::limits::AddressLimits {
                    sessions: 0,
                    joins_per_minute: 0,
                    control_bytes_per_sec: 0,
                    ingest_channels: 0,
                }
            } else {
                c.address_limits
            },
            ..c
        },
        source,
    )
    .await?;
    let hb_ms = f64::from(swarm.state.config.heartbeat_ms);
    eprintln!(
        "swarm: control server on http://{}/, stream {} kbit/s; opening {} viewers ({} playing)",
        swarm.addr,
        swarm.stream_kbps(),
        args.viewers,
        args.playing.min(args.viewers)
    );
    if args.waypoints > 0 {
        // Servers the operator runs: there before the viewers, each offering 20 streams.
        let up = swarm.stream_kbps().max(100) * 20;
        swarm.add_waypoints(args.waypoints, up)?;
        eprintln!(
            "swarm: {} waypoint(s), {up} kbit/s of upload each",
            args.waypoints
        );
    }
    // Joiners: all before the run, or viewer i at i/N of `--join-over` into it, the playing ones
    // spread evenly among them (so some start playing well into the stream).
    let join_over = args.join_over.min(args.seconds) as f64;
    let joins: Vec<(f64, bool)> = (0..args.viewers)
        .map(|i| {
            if join_over > 0.0 {
                (
                    join_over * i as f64 / args.viewers as f64,
                    i * args.playing % args.viewers < args.playing,
                )
            } else {
                (0.0, i < args.playing)
            }
        })
        .collect();
    let mut next_join = 0;
    while next_join < joins.len() && joins[next_join].0 <= 0.0 {
        let up = args.upload_kbps[next_join % args.upload_kbps.len()];
        swarm.add_viewer(up, joins[next_join].1).await?;
        next_join += 1;
        eprint!("\r  opened {}/{} viewers", next_join, args.viewers);
    }
    eprintln!();
    if args.native_viewers > 0 {
        let cycle: Vec<u32> = (0..args.upload_kbps.len())
            .map(|i| args.upload_kbps[(args.viewers + i) % args.upload_kbps.len()])
            .collect();
        swarm.add_natives(args.native_viewers, &cycle, args.native_join_every_ms)?;
        eprintln!(
            "swarm: {} native viewers joining, {} ms apart",
            args.native_viewers, args.native_join_every_ms
        );
    }
    let cpu = CpuWindow::start(&swarm);
    // Churn: departures at random moments, each followed by a new (verify-only) viewer.
    let total_leaves =
        (args.churn / 100.0 * args.viewers as f64 * args.seconds as f64 / 60.0).round() as usize;
    let mut leave_at: Vec<f64> = (0..total_leaves)
        .map(|_| {
            5.0 + rng.below(((args.seconds as f64 - 10.0).max(1.0) * 1000.0) as u64) as f64 / 1000.0
        })
        .collect();
    leave_at.sort_by(f64::total_cmp);
    let throttle_at = args.seconds as f64 / 3.0;
    let mut throttled = false;
    let mut throttled_peers: Vec<(protocol::PeerId, f64)> = Vec::new();
    let mut pending: Vec<PendingRepair> = Vec::new();
    let mut repairs: Vec<Repaired> = Vec::new();

    let run_started = Instant::now();
    let deadline = run_started + Duration::from_secs(args.seconds);
    let mut next_progress = 5.0;
    let mut next_leave = 0;
    while Instant::now() < deadline {
        // The benchmark's clock tick, not a wait for a condition: the run lasts `--seconds`
        // and is sampled every half second.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = run_started.elapsed().as_secs_f64();
        // Joiners due now.
        while next_join < joins.len() && joins[next_join].0 <= t {
            let up = args.upload_kbps[next_join % args.upload_kbps.len()];
            let decode = joins[next_join].1;
            swarm.add_viewer(up, decode).await?;
            next_join += 1;
            eprintln!(
                "  t={t:>4.0}s  viewer {} joined{}",
                next_join - 1,
                if decode { " (playing)" } else { "" }
            );
        }
        // Departures due now.
        while next_leave < leave_at.len() && leave_at[next_leave] <= t {
            next_leave += 1;
            let candidates: Vec<usize> = (0..swarm.viewers.len())
                .filter(|i| swarm.viewers[*i].page.is_some() && !swarm.viewers[*i].decode)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let victim = candidates[rng.below(candidates.len() as u64) as usize];
            let id = swarm.stats(victim).await.ok().and_then(|r| r.peer_id);
            let now = wall_ms();
            if let Some(id) = id {
                let topo = swarm.topology().await?;
                pending.extend(children_of(&topo, id, now, false));
            }
            swarm.close_viewer(victim).await?;
            let up = swarm.viewers[victim].upload_kbps;
            swarm.add_viewer(up, false).await?;
        }
        // Throttle K relaying viewers once, a third into the run.
        if !throttled && args.throttle > 0 && t >= throttle_at {
            throttled = true;
            let topo = swarm.topology().await?;
            let reports = swarm.all_stats().await?;
            let mut relays: Vec<(usize, protocol::PeerId, usize)> = reports
                .iter()
                .enumerate()
                .filter(|(i, _)| swarm.viewers[*i].page.is_some())
                .filter_map(|(i, r)| {
                    let id = r.peer_id?;
                    let kids: usize = topo
                        .peers
                        .iter()
                        .find(|p| p.id == id)
                        .map(|p| p.plan.iter().map(|s| s.children.len()).sum())
                        .unwrap_or(0);
                    (kids >= 2).then_some((i, id, kids))
                })
                .collect();
            // Deterministic order, then a seeded pick.
            relays.sort_by_key(|r| r.1);
            let sub_kbps = f64::from(swarm.stream_kbps()) / f64::from(topo.substreams.max(1));
            for _ in 0..args.throttle.min(relays.len()) {
                let (i, id, kids) = relays.remove(rng.below(relays.len() as u64) as usize);
                // Well below what its children need: a fifth of their load.
                let cut = ((kids as f64 * sub_kbps) / 5.0).max(16.0) as u32;
                let now = wall_ms();
                pending.extend(children_of(&topo, id, now, true));
                if let Some(page) = &swarm.viewers[i].page {
                    page.eval(&format!("window.p2p.setUploadKbps({cut})"))
                        .await?;
                }
                throttled_peers.push((id, now));
                eprintln!("  throttled viewer {i} ({id}, {kids} children) to {cut} kbit/s");
            }
        }
        // Repairs: a child got its substream from a new parent.
        if !pending.is_empty() {
            let reports = swarm.all_stats().await?;
            pending.retain_mut(|p| {
                let Some(r) = reports.iter().find(|r| r.peer_id == Some(p.child)) else {
                    return true;
                };
                let Some(current) = r.links.iter().find(|l| l.substream == p.substream) else {
                    return true;
                };
                let old = protocol::Source::Peer { id: p.old_parent };
                if current.parent == old {
                    return true;
                }
                // The links this substream had since it left the old parent, oldest first: a
                // new parent that delivered and was then replaced by another move (say, a
                // joiner adopting the orphan) finished the repair when it delivered.
                let spans: Vec<&protocol::report::LinkStat> = r
                    .past_links
                    .iter()
                    .chain(std::iter::once(current))
                    .filter(|l| l.substream == p.substream)
                    .collect();
                let after = spans
                    .iter()
                    .rposition(|l| l.parent == old)
                    .map_or(0, |i| i + 1);
                let in_window =
                    |l: &protocol::report::LinkStat| l.since_ms >= p.at_ms - 5_000.0 && l.since_ms <= p.at_ms + 15_000.0;
                // The origin's bridge may have carried the substream before the new parent did.
                let bridged = spans[after..]
                    .iter()
                    .filter(|l| in_window(l))
                    .filter_map(|l| l.bridged_ms)
                    .reduce(f64::min);
                if bridged.is_some() {
                    p.bridged_ms = bridged;
                    p.assigned_ms = spans[after..]
                        .iter()
                        .find(|l| in_window(l))
                        .map(|l| l.since_ms);
                }
                let l = spans[after..]
                    .iter()
                    .copied()
                    .find(|l| l.first_packet_ms.is_some())
                    .unwrap_or(current);
                match l.first_packet_ms {
                    Some(peer_first) if in_window(l) => {
                        let first = p.bridged_ms.map_or(peer_first, |b| b.min(peer_first));
                        let reused_link = match l.parent {
                            protocol::Source::Peer { id } => p.neighbours.contains(&id),
                            protocol::Source::Origin => false,
                        };
                        // One line per repair, to see where a slow one spent its time.
                        eprintln!(
                            "    repair {} sub {} {} -> {:?}: {:.0} ms (assign {:.0}, connect {:.0}, open {:?}{}; new parent's first packet at {:.0}) injected at {:.0}",
                            p.child,
                            p.substream,
                            p.old_parent,
                            l.parent,
                            first - p.at_ms,
                            l.since_ms - p.at_ms,
                            first - l.since_ms,
                            l.parent_open_ms.map(|o| (o - l.since_ms).round()),
                            match (reused_link, p.bridged_ms.is_some_and(|b| b < peer_first)) {
                                (true, true) => ", reused link, bridged",
                                (true, false) => ", reused link",
                                (false, true) => ", bridged",
                                (false, false) => "",
                            },
                            peer_first - p.at_ms,
                            p.at_ms
                        );
                        repairs.push(Repaired {
                            total_ms: (first - p.at_ms).max(0.0),
                            peer_ms: Some((peer_first - p.at_ms).max(0.0)),
                            bridged: p.bridged_ms.is_some_and(|b| b < peer_first),
                            assign_ms: (l.since_ms - p.at_ms).max(0.0),
                            connect_ms: (first - l.since_ms).max(0.0),
                            reused_link,
                            to_origin: l.parent == protocol::Source::Origin,
                            throttle: p.throttle,
                            open_ms: l.parent_open_ms.map(|o| o - l.since_ms),
                            replaced: l.until_ms.is_some(),
                        });
                        false
                    }
                    // Moved much later, for another reason (e.g. churn): not this repair.
                    Some(_) if l.since_ms > p.at_ms + 15_000.0 => false,
                    _ => true,
                }
            });
        }
        if t >= next_progress {
            next_progress += 5.0;
            let r = swarm.report(t as u64).await?;
            if r.native_viewers > 0 {
                let n = swarm.native_stats();
                eprintln!(
                    "  t={:>4.0}s  native: {} joined, {} data channels open, {} with errors",
                    t,
                    n.iter().filter(|r| r.peer_id.is_some()).count(),
                    n.iter().map(|r| r.connected_peers).sum::<u32>(),
                    n.iter().filter(|r| !r.errors.is_empty()).count()
                );
            }
            eprintln!(
                "  t={:>4.0}s  p2p_share {:.3}  fallbacks {}  stalls {}  mismatched {}  depth {}  congested {}  repairs {}/{} pending  rss {:.0} MB",
                t,
                r.p2p_share,
                r.origin_fallbacks,
                r.stalls,
                r.mismatched_viewers,
                r.tree_depth_max,
                r.congestion_links_reported,
                repairs.len(),
                pending.len(),
                swarm.browser.rss_mb()
            );
        }
    }
    let mut report = swarm.report(args.seconds).await?;
    cpu.finish(&swarm, &mut report);
    let topo = swarm.topology().await?;
    // For debugging a run: the final topology as the DCM sees it.
    if let Some(path) = std::env::var_os("P2P_SWARM_TOPOLOGY") {
        std::fs::write(&path, serde_json::to_vec_pretty(&topo)?)?;
    }
    report.viewers = args.viewers + args.native_viewers;
    report.join_over_s = args.join_over;
    // Children the bridge fed whose new parent had not delivered by the end: their substream
    // flowed again, so the repair is measured, without a new parent's figure.
    pending.retain(|p| {
        let (Some(b), Some(assigned)) = (p.bridged_ms, p.assigned_ms) else {
            return true;
        };
        repairs.push(Repaired {
            total_ms: (b - p.at_ms).max(0.0),
            peer_ms: None,
            bridged: true,
            assign_ms: (assigned - p.at_ms).max(0.0),
            connect_ms: (b - assigned).max(0.0),
            reused_link: false,
            to_origin: false,
            throttle: p.throttle,
            open_ms: None,
            replaced: false,
        });
        false
    });
    let pct =
        |f: &dyn Fn(&Repaired) -> Option<f64>| Pct::of(repairs.iter().filter_map(f).collect());
    report.repair_ms = pct(&|r| Some(r.total_ms));
    report.repairs_measured = repairs.len();
    report.repair_peer_ms = pct(&|r| r.peer_ms);
    report.repairs_bridged = repairs.iter().filter(|r| r.bridged).count();
    report.repairs_peer_unfinished = repairs.iter().filter(|r| r.peer_ms.is_none()).count();
    report.repair_assign_ms = pct(&|r| Some(r.assign_ms));
    report.repair_connect_ms = pct(&|r| Some(r.connect_ms));
    report.repairs_reused_link = repairs.iter().filter(|r| r.reused_link).count();
    report.repair_connect_reused_ms = pct(&|r| r.reused_link.then_some(r.connect_ms));
    report.repair_connect_new_link_ms =
        pct(&|r| (!r.reused_link && !r.to_origin).then_some(r.connect_ms));
    report.repairs_to_origin = repairs.iter().filter(|r| r.to_origin).count();
    report.repairs_by_replaced_link = repairs.iter().filter(|r| r.replaced).count();
    report.repair_channel_open_ms = pct(&|r| (!r.reused_link).then_some(r.open_ms?.max(0.0)));
    report.repair_open_to_packet_ms =
        pct(&|r| Some(r.total_ms - r.assign_ms - r.open_ms?.max(0.0)));
    report.repair_departure_ms = pct(&|r| (!r.throttle).then_some(r.total_ms));
    report.repair_throttle_ms = pct(&|r| r.throttle.then_some(r.total_ms));
    // Children still with their throttled parent at the end were kept by the DCM.
    let throttled_ids: Vec<protocol::PeerId> = throttled_peers.iter().map(|t| t.0).collect();
    report.repairs_kept = pending
        .iter()
        .filter(|p| throttled_ids.contains(&p.old_parent))
        .count();
    report.repairs_unfinished = pending.len() - report.repairs_kept;
    report.detection_ms = throttled_peers
        .iter()
        .map(|(id, at)| {
            topo.congestion
                .iter()
                .filter(|c| c.link.parent == *id && c.at_ms as f64 >= *at)
                .map(|c| c.at_ms as f64 - at)
                .fold(
                    -1.0,
                    |best: f64, d| if best < 0.0 { d } else { best.min(d) },
                )
        })
        .collect();
    report.congestion_links_unthrottled = topo
        .congestion
        .iter()
        .filter(|c| !throttled_peers.iter().any(|(id, _)| *id == c.link.parent))
        .count();
    report.congestion_injected = throttled_peers.len();
    report.congestion_detected = throttled_peers
        .iter()
        .filter(|(id, at)| {
            topo.congestion.iter().any(|c| {
                c.link.parent == *id
                    && c.at_ms as f64 >= *at
                    && (c.at_ms as f64) <= at + 2.0 * hb_ms
            })
        })
        .count();
    println!("\n{}", report.table());
    println!("(total wall time {:.0} s)", started.elapsed().as_secs_f64());
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    } else {
        println!("{json}");
    }
    swarm.shutdown().await;
    Ok(())
}

/// CPU time over a run (issue 15): the native peers' process, this process (the control
/// server, the origin and the browser driver), and Chromium's process tree, from /proc.
struct CpuWindow {
    t0: Instant,
    natives0: f64,
    waypoints0: f64,
    process0: f64,
    browser0: f64,
}

impl CpuWindow {
    fn start(swarm: &Swarm) -> CpuWindow {
        CpuWindow {
            t0: Instant::now(),
            natives0: natives_cpu_s(swarm),
            waypoints0: waypoints_cpu_s(swarm),
            process0: crate::compare::cpu::tree_cpu_s(std::process::id()),
            browser0: crate::compare::cpu::tree_cpu_s(swarm.browser.pid()),
        }
    }

    fn finish(&self, swarm: &Swarm, report: &mut SwarmReport) {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-3);
        let natives = (natives_cpu_s(swarm) - self.natives0).max(0.0);
        let waypoints = (waypoints_cpu_s(swarm) - self.waypoints0).max(0.0);
        // The process tree includes Chromium and the native peers (the harness launched them).
        let browser =
            (crate::compare::cpu::tree_cpu_s(swarm.browser.pid()) - self.browser0).max(0.0);
        let process =
            (crate::compare::cpu::tree_cpu_s(std::process::id()) - self.process0).max(0.0);
        report.native_cpu_percent = natives / wall * 100.0;
        report.browser_cpu_percent = browser / wall * 100.0;
        report.waypoint_cpu_percent = waypoints / wall * 100.0;
        report.harness_cpu_percent =
            (process - browser - natives - waypoints).max(0.0) / wall * 100.0;
    }
}

/// CPU seconds of the waypoints' process so far (0 without one).
fn waypoints_cpu_s(swarm: &Swarm) -> f64 {
    swarm
        .waypoints
        .as_ref()
        .map_or(0.0, |n| crate::compare::cpu::tree_cpu_s(n.pid()))
}

/// CPU seconds of the native peers' process so far (0 without one).
fn natives_cpu_s(swarm: &Swarm) -> f64 {
    swarm
        .natives
        .as_ref()
        .map_or(0.0, |n| crate::compare::cpu::tree_cpu_s(n.pid()))
}
