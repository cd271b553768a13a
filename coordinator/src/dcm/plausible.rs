//! Heartbeats are a peer's word, and a peer runs code we do not control: before a heartbeat
//! reaches the view (and through it the congestion detector, the dashboard and `/metrics`) its
//! claims are checked against what the DCM knows.
//!
//! * **Substreams**: a link on a substream the channel does not have (`≥ k`, or `≥ k + n` on a
//!   coded tier) refuses the whole heartbeat: no honest peer sends one.
//! * **Counters** (`bytes_from_peers`, `bytes_from_origin`, `bytes_up`, `origin_fallbacks`) are
//!   cumulative: one going backwards refuses the heartbeat, and so does growth no link could
//!   carry: more than [`RATE_MULTIPLE`] × max(stream rate, declared upload) × elapsed time, plus
//!   [`SLACK_BYTES`] for start-up bursts and jitter. Elapsed time runs from the last accepted
//!   heartbeat, or from the join for the first one (from [`UNKNOWN_JOIN_MS`] before, for peers
//!   adopted by a DCM taking over, which did not see them join).
//! * **Links with peers the DCM does not know** (departed long ago, never joined, or the peer
//!   itself) are dropped from the heartbeat, which is kept: a link that ended a moment ago is
//!   still reported by honest peers.
//!
//! Refusals are counted by reason ([`RefusalCounts`]) for `p2p_heartbeats_refused_total`.

use protocol::{Heartbeat, PeerId, Source};
use rustc_hash::FxHashMap;

/// Counters may grow this many times faster than the larger of the stream rate and the peer's
/// declared upload (catch-up after a stall, duplicates while a parent changes).
pub const RATE_MULTIPLE: u64 = 4;
/// Growth allowed on top of the rate bound, bytes: a start-up burst of a few fragments.
pub const SLACK_BYTES: u64 = 16 << 20;
/// Packets a peer may fetch from the origin per second, and on top of that.
const FALLBACKS_PER_S: u64 = 2_000;
const FALLBACK_SLACK: u64 = 10_000;
/// How long links with a departed peer are still taken as honest (stale) reports.
pub const RECENTLY_DEPARTED_MS: u64 = 30_000;
/// For a peer whose join the DCM did not see: counters may cover this long a session.
pub const UNKNOWN_JOIN_MS: u64 = 7 * 24 * 3600 * 1000;

/// Why a heartbeat (or part of it) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A link on a substream the channel does not have.
    Substream,
    /// A cumulative counter went backwards.
    CountersBackwards,
    /// A counter grew faster than any link could carry.
    CountersImplausible,
    /// Links with peers the DCM does not know were dropped (the heartbeat was kept).
    UnknownLink,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Substream,
        Refusal::CountersBackwards,
        Refusal::CountersImplausible,
        Refusal::UnknownLink,
    ];

    /// The `reason` label of `p2p_heartbeats_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Substream => "substream",
            Refusal::CountersBackwards => "counters_backwards",
            Refusal::CountersImplausible => "counters_implausible",
            Refusal::UnknownLink => "unknown_link",
        }
    }
}

/// Refusals by reason, in the order of [`Refusal::ALL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts(pub [u64; 4]);

impl RefusalCounts {
    pub fn get(&self, r: Refusal) -> u64 {
        self.0[r as usize]
    }

    fn add(&mut self, r: Refusal) {
        self.0[r as usize] += 1;
    }
}

/// The counters of the last accepted heartbeat of a peer.
#[derive(Debug, Clone, Copy)]
struct Counters {
    at_ms: u64,
    /// `bytes_from_peers + bytes_from_origin`, saturating: two counters that each look
    /// possible cannot wrap their sum around to something small.
    received: u64,
    up: u64,
    fallbacks: u64,
    from_peers: u64,
    from_origin: u64,
}

impl Counters {
    fn of(hb: &Heartbeat, at_ms: u64) -> Self {
        Counters {
            at_ms,
            received: hb.bytes_from_peers.saturating_add(hb.bytes_from_origin),
            up: hb.bytes_up,
            fallbacks: hb.origin_fallbacks,
            from_peers: hb.bytes_from_peers,
            from_origin: hb.bytes_from_origin,
        }
    }
}

/// What the check needs to know of the channel and the peer.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Substreams a link may name: `k`, or `k + n` on a coded tier.
    pub substreams: u32,
    pub stream_kbps: u32,
    /// The peer's declared upload.
    pub upload_kbps: u32,
}

