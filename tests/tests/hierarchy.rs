//! End-to-end: the three-tier hierarchy in real browsers. Eighteen headless Chromium viewers in
//! three regions (by region hint: every page is on 127.0.0.1) with three upload classes fill the
//! top tier (preferred nodes flooding the stream over a c-connected mesh), the Reed-Solomon
//! coded middle tier and the plain bottom clusters. Run by `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use e2e::swarm::Swarm;
use protocol::{PeerId, Source, TierName};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

async fn sleep_s(s: u64) {
    tokio::time::sleep(Duration::from_secs(s)).await;
}

/// Viewer index of every open page, by peer id.
async fn index_by_peer(swarm: &mut Swarm) -> Result<BTreeMap<PeerId, usize>> {
    let mut out = BTreeMap::new();
    for i in 0..swarm.viewers.len() {
        if swarm.viewers[i].page.is_none() {
            continue;
        }
        if let Some(id) = swarm.stats(i).await?.peer_id {
            out.insert(id, i);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn eighteen_viewers_in_three_regions_use_three_tiers_and_lose_nothing_when_parents_go(
) -> Result<()> {
    let mut swarm = Swarm::start_with(web_dir(), 3).await?;
    let s = swarm.stream_kbps().max(100);
    // Per region, in join order: two strong (top tier), two medium (coded middle tier), two weak
    // (bottom tier). Viewer i is in region i mod 3.
    let classes = [8 * s, 8 * s, 5 * s, 5 * s, s / 2, s / 2];
    let viewers = 18;
    for i in 0..viewers {
        swarm.add_viewer(classes[(i / 3) % 6], i < 2).await?;
    }
    sleep_s(25).await;

    let topo = swarm.topology().await?;
    let h = topo
        .hierarchy
        .as_ref()
        .ok_or_else(|| anyhow!("the channel runs no hierarchy"))?;
    ensure!(h.regions.len() == 3, "regions: {:?}", h.regions);
    let mut tiers: BTreeMap<String, Vec<PeerId>> = BTreeMap::new();
    for p in &topo.peers {
        let t = p.tier.as_ref().context("a peer without a tier plan")?;
        tiers.entry(format!("{:?}", t.tier)).or_default().push(p.id);
    }
    println!(
        "tiers: {tiers:?}, mesh connectivity {}",
        h.mesh_connectivity
    );
    ensure!(tiers.len() == 3, "not all three tiers in use: {tiers:?}");
    ensure!(
        h.mesh_connectivity >= 2,
        "mesh connectivity {}",
        h.mesh_connectivity
    );

    let reports = swarm.all_stats().await?;
    for (i, r) in reports.iter().enumerate() {
        ensure!(
            r.verified_count > 20 && swarm.matches_origin(r) == Some(true),
            "viewer {i} ({:?}) is not byte-exact with the origin: verified {} ({:?})",
            r.peer_id,
            r.verified_count,
            swarm.matches_origin(r)
        );
    }
    let by_peer = index_by_peer(&mut swarm).await?;

    // 1. A middle-tier viewer loses up to n of its parents at once: the code rebuilds what they
    //    carried, so it loses no packet and asks the origin for nothing.
    let (middle, parents) = topo
        .peers
        .iter()
        .filter(|p| p.tier.as_ref().is_some_and(|t| t.tier == TierName::Middle))
        .filter_map(|p| {
            let n = p.tier.as_ref()?.fec?.n as usize;
            // Trees carried by each peer parent; take the parents carrying fewest trees while
            // the trees lost stay within n.
            let mut carried: BTreeMap<PeerId, usize> = BTreeMap::new();
            for sp in &p.plan {
                if let Source::Peer { id } = sp.parent {
                    *carried.entry(id).or_default() += 1;
                }
            }
            // The set of open parents whose trees together are as many as possible but ≤ n (few
            // parents: every subset is tried); more parents break the tie.
            let list: Vec<(PeerId, usize)> = carried
                .into_iter()
                .filter(|(id, _)| by_peer.contains_key(id))
                .collect();
            let mut best: (usize, usize, Vec<PeerId>) = (0, 0, Vec::new());
            for mask in 1u32..(1 << list.len().min(12)) {
                let set: Vec<&(PeerId, usize)> = list
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, x)| x)
                    .collect();
                let lost: usize = set.iter().map(|x| x.1).sum();
                if lost <= n && (lost, set.len()) > (best.0, best.1) {
                    best = (lost, set.len(), set.iter().map(|x| x.0).collect());
                }
            }
            (!best.2.is_empty()).then_some((best.0, p.id, best.2))
        })
        .max_by_key(|(lost, _, c)| (*lost, c.len()))
        .map(|(_, m, c)| (m, c))
        .ok_or_else(|| anyhow!("no middle-tier viewer with peer parents: {tiers:?}"))?;
    let m = by_peer[&middle];
    let before = swarm.stats(m).await?;
    let lost_trees = topo.peers.iter().find(|p| p.id == middle).map_or(0, |p| {
        p.plan
            .iter()
            .filter(|s| matches!(s.parent, Source::Peer { id } if parents.contains(&id)))
            .count()
    });
    println!(
        "closing parents {parents:?} of middle-tier viewer {m} ({middle}): {lost_trees} of its trees"
    );
    for p in &parents {
        swarm.close_viewer(by_peer[p]).await?;
    }
    sleep_s(10).await;
    let after = swarm.stats(m).await?;
    ensure!(
        after.origin_fallbacks == before.origin_fallbacks,
        "middle-tier viewer {m} fell back to the origin {} times after losing {} parents",
        after.origin_fallbacks - before.origin_fallbacks,
        parents.len()
    );
    ensure!(
        after.verified_first_seq == before.verified_first_seq
            && after.verified_count > before.verified_count + 10
            && swarm.matches_origin(&after) == Some(true),
        "middle-tier viewer {m} lost packets: {before:?} -> {after:?}"
    );

    // 2. A preferred node goes: everyone else keeps every packet (the mesh floods around it,
    //    its middle-tier roots rebuild or are re-fed).
    let closed: BTreeSet<PeerId> = parents.iter().copied().collect();
    let by_peer = index_by_peer(&mut swarm).await?;
    let topo = swarm.topology().await?;
    let preferred = topo
        .peers
        .iter()
        .filter(|p| {
            p.tier
                .as_ref()
                .is_some_and(|t| t.tier == TierName::Preferred)
        })
        .map(|p| p.id)
        .find(|id| !closed.contains(id) && by_peer.contains_key(id))
        .ok_or_else(|| anyhow!("no preferred node left to close"))?;
    let before = swarm.all_stats().await?;
    println!(
        "closing preferred node {preferred} (viewer {})",
        by_peer[&preferred]
    );
    swarm.close_viewer(by_peer[&preferred]).await?;
    sleep_s(10).await;
    let after = swarm.all_stats().await?;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if swarm.viewers[i].page.is_none() {
            continue;
        }
        ensure!(
            a.verified_first_seq == b.verified_first_seq
                && a.verified_count > b.verified_count + 10
                && swarm.matches_origin(a) == Some(true),
            "viewer {i} lost packets when preferred node {preferred} left: {b:?} -> {a:?}"
        );
    }

    let report = swarm.report(45).await?;
    println!("{}", report.table());
    ensure!(report.mismatched_viewers == 0, "mismatched viewers");
    ensure!(report.stalls == 0, "{} stalls", report.stalls);
    ensure!(
        report.p2p_share >= 0.6,
        "p2p share {:.3} below 0.6",
        report.p2p_share
    );
    swarm.shutdown().await;
    Ok(())
}
