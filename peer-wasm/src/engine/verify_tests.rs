//! The signed stream at one engine: what a peer sends is played and forwarded only once a
//! signed manifest vouches for it; forgeries are dropped, reported and fetched from the origin.

use protocol::manifest::{ManifestSigner, StreamKey};
use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS};

use super::*;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const PARENT: PeerId = PeerId(2);
const CHILD: PeerId = PeerId(3);

fn packet(seq: u64) -> Vec<u8> {
    let payload: Vec<u8> = (0..900).map(|i| (seq as usize * 13 + i) as u8).collect();
    let flags = if seq == 0 { FLAG_RANDOM_ACCESS } else { 0 };
    encode(
        &PacketHeader {
            seq,
            flags,
            created_ms: 0,
        },
        &payload,
    )
}

/// A peer of a one-substream channel fed by `PARENT`, feeding `CHILD`, checking against the
/// key of `signer`.
fn engine(signer: &ManifestSigner) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), 0.0);
    e.set_stream_key(
        StreamKey::from_hex(&signer.public_key().to_hex()).expect("key"),
        "demo",
    );
    e.handle(
        Input::Welcome {
            peer_id: PeerId(1),
            substreams: 1,
            start_seq: 0,
            live_seq: 0,
            live_start_seq: None,
        },
        0.0,
    );
    e.handle(
        Input::Instructions {
            plan: vec![SubstreamPlan {
                index: 0,
                parent: Source::Peer { id: PARENT },
                children: vec![CHILD],
            }],
            tier: None,
        },
        0.0,
    );
    // The start (fetched from the origin at the welcome) is here: packets from 1 on are the
    // swarm's.
    e.handle(
        Input::Packet {
            from: From::OriginFetch,
            bytes: &packet(0),
        },
        0.0,
    );
    e
}

fn manifest(signer: &mut ManifestSigner, first: u64, n: u64) -> Vec<u8> {
    let packets: Vec<Vec<u8>> = (first..first + n).map(packet).collect();
    signer.sign(first, &packets).remove(0).encode()
}

fn from_peer(e: &mut Engine, bytes: &[u8], now: f64) -> Vec<Action> {
    e.handle(
        Input::Packet {
            from: From::Peer(PARENT),
            bytes,
        },
        now,
    )
}

fn delivered(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn forwarded(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Send { to, .. } if *to == CHILD))
        .count()
}

#[test]
fn genuine_packets_play_and_go_on_packets_before_their_manifest_wait_for_it() {
    let mut signer = ManifestSigner::new(&[9; 32], "demo");
    let mut e = engine(&signer);
    let m = manifest(&mut signer, 1, 2);
    e.handle(Input::Manifest { bytes: &m }, 1.0);
    let a = from_peer(&mut e, &packet(1), 2.0);
    assert_eq!(delivered(&a), vec![1]);
    assert_eq!(forwarded(&a), 1);
    // Packet 3 comes before its manifest: nothing is played or forwarded yet.
    let m2 = manifest(&mut signer, 3, 2);
    let a = from_peer(&mut e, &packet(3), 3.0);
    assert!(delivered(&a).is_empty() && forwarded(&a) == 0, "{a:?}");
    let a = from_peer(&mut e, &packet(2), 4.0);
    assert_eq!(delivered(&a), vec![2]);
    let a = e.handle(Input::Manifest { bytes: &m2 }, 5.0);
    assert_eq!(delivered(&a), vec![3], "released by its manifest");
    assert_eq!(forwarded(&a), 1);
    assert_eq!(e.counters.forged, 0);
    assert_eq!(e.counters.verified_packets, 3);
}

