//! Hostile peers (issue 13): reports of forged packets, and eviction of the peers they prove.
//!
//! Every peer checks each packet it gets from a neighbour against the origin's signed manifest
//! and reports a mismatch ([`protocol::ClientMsg::Forged`]). The driver compares the hash the
//! reporter received with the origin's own ([`Evidence`]); this module decides what a report
//! means. A report alone proves only that *somebody* lies, the sender or the reporter: data
//! channels are not signed per sender, so a page may accuse a neighbour of bytes it never sent.
//! Hence:
//! - A report whose hash is the origin's own (the reporter got the right bytes and calls them
//!   forged) is false: it counts against the reporter, and [`FALSE_REPORTS_EVICT`] of them
//!   evict it.
//! - A report that holds moves the reporter away from the accused at once (as an unreachable
//!   pair: never paired again), so an honest reporter stops receiving forgeries whoever lies.
//! - The accused is evicted when [`CORROBORATING_REPORTERS`] distinct peers that it was linked
//!   with report it within [`REPORT_WINDOW_MS`]. A forger that alters what it forwards does so
//!   to every child, so its children corroborate each other within one fragment; a single
//!   hostile page cannot evict an honest peer.
//! - A reporter whose holding reports name [`UNCORROBORATED_EVICT`] distinct peers that nobody
//!   else reports is the liar (accusations that follow the reporter, not the accused), and is
//!   evicted.
//!
//! Reports about peers the reporter is not linked with, or packets the origin no longer knows,
//! are ignored: a link moved by a repair leaves forged packets in flight that may be reported
//! late, and that is not evidence either way.

use protocol::PeerId;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{Dcm, Output};

/// Distinct linked reporters that evict an accused peer.
pub const CORROBORATING_REPORTERS: usize = 2;
/// Reports older than this no longer corroborate new ones (server ms).
pub const REPORT_WINDOW_MS: u64 = 30_000;
/// False reports (the hash received was the origin's) that evict the reporter.
pub const FALSE_REPORTS_EVICT: u32 = 3;
/// Distinct peers a reporter may accuse without anyone else agreeing before it is evicted.
pub const UNCORROBORATED_EVICT: usize = 3;
/// Children complaining of one parent within this long corroborate each other (server ms).
pub const SILENCE_WINDOW_MS: u64 = 10_000;
/// A parent reporting at most this upload backlog (ms) says it is not short of uplink.
const SILENT_BACKLOG_MS: u64 = 250;

/// What the origin's own hash says of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The hash received is not the origin's: somebody forged the packet.
    Holds,
    /// The hash received is the origin's: the reporter calls genuine bytes forged.
    Refuted,
    /// The origin no longer knows the packet (or never did): no evidence.
    Unknown,
}

/// What became of a report (returned for tests and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ignored,
    /// A false report, counted against the reporter.
    CountedAgainstReporter,
    /// The reporter was moved away from the accused; not enough reporters yet to evict.
    ReporterMoved,
    Evicted(PeerId),
}

/// Reports received, per accused and per reporter.
#[derive(Debug, Default)]
pub struct Reports {
    /// Accused → reporter → when it last reported.
    against: FxHashMap<PeerId, FxHashMap<PeerId, u64>>,
    /// Reporter → false reports so far.
    false_reports: FxHashMap<PeerId, u32>,
    /// Reporter → peers it accused, with the reports held.
    accused_by: FxHashMap<PeerId, FxHashSet<PeerId>>,
    /// Parent → children whose heartbeats show it late while its own heartbeat claims it sent
    /// them what they lack, and when.
    silence: FxHashMap<PeerId, FxHashMap<PeerId, u64>>,
}

impl Reports {
    pub(super) fn forget(&mut self, peer: PeerId) {
        self.against.remove(&peer);
        self.false_reports.remove(&peer);
        self.accused_by.remove(&peer);
        self.silence.remove(&peer);
        for m in self.against.values_mut() {
            m.remove(&peer);
        }
        for m in self.silence.values_mut() {
            m.remove(&peer);
        }
        for s in self.accused_by.values_mut() {
            s.remove(&peer);
        }
    }

    /// Bounded memory: peers no longer present, and reports past the window, are dropped.
    fn expire(&mut self, now: u64) {
        for m in self.against.values_mut() {
            m.retain(|_, t| now.saturating_sub(*t) <= REPORT_WINDOW_MS);
        }
        self.against.retain(|_, m| !m.is_empty());
    }

    /// Peers `reporter` accused that no other peer has reported.
    fn uncorroborated(&self, reporter: PeerId) -> usize {
        self.accused_by.get(&reporter).map_or(0, |s| {
            s.iter()
                .filter(|a| {
                    self.against
                        .get(a)
                        .is_none_or(|m| m.keys().all(|r| *r == reporter))
                })
                .count()
        })
    }
}

