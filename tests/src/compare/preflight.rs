//! What `cargo xtask compare` needs before it starts, checked all at once so that the refusal
//! lists everything missing and says how the README's commands install it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// P2P Media Loader's side, at the versions pinned in `web/package.json` (and the lockfile).
pub const PACKAGES: [&str; 4] = [
    "p2p-media-loader-core",
    "p2p-media-loader-hlsjs",
    "hls.js",
    "bittorrent-tracker",
];

/// How the README's commands install what is missing.
const HOW: &str = "`cargo xtask test` installs them (as root: Debian's chromium and ffmpeg; the \
    npm packages with `npm ci` from web/package-lock.json, which `cargo xtask build` runs too)";

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The version of `package` pinned in `web/package.json`.
fn pinned(web_dir: &Path, package: &str) -> Result<String> {
    let path = web_dir.join("package.json");
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    json["devDependencies"][package]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} pins no {package}", path.display()))
}

/// The version of `package` installed in `web/node_modules`, if any.
fn installed(web_dir: &Path, package: &str) -> Option<String> {
    let path = web_dir
        .join("node_modules")
        .join(package)
        .join("package.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["version"].as_str().map(str::to_string)
}

/// Checks ffmpeg, Chromium, Node.js and the npm packages; returns the packages' versions.
pub fn check(web_dir: &Path) -> Result<Vec<(String, String)>> {
    let mut missing = Vec::new();
    if !runs("ffmpeg", "-version") {
        missing.push("ffmpeg (cuts the source into HLS segments)".to_string());
    }
    if crate::cdp::chromium_path().is_err() {
        missing.push("Chromium (the viewer pages)".to_string());
    }
    if !runs("node", "--version") {
        missing.push("Node.js (runs the WebTorrent tracker)".to_string());
    }
    let mut versions = Vec::new();
    for p in PACKAGES {
        let want = pinned(web_dir, p)?;
        match installed(web_dir, p) {
            Some(v) if v == want => versions.push((p.to_string(), v)),
            Some(v) => missing.push(format!("npm package {p} {want} (web/node_modules has {v})")),
            None => missing.push(format!("npm package {p} {want} (not in web/node_modules)")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "cargo xtask compare cannot run; missing: {}. {HOW}, then run compare again",
            missing.join("; ")
        );
    }
    Ok(versions)
}

/// The bundled page of P2P Media Loader's side (built by `cargo xtask build`).
pub fn check_bundle(web_dir: &Path) -> Result<()> {
    let bundle = web_dir.join("dist/compare/p2pml.js");
    if !bundle.is_file() {
        bail!(
            "{} is missing: `cargo xtask build` bundles it (esbuild, web/build.mjs)",
            bundle.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_are_named_with_the_fix() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("package.json"),
            r#"{"devDependencies": {"p2p-media-loader-core": "2.3.1", "p2p-media-loader-hlsjs": "2.3.1",
                "hls.js": "1.6.16", "bittorrent-tracker": "11.2.3"}}"#,
        )?;
        let e = format!("{:#}", check(dir.path()).err().context("no refusal")?);
        assert!(
            e.contains("p2p-media-loader-hlsjs 2.3.1 (not in web/node_modules)"),
            "{e}"
        );
        assert!(e.contains("cargo xtask test"), "{e}");
        assert!(check_bundle(dir.path()).is_err());
        Ok(())
    }
}