#[test]
fn a_forged_packet_is_dropped_reported_and_fetched_from_the_origin_at_once() {
    let mut signer = ManifestSigner::new(&[9; 32], "demo");
    let mut e = engine(&signer);
    let m = manifest(&mut signer, 1, 4);
    e.handle(Input::Manifest { bytes: &m }, 0.0);
    let mut flipped = packet(1);
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let a = from_peer(&mut e, &flipped, 10.0);
    assert!(delivered(&a).is_empty() && forwarded(&a) == 0, "{a:?}");
    assert!(a.iter().any(|x| matches!(
        x,
        Action::ReportForgery { peer, seq: 1, .. } if *peer == PARENT
    )));
    assert!(
        a.iter().any(|x| matches!(x, Action::Fetch { seq: 1 })),
        "fetched without the usual wait: {a:?}"
    );
    // An old packet replayed under a new number is a forgery too; the sender is reported once
    // per interval, not per packet.
    let mut replayed = packet(1);
    replayed[8..16].copy_from_slice(&3u64.to_be_bytes());
    let a = from_peer(&mut e, &replayed, 20.0);
    assert!(delivered(&a).is_empty() && forwarded(&a) == 0);
    assert!(!a.iter().any(|x| matches!(x, Action::ReportForgery { .. })));
    assert_eq!(e.counters.forged, 2);
    // The origin's copy plays.
    let a = e.handle(
        Input::Packet {
            from: From::OriginFetch,
            bytes: &packet(1),
        },
        30.0,
    );
    assert_eq!(delivered(&a), vec![1]);
}

#[test]
fn manifests_signed_by_another_key_vouch_for_nothing() {
    let signer = ManifestSigner::new(&[9; 32], "demo");
    let mut e = engine(&signer);
    let mut impostor = ManifestSigner::new(&[8; 32], "demo");
    let fake = manifest(&mut impostor, 1, 1);
    e.handle(Input::Manifest { bytes: &fake }, 0.0);
    assert_eq!(e.counters.bad_manifests, 1);
    let a = from_peer(&mut e, &packet(1), 1.0);
    assert!(delivered(&a).is_empty(), "waits for a genuine manifest");
    // None comes: the packet is dropped and the gap fetched from the origin.
    let mut fetched = false;
    for t in 1..=60 {
        let a = e.handle(Input::Tick, f64::from(t) * 100.0);
        fetched |= a.iter().any(|x| matches!(x, Action::Fetch { seq: 1 }));
    }
    assert!(fetched);
    e.handle(Input::Tick, 7000.0);
    assert_eq!(e.counters.unverified_dropped, 1);
}

#[test]
fn the_origin_push_needs_no_manifest() {
    let signer = ManifestSigner::new(&[9; 32], "demo");
    let mut e = engine(&signer);
    let a = e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(1),
        },
        1.0,
    );
    assert_eq!(delivered(&a), vec![1]);
    assert_eq!(forwarded(&a), 1);
}

#[test]
fn a_forged_copy_of_a_packet_already_here_still_reports_its_sender() {
    let mut signer = ManifestSigner::new(&[9; 32], "demo");
    let mut e = engine(&signer);
    let m = manifest(&mut signer, 1, 2);
    e.handle(Input::Manifest { bytes: &m }, 0.0);
    // The genuine packet 2 won the race (held, waiting for 1); the forged copy comes second.
    e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(2),
        },
        1.0,
    );
    let mut forged = packet(2);
    forged[30] ^= 1;
    let a = from_peer(&mut e, &forged, 2.0);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::ReportForgery { peer, seq: 2, .. } if *peer == PARENT
    )));
    assert!(delivered(&a).is_empty() && forwarded(&a) == 0);
    // Once played, a forged copy is still caught (by the manifest's hash).
    e.handle(
        Input::Packet {
            from: From::OriginPush,
            bytes: &packet(1),
        },
        3.0,
    );
    assert_eq!(e.counters.forged, 1);
    let a = e.handle(
        Input::Packet {
            from: From::Peer(PeerId(7)),
            bytes: &forged,
        },
        4.0,
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::ReportForgery { peer, seq: 2, .. } if *peer == PeerId(7)
    )));
    assert_eq!(e.counters.forged, 2);
}