/// Per-peer state of the check.
#[derive(Debug, Default)]
pub struct Plausibility {
    joined: FxHashMap<PeerId, u64>,
    /// Peers that left, and when: honest peers still report a link that ended a moment ago.
    departed: FxHashMap<PeerId, u64>,
    last: FxHashMap<PeerId, Counters>,
    pub refused: RefusalCounts,
}

impl Plausibility {
    pub fn joined(&mut self, peer: PeerId, now_ms: u64) {
        self.joined.insert(peer, now_ms);
        self.last.remove(&peer);
    }

    /// `peer` resumed here after a failover: its counters run from its join on the failed
    /// server, which this DCM did not see, so its first heartbeat is judged as one of a peer
    /// adopted after a takeover (against [`UNKNOWN_JOIN_MS`], not the time since the resume: a
    /// viewer of a few minutes would otherwise be refused, fall silent and be cut off).
    pub fn resumed(&mut self, peer: PeerId) {
        self.joined.remove(&peer);
        self.last.remove(&peer);
    }

    pub fn left(&mut self, peer: PeerId, now_ms: u64) {
        self.joined.remove(&peer);
        self.last.remove(&peer);
        self.departed.insert(peer, now_ms);
        if self.departed.len() > 4096 {
            self.departed
                .retain(|_, t| now_ms.saturating_sub(*t) < RECENTLY_DEPARTED_MS);
        }
    }

    /// Whether `peer` left less than [`RECENTLY_DEPARTED_MS`] ago.
    pub fn recently_departed(&self, peer: PeerId, now_ms: u64) -> bool {
        self.departed
            .get(&peer)
            .is_some_and(|t| now_ms.saturating_sub(*t) < RECENTLY_DEPARTED_MS)
    }

    /// Checks `hb` from `peer`, arrived at `at_ms`. `Err`: refuse the whole heartbeat (counted).
    /// `Ok`: apply it; links with peers for which `known` is false and that did not leave
    /// recently have been dropped (counted).
    pub fn check(
        &mut self,
        peer: PeerId,
        hb: &mut Heartbeat,
        at_ms: u64,
        bounds: Bounds,
        known: impl Fn(PeerId) -> bool,
    ) -> Result<(), Refusal> {
        let r = self.judge(peer, hb, at_ms, bounds, known);
        match r {
            Err(why) => self.refused.add(why),
            Ok(Some(why)) => self.refused.add(why),
            Ok(None) => {}
        }
        r.map(|_| ())
    }

    fn judge(
        &mut self,
        peer: PeerId,
        hb: &mut Heartbeat,
        at_ms: u64,
        bounds: Bounds,
        known: impl Fn(PeerId) -> bool,
    ) -> Result<Option<Refusal>, Refusal> {
        if hb.parents.iter().any(|p| p.substream >= bounds.substreams)
            || hb.children.iter().any(|c| c.substream >= bounds.substreams)
        {
            return Err(Refusal::Substream);
        }
        let now = Counters::of(hb, at_ms);
        let (since, before) = match self.last.get(&peer) {
            Some(c) => (c.at_ms, Some(*c)),
            None => (
                self.joined
                    .get(&peer)
                    .copied()
                    .unwrap_or(at_ms.saturating_sub(UNKNOWN_JOIN_MS)),
                None,
            ),
        };
        if let Some(b) = before {
            if now.from_peers < b.from_peers
                || now.from_origin < b.from_origin
                || now.up < b.up
                || now.fallbacks < b.fallbacks
            {
                return Err(Refusal::CountersBackwards);
            }
        }
        let (received0, up0, fallbacks0) =
            before.map_or((0, 0, 0), |b| (b.received, b.up, b.fallbacks));
        let elapsed_ms = at_ms.saturating_sub(since);
        let kbps = u64::from(bounds.stream_kbps.max(bounds.upload_kbps).max(1));
        // kbit/s × ms / 8 = bytes.
        let max_bytes = (RATE_MULTIPLE * kbps)
            .saturating_mul(elapsed_ms)
            .saturating_div(8)
            .saturating_add(SLACK_BYTES);
        let max_fallbacks =
            (FALLBACKS_PER_S.saturating_mul(elapsed_ms) / 1000).saturating_add(FALLBACK_SLACK);
        if now.received.saturating_sub(received0) > max_bytes
            || now.up.saturating_sub(up0) > max_bytes
            || now.fallbacks.saturating_sub(fallbacks0) > max_fallbacks
        {
            return Err(Refusal::CountersImplausible);
        }
        let is_known = |id: PeerId| id != peer && (known(id) || self.recently_departed(id, at_ms));
        let before_links = hb.parents.len() + hb.children.len();
        hb.parents.retain(|p| match p.parent {
            Source::Origin => true,
            Source::Peer { id } => is_known(id),
        });
        hb.children.retain(|c| is_known(c.child));
        self.last.insert(peer, now);
        Ok((hb.parents.len() + hb.children.len() < before_links).then_some(Refusal::UnknownLink))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ChildLink, ParentLink};

