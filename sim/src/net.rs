//! The network model's parameters and what they give per peer and per path. Every part is a
//! field of [`NetConfig`]; the defaults, and where their numbers come from, are documented on
//! each field and in `docs/simulator.md`.
//!
//! A message of `b` bytes from peer A to peer B sent at `t`:
//! 1. waits for A's uplink (one FIFO per peer, drained at A's upload capacity: what a data
//!    channel's SCTP send buffer does) and leaves when its last bit is out;
//! 2. travels `delay(A, B)` = A's access delay + the region matrix entry + B's access delay;
//! 3. each transmission is lost with the path's loss probability; a loss costs
//!    `loss_rtts` round trips (SCTP fast retransmit after duplicate SACKs; more when the RTO
//!    fires), and because the channel is ordered and reliable nothing behind it on the same
//!    link is delivered earlier (head-of-line blocking);
//! 4. waits for B's downlink (one FIFO per peer at its download capacity), taking its turn when
//!    it arrives there (`Ev::Arrive`), not when it was sent.

use protocol::{Connectivity, NatClass};
use serde::{Deserialize, Serialize};

use crate::dist::{mix, Dist, Rng};

/// One kind of access network and its share of the peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClass {
    pub name: String,
    pub weight: f64,
    pub down_kbps: Dist,
    pub up_kbps: Dist,
    /// One-way delay from the peer to its region's core (ms).
    pub access_ms: Dist,
}

/// How much upload a peer declares to the control center (`upload_kbps` of its Join).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Declared {
    /// This fraction of its real upload capacity, capped at `max_kbps` (a player that measured
    /// its uplink and keeps a margin).
    Fraction { of_capacity: f64, max_kbps: u32 },
    /// The same figure for everyone (the player's default option is 2000 kbit/s), whatever
    /// the real capacity: a peer with less than it declared congests.
    Fixed { kbps: u32 },
}

/// Every parameter of the simulated network. `Default` is the documented model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetConfig {
    /// Access networks and their shares. Default: DSL 15 %, cable 30 %, fibre 25 %, mobile
    /// 25 %, satellite/fixed-wireless 5 %, with capacities spread (log-uniform) around the
    /// medians of Ookla's Speedtest Global Index (2024: fixed ~90/40 Mbit/s down/up median,
    /// mobile ~50/10), Ofcom's UK Home Broadband Performance report (upload by technology:
    /// ADSL ~1 Mbit/s, cable 10-50, FTTP 50-500+) and M-Lab NDT's lower single-stream medians
    /// (which is why the ranges reach well below the Ookla medians).
    pub access: Vec<AccessClass>,
    pub declared: Declared,
    /// Regions (`Region::Named(i)` for the coordinator); peers are spread evenly.
    pub regions: u16,
    /// One-way delay between regions' cores, ms, `regions x regions`; `None`: regions on a
    /// ring, 2 ms inside a region and 10 + 120 * d ms between regions at ring distance
    /// `d` in (0, 1] (continental 10-40 ms to intercontinental ~130 ms one way, as in
    /// WonderNetwork's public ping tables).
    pub matrix: Option<Vec<Vec<f64>>>,
    /// Region of the control center and origin.
    pub server_region: u16,
    /// Loss probability of each transmission on a peer-to-peer path.
    pub loss: f64,
    /// Round trips a lost message costs before its retransmission arrives (1 = fast
    /// retransmit; an RTO would be more).
    pub loss_rtts: f64,
    /// Data-channel set-up: `setup_ms` (signalling through the server, candidate gathering,
    /// browser work: the browser swarm on loopback measured ~15 ms idle and 0.3-1.5 s on a
    /// loaded machine) plus `setup_rtts` round trips of the path (ICE checks, DTLS, SCTP).
    pub setup_ms: Dist,
    pub setup_rtts: f64,
    /// Share of peer pairs that can never connect (symmetric NATs without TURN); their
    /// attempt fails after `ice_timeout_ms`.
    pub unreachable: f64,
    /// How the unreachable pairs arise ([`NatModel`]).
    pub nat: NatModel,
    pub ice_timeout_ms: f64,
    /// Overrides every path's one-way delay (the `lossy` scenario's fixed RTT), ms.
    pub fixed_one_way_ms: Option<f64>,
}

