//! `cargo xtask fuzz`: coverage-guided fuzzing of everything that parses what peers, ingest
//! clients and the network send (cargo-fuzz and libFuzzer; the targets are in `fuzz/`).
//!
//! The targets build on the stable toolchain without sanitizers (`--sanitizer none`): the code
//! under test is safe Rust, so what a sanitizer would catch is a panic already, and no nightly
//! or sanitizer runtime is needed. Each target runs for a bounded time from its corpus
//! (`fuzz/corpus/<target>`, kept between runs, not committed) and seeds generated here from real
//! inputs (the demo clip, encoded heartbeats and packets, sample control messages). A crash
//! fails the run and names the input to reproduce it with.
//!
//! Adding a target: write `fuzz/fuzz_targets/<name>.rs`, add its `[[bin]]` to
//! `fuzz/Cargo.toml`, and a row to [`TARGETS`] (with a seeds function, or [`no_seeds`]); the
//! test `targets_match_fuzz_cargo_toml` checks the three agree. For the manifest decoder:
//!
//! ```text
//! Target { name: "manifest", max_len: 4096, seeds: manifest_seeds, args: &[] },
//! ```
//!
//! with `manifest_seeds` returning a few signed manifests made with `protocol::manifest`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use protocol::fec::{encode_parity_frames, Fec, FecParams};
use protocol::heartbeat::binary;
use protocol::packet::{self, PacketHeader, FLAG_RANDOM_ACCESS};
use protocol::{
    ChildLink, ClientMsg, ErrorCode, FecSpec, Feed, Heartbeat, ParentLink, PeerId, ServerMsg,
    Signal, Source, SubstreamPlan, TierName, TierPlan, PROTOCOL_VERSION,
};

use crate::tools::ensure_cargo_fuzz;
use crate::util::{cargo, display, repo_root};

/// One fuzz target of `fuzz/`.
pub struct Target {
    /// Its `[[bin]]` name in `fuzz/Cargo.toml` (and file in `fuzz/fuzz_targets/`).
    pub name: &'static str,
    /// libFuzzer's `-max_len`: the largest input it makes.
    pub max_len: usize,
    /// Seed inputs (file name, bytes) written beside the corpus before each run.
    pub seeds: fn() -> Vec<(String, Vec<u8>)>,
    /// More libFuzzer options for this target.
    pub args: &'static [&'static str],
}

/// Every fuzz target, in the order they run.
pub const TARGETS: &[Target] = &[
    Target {
        name: "control_msg",
        max_len: 4096,
        seeds: control_msg_seeds,
        args: &[],
    },
    Target {
        name: "dcm_events",
        max_len: 4096,
        seeds: no_seeds,
        // Long event sequences from the start: libFuzzer otherwise grows inputs slowly, and
        // the DCM's states need many peers and steps (more coverage in a 150 s trial).
        args: &["-len_control=0"],
    },
    Target {
        name: "heartbeat_binary",
        max_len: 2048,
        seeds: heartbeat_seeds,
        args: &[],
    },
    Target {
        name: "fmp4_split",
        max_len: 64 * 1024,
        seeds: fmp4_seeds,
        args: &[],
    },
    Target {
        name: "packet_header",
        max_len: 2048,
        seeds: packet_seeds,
        args: &[],
    },
    Target {
        name: "fec_assembler",
        max_len: 4096,
        seeds: no_seeds,
        args: &[],
    },
    Target {
        name: "manifest",
        max_len: 4096,
        seeds: manifest_seeds,
        args: &[],
    },
    Target {
        name: "flv_remux",
        max_len: 64 * 1024,
        seeds: flv_seeds,
        args: &[],
    },
];

/// A valid start for `flv_remux`: its built-in H.264 and AAC configurations, then two seconds
/// of 25 fps pictures (a keyframe each second) and AAC frames.
fn flv_seeds() -> Vec<(String, Vec<u8>)> {
    let mut s = vec![1u8];
    let mut tag = |video: bool, step: u8, body: &[u8]| {
        s.push(u8::from(video));
        s.push(step);
        s.extend_from_slice(&(body.len() as u16).to_le_bytes());
        s.extend_from_slice(body);
    };
    for i in 0..50u8 {
        let key = i % 25 == 0;
        let mut picture = vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0, 0, 0, 0, 8];
        picture.extend_from_slice(&[if key { 0x65 } else { 0x41 }; 8]);
        tag(true, 40, &picture);
        tag(false, 0, &[0xaf, 1, 0x21, 0x10, 0x04]);
        tag(false, 21, &[0xaf, 1, 0x21, 0x10, 0x04]);
    }
    vec![("flv.bin".to_string(), s)]
}

