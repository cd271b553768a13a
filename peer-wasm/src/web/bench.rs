//! What checking the signed stream costs in this browser (issue 13): `verifyBenchmark()` hashes
//! and verifies synthetic manifests with the same code the engine uses, timed with
//! `performance.now()`, so a benchmark can put the peers' verification CPU next to the stream.

use protocol::manifest::{ManifestBook, ManifestSigner};
use serde::Serialize;
use wasm_bindgen::prelude::*;

#[derive(Serialize)]
struct VerifyBenchmark {
    /// SHA-256 over whole packets, MB/s (10^6 bytes).
    sha256_mb_per_s: f64,
    /// One manifest of `packets_per_manifest` packets: decode, ed25519 verify, keep its hashes.
    manifest_verify_us: f64,
    packet_bytes: usize,
    packets_per_manifest: usize,
}

/// Measures SHA-256 throughput on `mb` megabytes of 16 KiB packets and the cost of taking one
/// signed manifest of four packets (the demo stream's fragment), averaged over `manifests`.
#[wasm_bindgen(js_name = verifyBenchmark)]
pub fn verify_benchmark(mb: u32, manifests: u32) -> Result<JsValue, JsError> {
    const PACKET: usize = 16 * 1024;
    const PER_MANIFEST: usize = 4;
    let packets: Vec<Vec<u8>> = (0..(mb as usize * 1_000_000).div_ceil(PACKET).max(1))
        .map(|i| (0..PACKET).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let t = super::perf_now();
    let mut fold = 0u8;
    for p in &packets {
        fold ^= protocol::manifest::packet_digest(p)[0];
    }
    let hash_ms = (super::perf_now() - t).max(0.001);
    let bytes = packets.len() * PACKET;

    let mut signer = ManifestSigner::new(&[fold | 1; 32], "bench");
    let frames: Vec<Vec<u8>> = (0..manifests.max(1) as usize)
        .flat_map(|m| {
            let first = (m * PER_MANIFEST) as u64;
            let chunk = &packets[..PER_MANIFEST.min(packets.len())];
            signer.sign(first, chunk).into_iter().map(|x| x.encode())
        })
        .collect();
    let mut book = ManifestBook::new(signer.public_key(), "bench");
    let t = super::perf_now();
    for f in &frames {
        book.add(f)
            .map_err(|e| JsError::new(&format!("benchmark manifest refused: {e}")))?;
    }
    let verify_ms = super::perf_now() - t;
    let out = VerifyBenchmark {
        sha256_mb_per_s: bytes as f64 / 1e6 / (hash_ms / 1000.0),
        manifest_verify_us: verify_ms * 1000.0 / frames.len() as f64,
        packet_bytes: PACKET,
        packets_per_manifest: PER_MANIFEST,
    };
    serde_wasm_bindgen::to_value(&out).map_err(|e| JsError::new(&e.to_string()))
}
