//! The run's figures, under the browser swarm's field names where the meaning is the same
//! (`tests/src/swarm.rs`), plus the simulator's own.

use std::collections::BTreeMap;

use protocol::report::LatencyHistogram;
use serde::Serialize;

use crate::checks::Invariants;
use crate::scenario::RunConfig;
use crate::world::World;

/// Percentiles of a sample: the same {p50, p95, max} in every benchmark's JSON.
pub use protocol::report::Pct;

/// How many peers the origin pushes to, by kind of push.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OriginFed {
    pub full: usize,
    pub data: usize,
    pub parity: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: RunConfig,
    pub viewers: usize,
    pub viewer_sessions: usize,
    pub departures: usize,
    pub stream_kbps: u32,
    pub substreams: u32,
    pub unreachable_pct: f64,
    /// How the unreachable pairs arose (`classes`: NAT classes reported at join; `pairs`).
    pub nat_model: crate::net::NatModel,
    pub loss_pct: f64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub p2p_share: f64,
    pub p2p_share_limit: f64,
    pub bytes_played: u64,
    pub p2p_share_useful: f64,
    pub server_push_bytes: u64,
    /// Of `server_push_bytes`, the bytes pushed over bridges (after congestion repairs).
    pub server_bridge_bytes: u64,
    /// Peers the origin feeds at the end of the run, by what it pushes them (`full` for mesh
    /// neighbours, `data` and `parity` substreams of tree roots).
    pub origin_fed_at_end: OriginFed,
    /// The coordinator's summary of the hierarchy at the end of the run (hierarchy runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hierarchy: Option<coordinator::topology::hierarchy::HierarchyReport>,
    pub server_fallback_bytes: u64,
    pub origin_fallbacks: u64,
    /// Of those, by the tier the peer was in at the end (`flat` on a flat channel; departed
    /// peers not included).
    pub origin_fallbacks_by_tier: BTreeMap<String, u64>,
    pub startup_ms: Pct,
    pub latency_ms: Pct,
    pub continuity: f64,
    /// Continuity of the peers that stayed to the end (the survivors of a mass failure).
    pub continuity_staying: f64,
    pub stalls: u32,
    pub repair_ms: Pct,
    pub repairs_measured: usize,
    pub repairs_unfinished: usize,
    /// Throttled relays (`--throttle`) and those the coordinator flagged within two heartbeat
    /// intervals, and per relay the delay to its first report (ms, -1: none).
    pub congestion_injected: usize,
    pub congestion_detected: usize,
    pub detection_ms: Vec<f64>,
    /// The coordinator's own counters: congested links found, repairs, origin bridges opened.
    pub congestion_events: u64,
    pub coordinator_repairs: u64,
    pub bridges_opened: u64,
    pub tiers: BTreeMap<String, usize>,
    /// Peak over simulated seconds of origin egress (pushes + fetches) in streams' worth.
    pub origin_egress_peak_copies: f64,
    /// Origin egress in each simulated second, in streams' worth.
    pub origin_egress_copies_per_s: Vec<f64>,
    /// Of that, fallback fetches, and bridges after moves (the second a step behind).
    pub origin_fallback_copies_per_s: Vec<f64>,
    pub origin_bridge_copies_per_s: Vec<f64>,
    /// Fallback fetches per second by the fetching peer's tier at the time.
    pub origin_fallback_copies_per_s_by_tier: BTreeMap<String, Vec<f64>>,
    /// Joiners started one fragment behind the newest (the origin serves that fragment), and
    /// at the newest: late in a fragment, or beyond the origin's start budget
    /// (`coordinator::start`).
    pub starts_older: u64,
    pub starts_newest_late: u64,
    pub starts_next_budget: u64,
    pub links_opened: u64,
    pub link_failures: u64,
    pub link_setup_ms: Pct,
    pub send_dropped: u64,
    pub heartbeat_bytes_avg: f64,
    pub invariants: Invariants,
    pub events: u64,
    pub wall_s: f64,
    /// Simulated peer-seconds per wall second.
    pub sim_speed: f64,
    pub coordinator_cpu_us_per_heartbeat: f64,
    pub coordinator_cpu_us_per_join: f64,
    /// Control-only runs: growth of the process's resident memory over the run per peer, an
    /// upper bound of the coordinator's state per peer (it includes the simulator's own small
    /// per-peer records). `null` on media runs, where the engines dominate.
    pub coordinator_bytes_per_peer: Option<f64>,
    pub peak_rss_mb: f64,
    /// The failover scenario: what the DCM that took over did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverReport>,
}

