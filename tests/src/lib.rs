//! End-to-end test support for the P2P live-video system.
//!
//! * [`cdp`] — the browser driver: launches headless Chromium and drives many
//!   pages in one browser process over the Chrome DevTools Protocol, spoken by
//!   `chromiumoxide`; captures each page's console errors.
//! * [`swarm`] — the swarm harness used by `cargo xtask swarm` and the e2e
//!   tests: a control server plus N viewer pages relaying video over WebRTC.
//! * [`source`] — the swarm's source: the demo clip or any fragmented-MP4
//!   file, checked and described before the run.
//! * [`wait`] — [`wait::wait_until`]: poll a condition until a deadline
//!   instead of sleeping a fixed time.
//! * [`cluster`] — a real etcd and control-server processes joined to it
//!   (issue 12), to kill, stop and restart; [`cluster_swarm`] — `cargo xtask
//!   swarm --nodes N --kill-node-at T` on them.
//! * [`compare`] — `cargo xtask compare`: our swarm against P2P Media Loader on the
//!   same source, measured the same way.
//! * [`natives`] — native peers (`waypoint`, issue 15) beside the pages, in one
//!   process of their own.
//! * [`netns`] — a real NAT test bed: network namespaces behind nftables NATs
//!   and a firewall (issue 15).
//! * [`console`] — the console errors a test expects; every browser test
//!   fails on any other.
//!
//! Tests that need a real browser are `#[ignore]`d so that a plain
//! `cargo test --workspace` stays hermetic; `cargo xtask test` runs them with
//! `cargo test -p e2e -- --ignored --test-threads=1`.

pub mod cdp;
pub mod cluster;
pub mod cluster_swarm;
pub mod compare;
pub mod console;
pub mod natives;
pub mod netns;
pub mod source;
pub mod swarm;
pub mod wait;
