//! The origin's streaming fMP4 splitter (`control-server/src/origin/fmp4/`), which reads
//! whatever an ingest client uploads. Any bytes, cut into any chunks, must give items or an
//! error, never a panic; and how the stream is chunked must not change what comes out: the
//! items and the final result equal those of the whole stream pushed at once (up to the items
//! a failing push does not return, see below). Every fragment
//! then goes through `rewrite_timing` (what the looped demo does), which must leave the bytes
//! untouched when it fails.
//!
//! Input: two bytes choosing the chunking, then the stream.
//!
//! The module is compiled here from its source files rather than through the `control-server`
//! crate: it depends on nothing but `thiserror` and `mp4-atom`, and the crate would bring tokio,
//! axum and hyper into every instrumented fuzz build.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../control-server/src/origin/fmp4/mod.rs"]
mod fmp4;

use fmp4::{Fmp4Error, Fmp4Item, Fmp4Splitter};

/// Items, then the end: `Ok` after `finish`, or the first error.
fn split(chunks: &mut dyn Iterator<Item = &[u8]>) -> (Vec<Fmp4Item>, Result<(), Fmp4Error>) {
    let mut s = Fmp4Splitter::new();
    let mut items = Vec::new();
    for chunk in chunks {
        match s.push(chunk) {
            Ok(more) => items.extend(more),
            Err(e) => {
                // Errors are terminal: the next push says the same.
                assert_eq!(s.push(b"more").err(), Some(e.clone()));
                return (items, Err(e));
            }
        }
    }
    match s.finish() {
        Ok(more) => {
            items.extend(more);
            (items, Ok(()))
        }
        Err(e) => (items, Err(e)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let whole = split(&mut std::iter::once(stream));

    // Chunk lengths from a small xorshift; the seed's low bits pick how fine the cuts are.
    let mut x = u32::from(u16::from_le_bytes(*seed)) | 1 << 16;
    let max = [1usize, 3, 16, 200, 4096][usize::from(seed[0] & 7) % 5];
    let mut rest = stream;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let len = (1 + x as usize % max).min(rest.len());
        let (c, r) = rest.split_at(len);
        chunks.push(c);
        rest = r;
    }
    let chunked = split(&mut chunks.iter().copied());
    // The same end, and the same items; except that a push which fails returns only the error,
    // so items completed earlier in the failing chunk are not returned (a finer chunking may
    // have returned them before the error).
    assert_eq!(chunked.1, whole.1, "chunking changed the outcome");
    if whole.1.is_ok() {
        assert_eq!(chunked.0, whole.0, "chunking changed the items");
    } else {
        assert!(
            chunked.0.starts_with(&whole.0),
            "chunking changed the items before the error"
        );
    }

    let (items, _) = whole;
    for (n, item) in items.into_iter().enumerate() {
        if let Fmp4Item::Fragment(f) = item {
            let mut bytes = f.bytes.clone();
            let add = u64::from(seed[1]) << (n % 40);
            if fmp4::rewrite_timing(&mut bytes, add, n as u32).is_err() {
                assert_eq!(bytes, f.bytes, "a failed rewrite changed the fragment");
            }
        }
    }
});
