//! The DCM's view of the swarm, built from heartbeats alone (FIG. 9), and congestion detection.
//!
//! Every peer reports, per substream, the last sequence number it received from its parent and,
//! per child, the last one it sent. From these the DCM (or a freshly started replacement that has
//! never seen the peers join) reconstructs the distribution topology, and finds congested links by
//! comparing what each side reports with what the origin had produced a grace period earlier.
//! Pure: time and the origin's production log come in as arguments.

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};

use protocol::{ChildLink, Heartbeat, PeerId, Source, SubstreamPlan};
use serde::Serialize;

pub use super::production::ProductionLog;

/// What the view remembers of one peer.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub heartbeat: Heartbeat,
    /// Server time (ms) the heartbeat arrived.
    pub received_ms: u64,
    /// Upload rate measured between the last two heartbeats, kbit/s.
    pub measured_upload_kbps: Option<f64>,
    /// Server clock minus the peer's clock plus the quickest transit seen (ms): the smallest
    /// `received_ms - local_ts_ms` so far, allowed to creep up 1 ms per heartbeat to follow
    /// clock drift. A heartbeat that queued in a busy server's socket or DCM queue has a larger
    /// difference; this one does not grow with the queueing.
    pub clock_offset_ms: i64,
}

impl PeerState {
    /// When the peer wrote its last heartbeat, on the server's clock (never after it arrived).
    /// Lateness is judged as of then: packets cut while the heartbeat waited in the server's
    /// queues are not yet owed.
    pub fn sent_ms(&self) -> u64 {
        ((self.heartbeat.local_ts_ms as i64).saturating_add(self.clock_offset_ms)).max(0) as u64
    }
}

#[derive(Debug, Default)]
pub struct HeartbeatView {
    // Fx: peer ids are small integers the server hands out, and this map is hit several times
    // per heartbeat; SipHash's DoS resistance buys nothing here.
    peers: FxHashMap<PeerId, PeerState>,
    /// See [`HeartbeatView::with_quiet_threshold`]: links quiet at least this long (ms) before
    /// their child's heartbeat was written put the child in `quiet`.
    quiet_threshold_ms: u64,
    /// Peers whose last heartbeat shows a link from a peer parent that had delivered nothing for
    /// `quiet_threshold_ms`: empty in a healthy swarm, so a parent's heartbeat need not read
    /// each child's report (another peer's memory: cache misses at tens of thousands of
    /// heartbeats per second) to know none of its links is dead.
    quiet: FxHashSet<PeerId>,
}

impl HeartbeatView {
    /// A view that keeps the set [`HeartbeatView::may_have_quiet_link`] reads, for links quiet
    /// for `ms` (the congestion detector's `dead_grace_ms`). The default, 0, puts every peer with
    /// a peer parent in it.
    pub fn with_quiet_threshold(ms: u64) -> Self {
        HeartbeatView {
            quiet_threshold_ms: ms,
            ..Self::default()
        }
    }

    /// The threshold the quiet set is kept for.
    pub fn quiet_threshold_ms(&self) -> u64 {
        self.quiet_threshold_ms
    }

    /// False when no link from a peer parent in `peer`'s last heartbeat had been quiet for the
    /// quiet threshold when the heartbeat was written (every such link's last delivery, on the
    /// server's clock, is later than the heartbeat's `sent_ms()` minus the threshold).
    pub fn may_have_quiet_link(&self, peer: PeerId) -> bool {
        !self.quiet.is_empty() && self.quiet.contains(&peer)
    }

