//! Checking for, and installing, the external tools the tasks need.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, cargo_bin_dir, find_tool, output, repo_root, run};

/// The Rust target the browser peer is compiled for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Where Debian's `chromium-driver` package puts ChromeDriver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Makes sure the `wasm32-unknown-unknown` standard library is installed.
pub fn ensure_wasm_target() -> Result<()> {
    let mut list = Command::new("rustup");
    list.args(["target", "list", "--installed"])
        .current_dir(repo_root());
    match output(&mut list) {
        Some(installed) if installed.lines().any(|l| l.trim() == WASM_TARGET) => {
            println!("Rust target {WASM_TARGET} is installed");
            Ok(())
        }
        Some(_) => run(Command::new("rustup")
            .args(["target", "add", WASM_TARGET])
            .current_dir(repo_root())),
        None => {
            // No rustup (e.g. a distribution toolchain): look in the sysroot.
            let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))
                .context("neither `rustup` nor `rustc` could be run; install Rust via rustup")?;
            let lib = Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(WASM_TARGET);
            if lib.is_dir() {
                println!("Rust target {WASM_TARGET} is installed (no rustup)");
                Ok(())
            } else {
                bail!(
                    "the Rust target {WASM_TARGET} is missing and rustup is not available; \
                     install rustup and run `rustup target add {WASM_TARGET}`"
                )
            }
        }
    }
}

/// All versions of package `name` recorded in the text of a `Cargo.lock`.
pub fn lock_versions(lock: &str, name: &str) -> Vec<String> {
    let wanted = format!("name = \"{name}\"");
    let mut out = Vec::new();
    let mut lines = lock.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != wanted {
            continue;
        }
        if let Some(v) = lines
            .next()
            .and_then(|l| l.strip_prefix("version = \""))
            .and_then(|l| l.strip_suffix('"'))
        {
            out.push(v.to_owned());
        }
    }
    out
}

/// The exact `wasm-bindgen` version in `Cargo.lock` (resolving the lockfile
/// first if it does not mention wasm-bindgen yet).
pub fn wasm_bindgen_version() -> Result<String> {
    let path = repo_root().join("Cargo.lock");
    let read = || {
        let lock = std::fs::read_to_string(&path).unwrap_or_default();
        lock_versions(&lock, "wasm-bindgen")
    };
    let mut versions = read();
    if versions.is_empty() {
        println!("Cargo.lock does not list wasm-bindgen yet; resolving dependencies");
        run(cargo()
            .args(["metadata", "--format-version", "1", "--quiet"])
            .stdout(std::process::Stdio::null()))?;
        versions = read();
    }
    match versions.as_slice() {
        [v] => Ok(v.clone()),
        [] => bail!(
            "{} lists no `wasm-bindgen` package; peer-wasm should depend on it",
            path.display()
        ),
        many => bail!(
            "{} lists several wasm-bindgen versions ({}); the CLI can only match one — \
             unify them (the workspace pins wasm-bindgen exactly)",
            path.display(),
            many.join(", ")
        ),
    }
}