fn manifest_seeds() -> Vec<(String, Vec<u8>)> {
    let packets: Vec<&[u8]> = vec![b"moof"; 3];
    // Signed with a key other than the target's: decodable, never taken by its book.
    protocol::manifest::ManifestSigner::new(&[9; 32], "demo")
        .sign(120, &packets)
        .iter()
        .map(|m| ("manifest.bin".to_string(), m.encode()))
        .collect()
}

/// What one target's run found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunStats {
    pub executions: Option<u64>,
    /// libFuzzer's `cov:` (coverage points hit) and `ft:` (features) at the end.
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    /// Inputs in the corpus at the end.
    pub corpus: Option<u64>,
    /// Inputs libFuzzer saved as crashing, timing out or running out of memory.
    pub artifacts: Vec<String>,
}

/// Where the fuzz build goes: its own directory (the instrumented build shares nothing with
/// the normal one), under `CARGO_TARGET_DIR` if set.
fn fuzz_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("fuzz"),
        _ => repo_root().join("target").join("fuzz"),
    }
}

/// `cargo fuzz <sub> --sanitizer none --target-dir DIR`, run in the repository root.
fn cargo_fuzz(sub: &str, target_dir: &Path, bootstrap: bool) -> Command {
    let mut cmd = cargo();
    cmd.args(["fuzz", sub, "--sanitizer", "none", "--target-dir"])
        .arg(target_dir);
    if bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

/// Runs `cmd` with its stderr both shown (lines for which `show` says so) and returned,
/// written to `log` as it comes.
fn run_tee(
    cmd: &mut Command,
    log: &Path,
    mut show: impl FnMut(&str) -> bool,
) -> Result<(bool, String)> {
    let line = display(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let mut file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut all = String::new();
    if let Some(err) = child.stderr.take() {
        for l in BufReader::new(err).lines() {
            let l = l.unwrap_or_default();
            let _ = writeln!(file, "{l}");
            if show(&l) {
                eprintln!("{l}");
            }
            all.push_str(&l);
            all.push('\n');
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    Ok((status.success(), all))
}

/// Builds every target. Stable first; if this cargo-fuzz asks for nightly-only flags, once
/// more with `RUSTC_BOOTSTRAP=1` (returned: the runs need the same setting).
fn build(target_dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(target_dir)?;
    let log = target_dir.join("build.log");
    let mut bootstrap = false;
    loop {
        let (ok, out) = run_tee(
            &mut cargo_fuzz("build", target_dir, bootstrap),
            &log,
            |_| true,
        )?;
        if ok {
            return Ok(bootstrap);
        }
        let nightly = out.contains("only accepted on the nightly")
            || out.contains("-Z") && (out.contains("nightly") || out.contains("unstable"));
        if nightly && !bootstrap {
            println!(
                "this cargo-fuzz passes nightly-only flags; retrying with RUSTC_BOOTSTRAP=1 \
                 on the stable toolchain"
            );
            bootstrap = true;
            continue;
        }
        let cxx = out.contains("libfuzzer") && (out.contains("c++") || out.contains("cc-rs"));
        bail!(
            "building the fuzz targets failed (log: {}){}",
            log.display(),
            if cxx {
                "; libfuzzer-sys compiles libFuzzer's C++ sources and needs a C++ compiler \
                 (Debian: `apt-get install g++`)"
            } else {
                ""
            }
        );
    }
}

/// The value after `key` in a libFuzzer status line (`cov: 123`), as a number.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    num.parse().ok()
}

/// Reads a run's numbers from libFuzzer's output.
pub fn parse_stats(out: &str) -> RunStats {
    let mut s = RunStats::default();
    for line in out.lines() {
        if line.starts_with('#') && line.contains(" cov: ") {
            // Status lines (`#1024 pulse cov: 88 ft: 120 corp: 30/1Kb ...`); the last wins.
            s.cov = field(line, " cov:").or(s.cov);
            s.ft = field(line, " ft:").or(s.ft);
            s.corpus = field(line, " corp:").or(s.corpus);
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            s.executions = n.trim().parse().ok();
        }
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            s.artifacts.push(path.trim().to_string());
        }
    }
    s
}

/// Fuzzes `targets` (all when empty) for `seconds` each.
pub fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    let unknown: Vec<&String> = only
        .iter()
        .filter(|n| !TARGETS.iter().any(|t| t.name == n.as_str()))
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        bail!("unknown fuzz target(s) {unknown:?}; the targets are {names:?}");
    }
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|n| n == t.name))
        .collect();
    ensure_cargo_fuzz()?;
    let target_dir = fuzz_target_dir();
    let t = Instant::now();
    let bootstrap = build(&target_dir)?;
    println!("fuzz targets built in {:.1}s", t.elapsed().as_secs_f64());
    let commit = crate::util::output(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
        .unwrap_or_default();

    let mut results: BTreeMap<usize, (&str, RunStats)> = BTreeMap::new();
    for (i, target) in targets.iter().enumerate() {
        let seeds = target_dir.join("seeds").join(target.name);
        let _ = std::fs::remove_dir_all(&seeds);
        std::fs::create_dir_all(&seeds)?;
        for (name, bytes) in (target.seeds)() {
            std::fs::write(seeds.join(name), bytes)?;
        }
        let corpus = repo_root().join("fuzz").join("corpus").join(target.name);
        std::fs::create_dir_all(&corpus)?;
        let logs = target_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{}.log", target.name));
        println!(
            "\n--> fuzz target {} ({}/{}), {seconds}s",
            target.name,
            i + 1,
            targets.len()
        );
        let mut cmd = cargo_fuzz("run", &target_dir, bootstrap);
        cmd.arg(target.name)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={}", target.max_len))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .args(target.args);
        let mut crashed = false;
        let (ok, out) = run_tee(&mut cmd, &log, |l| {
            crashed |= l.contains("panicked at") || l.contains("ERROR: libFuzzer");
            // Status lines at powers of two and the end; everything once something failed.
            crashed
                || l.contains("INITED")
                || l.contains("pulse")
                || l.contains("DONE")
                || l.starts_with("stat::number_of_executed_units")
        })?;
        let stats = parse_stats(&out);
        if !ok && stats.artifacts.is_empty() {
            bail!(
                "fuzz target {} did not run (log: {})",
                target.name,
                log.display()
            );
        }
        results.insert(i, (target.name, stats));
    }

    println!(
        "\nfuzzing summary ({seconds}s per target, commit {}):",
        commit.trim()
    );
    println!(
        "{:<18} {:>12} {:>7} {:>8} {:>7}  crashes",
        "target", "executions", "cov", "ft", "corpus"
    );
    let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let mut failures = Vec::new();
    for (name, s) in results.values() {
        println!(
            "{:<18} {:>12} {:>7} {:>8} {:>7}  {}",
            name,
            opt(s.executions),
            opt(s.cov),
            opt(s.ft),
            opt(s.corpus),
            s.artifacts.len()
        );
        for a in &s.artifacts {
            failures.push(format!(
                "{name}: {a}\n    reproduce: cargo fuzz run --sanitizer none {name} {a}\n    \
                 show the input: cargo fuzz fmt --sanitizer none {name} {a}"
            ));
        }
    }
    if !failures.is_empty() {
        bail!(
            "fuzzing found {} failing input(s) (run from fuzz/ or the repository root):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// For targets whose inputs are structured (`arbitrary`): libFuzzer finds its way from nothing.
pub fn no_seeds() -> Vec<(String, Vec<u8>)> {
    Vec::new()
}

fn sample_heartbeat(k: u32, children: u64) -> Heartbeat {
    let now = 1_764_000_000_000;
    Heartbeat {
        client_id: PeerId(42),
        seq: 1234,
        local_ts_ms: now,
        parents: (0..k)
            .map(|i| ParentLink {
                substream: i,
                parent: if i == 0 {
                    Source::Origin
                } else {
                    Source::Peer {
                        id: PeerId(100 + u64::from(i)),
                    }
                },
                last_seq: Some(50_000 + u64::from(i)),
                last_ts_ms: Some(now - 120),
            })
            .collect(),
        children: (0..children)
            .map(|i| ChildLink {
                substream: 2,
                child: PeerId(200 + i),
                last_seq: (i % 2 == 0).then_some(50_002),
                last_ts_ms: Some(now - 80),
            })
            .collect(),
        buffer: (0..k).map(|i| 3 - i % 2).collect(),
        bytes_from_peers: 123_456_789,
        bytes_from_origin: 1_234_567,
        bytes_up: 98_765_432,
        origin_fallbacks: 17,
        upload_kbps: 2000,
        send_backlog_ms: 15,
        place: None,
    }
}

fn control_msg_seeds() -> Vec<(String, Vec<u8>)> {
    let join = ClientMsg::Join {
        version: PROTOCOL_VERSION,
        channel: "demo".into(),
        upload_kbps: 2000,
        region: Some("lan".into()),
        network: Some("fiber".into()),
        relay_token: Some("r-1234".into()),
        companion: Some(PeerId(7)),
        resume: None,
        connectivity: None,
        waypoint: None,
    };
    let client = [
        join,
        ClientMsg::Join {
            version: PROTOCOL_VERSION,
            channel: "demo".into(),
            upload_kbps: 800,
            region: None,
            network: None,
            relay_token: None,
            companion: None,
            resume: None,
            connectivity: None,
            waypoint: None,
        },
        ClientMsg::Signal {
            to: PeerId(3),
            signal: Signal::Offer {
                sdp: "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n".into(),
            },
        },
        ClientMsg::Signal {
            to: PeerId(3),
            signal: Signal::Ice {
                candidate: "candidate:1 1 udp 2122260223 10.0.0.2 5000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
            },
        },
        ClientMsg::Heartbeat(sample_heartbeat(4, 3)),
        ClientMsg::LinkFailed { peer: PeerId(9) },
        ClientMsg::Leave,
    ];
    let tier = TierPlan {
        tier: TierName::Middle,
        region: "lan".into(),
        cluster: Some(3),
        plays: true,
        fec: Some(FecSpec { k: 4, n: 2 }),
        mesh: vec![Source::Origin, Source::Peer { id: PeerId(5) }],
        feeds: vec![Feed {
            to: PeerId(8),
            substream: 1,
            fec: None,
        }],
    };
    let server = [
        ServerMsg::Instructions {
            epoch: 3,
            substreams: vec![SubstreamPlan {
                index: 0,
                parent: Source::Peer { id: PeerId(7) },
                children: vec![PeerId(3), PeerId(4)],
            }],
            tier: Some(tier),
        },
        ServerMsg::Signal {
            from: PeerId(2),
            signal: Signal::Answer { sdp: "v=0".into() },
        },
        ServerMsg::LiveEdge { seq: 99 },
        ServerMsg::Error {
            code: ErrorCode::RateLimited,
            message: "too many messages; slow down".into(),
        },
        ServerMsg::Recruit {
            channel: "other".into(),
            relay_token: "t".into(),
            upload_kbps: 500,
        },
    ];
    let mut out: Vec<(String, Vec<u8>)> = client
        .iter()
        .filter_map(|m| serde_json::to_vec(m).ok())
        .chain(server.iter().filter_map(|m| serde_json::to_vec(m).ok()))
        .enumerate()
        .map(|(i, b)| (format!("msg-{i:02}.json"), b))
        .collect();
    // The Welcome as the server writes it (its optional fields as plain JSON).
    out.push((
        "welcome.json".into(),
        br#"{"type":"welcome","version":1,"peer_id":4,"channel":"demo","heartbeat_ms":1000,"substreams":4,"stream_kbps":800,"mime":"video/mp4; codecs=\"avc1.42c01e\"","init_url":"/api/channels/demo/init","packet_url":"/api/channels/demo/packets/","start_seq":120,"live_seq":131,"upload_kbps":600}"#.to_vec(),
    ));
    out
}

fn heartbeat_seeds() -> Vec<(String, Vec<u8>)> {
    let mut empty = sample_heartbeat(0, 0);
    empty.seq = 0;
    let mut big = sample_heartbeat(8, 20);
    big.bytes_up = u64::MAX;
    big.upload_kbps = u32::MAX;
    [sample_heartbeat(4, 3), empty, big]
        .iter()
        .enumerate()
        .map(|(i, hb)| (format!("heartbeat-{i}.bin"), binary::encode(hb)))
        .collect()
}

fn packet_seeds() -> Vec<(String, Vec<u8>)> {
    let header = |seq, flags| PacketHeader {
        seq,
        flags,
        created_ms: 1_764_000_000_000,
    };
    let packets = [
        packet::encode(&header(0, FLAG_RANDOM_ACCESS), b"moof"),
        packet::encode(&header(4, 0), &[7; 300]),
        packet::encode(&header(u64::MAX, 0xff), b""),
    ];
    let mut out: Vec<(String, Vec<u8>)> = packets
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("packet-{i}.bin"), p.clone()))
        .collect();
    // A parity frame: peers decode both from the same channels.
    if let Ok(fec) = FecParams::new(2, 1).and_then(Fec::new) {
        let refs: Vec<&[u8]> = packets[..2].iter().map(Vec::as_slice).collect();
        if let Ok(frames) = encode_parity_frames(&fec, 0, 1, &refs) {
            out.extend(
                frames
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| (format!("parity-{i}.bin"), f)),
            );
        }
    }
    out
}

