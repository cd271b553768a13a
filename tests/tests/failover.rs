//! End-to-end: the channel's DCM fails mid-stream (fault injection: it panics). Its supervisor
//! starts a new DCM that adopts the sessions and rebuilds the multi-tree from one round of
//! heartbeats; viewers must not notice. Run by `cargo xtask test`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use control_server::dcm::DcmEvent;
use e2e::swarm::Swarm;
use protocol::{PeerId, SubstreamPlan};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

async fn plans(swarm: &Swarm) -> Result<BTreeMap<PeerId, Vec<SubstreamPlan>>> {
    Ok(swarm
        .topology()
        .await?
        .peers
        .into_iter()
        .map(|mut p| {
            // Children in id order: heartbeats do not say in which order they were adopted.
            for s in &mut p.plan {
                s.children.sort();
            }
            (p.id, p.plan)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn a_failed_dcm_is_replaced_and_rebuilt_from_heartbeats_without_viewers_noticing(
) -> Result<()> {
    let mut swarm = Swarm::start(web_dir()).await?;
    for i in 0..8 {
        swarm.add_viewer([3000, 1200][i % 2], i < 1).await?;
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let before = swarm.all_stats().await?;
    let plans_before = plans(&swarm).await?;
    let ch = swarm
        .state
        .channel("demo")
        .ok_or_else(|| anyhow!("no demo channel"))?;

    ch.dcm
        .send(DcmEvent::InjectFailure)
        .await
        .map_err(|_| anyhow!("DCM queue closed"))?;
    tokio::time::sleep(Duration::from_secs(8)).await;

    ensure!(
        ch.counters.dcm_failovers.load(Ordering::Relaxed) == 1,
        "the DCM was not replaced"
    );
    let plans_after = plans(&swarm).await?;
    let kept = plans_before
        .iter()
        .filter(|(p, plan)| plans_after.get(p) == Some(plan))
        .count();
    println!(
        "plans kept across the failover: {kept}/{}",
        plans_before.len()
    );
    ensure!(
        kept == plans_before.len(),
        "the new DCM changed the topology: {plans_before:?} -> {plans_after:?}"
    );
    let after = swarm.all_stats().await?;
    let mut fallbacks = 0;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        fallbacks += a.origin_fallbacks - b.origin_fallbacks;
        ensure!(
            a.verified_first_seq == b.verified_first_seq
                && a.verified_count > b.verified_count + 20
                && swarm.matches_origin(a) == Some(true),
            "viewer {i} noticed the failover: {b:?} -> {a:?}"
        );
        ensure!(a.stalls == b.stalls, "viewer {i} stalled");
    }
    println!("origin fallbacks during the failover: {fallbacks}");
    // Joins and departures are handled by the new DCM.
    swarm.add_viewer(2000, false).await?;
    swarm.close_viewer(2).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = swarm.stats(8).await?;
    ensure!(
        r.verified_count > 20 && swarm.matches_origin(&r) == Some(true),
        "a viewer joining after the failover is not served: {r:?}"
    );
    swarm.shutdown().await;
    Ok(())
}