/// How a takeover went (the failover scenario, [`crate::Scenario::Failover`]).
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub at_s: f64,
    /// Peers the new DCM adopted with their resume tokens, and the rebuilds from heartbeats.
    pub resumed: u64,
    pub recoveries: u64,
    /// Links the resumed peers reported and the share the rebuilt topology kept.
    pub links_reported: u64,
    pub links_kept: f64,
    /// Instructions peers received from the new DCM within 10 s of the failure (the rebuild's
    /// and the repairs' after it), and peers alive at the failure.
    pub instructions_10s: u64,
    pub peers_at_failover: usize,
    /// Stalls of all peers from the failure to the end of the run.
    pub stalls_after: u32,
}

pub fn build(
    cfg: &RunConfig,
    w: &World,
    inv: Invariants,
    wall_s: f64,
    rss_growth: Option<f64>,
) -> Report {
    let mut hist = LatencyHistogram::default();
    let (mut b0, mut b1, mut played, mut on_time, mut late) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut fallbacks, mut dropped) = (0u64, 0u64);
    let (mut stay_on, mut stay_late) = (0u64, 0u64);
    for p in &w.peers {
        let st = p.stats();
        let c = &st.counters;
        b0 += c.bytes_from_origin;
        b1 += c.bytes_from_peers;
        played += c.bytes_played;
        on_time += c.on_time;
        late += c.late;
        fallbacks += c.origin_fallbacks;
        if p.alive && !p.leaves {
            stay_on += c.on_time;
            stay_late += c.late;
        }
        dropped += c.send_dropped;
        hist.merge_sparse(&st.latency);
    }
    let lat = |q| hist.quantile(q).unwrap_or(0) as f64;
    let mut by_tier: BTreeMap<String, u64> = BTreeMap::new();
    for p in w.peers.iter().filter(|p| p.alive) {
        if let Some(e) = &p.engine {
            let tier = tier_name(e.tier());
            *by_tier.entry(tier).or_insert(0) += e.counters.origin_fallbacks;
        }
    }
    let n = w.peers.iter().filter(|p| p.alive).count();
    let egress = w.totals.origin_push_bytes + w.totals.origin_fetch_bytes;
    let stream_bytes_per_s = f64::from(cfg.stream_kbps) * 1000.0 / 8.0;
    let peak = w.totals.egress_per_s.iter().copied().max().unwrap_or(0);
    let (hb_bytes, hb_n) = w.peers.iter().fold((0u64, 0u64), |(b, n), p| {
        (b + p.heartbeat_bytes, n + p.heartbeats_sent)
    });
    let cpu = &w.control.cpu;
    let per = |ns: u128, n: u64| {
        if n > 0 {
            ns as f64 / n as f64 / 1000.0
        } else {
            0.0
        }
    };
    let sim_peer_s: f64 = w
        .peers
        .iter()
        .map(|p| {
            let end = p.left_at.unwrap_or(w.q.now());
            crate::queue::ms(end.saturating_sub(p.joined_at)) / 1000.0
        })
        .sum();
    let mut tiers = BTreeMap::new();
    for s in w.control.snapshot(w.now_ms() as u64) {
        if let Some(t) = s.tier {
            let name = format!("{t:?}").to_lowercase();
            *tiers.entry(name).or_insert(0) += 1;
        }
    }
    let pending = w
        .peers
        .iter()
        .filter(|p| p.alive)
        .map(|p| p.repairs.len())
        .sum();
    Report {
        run: cfg.clone(),
        viewers: n,
        viewer_sessions: w.peers.len(),
        departures: w.peers.iter().filter(|p| p.left_at.is_some()).count(),
        stream_kbps: cfg.stream_kbps,
        substreams: cfg.k,
        unreachable_pct: w.cfg.net.unreachable * 100.0,
        nat_model: w.cfg.net.nat,
        loss_pct: w.cfg.net.loss * 100.0,
        bytes_from_origin: b0,
        bytes_from_peers: b1,
        p2p_share: ratio(b1, b0 + b1),
        p2p_share_limit: if n > 0 { 1.0 - 1.0 / n as f64 } else { 0.0 },
        bytes_played: played,
        p2p_share_useful: if played > 0 {
            (1.0 - egress as f64 / played as f64).max(0.0)
        } else {
            0.0
        },
        server_push_bytes: w.totals.origin_push_bytes,
        server_bridge_bytes: w.control.stats().origin_bridge_bytes,
        hierarchy: w.control.hierarchy_report(),
        origin_fed_at_end: {
            let (full, data, parity) = w.control.origin_fed_counts();
            OriginFed { full, data, parity }
        },
        server_fallback_bytes: w.totals.origin_fetch_bytes,
        origin_fallbacks: fallbacks,
        origin_fallbacks_by_tier: by_tier,
        startup_ms: Pct::of(
            w.peers
                .iter()
                .filter_map(|p| p.playout.startup_ms)
                .collect(),
        ),
        latency_ms: Pct {
            p50: lat(0.5),
            p95: lat(0.95),
            max: lat(1.0),
        },
        continuity: ratio(on_time, on_time + late),
        continuity_staying: ratio(stay_on, stay_on + stay_late),
        stalls: w.peers.iter().map(|p| p.playout.stalls).sum(),
        repair_ms: Pct::of(w.totals.repairs_ms.clone()),
        repairs_measured: w.totals.repairs_ms.len(),
        repairs_unfinished: pending,
        congestion_injected: w.totals.throttled.len(),
        congestion_detected: w.totals.congestion_detected,
        detection_ms: w.totals.detection_ms.clone(),
        congestion_events: w.control.stats().congestion_events,
        coordinator_repairs: w.control.stats().repairs,
        bridges_opened: w.control.stats().bridges_opened,
        tiers,
        origin_egress_peak_copies: peak as f64 / stream_bytes_per_s,
        origin_egress_copies_per_s: w
            .totals
            .egress_per_s
            .iter()
            .map(|b| (*b as f64 / stream_bytes_per_s * 10.0).round() / 10.0)
            .collect(),
        origin_fallback_copies_per_s: w
            .totals
            .fallback_per_s
            .iter()
            .map(|b| (*b as f64 / stream_bytes_per_s * 10.0).round() / 10.0)
            .collect(),
        origin_fallback_copies_per_s_by_tier: w
            .totals
            .fallback_by_tier_per_s
            .iter()
            .map(|(tier, v)| {
                let per_s = v
                    .iter()
                    .map(|b| (*b as f64 / stream_bytes_per_s * 10.0).round() / 10.0)
                    .collect();
                (tier.clone(), per_s)
            })
            .collect(),
        origin_bridge_copies_per_s: w
            .totals
            .bridge_total_at_s
            .windows(2)
            .map(|b| ((b[1] - b[0]) as f64 / stream_bytes_per_s * 10.0).round() / 10.0)
            .collect(),
        failover: w.totals.failover_at.map(|at| {
            let now = w.control.current_stats();
            FailoverReport {
                at_s: at as f64 / 1e6,
                resumed: now.resumes,
                recoveries: now.recoveries,
                links_reported: now.links_reported,
                links_kept: ratio(now.links_kept, now.links_reported),
                instructions_10s: w.totals.instructions_after_failover,
                peers_at_failover: w
                    .peers
                    .iter()
                    .filter(|p| p.joined_at <= at && p.left_at.is_none_or(|l| l > at))
                    .count(),
                stalls_after: w
                    .peers
                    .iter()
                    .map(|p| p.playout.stalls)
                    .sum::<u32>()
                    .saturating_sub(w.totals.stalls_at_failover),
            }
        }),
        starts_older: w.totals.starts_older,
        starts_newest_late: w.totals.starts_newest_late,
        starts_next_budget: w.totals.starts_next_budget,
        links_opened: w.totals.links_opened,
        link_failures: w.totals.link_failures,
        link_setup_ms: Pct::of(w.totals.setup_ms.clone()),
        send_dropped: dropped,
        heartbeat_bytes_avg: if hb_n > 0 {
            hb_bytes as f64 / hb_n as f64
        } else {
            0.0
        },
        invariants: inv,
        events: w.totals.events,
        wall_s,
        sim_speed: if wall_s > 0.0 {
            sim_peer_s / wall_s
        } else {
            0.0
        },
        coordinator_cpu_us_per_heartbeat: per(cpu.heartbeat_ns, cpu.heartbeats),
        coordinator_cpu_us_per_join: per(cpu.join_ns, cpu.joins),
        coordinator_bytes_per_peer: rss_growth,
        peak_rss_mb: rss_mb().unwrap_or(0.0),
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b > 0 {
        a as f64 / b as f64
    } else {
        0.0
    }
}

