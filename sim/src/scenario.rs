//! Scenarios: who joins and leaves when, and which network parameters change, for one run.

use clap::ValueEnum;
use peer_wasm::engine::EngineConfig;
use serde::Serialize;

use crate::control::ControlConfig;
use crate::dist::Rng;
use crate::net::{Declared, NatModel, NetConfig};
use crate::origin::OriginConfig;
use crate::queue::Micros;
use crate::world::{Ev, World, WorldConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Everyone joins over the first quarter of the run (at most 30 s) and stays.
    Steady,
    /// All peers join within 10 s.
    FlashCrowd,
    /// `--churn PCT` of the peers leave per minute, each replaced by a newcomer.
    Churn,
    /// A quarter of the peers leave at once halfway through.
    MassFailure,
    /// 5 % loss and 100 ms round trip on every path.
    Lossy,
    /// `--unreachable PCT` of peer pairs can never connect (20 % unless given).
    Unreachable,
    /// Joins, leaves and heartbeats only, no media: the coordinator alone.
    ControlOnly,
    /// The DCM's server dies halfway through: a new DCM that knows nothing takes the channel
    /// over as the peers resume (3 s of lease, then within 0.5 s), rebuilding the topology from
    /// their heartbeats (FIG. 7).
    Failover,
}

/// The network model a run starts from (then changed by the scenario and the flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// The documented residential and mobile mix (`NetConfig::default`).
    Internet,
    /// The browser swarm's loopback (`NetConfig::loopback`), for calibration.
    Loopback,
}

/// Everything a run needs, from the command line or a test.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub peers: usize,
    pub seconds: u64,
    pub scenario: Scenario,
    pub regions: u16,
    pub hierarchy: bool,
    pub seed: u64,
    pub churn_pct: f64,
    /// Overrides the model's share of unreachable pairs (percent).
    pub unreachable_pct: Option<f64>,
    /// How unreachable pairs arise (NAT classes the DCM knows, or random pairs it does not).
    pub nat_model: NatModel,
    /// Overrides the model's loss (percent).
    pub loss_pct: Option<f64>,
    pub stream_kbps: u32,
    pub fragment_ms: u32,
    pub k: u32,
    pub heartbeat_ms: u32,
    /// Region-to-region one-way delays (ms), `regions x regions`.
    pub matrix: Option<Vec<Vec<f64>>>,
    /// Every peer declares this upload (kbit/s) instead of a share of its capacity.
    pub upload_kbps: Option<u32>,
    /// Relaying peers whose upload cap is cut to a fifth of their load a third into the run
    /// (the browser swarm's `--throttle`).
    pub throttle: usize,
    pub network: Network,
    /// The origin releases each fragment's packets evenly over the next fragment duration.
    pub pace: bool,
    /// The engines' `fallback_after_ms`: how long a gap waits before the origin is asked.
    pub fallback_ms: f64,
    /// The engines' `handover_ms`: how long a moved tree link is kept, at most.
    pub handover_ms: f64,
    /// Where joiners start (the server's `--start-newest-after` and `--start-budget`).
    pub start: coordinator::start::StartConfig,
}

impl RunConfig {
    pub fn new(peers: usize, seconds: u64, scenario: Scenario) -> Self {
        RunConfig {
            peers,
            seconds,
            scenario,
            regions: 1,
            hierarchy: false,
            seed: 1,
            churn_pct: 10.0,
            unreachable_pct: None,
            nat_model: NatModel::Classes,
            loss_pct: None,
            stream_kbps: 1000,
            fragment_ms: 1000,
            k: 4,
            heartbeat_ms: 1000,
            matrix: None,
            upload_kbps: None,
            throttle: 0,
            network: Network::Internet,
            pace: false,
            fallback_ms: EngineConfig::default().fallback_after_ms,
            handover_ms: EngineConfig::default().handover_ms,
            start: coordinator::start::StartConfig::default(),
        }
    }

    /// The network model of this run (validated).
    pub fn net(&self) -> Result<NetConfig, String> {
        let base = match self.network {
            Network::Internet => NetConfig::default(),
            Network::Loopback => NetConfig::loopback(),
        };
        let mut net = NetConfig {
            regions: self.regions,
            matrix: self.matrix.clone(),
            ..base
        };
        if let Some(kbps) = self.upload_kbps {
            net.declared = Declared::Fixed { kbps };
        }
        if self.scenario == Scenario::Lossy {
            net.loss = 0.05;
            net.fixed_one_way_ms = Some(50.0);
        }
        if let Some(p) = self.loss_pct {
            net.loss = p / 100.0;
        }
        if let Some(p) = self.unreachable_pct {
            net.unreachable = p / 100.0;
        }
        net.nat = self.nat_model;
        net.validate()?;
        Ok(net)
    }