    pub fn ingest(&mut self, hb: Heartbeat, now_ms: u64) {
        let measured = self.peers.get(&hb.client_id).and_then(|prev| {
            let dt = now_ms.saturating_sub(prev.received_ms);
            let db = hb.bytes_up.checked_sub(prev.heartbeat.bytes_up)?;
            (dt >= 200).then(|| db as f64 * 8.0 / dt as f64)
        });
        let offset = now_ms as i64 - hb.local_ts_ms as i64;
        let clock_offset_ms = self.peers.get(&hb.client_id).map_or(offset, |prev| {
            offset.min(prev.clock_offset_ms.saturating_add(1))
        });
        let state = PeerState {
            heartbeat: hb,
            received_ms: now_ms,
            measured_upload_kbps: measured,
            clock_offset_ms,
        };
        let cutoff = state.sent_ms().saturating_sub(self.quiet_threshold_ms);
        let quiet = state.heartbeat.parents.iter().any(|p| {
            matches!(p.parent, Source::Peer { .. })
                && p.last_ts_ms.is_some_and(|t| {
                    ((t as i64).saturating_add(clock_offset_ms)).max(0) as u64 <= cutoff
                })
        });
        let id = state.heartbeat.client_id;
        if quiet {
            self.quiet.insert(id);
        } else if !self.quiet.is_empty() {
            self.quiet.remove(&id);
        }
        self.peers.insert(id, state);
    }

    pub fn remove(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.quiet.remove(&peer);
    }

    /// Counts `peer` as heard from at `now_ms` (its connection was replaced; a heartbeat
    /// follows at once), if it ever sent a heartbeat.
    pub fn touch(&mut self, peer: PeerId, now_ms: u64) {
        if let Some(s) = self.peers.get_mut(&peer) {
            s.received_ms = s.received_ms.max(now_ms);
        }
    }

