//! A joiner's catch-up from its new parents, and the window of recent packets a parent serves
//! it from (issue 14).
//!
//! A joiner starts one fragment behind the newest random-access point: it fetches that older
//! fragment from the origin at once (the player starts on it), and gives the newest fragment a
//! fallback period first, because its parents already hold it. A parent primes a new child with
//! its newest packet of the tree; on the demo clip (a 16 KiB packet a substream a fragment) that
//! is the whole fragment, but a 3 Mbit/s stream's 4 s fragment is 13 packets a substream, and the
//! other 12 used to come from the origin. Now:
//!
//! * the **child** asks each new parent of a data tree, once, for that tree's packets of the
//!   newest fragment it lacks ([`protocol::want::Want`], a 24-byte frame on the data channel),
//!   and its fallback clock for them runs as for a fragment the trees hand down (spread over
//!   two thirds of a long fragment, `burst_spread_ms`);
//! * the **parent** answers from its [`Window`] (the last two fragments it delivered) through
//!   its prime queue: from spare upload, after the stream and leaving half the upload burst to
//!   the next fragment, each send dropped once the child has surely fetched it. A want from a
//!   peer that is not its child yet (the child's instructions came first) waits a few seconds
//!   for the parent's own instructions.
//!
//! A want costs the parent nothing it does not have: only packets it holds, only to a child of
//! that tree (or a cluster it feeds that substream), at most [`MAX_PENDING`] waiting.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use protocol::packet::{peek_seq, FLAG_RANDOM_ACCESS};
use protocol::want::Want;
use protocol::PeerId;

/// Fragments a [`Window`] keeps: the newest (perhaps still arriving) and the one before, which
/// is the newest a joiner welcomed a moment ago knew of.
const KEEP_FRAGMENTS: usize = 2;

/// Most packets a [`Window`] keeps whatever the fragments (16 MiB of 16 KiB packets).
const MAX_WINDOW: usize = 1024;

/// Wants from peers that are not our children yet, at most.
pub(super) const MAX_PENDING: usize = 16;

/// How long a want waits for the instructions that make its sender our child (ms).
const PENDING_MS: f64 = 3000.0;

/// The packets this peer delivered last, newest at the back: at least two per substream (what
/// primes a new child) and everything from the second newest random-access point on.
#[derive(Debug, Default)]
pub(super) struct Window {
    packets: VecDeque<(bool, Rc<Vec<u8>>)>,
    /// Random-access points among `packets`.
    starts: usize,
}

impl Window {
    pub fn push(&mut self, packet: Rc<Vec<u8>>, k: u32) {
        let start = packet.get(2).is_some_and(|f| f & FLAG_RANDOM_ACCESS != 0);
        self.starts += usize::from(start);
        self.packets.push_back((start, packet));
        let floor = 2 * k.max(1) as usize;
        while self.packets.len() > floor {
            let Some(&(front_start, _)) = self.packets.front() else {
                break;
            };
            let starts_after = self.starts - usize::from(front_start);
            if self.packets.len() <= MAX_WINDOW && starts_after < KEEP_FRAGMENTS {
                break;
            }
            self.packets.pop_front();
            self.starts = starts_after;
        }
    }

    /// The newest packet of substream `sub`.
    pub fn newest_of(&self, sub: u32, k: u32) -> Option<(u64, &Rc<Vec<u8>>)> {
        self.packets.iter().rev().find_map(|(_, p)| {
            peek_seq(p)
                .filter(|q| protocol::substream_of(*q, k) == sub)
                .map(|q| (q, p))
        })
    }

    /// The packets of `want`'s substream in its range, oldest first.
    pub fn wanted<'a>(
        &'a self,
        want: &'a Want,
        k: u32,
    ) -> impl Iterator<Item = (u64, &'a Rc<Vec<u8>>)> + 'a {
        self.packets.iter().filter_map(move |(_, p)| {
            peek_seq(p)
                .filter(|q| {
                    (want.from_seq..=want.to_seq).contains(q)
                        && protocol::substream_of(*q, k) == want.substream
                })
                .map(|q| (q, p))
        })
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.packets.len()
    }
}

#[derive(Debug, Default)]
pub(super) struct CatchUp {
    /// Child side: the newest fragment at the Welcome (first and last packet), until played.
    range: Option<(u64, u64)>,
    /// Child side: (parent, data tree) pairs already asked.
    asked: BTreeSet<(PeerId, u32)>,
    /// Parent side: wants from peers that were not our children when they came, and when.
    pending: VecDeque<(PeerId, Want, f64)>,
    /// Parent side: per (child, tree), the packet it was primed with when it became our child;
    /// that one and every later one go down the tree, so a want is served below it.
    primed: BTreeMap<(PeerId, u32), u64>,
}

impl CatchUp {
    /// Welcomed: packets `first..=last` (the newest fragment) are the parents' to send.
    pub fn open(&mut self, first: u64, last: u64) {
        self.range = (first <= last).then_some((first, last));
        self.asked.clear();
    }

    /// The want to send `parent`, our new parent in data tree `tree`, if the catch-up is still
    /// open, that pair was not asked yet and `lacks(first, last)` says packets of the tree are
    /// missing in the range.
    pub fn ask(
        &mut self,
        parent: PeerId,
        tree: u32,
        next_deliver: Option<u64>,
        lacks: impl Fn(u64, u64) -> bool,
    ) -> Option<Want> {
        let (first, last) = self.range?;
        let first = first.max(next_deliver.unwrap_or(first));
        if first > last {
            self.range = None;
            return None;
        }
        if self.asked.contains(&(parent, tree)) || !lacks(first, last) {
            return None;
        }
        self.asked.insert((parent, tree));
        Some(Want {
            substream: tree,
            from_seq: first,
            to_seq: last,
        })
    }

