//! `cargo xtask sim …`: the whole-system simulator (crate `sim`), built in release mode and
//! given the arguments as they are (`cargo xtask sim --help` lists them; the model is described
//! in `docs/simulator.md`).

use anyhow::Result;

use crate::util::{cargo, run};

/// Runs `cargo run --release -p sim -- ARGS`.
pub fn sim(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "--release", "-q", "-p", "sim", "--"])
        .args(args);
    run(&mut cmd)
}