    const ME: PeerId = PeerId(1);
    const BOUNDS: Bounds = Bounds {
        substreams: 4,
        stream_kbps: 1_000,
        upload_kbps: 2_000,
    };

    fn hb(seq: u64, received: u64, up: u64) -> Heartbeat {
        Heartbeat {
            client_id: ME,
            seq,
            local_ts_ms: 0,
            parents: vec![ParentLink {
                substream: 0,
                parent: Source::Peer { id: PeerId(2) },
                last_seq: Some(4),
                last_ts_ms: None,
            }],
            children: vec![ChildLink {
                substream: 1,
                child: PeerId(3),
                last_seq: Some(5),
                last_ts_ms: None,
            }],
            buffer: vec![1; 4],
            bytes_from_peers: received,
            bytes_from_origin: 0,
            bytes_up: up,
            origin_fallbacks: 0,
            upload_kbps: 2_000,
            send_backlog_ms: 0,
            place: None,
        }
    }

    fn known(id: PeerId) -> bool {
        id.0 <= 3
    }

    #[test]
    fn honest_heartbeats_pass_untouched() {
        let mut p = Plausibility::default();
        p.joined(ME, 0);
        // 1 s at 1 Mbit/s is 125 kB; 10 s of it, in heartbeats a second apart.
        for s in 1..=10u64 {
            let mut h = hb(s, s * 125_000, s * 200_000);
            let orig = h.clone();
            assert_eq!(p.check(ME, &mut h, s * 1000, BOUNDS, known), Ok(()));
            assert_eq!(h, orig);
        }
        assert_eq!(p.refused, RefusalCounts::default());
    }

    #[test]
    fn counters_near_u64_max_are_refused_even_in_the_first_heartbeat() {
        let mut p = Plausibility::default();
        p.joined(ME, 0);
        let mut h = hb(1, u64::MAX - 5, 0);
        assert_eq!(
            p.check(ME, &mut h, 1000, BOUNDS, known),
            Err(Refusal::CountersImplausible)
        );
        // A peer adopted after a takeover (join unseen) cannot claim it either.
        let mut h = hb(1, 0, u64::MAX / 2);
        assert_eq!(
            p.check(PeerId(9), &mut h, 1000, BOUNDS, known),
            Err(Refusal::CountersImplausible)
        );
        // Two counters that each look possible cannot wrap their sum around.
        let mut h = hb(1, u64::MAX, 0);
        h.bytes_from_origin = 2;
        assert!(p.check(ME, &mut h, 1000, BOUNDS, known).is_err());
        assert_eq!(p.refused.get(Refusal::CountersImplausible), 3);
    }

    #[test]
    fn a_resumed_peer_s_first_counters_run_from_its_join_elsewhere() {
        let mut p = Plausibility::default();
        // Ten minutes of viewing on the failed server: far more than 16 MiB since the resume.
        p.joined(ME, 600_000);
        p.resumed(ME);
        let mut h = hb(1, 600 * 1000 * 1000 / 8 * 2, 600 * 4000 * 1000 / 8);
        assert_eq!(p.check(ME, &mut h, 601_000, BOUNDS, known), Ok(()));
        // Growth is judged from there on.
        let mut h2 = hb(2, h.bytes_from_peers + (1 << 30), h.bytes_up);
        assert_eq!(
            p.check(ME, &mut h2, 602_000, BOUNDS, known),
            Err(Refusal::CountersImplausible)
        );
        // Absurd counters are still refused.
        p.resumed(PeerId(9));
        let mut h3 = hb(1, u64::MAX - 5, 0);
        assert!(p.check(PeerId(9), &mut h3, 601_000, BOUNDS, known).is_err());
    }