    pub fn get(&self, peer: PeerId) -> Option<&PeerState> {
        self.peers.get(&peer)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Peers whose last heartbeat is older than `timeout_ms`.
    pub fn silent_since(&self, now_ms: u64, timeout_ms: u64) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.received_ms) > timeout_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The distribution topology as the heartbeats describe it: each peer's parent per
    /// substream (its own report) and its children (its parents' reports, so a child that has
    /// not yet sent a heartbeat is still found).
    pub fn plans(&self) -> BTreeMap<PeerId, Vec<SubstreamPlan>> {
        let mut plans: BTreeMap<PeerId, Vec<SubstreamPlan>> = BTreeMap::new();
        for (id, s) in &self.peers {
            let mut v: Vec<SubstreamPlan> = s
                .heartbeat
                .parents
                .iter()
                .map(|p| SubstreamPlan {
                    index: p.substream,
                    parent: p.parent,
                    children: Vec::new(),
                })
                .collect();
            for c in &s.heartbeat.children {
                if let Some(sp) = v.iter_mut().find(|sp| sp.index == c.substream) {
                    sp.children.push(c.child);
                }
            }
            for sp in &mut v {
                sp.children.sort();
            }
            v.sort_by_key(|sp| sp.index);
            plans.insert(*id, v);
        }
        plans
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CongestionConfig {
    /// How long after its creation a packet may still be on its way down the tree.
    pub grace_ms: u64,
    /// Consecutive late observations before a link counts as congested.
    pub strikes: u32,
    /// A link is only judged on packets that arrived upstream at least this long after the link
    /// was created (its data channel may still have been opening before).
    pub settle_ms: u64,
    /// A parent reporting an upload backlog older than this is congested towards every child
    /// it has not yet sent its newest packet to.
    pub backlog_ms: u64,
    /// A parent whose backlog exceeds this cannot forward a fragment before its children's
    /// fallback fetches it: it owes each child at once what it already sent a sibling. Above
    /// one fragment, so that a healthy forwarder handed many children at once (and priming
    /// them) is not taken for a stuck one.
    pub stuck_ms: u64,
    /// How long after its creation a packet must have been owed on a link that delivers
    /// nothing at all while its parent claims to feed it (see `claimed_but_dead`): shorter
    /// than `grace_ms`, since a link that is merely slow still delivers something. The peer
    /// engine reports a parent gone quiet this long (plus a margin) in an early heartbeat.
    pub dead_grace_ms: u64,
}

impl Default for CongestionConfig {
    fn default() -> Self {
        CongestionConfig {
            grace_ms: 700,
            strikes: 2,
            settle_ms: 1000,
            backlog_ms: 250,
            stuck_ms: 1500,
            dead_grace_ms: 400,
        }
    }
}

/// A link found congested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Congested {
    pub parent: PeerId,
    pub child: PeerId,
    pub substream: u32,
    /// Packets of this substream the child is behind.
    pub behind: u64,
    /// True when the parent's own report shows it did not send (its uplink is the bottleneck).
    pub parent_side: bool,
}

#[derive(Debug, Default)]
pub struct CongestionDetector {
    pub cfg: CongestionConfig,
    strikes: FxHashMap<(PeerId, PeerId, u32), u32>,
    /// Links judged in the current heartbeat; kept to reuse its allocation.
    scratch: Vec<Judged>,
    /// Whether the last heartbeat judged showed its peer missing a packet a parent (or the
    /// origin) should have delivered by then.
    last_behind: bool,
}

/// (parent, child, substream, late, expected, have, parent_side, at_once): `at_once` when one
/// late observation is enough (the parent says its uplink is stuck, or it claims to feed a link
/// that delivers nothing).
type Judged = (PeerId, PeerId, u32, bool, u64, Option<u64>, bool, bool);

/// Whether `child`'s link from `parent` on `substream` is dead while the parent claims to feed
/// it: the parent's own last heartbeat says it sent the child `expected` (or, for a link it does
/// not list, a feed into another cluster, it reports no upload backlog while holding the
/// packet), yet nothing at all has come over the link since `expected` was due (see `ProductionLog`). A slow link
/// still delivers, late; an overloaded child still shows arrivals; a silent forwarder (issue 13)
/// shows neither, and its children are moved on the first heartbeat that shows it rather than
/// the second. Only a link that delivered before counts: one that never did may never have
/// opened.
fn claimed_but_dead(
    view: &HeartbeatView,
    log: &ProductionLog,
    cfg: &CongestionConfig,
    parent: PeerId,
    child: PeerId,
    substream: u32,
    (expected, due): (u64, u64),
) -> bool {
    // The child's side first: in a healthy swarm it has the packet, and the parent's report
    // (another peer's memory) is not read.
    let Some(cs) = view.get(child) else {
        return false;
    };
    let Some(link) = cs
        .heartbeat
        .parents
        .iter()
        .find(|p| p.substream == substream && p.parent == Source::Peer { id: parent })
    else {
        return false;
    };
    if link.last_seq.is_some_and(|s| s >= expected) {
        return false;
    }
    // A link that never delivered may never have opened (an unreachable pair): that is for
    // the data channel's own timeout and `link_failed` to settle, which also keeps the pair
    // apart afterwards. Dead here means it delivered, then stopped.
    let Some(last_at) = link.last_ts_ms else {
        return false;
    };
    let last_at = (last_at as i64).saturating_add(cs.clock_offset_ms).max(0) as u64;
    if last_at > due {
        return false;
    }
    let Some(ps) = view.get(parent) else {
        return false;
    };
    // When a packet `last` (no earlier than `expected`) went at local time `at`, `expected` went
    // as much earlier as it was made earlier (a forwarder passes packets on with about the same
    // delay).
    let went_at = |last: u64, at: u64| {
        let made_apart = log.due(last).map_or(0, |c| c.saturating_sub(due));
        at.saturating_sub(made_apart)
    };
    // What the parent received on the substream, and when.
    let got = ps
        .heartbeat
        .parents
        .iter()
        .find(|x| x.substream == substream)
        .and_then(|x| Some((x.last_seq?, x.last_ts_ms?)))
        .filter(|(s, _)| *s >= expected);
    // When the parent says it sent the packet, on the server's clock: from its last send to
    // this child, or, for a link it does not list, from when it received the packet, which it
    // passed on at once if it reports nothing queued. A link that delivers late (a slow uplink,
    // a long path, packets of one substream a second apart) delivers within the grace of that;
    // a dead one never does.
    let skew = ps.clock_offset_ms;
    let sent_at = match ps
        .heartbeat
        .children
        .iter()
        .find(|c| c.child == child && c.substream == substream)
    {
        Some(ChildLink {
            last_seq: Some(last),
            last_ts_ms: Some(at),
            ..
        }) if *last >= expected => Some(went_at(*last, *at)),
        Some(_) => None,
        None if u64::from(ps.heartbeat.send_backlog_ms) <= cfg.backlog_ms => {
            got.map(|(last, at)| went_at(last, at))
        }
        None => None,
    };
    sent_at.is_some_and(|t| {
        let t = (t as i64).saturating_add(skew).max(0) as u64;
        t >= due && t + cfg.dead_grace_ms <= cs.sent_ms()
    })
}

impl CongestionDetector {
    pub fn new(cfg: CongestionConfig) -> Self {
        CongestionDetector {
            cfg,
            strikes: FxHashMap::default(),
            scratch: Vec::new(),
            last_behind: false,
        }
    }

