//! The origin: ingest → packets → bounded window.
//!
//! 1. [`fmp4`] splits an incoming fragmented-MP4 byte stream (demo clip loop, file, stdin, HTTP
//!    ingest) into the init segment and self-contained media fragments, and can retime fragments
//!    so a short clip loops as an endless live stream.
//! 2. [`packetizer`] cuts each fragment into numbered, size-bounded packets; the first packet of a
//!    keyframe fragment is flagged as a random-access point.
//! 3. [`window`] keeps the most recent packets for joiners and for peers' fallback fetches, plus a
//!    long log of packet hashes for end-to-end verification.
//!
//! 4. [`cadence`] measures how often fragments are published (the players' lag is sized from it).
//!
//! All of them are pure, synchronous logic: the I/O and timing around them live elsewhere, so they
//! are tested natively and deterministically.

pub mod cadence;
pub mod fmp4;
pub mod packetizer;
pub mod window;

pub use cadence::Cadence;
pub use fmp4::{
    parse_file, rewrite_timing, Fmp4Error, Fmp4Item, Fmp4Splitter, Fragment, InitSegment,
};
pub use packetizer::Packetizer;
pub use window::{Lookup, PacketWindow, WindowError, DEFAULT_HASH_CAPACITY};