impl Default for NetConfig {
    fn default() -> Self {
        let class =
            |name: &str, weight, down: (f64, f64), up: (f64, f64), acc: (f64, f64)| AccessClass {
                name: name.into(),
                weight,
                down_kbps: Dist::log_uniform(down.0, down.1),
                up_kbps: Dist::log_uniform(up.0, up.1),
                access_ms: Dist::uniform(acc.0, acc.1),
            };
        NetConfig {
            access: vec![
                class("dsl", 0.15, (4e3, 25e3), (500.0, 2e3), (8.0, 20.0)),
                class("cable", 0.30, (50e3, 500e3), (5e3, 50e3), (5.0, 12.0)),
                class("fiber", 0.25, (100e3, 1e6), (50e3, 500e3), (1.0, 5.0)),
                class("mobile", 0.25, (8e3, 150e3), (1.5e3, 30e3), (15.0, 45.0)),
                class("satellite", 0.05, (10e3, 150e3), (1e3, 15e3), (20.0, 60.0)),
            ],
            declared: Declared::Fraction {
                of_capacity: 0.8,
                max_kbps: 10_000,
            },
            regions: 1,
            matrix: None,
            server_region: 0,
            loss: 0.001,
            loss_rtts: 1.0,
            setup_ms: Dist::log_uniform(15.0, 300.0),
            setup_rtts: 3.0,
            unreachable: 0.2,
            nat: NatModel::Classes,
            ice_timeout_ms: 5000.0,
            fixed_one_way_ms: None,
        }
    }
}

impl NetConfig {
    /// The browser swarm's machine: every page on loopback, so no delay, no loss, every pair
    /// connects and capacity is the CPU's (taken as 10 Gbit/s); data channels still take the
    /// 15 ms (idle) to 1.5 s (loaded machine) the swarm measured to open. For calibrating the
    /// simulator against `cargo xtask swarm` (issue 11, item 4).
    pub fn loopback() -> Self {
        NetConfig {
            access: vec![AccessClass {
                name: "loopback".into(),
                weight: 1.0,
                down_kbps: Dist::constant(1e7),
                up_kbps: Dist::constant(1e7),
                access_ms: Dist::constant(0.05),
            }],
            declared: Declared::Fixed { kbps: 2000 },
            loss: 0.0,
            setup_ms: Dist::log_uniform(15.0, 1500.0),
            setup_rtts: 0.0,
            unreachable: 0.0,
            fixed_one_way_ms: Some(0.1),
            ..NetConfig::default()
        }
    }
}

/// How the `unreachable` share of pairs arises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NatModel {
    /// From NAT classes (issue 15): 25 % of peers open, the rest behind endpoint-independent
    /// or endpoint-dependent ("symmetric") NATs in the proportion that makes `unreachable` of
    /// the pairs unable to connect (a symmetric peer reaches only open peers). Each peer reports
    /// its class when it joins, as the page does, so the DCM can place around it.
    Classes,
    /// A random `unreachable` share of pairs, unknown to the DCM until a failure is reported
    /// (the model before NAT classes).
    Pairs,
}

/// Share of peers with a public address in the [`NatModel::Classes`] model. Measurements of
/// WebRTC clients put open or UPnP-mapped hosts at a fifth to a third, symmetric NATs (mostly
/// mobile carrier-grade NAT) at 10-20 % (see docs/simulator.md).
const OPEN_SHARE: f64 = 0.25;

/// What a peer got from the model.
#[derive(Debug, Clone, Copy)]
pub struct PeerNet {
    pub class: u8,
    pub region: u16,
    pub up_kbps: f64,
    pub down_kbps: f64,
    pub access_ms: f64,
    pub declared_kbps: u32,
    /// Its NAT class ([`NatModel::Classes`] with some pairs unreachable; `None` otherwise).
    pub nat: Option<Connectivity>,
}