    #[test]
    fn growth_beyond_the_rate_and_counters_going_back_are_refused() {
        let mut p = Plausibility::default();
        p.joined(ME, 0);
        assert!(p
            .check(ME, &mut hb(1, 100_000, 0), 1000, BOUNDS, known)
            .is_ok());
        // One second later, 1 GB more: no link carries that.
        assert_eq!(
            p.check(ME, &mut hb(2, 1_000_100_000, 0), 2000, BOUNDS, known),
            Err(Refusal::CountersImplausible)
        );
        // Backwards (the refused heartbeat did not move the baseline).
        assert_eq!(
            p.check(ME, &mut hb(3, 50_000, 0), 3000, BOUNDS, known),
            Err(Refusal::CountersBackwards)
        );
        assert!(p
            .check(ME, &mut hb(4, 400_000, 0), 4000, BOUNDS, known)
            .is_ok());
        assert_eq!(p.refused.get(Refusal::CountersBackwards), 1);
    }

    #[test]
    fn substreams_beyond_k_refuse_and_unknown_links_are_dropped() {
        let mut p = Plausibility::default();
        p.joined(ME, 0);
        let mut h = hb(1, 0, 0);
        h.children[0].substream = 4;
        assert_eq!(
            p.check(ME, &mut h, 1000, BOUNDS, known),
            Err(Refusal::Substream)
        );
        let mut h = hb(2, 0, 0);
        h.children.push(ChildLink {
            substream: 2,
            child: PeerId(77),
            last_seq: None,
            last_ts_ms: None,
        });
        h.children.push(ChildLink {
            substream: 3,
            child: ME,
            last_seq: None,
            last_ts_ms: None,
        });
        assert_eq!(p.check(ME, &mut h, 2000, BOUNDS, known), Ok(()));
        assert_eq!(h.children.len(), 1, "{:?}", h.children);
        assert_eq!(h.children[0].child, PeerId(3));
        assert_eq!(p.refused.get(Refusal::UnknownLink), 1);
        assert_eq!(p.refused.get(Refusal::Substream), 1);
        // A child that left a moment ago is a stale link, not a forged one.
        p.left(PeerId(50), 2500);
        let mut h = hb(3, 0, 0);
        h.children[0].child = PeerId(50);
        assert_eq!(p.check(ME, &mut h, 3000, BOUNDS, known), Ok(()));
        assert_eq!(h.children.len(), 1);
        assert_eq!(p.refused.get(Refusal::UnknownLink), 1);
    }

    /// Through the DCM: a forged heartbeat never reaches the view (whose last heartbeat is what
    /// the dashboard and `/metrics` report), and the refusal is in the DCM's stats.
    #[test]
    fn the_dcm_keeps_absurd_counters_out_of_its_view() {
        use crate::dcm::{Dcm, DcmConfig, Event};
        let mut dcm = Dcm::new(
            DcmConfig {
                channel: "c".into(),
                k: 4,
                heartbeat_ms: 1000,
                stream_kbps: 1000,
                topology: None,
                origin_fanout: 1,
                max_fanout: 16,
                cluster_max: 512,
                max_bridges: 0,
            },
            0,
        );
        dcm.handle(
            Event::Join {
                peer: ME,
                upload_kbps: 2000,
                region: crate::topology::region::Region::V4([127, 0]),
                relay: false,
                connectivity: None,
            },
            0,
        );
        let mut honest = hb(1, 125_000, 0);
        honest.parents.clear();
        honest.children.clear();
        dcm.handle(
            Event::Heartbeat {
                peer: ME,
                heartbeat: Box::new(honest),
                arrived_ms: 1000,
            },
            1000,
        );
        let mut forged = hb(2, u64::MAX - 1, u64::MAX - 1);
        forged.parents.clear();
        forged.children.clear();
        dcm.handle(
            Event::Heartbeat {
                peer: ME,
                heartbeat: Box::new(forged),
                arrived_ms: 2000,
            },
            2000,
        );
        let seen = dcm.view.get(ME).map(|s| s.heartbeat.bytes_from_peers);
        assert_eq!(seen, Some(125_000), "the forged counters reached the view");
        assert_eq!(
            dcm.stats()
                .heartbeats_refused
                .get(Refusal::CountersImplausible),
            1
        );
    }
}