/// Top-level boxes of an MP4: (offset, size, fourcc).
fn boxes(data: &[u8]) -> Vec<(usize, usize, [u8; 4])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = data.get(at..at + 8) {
        let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if size < 8 || at + size > data.len() {
            break;
        }
        out.push((at, size, [h[4], h[5], h[6], h[7]]));
        at += size;
    }
    out
}

/// Seeds from the demo clip: its init segment and first fragment (the media data cut short,
/// so the fuzzer does not spend its time copying video), behind the two chunking bytes.
fn fmp4_seeds() -> Vec<(String, Vec<u8>)> {
    let clip = control_server::DEMO_CLIP;
    let b = boxes(clip);
    let Some(first_moof) = b.iter().position(|x| &x.2 == b"moof") else {
        return Vec::new();
    };
    let init_end = b[first_moof].0;
    let mut stream = clip[..init_end].to_vec();
    for (at, size, kind) in &b[first_moof..(first_moof + 4).min(b.len())] {
        if kind == b"mdat" {
            let body = 64.min(size - 8);
            stream.extend_from_slice(&((body + 8) as u32).to_be_bytes());
            stream.extend_from_slice(b"mdat");
            stream.extend_from_slice(&clip[at + 8..at + 8 + body]);
        } else {
            stream.extend_from_slice(&clip[*at..at + size]);
        }
    }
    let mut out = Vec::new();
    for chunking in [[0u8, 0], [1, 7], [3, 200]] {
        let mut s = chunking.to_vec();
        s.extend_from_slice(&stream);
        out.push((format!("demo-{}.mp4", chunking[0]), s));
    }
    // The init segment alone.
    let mut init = vec![4, 0];
    init.extend_from_slice(&clip[..init_end]);
    out.push(("demo-init.mp4".into(), init));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn targets_match_fuzz_cargo_toml() {
        let fuzz = repo_root().join("fuzz");
        let toml = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        let mut bins = Vec::new();
        let mut in_bin = false;
        for l in toml.lines().map(str::trim) {
            if l.starts_with('[') {
                in_bin = l == "[[bin]]";
            } else if let Some(n) = l.strip_prefix("name = \"").filter(|_| in_bin) {
                bins.push(n.trim_end_matches('"').to_string());
            }
        }
        bins.sort();
        let mut files: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".rs").map(str::to_string)
            })
            .collect();
        files.sort();
        let mut listed: Vec<String> = TARGETS.iter().map(|t| t.name.to_string()).collect();
        listed.sort();
        assert_eq!(bins, listed, "fuzz/Cargo.toml [[bin]]s vs xtask TARGETS");
        assert_eq!(files, listed, "fuzz/fuzz_targets/*.rs vs xtask TARGETS");
    }

    #[test]
    fn seeds_are_real_inputs() {
        for t in TARGETS {
            for (name, bytes) in (t.seeds)() {
                assert!(
                    bytes.len() <= t.max_len,
                    "{}: seed {name} is longer than max_len",
                    t.name
                );
            }
        }
        for (_, s) in heartbeat_seeds() {
            binary::decode(&s).unwrap();
        }
        for (_, s) in control_msg_seeds() {
            let text = std::str::from_utf8(&s).unwrap();
            assert!(
                serde_json::from_str::<ClientMsg>(text).is_ok()
                    || serde_json::from_str::<ServerMsg>(text).is_ok(),
                "{text}"
            );
        }
        let mp4 = fmp4_seeds();
        assert_eq!(mp4.len(), 4);
        let (init, fragments) = control_server::origin::fmp4::parse_file(&mp4[0].1[2..]).unwrap();
        assert!(init.mime.starts_with("video/mp4"));
        assert_eq!(fragments.len(), 2);
        assert!(fragments[0].starts_with_keyframe);
    }

    #[test]
    fn reads_libfuzzer_numbers() {
        let out = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #1024\tpulse  cov: 80 ft: 120 corp: 30/1Kb lim: 4 exec/s: 512 rss: 31Mb\n\
                   #15937393\tDONE   cov: 46 ft: 53 corp: 23/803b lim: 4096 exec/s: 1770821 rss: 38Mb\n\
                   Done 15937393 runs in 9 second(s)\n\
                   stat::number_of_executed_units: 15937393\n";
        let s = parse_stats(out);
        assert_eq!(s.executions, Some(15_937_393));
        assert_eq!((s.cov, s.ft, s.corpus), (Some(46), Some(53), Some(23)));
        assert!(s.artifacts.is_empty());
        let crash = "==1== ERROR: libFuzzer: deadly signal\n\
                     artifact_prefix='a/'; Test unit written to a/crash-db90\n";
        assert_eq!(parse_stats(crash).artifacts, vec!["a/crash-db90"]);
    }
}