impl Dcm {
    /// A child's heartbeats show its parent late on `substream`. Returns true when the parent
    /// is to be demoted as a peer that takes children and sends them nothing (issue 13): its
    /// own heartbeat claims it sent this child more than the child got from it, and another
    /// child said the same of it within [`SILENCE_WINDOW_MS`]. One child's word is never enough
    /// (a lying child would demote an honest parent); an honest but congested parent says so
    /// itself (its backlog) and is capped by what it manages to send instead.
    pub(super) fn corroborated_silence(
        &mut self,
        parent: PeerId,
        child: PeerId,
        substream: u32,
        now: u64,
    ) -> bool {
        let Some(cs) = self.view.get(child) else {
            return false;
        };
        let Some(ps) = self.view.get(parent) else {
            return false;
        };
        let Some(link) = cs
            .heartbeat
            .parents
            .iter()
            .find(|p| p.substream == substream)
        else {
            return false;
        };
        let got = link.last_seq;
        // What the child says it got is judged against what the parent had sent a grace
        // before the child wrote its heartbeat, not against the parent's newest send: packets
        // in flight (a fragment serialized to several children over a slow uplink, a long
        // path) are not missing yet. The simulator's 10 000-peer swarms demoted thousands of
        // honest parents on in-flight packets before this.
        let grace = self.detector.cfg.dead_grace_ms;
        let claimed = ps
            .heartbeat
            .children
            .iter()
            .find(|c| c.child == child && c.substream == substream)
            .and_then(|c| Some((c.last_seq?, c.last_ts_ms?)))
            .filter(|(_, at)| {
                let sent = (*at as i64).saturating_add(ps.clock_offset_ms).max(0) as u64;
                sent + u64::from(ps.heartbeat.send_backlog_ms) + grace <= cs.sent_ms()
            })
            .map(|(seq, _)| seq);
        let lists_link = ps
            .heartbeat
            .children
            .iter()
            .any(|c| c.child == child && c.substream == substream);
        // A parent that does not list the link (a feed into another cluster's root) claims, by
        // reporting no upload backlog, that it sends what it has. Only a feed, and only one that
        // delivered before: a child link the parent does not list yet may never have opened (an
        // unreachable pair), which the data channel's timeout and `link_failed` settle.
        let quiet_uplink = u64::from(ps.heartbeat.send_backlog_ms) <= SILENT_BACKLOG_MS
            && link.last_ts_ms.is_some()
            && self.planner.is_feed(parent, child);
        let contradicts = match (claimed, lists_link) {
            (Some(claimed), _) => got.is_none_or(|g| claimed > g),
            (None, false) => quiet_uplink,
            (None, true) => false,
        };
        if !contradicts {
            return false;
        }
        let m = self.reports.silence.entry(parent).or_default();
        m.retain(|_, t| now.saturating_sub(*t) <= SILENCE_WINDOW_MS);
        m.insert(child, now);
        if m.len() < CORROBORATING_REPORTERS {
            return false;
        }
        self.reports.silence.remove(&parent);
        tracing::warn!(channel = %self.name, %parent, "children corroborate: it claims to send what they never get");
        true
    }

    /// `reporter` says `accused` sent it packet `seq` with a hash that is not the signed one.
    pub(super) fn forgery_report(
        &mut self,
        reporter: PeerId,
        accused: PeerId,
        seq: u64,
        evidence: Evidence,
        now: u64,
    ) -> Verdict {
        if reporter == accused
            || !self.peers.contains_key(&reporter)
            || !self.peers.contains_key(&accused)
        {
            return Verdict::Ignored;
        }
        self.stats.forgery_reports += 1;
        self.reports.expire(now);
        match evidence {
            Evidence::Unknown => return Verdict::Ignored,
            Evidence::Refuted => {
                self.stats.false_reports += 1;
                let n = self.reports.false_reports.entry(reporter).or_insert(0);
                *n += 1;
                tracing::warn!(channel = %self.name, %reporter, %accused, seq, false_reports = *n, "false forgery report");
                if *n >= FALSE_REPORTS_EVICT {
                    self.evict(reporter, "false forgery reports", now);
                    return Verdict::Evicted(reporter);
                }
                return Verdict::CountedAgainstReporter;
            }
            Evidence::Holds => {}
        }
        if !self.linked(reporter, accused) {
            return Verdict::Ignored;
        }
        tracing::warn!(channel = %self.name, %reporter, %accused, seq, "forged packet reported");
        let reporters = self.reports.against.entry(accused).or_default();
        reporters.insert(reporter, now);
        let distinct = reporters.len();
        self.reports
            .accused_by
            .entry(reporter)
            .or_default()
            .insert(accused);
        if distinct >= CORROBORATING_REPORTERS {
            self.evict(accused, "forged packets", now);
            return Verdict::Evicted(accused);
        }
        if self.reports.uncorroborated(reporter) >= UNCORROBORATED_EVICT {
            self.evict(reporter, "accusations nobody corroborates", now);
            return Verdict::Evicted(reporter);
        }
        // Whoever lies, the reporter is better fed by somebody else.
        self.link_failed(reporter, accused, now);
        Verdict::ReporterMoved
    }

    /// Removes `peer` from every tree and mesh at once (its children re-homed as after a
    /// departure) and has its session closed and its address refused.
    pub(super) fn evict(&mut self, peer: PeerId, reason: &str, now: u64) {
        tracing::warn!(channel = %self.name, %peer, reason, "peer evicted");
        self.stats.evictions += 1;
        self.reports.forget(peer);
        self.remove_peer(peer, reason, now);
        self.outputs.push_back(Output::Evict {
            peer,
            reason: format!("evicted: {reason}"),
        });
    }
}