    /// Whether the peer of the last [`CongestionDetector::on_heartbeat`] call lags behind what
    /// the origin produced a grace ago, on any data substream.
    pub fn last_behind(&self) -> bool {
        self.last_behind
    }

    /// The packet `child` is owed on the link from `parent` (`substream`) if that link is dead
    /// while `parent` claims to feed it ([`claimed_but_dead`]), judged as of the child's last
    /// heartbeat with [`CongestionConfig::dead_grace_ms`]; links younger than `settle_ms` are
    /// not judged.
    #[allow(clippy::too_many_arguments)]
    fn dead_link(
        &self,
        view: &HeartbeatView,
        log: &ProductionLog,
        k: u32,
        parent: PeerId,
        child: PeerId,
        substream: u32,
        link_since: &impl Fn(PeerId, PeerId, u32) -> Option<u64>,
    ) -> Option<u64> {
        if substream >= k {
            return None;
        }
        // The view's quiet set answers for the common case without reading the child's report
        // (when it is kept for this grace or a shorter one).
        if view.quiet_threshold_ms() <= self.cfg.dead_grace_ms && !view.may_have_quiet_link(child) {
            return None;
        }
        let cs = view.get(child)?;
        let cutoff = cs.sent_ms().saturating_sub(self.cfg.dead_grace_ms);
        // Fast path of the common case, before the production log is scanned: a link that
        // delivered after the cutoff (or never) is not dead in `claimed_but_dead`'s sense.
        let last_at = cs
            .heartbeat
            .parents
            .iter()
            .find(|p| p.substream == substream && p.parent == Source::Peer { id: parent })?
            .last_ts_ms?;
        if (last_at as i64).saturating_add(cs.clock_offset_ms).max(0) as u64 > cutoff {
            return None;
        }
        let owed = log.newest_before(substream, k, cutoff)?;
        let dead = claimed_but_dead(
            view,
            log,
            &self.cfg,
            parent,
            child,
            substream,
            (owed.seq, owed.due_ms),
        );
        // Settled: the link existed a while before the packet was made (a link never carries
        // what its parent had before it).
        (dead
            && link_since(parent, child, substream)
                .is_some_and(|since| owed.created_ms >= since + self.cfg.settle_ms))
        .then_some(owed.seq)
    }

