//! Small helpers: locating the repository and running commands loudly.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The repository root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command (the same cargo that runs xtask, if known), run from
/// the repository root.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root());
    cmd
}

/// Renders a command line for display.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` with inherited stdio, failing unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout if it exits successfully;
/// `None` if it cannot be started or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable: on `PATH`, else in `$CARGO_HOME/bin` (or
/// `~/.cargo/bin`), where `cargo install` puts it.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(cargo_bin_dir());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
pub fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("bin"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| OsStr::new("/root").into()))
            .join(".cargo")
            .join("bin"),
    }
}

/// Benchmarks must measure optimized code: in a debug build of xtask this re-runs the same
/// command line with `cargo run --release` and returns `true` (the caller then returns).
const RERUN_ENV: &str = "XTASK_RELEASE_REEXEC";

/// Whether this process is the release re-run of a benchmark.
pub fn was_rerun() -> bool {
    std::env::var_os(RERUN_ENV).is_some()
}

pub fn rerun_in_release(name: &str) -> Result<bool> {
    const ENV: &str = RERUN_ENV;
    if !cfg!(debug_assertions) {
        return Ok(false);
    }
    if std::env::var_os(ENV).is_some() {
        anyhow::bail!("re-executed {name} is still a debug build");
    }
    println!("==> {name}: debug build, re-executing in release mode");
    let status = cargo()
        .args(["run", "--quiet", "--release", "-p", "xtask", "--"])
        .args(std::env::args().skip(1))
        .env(ENV, "1")
        .status()
        .with_context(|| format!("re-executing {name} in release mode"))?;
    if !status.success() {
        anyhow::bail!("release {name} failed: {status}");
    }
    Ok(true)
}