    /// Refuses impossible runs, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.peers == 0 {
            return Err("--peers must be at least 1".into());
        }
        if self.seconds == 0 {
            return Err("--seconds must be at least 1".into());
        }
        if !(self.churn_pct.is_finite() && (0.0..=100.0).contains(&self.churn_pct)) {
            return Err(format!(
                "--churn must be between 0 and 100 (% per minute), got {}",
                self.churn_pct
            ));
        }
        if self.stream_kbps == 0 {
            return Err("--stream-kbps must be at least 1".into());
        }
        if self.fragment_ms < 100 {
            return Err("--fragment-ms must be at least 100".into());
        }
        if self.k == 0 || self.k > 64 {
            return Err("--k must be between 1 and 64".into());
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err("--heartbeat-ms must be between 100 and 60000".into());
        }
        if !(self.fallback_ms.is_finite() && self.fallback_ms >= 0.0) {
            return Err("--fallback-ms must be a number of ms >= 0".into());
        }
        if !(self.handover_ms.is_finite() && self.handover_ms >= 0.0) {
            return Err("--handover-ms must be a number of ms >= 0".into());
        }
        if !(self.start.newest_after.is_finite() && self.start.newest_after >= 0.0) {
            return Err("--start-newest-after must be a share of a fragment >= 0".into());
        }
        if !(self.start.budget_streams.is_finite() && self.start.budget_streams >= 0.0) {
            return Err("--start-budget must be a number of streams >= 0".into());
        }
        if self.throttle > self.peers {
            return Err("--throttle cannot exceed --peers".into());
        }
        if self.upload_kbps == Some(0) {
            return Err("--upload-kbps must be at least 1".into());
        }
        self.net().map(|_| ())
    }

    pub fn world_config(&self) -> Result<WorldConfig, String> {
        self.validate()?;
        Ok(WorldConfig {
            seed: self.seed,
            net: self.net()?,
            origin: OriginConfig {
                stream_kbps: self.stream_kbps,
                fragment_ms: self.fragment_ms,
                k: self.k,
                window: 4096,
                pace: self.pace,
            },
            control: ControlConfig {
                channel: "sim".into(),
                k: self.k,
                heartbeat_ms: self.heartbeat_ms,
                stream_kbps: self.stream_kbps,
                hierarchy: self.hierarchy,
                regions: self.regions,
                origin_fanout: 1,
                max_fanout: 16,
            },
            media: self.scenario != Scenario::ControlOnly,
            engine: EngineConfig {
                fallback_after_ms: self.fallback_ms,
                // Byte-exactness is checked by comparing each delivered payload with the
                // origin's (`driver.rs`), which costs far less than hashing it.
                verify: false,
                handover_ms: self.handover_ms,
                ..EngineConfig::default()
            },
            start: self.start,
        })
    }

    /// Window over which the initial peers join, µs.
    pub fn join_window(&self) -> Micros {
        let s = match self.scenario {
            Scenario::FlashCrowd => 10.0_f64.min(self.seconds as f64 / 2.0),
            _ => (self.seconds as f64 / 4.0).clamp(1.0, 30.0),
        };
        (s * 1e6) as Micros
    }

    /// Creates the peers and schedules their joins and departures.
    pub fn schedule(&self, w: &mut World) {
        let mut rng = Rng::stream(self.seed, 2);
        // The origin cuts its first fragment at 0; joins start right after.
        let first = 100_000;
        let window = self.join_window();
        let mut live: Vec<u32> = Vec::with_capacity(self.peers);
        for _ in 0..self.peers {
            let at = first + rng.below(window.max(1));
            live.push(w.add_peer(at));
        }
        let end = self.seconds * 1_000_000;
        if self.throttle > 0 {
            // At a seeded point of the fragment cycle (fragments are cut on whole multiples of
            // `fragment_ms`): right after a fragment, a throttle shows at once; right before
            // the next, only with it.
            let phase = rng.below(u64::from(self.fragment_ms) * 1000);
            w.q.at(end / 3 + phase, Ev::Throttle(self.throttle));
        }
        match self.scenario {
            Scenario::Churn if self.churn_pct > 0.0 => {
                let from = first + window;
                let span = end.saturating_sub(from + 5_000_000);
                let minutes = span as f64 / 60e6;
                let n = (self.peers as f64 * self.churn_pct / 100.0 * minutes).round() as usize;
                let mut times: Vec<Micros> =
                    (0..n).map(|_| from + rng.below(span.max(1))).collect();
                times.sort_unstable();
                for t in times {
                    if live.is_empty() {
                        break;
                    }
                    let v = live.swap_remove(rng.below(live.len() as u64) as usize);
                    w.peers[v as usize].leaves = true;
                    w.q.at(t, Ev::Leave(v));
                    live.push(w.add_peer(t));
                }
            }
            Scenario::Failover => w.q.at(end / 2, Ev::Failover),
            Scenario::MassFailure => {
                let t = end / 2;
                rng_shuffle(&mut rng, &mut live);
                let n = self.peers / 4;
                for v in live.drain(..n) {
                    w.peers[v as usize].leaves = true;
                    w.q.at(t, Ev::Leave(v));
                }
            }
            _ => {}
        }
    }
}

fn rng_shuffle(rng: &mut Rng, v: &mut [u32]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_names_the_flag() {
        let mut c = RunConfig::new(0, 10, Scenario::Steady);
        assert!(c.validate().is_err_and(|m| m.contains("--peers")));
        c.peers = 10;
        c.loss_pct = Some(100.0);
        assert!(c.validate().is_err_and(|m| m.contains("--loss")));
        c.loss_pct = None;
        c.regions = 3;
        c.matrix = Some(vec![vec![0.0; 2]; 2]);
        assert!(c.validate().is_err_and(|m| m.contains("--matrix")));
        c.matrix = None;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn flash_crowd_joins_within_ten_seconds() {
        let c = RunConfig::new(10, 120, Scenario::FlashCrowd);
        assert_eq!(c.join_window(), 10_000_000);
        assert_eq!(
            RunConfig::new(10, 120, Scenario::Steady).join_window(),
            30_000_000
        );
    }

    #[test]
    fn lossy_sets_loss_and_round_trip() {
        let net = RunConfig::new(10, 60, Scenario::Lossy).net();
        assert!(net.is_ok_and(|n| n.loss == 0.05 && n.fixed_one_way_ms == Some(50.0)));
    }
}