/// Resident memory of this process, MB (Linux).
pub fn rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

/// Memory available to a new run, MB (Linux).
pub fn available_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1000.0)
}

impl Report {
    /// A short human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<34} {v}\n"));
        row(
            "viewers (sessions, departures)",
            format!(
                "{} ({}, {})",
                self.viewers, self.viewer_sessions, self.departures
            ),
        );
        row(
            "p2p_share / useful / limit",
            format!(
                "{:.4} / {:.4} / {:.4}",
                self.p2p_share, self.p2p_share_useful, self.p2p_share_limit
            ),
        );
        let pct = |p: &Pct| format!("{:.0} / {:.0} / {:.0}", p.p50, p.p95, p.max);
        row("startup ms p50/p95/max", pct(&self.startup_ms));
        row("latency ms p50/p95/max", pct(&self.latency_ms));
        row("continuity", format!("{:.5}", self.continuity));
        row("stalls", self.stalls.to_string());
        row(
            "repair ms p50/p95/max (n)",
            format!("{} ({})", pct(&self.repair_ms), self.repairs_measured),
        );
        row(
            "origin egress peak (streams)",
            format!("{:.1}", self.origin_egress_peak_copies),
        );
        row(
            "links opened / failed",
            format!("{} / {}", self.links_opened, self.link_failures),
        );
        if let Some(f) = &self.failover {
            row(
                "failover: resumed / links kept",
                format!(
                    "{} of {} / {:.3} of {}",
                    f.resumed, f.peers_at_failover, f.links_kept, f.links_reported
                ),
            );
            row(
                "failover: instructions 10 s / stalls",
                format!("{} / {}", f.instructions_10s, f.stalls_after),
            );
        }
        row("invariants", format!("{:?}", self.invariants));
        row(
            "wall s / sim_speed (peer-s per s)",
            format!("{:.1} / {:.0}", self.wall_s, self.sim_speed),
        );
        row(
            "coordinator us/heartbeat, us/join",
            format!(
                "{:.2}, {:.2}",
                self.coordinator_cpu_us_per_heartbeat, self.coordinator_cpu_us_per_join
            ),
        );
        s
    }
}

/// How reports name a tier: `preferred`, `middle`, `bottom`, or `flat` on a flat channel.
pub(crate) fn tier_name(tier: Option<protocol::TierName>) -> String {
    tier.map_or_else(|| "flat".to_string(), |t| format!("{t:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::Pct;

    #[test]
    fn percentiles_like_the_swarm() {
        let p = Pct::of((1..=100).map(f64::from).collect());
        assert_eq!(
            p,
            Pct {
                p50: 50.0,
                p95: 95.0,
                max: 100.0
            }
        );
        assert_eq!(Pct::of(Vec::new()), Pct::default());
    }
}