/// The version a `wasm-bindgen`-style binary reports (`wasm-bindgen 0.2.130`).
fn reported_version(bin: &Path) -> Option<String> {
    let out = output(Command::new(bin).arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// Finds a `wasm-bindgen` CLI of exactly `version` (on PATH or in cargo's
/// bin directory).
fn find_wasm_bindgen(version: &str) -> Option<PathBuf> {
    let candidates = [
        find_tool("wasm-bindgen"),
        Some(cargo_bin_dir().join("wasm-bindgen")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file() && reported_version(p).as_deref() == Some(version))
}

/// The `wasm-bindgen` CLI matching `Cargo.lock`, or an error saying how to
/// get it.
pub fn wasm_bindgen_bin() -> Result<PathBuf> {
    let version = wasm_bindgen_version()?;
    find_wasm_bindgen(&version).with_context(|| {
        format!(
            "no wasm-bindgen CLI {version} found (on PATH or in {}); \
             run `cargo install wasm-bindgen-cli --version {version}`",
            cargo_bin_dir().display()
        )
    })
}

/// Makes sure the `wasm-bindgen` CLI matches the library version in
/// `Cargo.lock` exactly, installing it with `cargo install` otherwise.
pub fn ensure_wasm_bindgen() -> Result<()> {
    let version = wasm_bindgen_version()?;
    if let Some(bin) = find_wasm_bindgen(&version) {
        println!("wasm-bindgen {version} found at {}", bin.display());
        return Ok(());
    }
    match find_tool("wasm-bindgen").and_then(|p| reported_version(&p)) {
        Some(other) => println!("wasm-bindgen {other} is installed but Cargo.lock needs {version}"),
        None => println!("wasm-bindgen CLI not found"),
    }
    println!("Installing wasm-bindgen-cli {version} (this takes a few minutes)");
    run(cargo().args(["install", "wasm-bindgen-cli", "--version", &version]))?;
    let bin = find_wasm_bindgen(&version).with_context(|| {
        format!(
            "installed wasm-bindgen-cli {version} but no matching `wasm-bindgen` is found; \
             is {} on PATH (and before any other wasm-bindgen)?",
            cargo_bin_dir().display()
        )
    })?;
    if find_tool("wasm-bindgen").as_deref() != Some(bin.as_path()) {
        println!(
            "warning: {} is used, but a different wasm-bindgen comes first on PATH; \
             `wasm-pack test` may try to download its own",
            bin.display()
        );
    }
    Ok(())
}

/// Path of `wasm-pack`, if installed and working.
pub fn wasm_pack_bin() -> Option<PathBuf> {
    let bin = find_tool("wasm-pack")?;
    output(Command::new(&bin).arg("--version")).map(|_| bin)
}

/// Makes sure `wasm-pack` is installed (`cargo install wasm-pack` if not).
pub fn ensure_wasm_pack() -> Result<()> {
    if let Some(bin) = wasm_pack_bin() {
        let v = output(Command::new(&bin).arg("--version")).unwrap_or_default();
        println!("{} found at {}", v.trim(), bin.display());
        return Ok(());
    }
    println!("Installing wasm-pack (this takes a few minutes)");
    run(cargo().args(["install", "wasm-pack"]))?;
    wasm_pack_bin()
        .map(|_| ())
        .context("installed wasm-pack but it is not found or does not run")
}

/// The cargo-fuzz release `cargo xtask fuzz` installs when none is found (any 0.13 works).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Path of `cargo-fuzz`, if installed and working.
pub fn cargo_fuzz_bin() -> Option<PathBuf> {
    let bin = find_tool("cargo-fuzz")?;
    output(Command::new(&bin).arg("--version")).map(|_| bin)
}

/// Makes sure `cargo fuzz` is available (`cargo install cargo-fuzz` if not). It needs no
/// nightly toolchain here: `cargo xtask fuzz` builds with `--sanitizer none`.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(bin) = cargo_fuzz_bin() {
        let v = output(Command::new(&bin).arg("--version")).unwrap_or_default();
        println!("{} found at {}", v.trim(), bin.display());
        return Ok(());
    }
    println!("Installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (about a minute)");
    run(cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context(
        "cargo-fuzz is not installed and `cargo install cargo-fuzz` failed (is crates.io \
         reachable?); install it by hand (`cargo install cargo-fuzz`) and re-run",
    )?;
    cargo_fuzz_bin().map(|_| ()).with_context(|| {
        format!(
            "installed cargo-fuzz but it is not found or does not run; is {} on PATH?",
            cargo_bin_dir().display()
        )
    })
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Installs the Debian packages whose programs are missing (as root, with apt-get), or says
/// which to install. `wanted` pairs a program's path with the package that provides it.
fn ensure_debian_programs(wanted: &[(&str, &str)]) -> Result<()> {
    let missing = || -> Vec<(&str, &str)> {
        wanted
            .iter()
            .copied()
            .filter(|(path, _)| !Path::new(path).is_file())
            .collect()
    };
    let absent = missing();
    if absent.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = absent.iter().map(|(p, _)| *p).collect();
    let mut packages: Vec<&str> = absent.iter().map(|(_, pkg)| *pkg).collect();
    packages.dedup();
    if !is_root() {
        bail!(
            "{} not found; install the Debian packages {} (e.g. `sudo apt-get install -y {}`)",
            programs.join(" and "),
            packages.join(", "),
            packages.join(" ")
        );
    }
    println!(
        "{} not found; installing {}",
        programs.join(" and "),
        packages.join(", ")
    );
    // The package lists are fetched once per run of xtask.
    static UPDATED: std::sync::Once = std::sync::Once::new();
    let mut update = Ok(());
    UPDATED.call_once(|| update = run(Command::new("apt-get").arg("update")));
    update?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still: Vec<&str> = missing().iter().map(|(p, _)| *p).collect();
    if !still.is_empty() {
        bail!(
            "apt-get installed {} but {} is still missing",
            packages.join(", "),
            still.join(" and ")
        );
    }
    Ok(())
}

/// Makes sure Chromium and ChromeDriver are installed (via apt when running
/// as root on Debian).
pub fn ensure_chromium() -> Result<()> {
    ensure_debian_programs(&[(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")])?;
    for bin in [CHROMIUM, CHROMEDRIVER] {
        let v = output(Command::new(bin).arg("--version")).unwrap_or_default();
        println!("{bin}: {}", v.trim());
    }
    Ok(())
}

/// Where Debian's ffmpeg puts its program: tests encode and publish live sources with it.
pub const FFMPEG: &str = "/usr/bin/ffmpeg";

/// Makes sure ffmpeg is installed (via apt when running as root on Debian).
pub fn ensure_ffmpeg() -> Result<()> {
    ensure_debian_programs(&[(FFMPEG, "ffmpeg")])?;
    let v = output(Command::new(FFMPEG).arg("-version")).unwrap_or_default();
    println!("{FFMPEG}: {}", v.lines().next().unwrap_or("").trim());
    Ok(())
}

/// Where Debian's nftables and coturn put `nft` and `turnserver`: the NAT test bed's routers
/// (`tests/src/netns.rs`) and its TURN server.
pub const NFT: &str = "/usr/sbin/nft";
pub const TURNSERVER: &str = "/usr/bin/turnserver";

/// Makes sure nft and coturn are installed (via apt when running as root on Debian).
pub fn ensure_nat_tools() -> Result<()> {
    ensure_debian_programs(&[(NFT, "nftables"), (TURNSERVER, "coturn")])?;
    let v = output(Command::new(NFT).arg("--version")).unwrap_or_default();
    println!("{NFT}: {}", v.trim());
    Ok(())
}

/// Where Debian's protobuf-compiler puts protoc: etcd-client's build compiles etcd's protobuf
/// definitions with it (the control server's `cluster` feature).
pub const PROTOC: &str = "/usr/bin/protoc";

/// Where Debian's etcd-server puts etcd: the cluster tests and `demo --cluster` run it.
pub const ETCD: &str = "/usr/bin/etcd";

/// Makes sure protoc is installed (via apt when running as root on Debian): needed to build the
/// control server at all, so every command that builds it calls this first.
pub fn ensure_protoc() -> Result<()> {
    ensure_debian_programs(&[(PROTOC, "protobuf-compiler")])?;
    let v = output(Command::new(PROTOC).arg("--version")).unwrap_or_default();
    println!("{PROTOC}: {}", v.trim());
    Ok(())
}

/// Makes sure etcd is installed (Debian's etcd-server, 3.4).
pub fn ensure_etcd() -> Result<()> {
    ensure_debian_programs(&[(ETCD, "etcd-server")])?;
    let v = output(Command::new(ETCD).arg("--version")).unwrap_or_default();
    println!("{ETCD}: {}", v.lines().next().unwrap_or("").trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lock_versions() {
        let lock = r#"
[[package]]
name = "wasm-bindgen"
version = "0.2.130"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "wasm-bindgen-futures"
version = "0.4.50"
"#;
        assert_eq!(lock_versions(lock, "wasm-bindgen"), vec!["0.2.130"]);
        assert_eq!(lock_versions(lock, "wasm-bindgen-futures"), vec!["0.4.50"]);
        assert!(lock_versions(lock, "serde").is_empty());
    }
}
