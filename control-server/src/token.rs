//! Random tokens (operator token, relay recruit tokens): a leaf module.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;

/// A fresh random operator token: 32 hex digits from the OS's random source.
pub fn random_token() -> String {
    let mut buf = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !from_os {
        // Not Linux: std's hasher keys are seeded from the OS's random source too.
        for chunk in buf.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
