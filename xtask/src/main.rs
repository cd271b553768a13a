//! `cargo xtask` — developer tasks for the P2P live-video workspace.
//!
//! * `cargo xtask demo` — build the wasm peer and serve the demo page.
//! * `cargo xtask test` — everything CI runs: native tests, wasm tests in
//!   headless Chromium, and the end-to-end browser tests.
//! * `cargo xtask swarm` — run a swarm of headless viewers and report.
//! * `cargo xtask compare` — our swarm against P2P Media Loader on the same source.
//! * `cargo xtask fuzz --seconds N` — coverage-guided fuzzing of every parser of untrusted
//!   input (cargo-fuzz, libFuzzer; targets in `fuzz/`).
//!
//! Missing tools (wasm32 target, wasm-bindgen CLI, wasm-pack, Chromium and
//! ChromeDriver) are installed on the way.

mod bench_heartbeats;
mod bench_topology;
mod build;
mod cluster_demo;
mod compare;
mod fuzz;
mod sim;
mod tools;
mod util;
mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::build::build_wasm;
use crate::tools::{
    ensure_chromium, ensure_etcd, ensure_ffmpeg, ensure_nat_tools, ensure_protoc,
    ensure_wasm_bindgen, ensure_wasm_pack, ensure_wasm_target, wasm_pack_bin, CHROMEDRIVER,
};
use crate::util::{cargo, repo_root, run};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the P2P live-video workspace"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the wasm peer and run the control server serving `web/`.
    Demo {
        /// Address for the control server to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Run N control-server nodes on consecutive ports from --listen, joined through a local
        /// etcd (Debian's etcd-server, installed if missing) started on port + 100: the cluster
        /// mode of issue 12.
        #[arg(long, value_name = "N")]
        cluster: Option<u16>,
        /// More control-server options after `--`, e.g. `cargo xtask demo -- --hierarchy` or
        /// `-- --topology docs/topology.example.toml` (see `control-server --help`).
        #[arg(last = true)]
        server_args: Vec<String>,
    },
    /// Run all tests: native, wasm (wasm-pack in headless Chromium), e2e, and each fuzz
    /// target for a few seconds.
    Test,
    /// Build the wasm peer (web/pkg) and the web assets (web/dist) only: what the e2e tests
    /// need before `cargo test -p e2e -- --ignored` with `P2P_WEB_DIR=web`.
    Build,
    /// Coverage-guided fuzzing (cargo-fuzz, libFuzzer, stable toolchain) of the control
    /// messages, the DCM, binary heartbeats, the fMP4 splitter, packet headers and the FEC
    /// assembler. Installs cargo-fuzz if missing; a crash fails the run and names its input.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (comma-separated; default: all).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
    },
    /// Run a swarm of headless viewers against a local control server.
    Swarm {
        /// Number of viewer pages.
        #[arg(long, default_value_t = 12)]
        viewers: usize,
        /// Duration of the run in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Upload capacities in kbit/s, comma-separated, cycled over viewers.
        #[arg(long, value_delimiter = ',', default_value = "2000")]
        upload_kbps: Vec<u32>,
        /// How many viewers play the video.
        #[arg(long, default_value_t = 2)]
        playing: usize,
        /// Write a JSON report to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seed for the run's randomness.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Percentage of viewers that leave per minute (each replaced by a new viewer).
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Relaying viewers whose upload is cut to a fraction of their load a third into the run.
        #[arg(long, default_value_t = 0)]
        throttle: usize,
        /// Run the three-tier hierarchy with this many regions (viewers hinted round-robin);
        /// 0 runs one flat multi-tree.
        #[arg(long, default_value_t = 0, value_name = "R")]
        hierarchy_regions: usize,
        /// Run the stream unsigned (peers relay without checking), to measure what signing
        /// costs.
        #[arg(long)]
        unsigned: bool,
        /// Loop this fragmented-MP4 file as the live channel instead of the demo clip (make one
        /// with `ffmpeg ... -movflags +frag_keyframe+empty_moov+default_base_moof`).
        #[arg(long, value_name = "PATH")]
        source: Option<PathBuf>,
        /// Open the viewers one by one over the first S seconds of the run, the playing ones
        /// spread among them, instead of all before it: joiners throughout the stream.
        #[arg(long, default_value_t = 0, value_name = "S")]
        join_over: u64,
        /// Serve this already built web directory (its `pkg/` and `dist/`) as it is, without
        /// building: to compare two builds of the player on the same source.
        #[arg(long, value_name = "DIR")]
        web_dir: Option<PathBuf>,
        /// Run the swarm on a cluster of N control-server processes joined through a local
        /// etcd (issue 12) instead of one in-process server; viewers open the nodes in turn.
        #[arg(long, default_value_t = 0, value_name = "N")]
        nodes: usize,
        /// With --nodes: kill -9 the node that owns the channel's DCM this many seconds into
        /// the run, and report the failover (`failover_ms`, `reconnect_ms`, `links_kept`).
        #[arg(long, value_name = "S", requires = "nodes")]
        kill_node_at: Option<u64>,
        /// Add N native peers (waypoint/: the same engine on str0m WebRTC; one release-built
        /// process holds them all) beside the Chromium viewers; they verify bytes like
        /// non-playing viewers.
        #[arg(long, default_value_t = 0, value_name = "N")]
        native_viewers: usize,
        /// Milliseconds between two native peers' joins (100: 200 natives join over 20 s; at 25
        /// the DCM spent the first 15 s moving children, see docs/benchmarks.md).
        #[arg(long, default_value_t = 100, value_name = "MS")]
        native_join_every_ms: u64,
        /// Add W waypoint servers (issue 15: native peers with the operator token, on public
        /// addresses, 20 times the stream's rate of upload each), started before the viewers in
        /// a `waypoint` process of their own; reported apart (`waypoints`,
        /// `waypoint_bytes_up`, `p2p_share_excluding_waypoints`).
        #[arg(long, default_value_t = 0, value_name = "W")]
        waypoints: usize,
    },
    /// Our swarm against P2P Media Loader (hls.js + p2p-media-loader-hlsjs, a local tracker) on
    /// the same source, the same Chromium and the same number of viewers, one after the other:
    /// one table with both and their ratios.
    Compare(compare::Args),
    /// Benchmark the control center's hierarchy (build, join/leave cost, full-rate capacity).
    /// Runs in release mode (re-executes itself when built in debug).
    BenchTopology {
        #[arg(long, default_value_t = 100_000)]
        nodes: usize,
        #[arg(long, default_value_t = 50)]
        regions: usize,
        /// Write a JSON report to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Substreams (and FEC data shards).
        #[arg(long, default_value_t = 8)]
        k: u32,
        /// Incremental events measured after the build.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
    },
    /// Whole-system simulator: real peer engines and coordinator over a simulated network
    /// (`--peers N --seconds S --scenario NAME ...`; the arguments go to `cargo run --release
    /// -p sim --`, see docs/simulator.md).
    #[command(disable_help_flag = true)]
    Sim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The real control server under N simulated peers sending heartbeats (WebSocket clients).
    BenchHeartbeats {
        /// Simulated peers (one WebSocket each).
        #[arg(long, default_value_t = 2000)]
        peers: usize,
        /// Measurement time after all peers connected.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Heartbeat interval the server announces and the peers use.
        #[arg(long, default_value_t = 200)]
        heartbeat_ms: u32,
        /// Control-server processes: 1 runs one server alone; more start a local etcd and a
        /// cluster of that many nodes, spread the peers over them and report each node.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Write a JSON report to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Demo {
            listen,
            cluster,
            server_args,
        } => demo(listen, cluster, &server_args),
        Cmd::Test => test(),
        Cmd::Build => ensure_wasm_target()
            .and_then(|()| ensure_wasm_bindgen())
            .and_then(|()| build_wasm())
            .and_then(|()| web::build_web()),
        Cmd::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Cmd::Swarm {
            viewers,
            seconds,
            upload_kbps,
            playing,
            json,
            seed,
            churn,
            throttle,
            hierarchy_regions,
            unsigned,
            source,
            join_over,
            web_dir,
            nodes,
            kill_node_at,
            native_viewers,
            waypoints,
            ..
        } if nodes > 0 => {
            let unsupported = [
                ("--churn", churn != 0.0),
                ("--throttle", throttle != 0),
                ("--hierarchy-regions", hierarchy_regions != 0),
                ("--unsigned", unsigned),
                ("--source", source.is_some()),
                ("--join-over", join_over != 0),
                ("--seed", seed != 1),
                ("--native-viewers", native_viewers != 0),
                ("--waypoints", waypoints != 0),
            ];
            let named: Vec<&str> = unsupported
                .iter()
                .filter(|(_, set)| *set)
                .map(|(n, _)| *n)
                .collect();
            if named.is_empty() {
                cluster_swarm(e2e::cluster_swarm::ClusterSwarmArgs {
                    viewers,
                    seconds,
                    nodes,
                    kill_node_at,
                    upload_kbps,
                    playing,
                    json,
                    web_dir: web_dir.unwrap_or_else(|| repo_root().join("web")),
                })
            } else {
                Err(anyhow::anyhow!(
                    "swarm --nodes does not take {} yet",
                    named.join(", ")
                ))
            }
        }
        Cmd::Swarm {
            viewers,
            seconds,
            upload_kbps,
            playing,
            json,
            seed,
            churn,
            throttle,
            hierarchy_regions,
            unsigned,
            source,
            join_over,
            web_dir,
            native_viewers,
            native_join_every_ms,
            waypoints,
            ..
        } => swarm(e2e::swarm::SwarmArgs {
            native_viewers,
            native_join_every_ms,
            waypoints,
            unsigned,
            source,
            join_over,
            prebuilt: web_dir.is_some(),
            churn,
            throttle,
            regions: hierarchy_regions,
            viewers,
            seconds,
            upload_kbps,
            playing,
            json,
            seed,
            web_dir: web_dir.unwrap_or_else(|| repo_root().join("web")),
        }),
        Cmd::Compare(args) => compare::compare(args),
        Cmd::Sim { args } => sim::sim(&args),
        Cmd::BenchHeartbeats {
            peers,
            seconds,
            heartbeat_ms,
            nodes,
            json,
        } => bench_heartbeats::bench(bench_heartbeats::Args {
            peers,
            seconds,
            heartbeat_ms,
            nodes,
            json,
        }),
        Cmd::BenchTopology {
            nodes,
            regions,
            json,
            seed,
            k,
            events,
        } => bench_topology::run(bench_topology::BenchArgs {
            nodes,
            regions,
            json,
            seed,
            k,
            events,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nerror: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs named steps in order, printing a numbered header with the elapsed
/// time, and stops at the first failure, naming the step.
struct Steps {
    total: usize,
    done: usize,
    start: Instant,
}

impl Steps {
    fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            start: Instant::now(),
        }
    }

    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.done += 1;
        let (n, total) = (self.done, self.total);
        println!(
            "\n==> [{n}/{total}] {name}   (elapsed {:.1}s{})",
            self.start.elapsed().as_secs_f64(),
            disk_free_note()
        );
        let t = Instant::now();
        f().with_context(|| format!("step {n}/{total} \"{name}\" failed"))?;
        println!(
            "==> [{n}/{total}] {name}: ok in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn finish(&self) {
        println!(
            "\n==> all {} steps passed in {:.1}s",
            self.total,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// ", disk free N GiB" for the target directory's file system, or nothing where `df` cannot
/// tell: a full disk shows up as a linker killed by SIGBUS, and this line says why.
fn disk_free_note() -> String {
    let Ok(dir) = build::target_dir() else {
        return String::new();
    };
    let mut probe = dir.as_path();
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => return String::new(),
        }
    }
    let Some(out) = util::output(Command::new("df").arg("-Pk").arg(probe)) else {
        return String::new();
    };
    // POSIX format: the second line's fourth column is the space available, in KiB.
    let avail_kib = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    match avail_kib {
        Some(kib) => format!(", disk free {:.1} GiB", kib as f64 / (1024.0 * 1024.0)),
        None => String::new(),
    }
}

fn demo(listen: SocketAddr, cluster: Option<u16>, server_args: &[String]) -> Result<()> {
    ensure_protoc()?;
    ensure_wasm_target()?;
    ensure_wasm_bindgen()?;
    build_wasm()?;
    web::build_web()?;
    let web = repo_root().join("web");
    if let Some(n) = cluster {
        ensure_etcd()?;
        return cluster_demo::run_cluster(n, listen, &web, server_args);
    }
    println!("\nOpen http://{listen}/ in two tabs\n");
    run(cargo()
        .args(["run", "--release", "-p", "control-server", "--", "--listen"])
        .arg(listen.to_string())
        .arg("--web-dir")
        .arg(&web)
        .args(server_args))
}

/// The coordinator is the sans-IO core that the server and the simulator both drive: nothing in
/// its dependency tree may bring a runtime, a socket or a clock of its own.
fn check_core_deps() -> Result<()> {
    const FORBIDDEN: [&str; 6] = ["tokio", "axum", "hyper", "mio", "socket2", "async-std"];
    let out = cargo()
        .args([
            "tree",
            "-p",
            "coordinator",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree -p coordinator failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> = tree
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            FORBIDDEN.contains(&name)
        })
        .collect();
    if !found.is_empty() {
        bail!(
            "the coordinator crate must stay sans-IO, but its dependencies include {found:?}: \
             move that code into control-server (the driver) instead"
        );
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test` (longer runs: `cargo xtask fuzz`).
const FUZZ_TEST_SECONDS: u64 = 15;

fn test() -> Result<()> {
    let root = repo_root();
    let mut steps = Steps::new(17);
    // Fast checks first: a formatting or lint slip fails in seconds, not after the installs.
    steps.run("formatting: cargo fmt --all -- --check", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
            .context("code is not formatted: run `cargo fmt --all` and commit the result")
    })?;
    // The control server's build needs protoc (etcd-client), so before the first build.
    steps.run(
        "protoc (etcd-client's build) and etcd (cluster tests)",
        || {
            ensure_protoc()?;
            ensure_etcd()
        },
    )?;
    steps.run(
        "lints: cargo clippy --workspace --all-targets -- -D warnings",
        || {
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
            .context(
                "clippy found warnings: fix them (`cargo clippy --workspace --all-targets` \
                 lists them; `cargo clippy --fix` applies the mechanical ones)",
            )
        },
    )?;
    steps.run(
        "sans-IO core: the coordinator depends on no runtime or socket",
        check_core_deps,
    )?;
    steps.run("wasm32 target", ensure_wasm_target)?;
    steps.run("wasm-bindgen CLI", ensure_wasm_bindgen)?;
    steps.run("wasm-pack", ensure_wasm_pack)?;
    steps.run("Chromium and ChromeDriver", ensure_chromium)?;
    steps.run("ffmpeg (live sources of the ingest tests)", ensure_ffmpeg)?;
    steps.run("nftables and coturn (the NAT test bed)", ensure_nat_tools)?;
    steps.run("build the wasm peer (web/pkg)", build_wasm)?;
    steps.run(
        "web assets: npm ci + esbuild (web/dist: player, dashboard, compare page)",
        web::build_web,
    )?;
    steps.run("native tests: cargo test --workspace", || {
        run(cargo().args(["test", "--workspace"]))
    })?;
    steps.run(
        &format!(
            "fuzzing: each of the {} fuzz targets for {FUZZ_TEST_SECONDS}s (cargo xtask fuzz)",
            fuzz::TARGETS.len()
        ),
        || fuzz::fuzz(FUZZ_TEST_SECONDS, &[]),
    )?;
    steps.run(
        "wasm tests: wasm-pack test peer-wasm in headless Chromium",
        || {
            let wasm_pack = wasm_pack_bin().context("wasm-pack not found")?;
            run(Command::new(wasm_pack)
                .current_dir(&root)
                .args([
                    "test",
                    "--headless",
                    "--chrome",
                    "--chromedriver",
                    CHROMEDRIVER,
                ])
                .arg("peer-wasm")
                .env("WASM_BINDGEN_TEST_TIMEOUT", "120"))
        },
    )?;
    steps.run(
        "the control-server binary (the cluster tests run nodes as processes)",
        || run(cargo().args(["build", "-p", "control-server"])),
    )?;
    steps.run(
        "e2e tests in Chromium: cargo test -p e2e -- --ignored",
        || {
            run(cargo()
                .args(["test", "-p", "e2e", "--", "--ignored", "--test-threads=1"])
                .env("P2P_WEB_DIR", root.join("web")))
        },
    )?;
    steps.finish();
    Ok(())
}

/// `swarm --nodes N`: the control-server binary (release) and etcd, then the cluster run.
fn cluster_swarm(args: e2e::cluster_swarm::ClusterSwarmArgs) -> Result<()> {
    ensure_protoc()?;
    ensure_etcd()?;
    ensure_chromium()?;
    ensure_wasm_target()?;
    ensure_wasm_bindgen()?;
    build_wasm()?;
    web::build_web()?;
    run(cargo().args(["build", "--release", "-p", "control-server"]))?;
    // The nodes run the release build (as `demo --cluster` does).
    std::env::set_var(
        "P2P_SERVER_BIN",
        build::target_dir()?.join("release/control-server"),
    );
    println!("\n==> swarm on a cluster: {args:?}\n");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(e2e::cluster_swarm::run(args))
}

fn swarm(args: e2e::swarm::SwarmArgs) -> Result<()> {
    // A source the origin cannot loop is refused before the builds, not after them.
    if let Some(path) = &args.source {
        let clip = e2e::source::SourceClip::load(path)?;
        println!("source {}", clip.info.summary());
    }
    ensure_chromium()?;
    if !args.prebuilt {
        ensure_wasm_target()?;
        ensure_wasm_bindgen()?;
        build_wasm()?;
        web::build_web()?;
    }
    if args.native_viewers + args.waypoints > 0 {
        // The native peers run optimized, in a process of their own (tests/src/natives.rs).
        run(cargo().args(["build", "--release", "-p", "waypoint"]))?;
        let bin = build::target_dir()?.join("release/waypoint");
        std::env::set_var("P2P_WAYPOINT_BIN", &bin);
    }
    println!("\n==> swarm: {args:?}\n");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(e2e::swarm::run(args))
}
