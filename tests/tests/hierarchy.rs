//! End-to-end: the three-tier hierarchy in real browsers. Eighteen headless Chromium viewers in
//! three regions (by region hint: every page is on 127.0.0.1) with three upload classes fill the
//! top tier (preferred nodes flooding the stream over a c-connected mesh), the Reed-Solomon
//! coded middle tier and the plain bottom clusters. Run by `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use e2e::console::VIEWER_PAGE;
use e2e::swarm::Swarm;
use e2e::wait::{remaining, wait_until};
use protocol::report::PeerReport;
use protocol::{PeerId, Source, TierName};

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

const SECOND: Duration = Duration::from_secs(1);

/// Whether the peer's current plan names none of `gone` as a parent.
fn free_of(r: &PeerReport, gone: &[PeerId]) -> bool {
    r.plan.iter().all(|s| free_of_one(s.parent, gone))
}

/// Fails unless every substream the peer received from one of `gone` (per its plan in
/// `before`) now comes from another parent, which has delivered a packet of it.
fn ensure_repaired(before: &PeerReport, now: &PeerReport, gone: &[PeerId]) -> Result<()> {
    ensure!(
        free_of(now, gone),
        "its plan still names a closed parent: {:?}",
        now.plan
    );
    // A departed preferred node's place in the top tier may go to this very viewer: it then has
    // no trees, and the mesh feeds it (what it verifies is checked by the caller all the same).
    if now.plan.is_empty() && now.tier.as_deref() == Some("preferred") {
        ensure!(
            now.mesh_neighbours > 0,
            "promoted to the top tier but in no mesh: {now:?}"
        );
        return Ok(());
    }
    for s in before.plan.iter().filter(|s| !free_of_one(s.parent, gone)) {
        let l = now
            .links
            .iter()
            .find(|l| l.substream == s.index)
            .with_context(|| format!("no link for substream {}: {:?}", s.index, now.links))?;
        ensure!(
            l.first_packet_ms.is_some(),
            "substream {} has not been delivered by its new parent yet: {l:?}",
            s.index
        );
    }
    Ok(())
}

fn free_of_one(parent: Source, gone: &[PeerId]) -> bool {
    !matches!(parent, Source::Peer { id } if gone.contains(&id))
}

/// The sequence number after the last packet the peer has verified in order.
fn verified_end(r: &PeerReport) -> u64 {
    r.verified_first_seq.unwrap_or(0) + r.verified_count
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
    // Within the 25 s the test used to sleep: three regions, all three tiers in use, a
    // 2-connected mesh, and every viewer byte-exact with the origin.
    let (topo, tiers) = wait_until(
        "three tiers in three regions and every viewer byte-exact",
        Duration::from_secs(25),
        SECOND,
        async || {
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
            Ok((topo, tiers))
        },
    )
    .await?;
    println!(
        "tiers: {tiers:?}, mesh connectivity {}",
        topo.hierarchy.as_ref().map_or(0, |h| h.mesh_connectivity)
    );
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
    // Within the 10 s the test used to sleep: the viewer is re-homed and its new parents
    // deliver (the repair is over), then its in-order verified range passes every packet the
    // origin had cut by then. Any packet lost in the repair would by then have been fetched
    // from the origin (counted as a fallback) or have broken the range, so the checks below
    // see every loss the repair caused.
    let closed_at = Instant::now();
    let edge = wait_until(
        "the middle-tier viewer's new parents to deliver",
        Duration::from_secs(10),
        Duration::from_millis(500),
        async || {
            let r = swarm.stats(m).await?;
            ensure_repaired(&before, &r, &parents)?;
            swarm.latest_seq()
        },
    )
    .await?;
    let after = wait_until(
        "the middle-tier viewer to verify past the repair",
        remaining(closed_at, Duration::from_secs(10)),
        Duration::from_millis(500),
        async || {
            let r = swarm.stats(m).await?;
            ensure!(
                r.verified_first_seq != before.verified_first_seq
                    || (verified_end(&r) > edge && r.verified_count > before.verified_count + 10),
                "verified up to {} (packet {edge} was cut when the repair was done), {} packets \
                 ({} before the parents left)",
                verified_end(&r),
                r.verified_count,
                before.verified_count
            );
            Ok(r)
        },
    )
    .await?;
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
    // As above, within the 10 s the test used to sleep: the preferred node's children have
    // new parents that deliver, then every open viewer verifies past the packets cut by then.
    let closed_at = Instant::now();
    let edge = wait_until(
        "the preferred node's children's new parents to deliver",
        Duration::from_secs(10),
        SECOND,
        async || {
            let reports = swarm.all_stats().await?;
            for (i, (b, r)) in before.iter().zip(&reports).enumerate() {
                if swarm.viewers[i].page.is_some() {
                    ensure_repaired(b, r, &[preferred]).with_context(|| format!("viewer {i}"))?;
                }
            }
            swarm.latest_seq()
        },
    )
    .await?;
    let after = wait_until(
        "every viewer to verify past the repair",
        remaining(closed_at, Duration::from_secs(10)),
        SECOND,
        async || {
            let after = swarm.all_stats().await?;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                ensure!(
                    swarm.viewers[i].page.is_none()
                        || a.verified_first_seq != b.verified_first_seq
                        || (verified_end(a) > edge && a.verified_count > b.verified_count + 10),
                    "viewer {i} verified up to {} (packet {edge} was cut when the repair was \
                     done), {} packets ({} before)",
                    verified_end(a),
                    a.verified_count,
                    b.verified_count
                );
            }
            Ok(after)
        },
    )
    .await?;
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
    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    swarm.shutdown().await;
    Ok(())
}
