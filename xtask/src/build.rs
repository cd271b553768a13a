//! Building the browser peer: Rust → wasm → `web/pkg/peer.js` + `peer_bg.wasm`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::tools::{wasm_bindgen_bin, WASM_TARGET};
use crate::util::{cargo, repo_root, run};

/// Cargo profile for the wasm build (defined in the workspace `Cargo.toml`).
pub const WASM_PROFILE: &str = "wasm-release";

/// Cargo's target directory (honours `CARGO_TARGET_DIR` and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
    meta.get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .context("`cargo metadata` did not report target_directory")
}

/// Builds `peer-wasm` for the browser and runs `wasm-bindgen --target web`
/// into `<repo>/web/pkg` (`peer.js`, `peer_bg.wasm`, typings).
pub fn build_wasm() -> Result<()> {
    run(cargo().args([
        "build",
        "-p",
        "peer-wasm",
        "--target",
        WASM_TARGET,
        "--profile",
        WASM_PROFILE,
    ]))?;
    let wasm = target_dir()?
        .join(WASM_TARGET)
        .join(WASM_PROFILE)
        .join("peer_wasm.wasm");
    if !wasm.is_file() {
        bail!(
            "{} was not produced; is peer-wasm a `cdylib`?",
            wasm.display()
        );
    }
    let out_dir = repo_root().join("web").join("pkg");
    run(Command::new(wasm_bindgen_bin()?)
        .args(["--target", "web", "--out-dir"])
        .arg(&out_dir)
        .args(["--out-name", "peer"])
        .arg(&wasm))?;
    // A dependency that links a bare `extern "C"` symbol on wasm32 makes wasm-bindgen import a
    // module named "env", which no browser provides: every page would fail to load.
    let js = std::fs::read_to_string(out_dir.join("peer.js"))?;
    if js.contains("from \"env\"") || js.contains("from 'env'") {
        anyhow::bail!(
            "web/pkg/peer.js imports the module \"env\": some dependency links a bare extern symbol \
             on wasm32 (e.g. `instant` without its wasm-bindgen feature); browsers cannot load it"
        );
    }
    println!("wrote {}/peer.js and peer_bg.wasm", out_dir.display());
    Ok(())
}
