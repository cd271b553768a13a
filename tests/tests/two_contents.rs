//! End-to-end, patent claim 1: one page keeps watching a live channel while it downloads a file
//! (a carousel of pieces) through the same P2P distribution, and both arrive byte-exact. When a
//! page's upload is short, the control center gives the live channel what it needs first.
//! Real headless Chromium pages, real WebRTC, the real control server. Run by `cargo xtask test`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use e2e::console::VIEWER_PAGE;
use e2e::swarm::Swarm;
use e2e::wait::wait_until;
use protocol::report::DownloadReport;

fn web_dir() -> PathBuf {
    std::env::var_os("P2P_WEB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"))
}

/// A file of pseudo-random bytes (nothing compressible or periodic a bug could hide behind).
fn test_file(len: usize) -> Vec<u8> {
    let mut rng = protocol::rng::XorShift::seeded(42);
    (0..len).map(|_| rng.below(256) as u8).collect()
}

const FILE_KBPS: u32 = 1200;
const FILE_LEN: usize = 700 * 1000;
/// Viewers' declared uploads: two pages with plenty, two short ones (the live channel must
/// then keep what it needs and the file gets only the rest).
const UPLOADS: [u32; 4] = [2000, 1100, 1100, 2000];
const DOWNLOADERS: [usize; 3] = [0, 1, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and the built wasm package; run by cargo xtask test"]
async fn a_page_watches_live_while_downloading_a_file_and_both_arrive_byte_exact() -> Result<()> {
    let mut swarm = Swarm::start_configured(web_dir(), 0, |c| control_server::config::Config {
        file_kbps: FILE_KBPS,
        ..c
    })
    .await?;
    let file = test_file(FILE_LEN);
    let ch = swarm.state.start_file_channel("file", file.clone())?;
    let info = ch
        .file()
        .cloned()
        .context("file channel without file info")?;
    for (i, up) in UPLOADS.iter().enumerate() {
        swarm.add_viewer(*up, i == 0).await?;
    }
    let live_kbps = swarm.stream_kbps();
    // Within the 8 s the test used to sleep: every page receives the live channel byte-exact,
    // and the decoding one plays (the live advance measured below starts from a playing page).
    let before = wait_until(
        "every page to receive the live channel byte-exact",
        Duration::from_secs(8),
        Duration::from_millis(500),
        async || {
            let before = swarm.all_stats().await?;
            for (i, r) in before.iter().enumerate() {
                ensure!(
                    swarm.matches_origin(r) == Some(true),
                    "viewer {i} live bytes differ before the download: {r:?}"
                );
            }
            ensure!(
                before[0].playing,
                "viewer 0 does not play yet: {:?}",
                before[0]
            );
            Ok(before)
        },
    )
    .await?;

    // Three pages start downloading at once, beside their live channel.
    let started = Instant::now();
    for i in DOWNLOADERS {
        let page = swarm.viewers[i].page.as_ref().context("page")?;
        page.eval("window.p2p.download('file')").await?;
    }

    // While the downloads run: the upload split the control center made, live first.
    let mut checked_split = false;
    let deadline = started + Duration::from_secs(45);
    let downloads: Vec<DownloadReport> = loop {
        // A poll of the downloads' progress (until done or the deadline below), which also
        // checks the upload split while the downloads run.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reports = swarm.all_stats().await?;
        let dls: Vec<Option<DownloadReport>> = DOWNLOADERS
            .iter()
            .map(|i| reports[*i].download.clone())
            .collect();
        if !checked_split {
            let file_topo = swarm.topology_of("file").await?;
            if file_topo.peers.len() == DOWNLOADERS.len() {
                let live_topo = swarm.topology().await?;
                for i in DOWNLOADERS {
                    let cap = UPLOADS[i];
                    let live_id = reports[i].peer_id.context("live peer id")?;
                    let live = live_topo
                        .peers
                        .iter()
                        .find(|p| p.id == live_id)
                        .context("live peer in the live topology")?;
                    let split = live
                        .upload_split
                        .with_context(|| format!("viewer {i}: no upload split recorded"))?;
                    println!(
                        "viewer {i} (upload {cap} kbit/s, live stream {live_kbps}): {split:?}"
                    );
                    ensure!(split.capacity_kbps == cap);
                    ensure!(split.live_kbps + split.file_kbps == cap);
                    // Live keeps at least one stream's worth (and what its children take).
                    ensure!(
                        split.live_need_kbps >= live_kbps
                            && split.live_kbps >= split.live_need_kbps.min(cap),
                        "viewer {i}: live got {} < its need {}",
                        split.live_kbps,
                        split.live_need_kbps
                    );
                    ensure!(
                        split.file_kbps == (cap - split.live_need_kbps.min(cap)).min(FILE_KBPS),
                        "viewer {i}: the file got {} kbit/s",
                        split.file_kbps
                    );
                    if cap < live_kbps + FILE_KBPS {
                        ensure!(
                            split.file_kbps < FILE_KBPS,
                            "viewer {i}: short upload but the file was not cut back"
                        );
                    }
                    // The download session is placed with the file's share only.
                    let dl_id = dls[DOWNLOADERS.iter().position(|d| *d == i).unwrap_or(0)]
                        .as_ref()
                        .and_then(|d| d.peer_id);
                    if let Some(dl_id) = dl_id {
                        let dl = file_topo
                            .peers
                            .iter()
                            .find(|p| p.id == dl_id)
                            .context("download session in the file topology")?;
                        ensure!(
                            dl.upload_kbps == split.file_kbps,
                            "viewer {i}: download placed with {} kbit/s, share {}",
                            dl.upload_kbps,
                            split.file_kbps
                        );
                    }
                }
                checked_split = true;
            }
        }
        if dls.iter().all(|d| d.as_ref().is_some_and(|d| d.done)) {
            break dls.into_iter().flatten().collect();
        }
        if Instant::now() > deadline {
            bail!("downloads did not complete within 45 s: {dls:#?}");
        }
    };
    let took = started.elapsed().as_secs_f64();
    ensure!(
        checked_split,
        "never saw all download sessions placed at once"
    );

    // Every download is complete and byte-exact: its digest is the origin's, and the bytes the
    // page offers for saving are exactly the file.
    for (n, d) in downloads.iter().enumerate() {
        let i = DOWNLOADERS[n];
        println!(
            "viewer {i}: downloaded {} B in {:.1} s, {} B from peers, {} B from the origin, up {} B",
            d.size,
            d.elapsed_ms.unwrap_or(0.0) / 1000.0,
            d.bytes_from_peers,
            d.bytes_from_origin,
            d.bytes_up
        );
        ensure!(d.pieces_have == info.pieces && d.size == info.size);
        ensure!(
            d.digest.as_deref() == Some(info.digest.as_str()) && d.expected_digest == info.digest,
            "viewer {i}: digest {:?}, origin {}",
            d.digest,
            info.digest
        );
        ensure!(
            d.bytes_from_peers > 0,
            "viewer {i}'s download got nothing from peers: {d:?}"
        );
        let page = swarm.viewers[i].page.as_ref().context("page")?;
        let b64 = page
            .eval(
                "(async () => { const b = window.p2p.downloadBlob(); \
                 const u = new Uint8Array(await b.arrayBuffer()); let s = ''; \
                 for (let i = 0; i < u.length; i += 0x8000) \
                 s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000)); \
                 return btoa(s); })()",
            )
            .await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("blob as base64")?)?;
        ensure!(
            bytes == file,
            "viewer {i}: the saved file differs from the origin's"
        );
    }
    let from_peers: u64 = downloads.iter().map(|d| d.bytes_from_peers).sum();
    let from_origin: u64 = downloads.iter().map(|d| d.bytes_from_origin).sum();

    // Live kept arriving byte-exact, without a stall, while the pages downloaded.
    let after = swarm.all_stats().await?;
    for (i, r) in after.iter().enumerate() {
        ensure!(
            swarm.matches_origin(r) == Some(true),
            "viewer {i} live bytes differ after the download"
        );
        ensure!(r.stalls == 0, "viewer {i} stalled: {:?}", r.errors);
        let expect = (took * f64::from(live_kbps) / 8.0 * 0.6) as u64;
        ensure!(
            r.bytes_played >= before[i].bytes_played + expect,
            "viewer {i}: live advanced only {} B during {took:.1} s (expected ≥ {expect})",
            r.bytes_played - before[i].bytes_played
        );
    }
    ensure!(after[0].current_time > before[0].current_time + took * 0.6);
    // The download sessions left when done: within the second the test used to sleep, the
    // live sessions have their whole upload back.
    wait_until(
        "the live sessions to get their whole upload back",
        Duration::from_secs(1),
        Duration::from_millis(100),
        async || {
            let live_topo = swarm.topology().await?;
            let split: Vec<_> = live_topo
                .peers
                .iter()
                .filter(|p| p.upload_split.is_some())
                .map(|p| (p.id, p.upload_split))
                .collect();
            ensure!(
                split.is_empty(),
                "upload splits outlived their downloads: {split:?}"
            );
            Ok(())
        },
    )
    .await?;
    println!(
        "downloads: {} pages x {} B in {took:.1} s; {:.0} % of download bytes from peers; live {live_kbps} kbit/s, file carousel {FILE_KBPS} kbit/s",
        downloads.len(),
        info.size,
        100.0 * from_peers as f64 / (from_peers + from_origin).max(1) as f64
    );
    swarm.ensure_no_unexpected_console_errors(VIEWER_PAGE)?;
    swarm.shutdown().await;
    Ok(())
}