    /// A want from `from`, not (yet) our child in its tree: kept until our instructions say
    /// so, for [`PENDING_MS`]; the oldest goes when [`MAX_PENDING`] wait.
    pub fn hold(&mut self, from: PeerId, want: Want, now: f64) {
        self.pending
            .retain(|(p, w, _)| !(*p == from && w.substream == want.substream));
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((from, want, now));
    }

    /// `child` became our child in `tree` and was primed with packet `seq`.
    pub fn primed(&mut self, child: PeerId, tree: u32, seq: u64) {
        self.primed.insert((child, tree), seq);
    }

    /// Forgets the primes of peers that are no longer our children.
    pub fn keep_primed(&mut self, children: &BTreeSet<(PeerId, u32)>) {
        self.primed.retain(|key, _| children.contains(key));
    }

    /// Where `want` from `child` ends for us: the packet we primed it with comes down the tree
    /// already, and so does every later one.
    pub fn served_range(&self, child: PeerId, want: &Want) -> Want {
        let mut w = *want;
        if let Some(&seq) = self.primed.get(&(child, want.substream)) {
            w.to_seq = w.to_seq.min(seq.saturating_sub(1));
        }
        w
    }

    /// The waiting want of `child` in tree `tree`, now our child there.
    pub fn take(&mut self, child: PeerId, tree: u32, now: f64) -> Option<Want> {
        self.pending.retain(|(_, _, at)| now - at <= PENDING_MS);
        let i = self
            .pending
            .iter()
            .position(|(p, w, _)| *p == child && w.substream == tree)?;
        self.pending.remove(i).map(|(_, w, _)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::packet::{encode, PacketHeader};

    fn packet(seq: u64, start: bool) -> Rc<Vec<u8>> {
        let header = PacketHeader {
            seq,
            flags: if start { FLAG_RANDOM_ACCESS } else { 0 },
            created_ms: 0,
        };
        Rc::new(encode(&header, &[seq as u8; 10]))
    }

    #[test]
    fn the_window_keeps_the_last_two_fragments() {
        let mut w = Window::default();
        // Fragments of 12 packets (k = 4) starting at 0, 12, 24, 36.
        for seq in 0..40 {
            w.push(packet(seq, seq % 12 == 0), 4);
        }
        // From 24 (the second newest start) on.
        assert_eq!(w.len(), 16);
        assert_eq!(w.newest_of(1, 4).map(|(s, _)| s), Some(37));
        let want = Want {
            substream: 2,
            from_seq: 20,
            to_seq: 35,
        };
        let got: Vec<u64> = w.wanted(&want, 4).map(|(s, _)| s).collect();
        assert_eq!(got, vec![26, 30, 34], "packets of substream 2 still held");
    }

    #[test]
    fn a_window_without_starts_keeps_two_packets_a_substream_and_is_bounded() {
        let mut w = Window::default();
        for seq in 0..5000 {
            w.push(packet(seq, seq == 0), 4);
        }
        assert_eq!(w.len(), MAX_WINDOW);
        let mut small = Window::default();
        for seq in 0..3 {
            small.push(packet(seq, true), 4);
        }
        assert_eq!(small.len(), 3, "fewer than two per substream: all kept");
    }

    #[test]
    fn a_parent_is_asked_once_per_tree_while_the_fragment_is_missing() {
        let mut c = CatchUp::default();
        let p = PeerId(7);
        assert_eq!(
            c.ask(p, 0, Some(0), |_, _| true),
            None,
            "nothing to catch up"
        );
        c.open(100, 150);
        let w = c.ask(p, 1, Some(90), |_, _| true).expect("asked");
        assert_eq!((w.substream, w.from_seq, w.to_seq), (1, 100, 150));
        assert_eq!(c.ask(p, 1, Some(90), |_, _| true), None, "once");
        assert_eq!(c.ask(p, 2, Some(90), |_, _| false), None, "nothing missing");
        let w = c
            .ask(PeerId(8), 1, Some(120), |_, _| true)
            .expect("a new parent");
        assert_eq!(w.from_seq, 120, "only what is not played yet");
        assert_eq!(c.ask(PeerId(9), 3, Some(151), |_, _| true), None, "played");
        assert_eq!(c.ask(PeerId(10), 3, Some(0), |_, _| true), None, "closed");
    }

    #[test]
    fn a_held_want_waits_for_the_instructions_a_while() {
        let mut c = CatchUp::default();
        let w = |substream| Want {
            substream,
            from_seq: 0,
            to_seq: 9,
        };
        c.hold(PeerId(1), w(0), 0.0);
        c.hold(PeerId(1), w(1), 0.0);
        assert_eq!(c.take(PeerId(1), 2, 10.0), None);
        assert_eq!(c.take(PeerId(1), 1, 10.0), Some(w(1)));
        assert_eq!(c.take(PeerId(1), 1, 10.0), None, "taken once");
        assert_eq!(c.take(PeerId(1), 0, PENDING_MS + 1.0), None, "expired");
        for i in 0..(MAX_PENDING as u64 + 4) {
            c.hold(PeerId(100 + i), w(0), 5000.0);
        }
        assert_eq!(c.take(PeerId(100), 0, 5000.0), None, "the oldest went");
        assert_eq!(
            c.take(PeerId(100 + MAX_PENDING as u64 + 3), 0, 5000.0),
            Some(w(0))
        );
    }
}
