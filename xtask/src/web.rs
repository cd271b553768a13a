//! Building the web assets: `npm ci` (from the committed `web/package-lock.json`) and esbuild
//! (`web/build.mjs`) bundle the embeddable player, the operator dashboard and P2P Media Loader's
//! page of `cargo xtask compare` into `web/dist` (`npm ci` also installs the tracker that
//! `compare` runs with node).
//! Both steps are skipped when their inputs have not changed since the last build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{find_tool, output, repo_root, run};

/// Files (or directories, recursively) whose content decides whether to re-bundle.
const BUNDLE_INPUTS: &[&str] = &[
    "build.mjs",
    "package.json",
    "package-lock.json",
    "player",
    "dashboard",
    "compare",
];
/// Files the bundle step must have produced.
const OUTPUTS: &[&str] = &[
    "player.js",
    "player.d.ts",
    "dashboard.js",
    "dashboard.css",
    "compare/p2pml.js",
];

/// 64-bit FNV-1a: a stable content fingerprint (std's hasher may change between releases).
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

fn files_under(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            files_under(&e, out)?;
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Fingerprint of the named inputs under `dir`: their relative paths and contents.
pub fn fingerprint(dir: &Path, inputs: &[&str]) -> Result<String> {
    let mut files = Vec::new();
    for i in inputs {
        files_under(&dir.join(i), &mut files)?;
    }
    let mut h = Fnv::default();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        h.write(rel.to_string_lossy().as_bytes());
        h.write(&[0]);
        h.write(&std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
        h.write(&[0]);
    }
    Ok(h.hex())
}

fn npm() -> Option<PathBuf> {
    let bin = find_tool("npm")?;
    output(Command::new(&bin).arg("--version")).map(|_| bin)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Makes sure Node.js and npm are installed (Debian's packages when running as root).
pub fn ensure_node() -> Result<PathBuf> {
    if let Some(bin) = npm() {
        let node = output(Command::new("node").arg("--version")).unwrap_or_default();
        let v = output(Command::new(&bin).arg("--version")).unwrap_or_default();
        println!("node {} and npm {} found", node.trim(), v.trim());
        return Ok(bin);
    }
    if !is_root() {
        bail!(
            "npm not found: the web assets (player, dashboard) are bundled with Node.js at build \
             time; install Node.js 18 or newer with npm (e.g. `sudo apt-get install -y nodejs npm`)"
        );
    }
    println!("npm not found; installing Debian's nodejs and npm");
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "nodejs", "npm"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    npm().context("apt-get installed nodejs and npm but `npm --version` still fails")
}

/// `npm ci` in `web/` unless `node_modules` was installed from this very lockfile, then the
/// esbuild bundle unless `web/dist` was built from these very inputs.
pub fn build_web() -> Result<()> {
    let web = repo_root().join("web");
    let lock = web.join("package-lock.json");
    if !lock.is_file() {
        bail!(
            "{} is missing; it is committed with the repository",
            lock.display()
        );
    }
    let dist = web.join("dist");
    let bundle_stamp = dist.join(".inputs");
    let inputs = fingerprint(&web, BUNDLE_INPUTS)?;
    let outputs_present = OUTPUTS.iter().all(|o| dist.join(o).is_file());
    if outputs_present && std::fs::read_to_string(&bundle_stamp).ok().as_deref() == Some(&inputs) {
        println!("web/dist is up to date");
        return Ok(());
    }

    let npm = ensure_node()?;
    let modules_stamp = web.join("node_modules").join(".p2p-lock");
    let lock_print = fingerprint(&web, &["package-lock.json"])?;
    if std::fs::read_to_string(&modules_stamp).ok().as_deref() == Some(&lock_print) {
        println!("web/node_modules matches package-lock.json; skipping npm ci");
    } else {
        run(Command::new(&npm).current_dir(&web).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--include=dev",
        ]))?;
        std::fs::write(&modules_stamp, &lock_print)
            .with_context(|| format!("writing {}", modules_stamp.display()))?;
    }
    run(Command::new(&npm)
        .current_dir(&web)
        .args(["run", "--silent", "build"]))?;
    for o in OUTPUTS {
        if !dist.join(o).is_file() {
            bail!("the web build did not produce {}", dist.join(o).display());
        }
    }
    std::fs::write(&bundle_stamp, &inputs)
        .with_context(|| format!("writing {}", bundle_stamp.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_and_names() -> Result<()> {
        let dir = tempfile_dir()?;
        std::fs::create_dir_all(dir.join("player"))?;
        std::fs::write(dir.join("player/a.js"), "one")?;
        let a = fingerprint(&dir, &["player", "missing.json"])?;
        assert_eq!(a, fingerprint(&dir, &["player", "missing.json"])?);
        std::fs::write(dir.join("player/a.js"), "two")?;
        let b = fingerprint(&dir, &["player"])?;
        assert_ne!(a, b);
        std::fs::rename(dir.join("player/a.js"), dir.join("player/b.js"))?;
        assert_ne!(b, fingerprint(&dir, &["player"])?);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    fn tempfile_dir() -> Result<PathBuf> {
        let d = std::env::temp_dir().join(format!("xtask-web-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}