    /// Judges the links of `peer` (as child and as parent) after its heartbeat arrived.
    /// `link_since(parent, child, substream)` is when the DCM created the link (server ms).
    pub fn on_heartbeat(
        &mut self,
        view: &HeartbeatView,
        log: &ProductionLog,
        k: u32,
        peer: PeerId,
        link_since: impl Fn(PeerId, PeerId, u32) -> Option<u64>,
    ) -> Vec<Congested> {
        self.last_behind = false;
        let Some(me) = view.get(peer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Whether the link existed `settle_ms` before time `t` (server ms).
        let settled_before = |p: PeerId, c: PeerId, s: u32, t: u64| {
            link_since(p, c, s).is_some_and(|since| t >= since + self.cfg.settle_ms)
        };
        // As a child: did each peer parent deliver what the origin produced before the grace?
        let mut judged = std::mem::take(&mut self.scratch);
        judged.clear();
        self.last_behind = false;
        for pl in &me.heartbeat.parents {
            // Parity trees (index ≥ k, coded middle tier) carry one shard per group, sent when
            // the group is complete: their lag is by design, and their loss is what the code
            // tolerates. Only data trees are judged.
            if pl.substream >= k {
                continue;
            }
            let cutoff = me.sent_ms().saturating_sub(self.cfg.grace_ms);
            let Some(owed) = log.newest_before(pl.substream, k, cutoff) else {
                continue;
            };
            let expected = owed.seq;
            if pl.last_seq.is_none_or(|s| s < expected) {
                self.last_behind = true;
            }
            let Source::Peer { id: parent } = pl.parent else {
                continue;
            };
            // Cheap test first: in a healthy swarm the child is not late, and the lookups below
            // (the link's age, the parent's own report: other peers' memory, cache misses at
            // tens of thousands of heartbeats per second) are skipped.
            let late = pl.last_seq.is_none_or(|s| s < expected)
                && settled_before(parent, peer, pl.substream, owed.created_ms)
                // Only the link's fault if the parent itself had the packet.
                && view
                    .get(parent)
                    .and_then(|ps| {
                        ps.heartbeat
                            .parents
                            .iter()
                            .find(|x| x.substream == pl.substream)
                    })
                    .and_then(|x| x.last_seq)
                    .is_some_and(|s| s >= expected);
            if let Some(owed) =
                self.dead_link(view, log, k, parent, peer, pl.substream, &link_since)
            {
                judged.push((
                    parent,
                    peer,
                    pl.substream,
                    true,
                    owed,
                    pl.last_seq,
                    false,
                    true,
                ));
                continue;
            }
            judged.push((
                parent,
                peer,
                pl.substream,
                late,
                expected,
                pl.last_seq,
                false,
                false,
            ));
        }
        // As a parent: did it send each child what it had itself received a grace ago?
        // k entries: a scan beats hashing, and nothing is allocated per heartbeat.
        let my_recv = |sub: u32| {
            me.heartbeat
                .parents
                .iter()
                .find(|p| p.substream == sub)
                .map(|p| (p.last_seq, p.last_ts_ms))
        };
        // The parent's clock and the server's differ; judge its own report by its own clock.
        let skew = me.clock_offset_ms;
        // A fragment longer than the grace covers is forwarded over its spread: a backlog that
        // long is a passing burst, not a stuck uplink (see `ProductionLog`).
        let burst = log.current_spread();
        let backlogged = u64::from(me.heartbeat.send_backlog_ms) > self.cfg.backlog_ms + burst;
        // Stuck (not a large fragment's passing backlog): a child is owed at once what its
        // parent already sent a sibling in the same tree, which proves the parent had it,
        // whatever it got from its own parent (nothing yet when that parent is new, or less
        // than it fetched from the origin).
        let stuck = u64::from(me.heartbeat.send_backlog_ms) > self.cfg.stuck_ms + burst;
        let sibling_best = |sub: u32| {
            me.heartbeat
                .children
                .iter()
                .filter(|c| c.substream == sub)
                .filter_map(|c| Some((c.last_seq?, c.last_ts_ms?)))
                .max()
        };
        for cl in &me.heartbeat.children {
            if cl.substream >= k {
                continue;
            }
            // The child's last heartbeat, read against this one's claims: when the child spoke
            // first, the parent's report is what shows the link dead (judged as the child's
            // complaint, so the parent's standing is not touched here).
            if let Some(owed) =
                self.dead_link(view, log, k, peer, cl.child, cl.substream, &link_since)
            {
                let have = view.get(cl.child).and_then(|c| {
                    c.heartbeat
                        .parents
                        .iter()
                        .find(|p| p.substream == cl.substream)
                        .and_then(|p| p.last_seq)
                });
                judged.push((peer, cl.child, cl.substream, true, owed, have, false, true));
                continue;
            }
            // What it got from its own parent: nothing yet when that parent is new (the origin
            // may be bridging the substream meanwhile, which is no parent's progress).
            let (got, got_at_server, waited) = match my_recv(cl.substream) {
                Some((Some(got), Some(got_at))) => (
                    Some(got),
                    (got_at as i64 + skew).max(0) as u64,
                    me.heartbeat.local_ts_ms.saturating_sub(got_at),
                ),
                _ if backlogged => (None, 0, 0),
                _ => continue,
            };
            // A parent whose own uplink is stuck holds more than its parent sent it when it
            // filled the gaps from the origin or a bridge (its parent may be starved, or new):
            // what the origin produced a grace ago is owed as well. Judged by what it got from
            // its parent alone, a relay under a congested relay hides its backlog until the one
            // above is repaired, and then until its new parent's link is up.
            let (mut owed, mut owed_at) = match log.newest_before(
                cl.substream,
                k,
                me.sent_ms().saturating_sub(self.cfg.grace_ms),
            ) {
                Some(m) if backlogged && got.is_none_or(|g| m.seq > g) => (m.seq, m.created_ms),
                _ => match got {
                    Some(got) => (got, got_at_server),
                    None => (0, 0),
                },
            };
            if stuck {
                if let Some((seq, at)) = sibling_best(cl.substream) {
                    if seq > owed {
                        (owed, owed_at) = (seq, (at as i64 + skew).max(0) as u64);
                    }
                }
            }
            if owed == 0 && got.is_none() {
                continue;
            }
            // The last packet it got may be the end of a burst it is still passing on.
            let allowed = self.cfg.grace_ms + got.map_or(0, |g| log.spread(g));
            let late = (waited > allowed || backlogged)
                && cl.last_seq.is_none_or(|s| s < owed)
                && settled_before(peer, cl.child, cl.substream, owed_at);
            judged.push((
                peer,
                cl.child,
                cl.substream,
                late,
                owed,
                cl.last_seq,
                true,
                backlogged,
            ));
        }
        for &(p, c, s, late, expected, have, parent_side, at_once) in &judged {
            let key = (p, c, s);
            if !late && self.strikes.is_empty() {
                // The common case in a healthy swarm: nothing to clear, no hashing.
                continue;
            }
            if !late {
                // A healthy report from either side clears the link.
                if !parent_side || !self.strikes.contains_key(&key) {
                    self.strikes.remove(&key);
                }
                continue;
            }
            let n = self.strikes.entry(key).or_insert(0);
            *n += 1;
            // A parent that says its own uplink is stuck is believed at once, and so is a link
            // that delivers nothing while its parent claims to feed it; other lateness seen
            // from outside must repeat, since an overloaded host makes every link look late.
            let needed = if at_once { 1 } else { self.cfg.strikes };
            // An earlier strike that fired nothing (it needed a second) leaves `n` past 1 when
            // the link turns clear-cut: it fires then, up to the usual count.
            if *n == needed || (at_once && *n <= self.cfg.strikes) {
                let behind = expected.saturating_sub(have.unwrap_or(0)) / u64::from(k.max(1));
                out.push(Congested {
                    parent: p,
                    child: c,
                    substream: s,
                    behind: behind.max(1),
                    parent_side,
                });
            }
        }
        self.scratch = judged;
        out
    }

    /// Judges the feeds of `peer` into other clusters' roots (`fed`: root and tree), which its
    /// heartbeat does not list: a root whose last heartbeat shows the feed dead while `peer`,
    /// holding the packet and reporting no backlog, claims to send what it has, is moved at once
    /// (as [`CongestionDetector::on_heartbeat`] does for the links a parent lists).
    pub fn on_feeder_heartbeat(
        &mut self,
        view: &HeartbeatView,
        log: &ProductionLog,
        k: u32,
        peer: PeerId,
        fed: &[(PeerId, u32)],
        link_since: impl Fn(PeerId, PeerId, u32) -> Option<u64>,
    ) -> Vec<Congested> {
        let mut out = Vec::new();
        for &(root, substream) in fed {
            let Some(expected) = self.dead_link(view, log, k, peer, root, substream, &link_since)
            else {
                continue;
            };
            let Some(child) = view.get(root) else {
                continue;
            };
            let n = self.strikes.entry((peer, root, substream)).or_insert(0);
            *n += 1;
            if *n <= self.cfg.strikes {
                let have = child
                    .heartbeat
                    .parents
                    .iter()
                    .find(|p| p.substream == substream)
                    .and_then(|p| p.last_seq);
                let behind = expected.saturating_sub(have.unwrap_or(0)) / u64::from(k.max(1));
                out.push(Congested {
                    parent: peer,
                    child: root,
                    substream,
                    behind: behind.max(1),
                    parent_side: false,
                });
            }
        }
        out
    }

    /// Forgets a link (after the DCM moved it) or everything about a peer.
    pub fn forget_peer(&mut self, peer: PeerId) {
        self.strikes.retain(|(p, c, _), _| *p != peer && *c != peer);
    }

    pub fn forget_link(&mut self, parent: PeerId, child: PeerId, substream: u32) {
        self.strikes.remove(&(parent, child, substream));
    }
}

#[cfg(test)]
mod tests;