impl NetConfig {
    /// Refuses impossible parameters, naming the flag or field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(format!(
                "--loss must be at least 0 % and below 100 %, got {} %",
                self.loss * 100.0
            ));
        }
        if !(0.0..=1.0).contains(&self.unreachable) {
            return Err(format!(
                "--unreachable must be between 0 and 100 %, got {} %",
                self.unreachable * 100.0
            ));
        }
        if self.nat == NatModel::Classes && self.nat_mix().is_none() {
            return Err(format!(
                "--unreachable {} % is more than NAT classes can make (56.25 %: every peer that \
                 is not open behind a symmetric NAT); lower it or use --nat-model pairs",
                self.unreachable * 100.0
            ));
        }
        if self.regions == 0 {
            return Err("--regions must be at least 1".into());
        }
        if self.server_region >= self.regions {
            return Err("server_region must be one of the regions".into());
        }
        if let Some(m) = &self.matrix {
            let r = usize::from(self.regions);
            if m.len() != r || m.iter().any(|row| row.len() != r) {
                return Err(format!(
                    "--matrix must be {r} x {r} (one row and column per region of --regions {r}), got {} rows of lengths {:?}",
                    m.len(),
                    m.iter().map(Vec::len).collect::<Vec<_>>()
                ));
            }
            if m.iter().flatten().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err("--matrix entries must be finite delays >= 0 ms".into());
            }
        }
        if self.access.is_empty() || self.access.iter().all(|c| c.weight <= 0.0) {
            return Err("access: at least one access class with a positive weight".into());
        }
        for c in &self.access {
            c.down_kbps
                .validate(&format!("access {} down_kbps", c.name))?;
            c.up_kbps.validate(&format!("access {} up_kbps", c.name))?;
            c.access_ms
                .validate(&format!("access {} access_ms", c.name))?;
        }
        self.setup_ms.validate("setup_ms")?;
        if !(self.ice_timeout_ms.is_finite() && self.ice_timeout_ms >= 0.0) {
            return Err("ice_timeout_ms must be >= 0".into());
        }
        Ok(())
    }

    /// Draws peer `index`'s access network; region `index mod regions`.
    pub fn draw_peer(&self, index: usize, rng: &mut Rng) -> PeerNet {
        let total: f64 = self.access.iter().map(|c| c.weight.max(0.0)).sum();
        let mut x = rng.unit() * total;
        let mut pick = self.access.len().saturating_sub(1);
        for (i, c) in self.access.iter().enumerate() {
            if x < c.weight {
                pick = i;
                break;
            }
            x -= c.weight.max(0.0);
        }
        let c = &self.access[pick];
        let up_kbps = c.up_kbps.sample(rng).max(1.0);
        let declared_kbps = match self.declared {
            Declared::Fraction {
                of_capacity,
                max_kbps,
            } => ((up_kbps * of_capacity) as u32).min(max_kbps),
            Declared::Fixed { kbps } => kbps,
        };
        PeerNet {
            class: pick as u8,
            region: (index % usize::from(self.regions.max(1))) as u16,
            up_kbps,
            down_kbps: c.down_kbps.sample(rng).max(1.0),
            access_ms: c.access_ms.sample(rng),
            declared_kbps,
            nat: None,
        }
    }

    /// The shares of endpoint-independent and endpoint-dependent peers that make `unreachable`
    /// of the pairs unable to connect, with [`OPEN_SHARE`] open: `d² + 2·d·e = u` with
    /// `e = 1 - open - d`. `None` above the most the model can make (0.5625).
    pub fn nat_mix(&self) -> Option<(f64, f64)> {
        let rest = 1.0 - OPEN_SHARE;
        let disc = rest * rest - self.unreachable;
        if disc < 0.0 {
            return None;
        }
        let d = rest - disc.sqrt();
        Some((rest - d, d))
    }

    /// Peer `index`'s NAT class: fixed by the seed, independent of the other draws (so runs
    /// with and without classes see the same capacities and delays).
    pub fn nat_of(&self, seed: u64, index: usize) -> Option<Connectivity> {
        if self.nat != NatModel::Classes || self.unreachable <= 0.0 {
            return None;
        }
        let (_, d) = self.nat_mix()?;
        let h = mix(seed ^ mix(0x4e41_5400_0000_0000 | index as u64));
        let x = (h >> 11) as f64 / (1u64 << 53) as f64;
        let class = if x < OPEN_SHARE {
            NatClass::Open
        } else if x < OPEN_SHARE + d {
            NatClass::EndpointDependent
        } else {
            NatClass::EndpointIndependent
        };
        Some(Connectivity { class, turn: false })
    }

    /// Whether peers `a` and `b` (by index, with their networks) can never connect.
    pub fn cannot_connect(&self, seed: u64, a: (u32, &PeerNet), b: (u32, &PeerNet)) -> bool {
        match self.nat {
            NatModel::Classes if self.unreachable > 0.0 => {
                !Connectivity::can_pair(a.1.nat, b.1.nat)
            }
            _ => self.unreachable_pair(seed, a.0, b.0),
        }
    }

    /// One-way delay between two regions' cores, ms.
    pub fn region_ms(&self, a: u16, b: u16) -> f64 {
        if let Some(m) = &self.matrix {
            return m
                .get(usize::from(a))
                .and_then(|r| r.get(usize::from(b)))
                .copied()
                .unwrap_or(0.0);
        }
        if a == b {
            return 2.0;
        }
        let r = f64::from(self.regions.max(2));
        let d = (f64::from(a) - f64::from(b)).abs();
        let ring = d.min(r - d) / (r / 2.0);
        10.0 + 120.0 * ring
    }

    /// One-way delay between two peers, ms.
    pub fn path_ms(&self, a: &PeerNet, b: &PeerNet) -> f64 {
        self.fixed_one_way_ms
            .unwrap_or_else(|| a.access_ms + self.region_ms(a.region, b.region) + b.access_ms)
    }

    /// One-way delay between a peer and the control center / origin, ms.
    pub fn server_ms(&self, p: &PeerNet) -> f64 {
        self.fixed_one_way_ms
            .unwrap_or_else(|| p.access_ms + self.region_ms(p.region, self.server_region))
    }

    /// Whether peers `a` and `b` (by index) can never connect: a fixed property of the pair,
    /// the same whichever side asks and however often.
    pub fn unreachable_pair(&self, seed: u64, a: u32, b: u32) -> bool {
        if self.unreachable <= 0.0 {
            return false;
        }
        let (lo, hi) = (a.min(b), a.max(b));
        let h = mix(seed ^ mix((u64::from(lo) << 32) | u64::from(hi)));
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.unreachable
    }

    /// Extra delay from losses for one message on a path of round trip `rtt_ms`.
    pub fn loss_delay_ms(&self, rtt_ms: f64, rng: &mut Rng) -> f64 {
        let mut extra = 0.0;
        // Each retransmission can be lost again (bounded: p < 1 is validated).
        let mut tries = 0;
        while tries < 64 && rng.chance(self.loss) {
            extra += self.loss_rtts * rtt_ms;
            tries += 1;
        }
        extra
    }

    /// Data-channel set-up time between two peers, ms.
    pub fn setup_time_ms(&self, path_one_way_ms: f64, rng: &mut Rng) -> f64 {
        self.setup_ms.sample(rng) + self.setup_rtts * 2.0 * path_one_way_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_mixes_access_networks() {
        let cfg = NetConfig {
            regions: 4,
            ..NetConfig::default()
        };
        assert!(cfg.validate().is_ok());
        let mut rng = Rng::seeded(1);
        let peers: Vec<PeerNet> = (0..2000).map(|i| cfg.draw_peer(i, &mut rng)).collect();
        let dsl = peers.iter().filter(|p| p.class == 0).count();
        assert!((200..400).contains(&dsl), "dsl {dsl}");
        assert!(peers.iter().all(|p| p.region < 4));
        assert!(peers
            .iter()
            .all(|p| f64::from(p.declared_kbps) <= p.up_kbps));
        let mut ups: Vec<f64> = peers.iter().map(|p| p.up_kbps).collect();
        ups.sort_by(f64::total_cmp);
        // Median upload: some Mbit/s, between DSL's and fibre's.
        assert!((3e3..60e3).contains(&ups[1000]), "median up {}", ups[1000]);
    }

    #[test]
    fn impossible_configurations_name_their_flag() {
        let bad = NetConfig {
            loss: 1.0,
            ..NetConfig::default()
        };
        assert!(bad.validate().is_err_and(|m| m.contains("--loss")));
        let bad = NetConfig {
            regions: 3,
            matrix: Some(vec![vec![1.0; 3]; 2]),
            ..NetConfig::default()
        };
        assert!(bad.validate().is_err_and(|m| m.contains("--matrix")));
        let ok = NetConfig {
            regions: 2,
            matrix: Some(vec![vec![1.0, 50.0], vec![50.0, 1.0]]),
            ..NetConfig::default()
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.region_ms(0, 1), 50.0);
    }

    #[test]
    fn ring_matrix_is_symmetric_and_grows_with_distance() {
        let cfg = NetConfig {
            regions: 10,
            ..NetConfig::default()
        };
        assert_eq!(cfg.region_ms(3, 3), 2.0);
        assert_eq!(cfg.region_ms(1, 4), cfg.region_ms(4, 1));
        assert!(cfg.region_ms(0, 1) < cfg.region_ms(0, 5));
        // Around the ring: 9 is next to 0.
        assert_eq!(cfg.region_ms(0, 9), cfg.region_ms(0, 1));
        assert!((cfg.region_ms(0, 5) - 130.0).abs() < 1e-9);
    }

    #[test]
    fn nat_classes_make_about_the_unreachable_share_of_pairs() {
        for u in [0.05, 0.2, 0.4] {
            let cfg = NetConfig {
                unreachable: u,
                ..NetConfig::default()
            };
            let peers: Vec<PeerNet> = (0..600)
                .map(|i| PeerNet {
                    nat: cfg.nat_of(3, i),
                    ..cfg.draw_peer(i, &mut Rng::seeded(i as u64))
                })
                .collect();
            let (mut bad, mut all) = (0u32, 0u32);
            for a in 0..peers.len() {
                for b in a + 1..peers.len() {
                    let x = cfg.cannot_connect(3, (a as u32, &peers[a]), (b as u32, &peers[b]));
                    assert_eq!(
                        x,
                        cfg.cannot_connect(3, (b as u32, &peers[b]), (a as u32, &peers[a]))
                    );
                    bad += u32::from(x);
                    all += 1;
                }
            }
            let share = f64::from(bad) / f64::from(all);
            assert!((share - u).abs() < 0.04, "{u}: {share}");
        }
        let too_many = NetConfig {
            unreachable: 0.7,
            ..NetConfig::default()
        };
        assert!(too_many
            .validate()
            .unwrap_err()
            .contains("--nat-model pairs"));
        let pairs = NetConfig {
            unreachable: 0.7,
            nat: NatModel::Pairs,
            ..NetConfig::default()
        };
        assert!(pairs.validate().is_ok());
        assert_eq!(pairs.nat_of(1, 1), None);
    }

    #[test]
    fn unreachable_pairs_are_symmetric_and_about_the_share() {
        let cfg = NetConfig::default();
        let n = 200u32;
        let mut bad = 0;
        for a in 0..n {
            for b in a + 1..n {
                assert_eq!(cfg.unreachable_pair(5, a, b), cfg.unreachable_pair(5, b, a));
                bad += u32::from(cfg.unreachable_pair(5, a, b));
            }
        }
        let share = f64::from(bad) / f64::from(n * (n - 1) / 2);
        assert!((0.18..0.22).contains(&share), "{share}");
        let none = NetConfig {
            unreachable: 0.0,
            ..NetConfig::default()
        };
        assert!(!none.unreachable_pair(5, 1, 2));
    }

    #[test]
    fn loss_costs_whole_round_trips() {
        let cfg = NetConfig {
            loss: 0.05,
            ..NetConfig::default()
        };
        let mut rng = Rng::seeded(2);
        let d: Vec<f64> = (0..10_000)
            .map(|_| cfg.loss_delay_ms(100.0, &mut rng))
            .collect();
        assert!(d.iter().all(|x| x % 100.0 == 0.0));
        let lost = d.iter().filter(|x| **x > 0.0).count();
        assert!((400..600).contains(&lost), "{lost}");
        let clean = NetConfig {
            loss: 0.0,
            ..NetConfig::default()
        };
        assert_eq!(clean.loss_delay_ms(100.0, &mut rng), 0.0);
    }
}
