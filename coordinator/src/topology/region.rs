//! Regions (patent FIG. 2): peers grouped by network boundary, shared by all channels.

use std::net::IpAddr;

/// A region: a configured one (index into the config's region table), or the fallback for peers
/// matching no rule: their IPv4 /16 or IPv6 /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Region {
    Named(u16),
    V4([u8; 2]),
    V6([u16; 3]),
}

/// Per-region settings from the region config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionSettings {
    /// Parity shards of the region's middle tier (`None`: the channel default).
    pub fec_n: Option<u32>,
    /// Configured relay server standing in when the region has no capable client.
    pub waypoint: Option<u32>,
}

impl Region {
    /// The fallback region of an address.
    pub fn fallback(ip: IpAddr) -> Region {
        match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                Region::V4([o[0], o[1]])
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                Region::V6([s[0], s[1], s[2]])
            }
        }
    }
}

/// A peer's declared access network: the optional sub-criterion of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkType {
    Dsl,
    Cable,
    Fiber,
    Mobile,
    Satellite,
    Other,
}

impl std::str::FromStr for NetworkType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "dsl" => NetworkType::Dsl,
            "cable" => NetworkType::Cable,
            "fiber" => NetworkType::Fiber,
            "mobile" => NetworkType::Mobile,
            "satellite" => NetworkType::Satellite,
            "other" => NetworkType::Other,
            _ => return Err(()),
        })
    }
}

/// A config problem, with the 1-based line it is on (0 when it has no place in the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topology config, line {line}: {message}")]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

/// Per-region settings as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    pub name: String,
    /// Parity shards of this region's middle tier (`None`: the default).
    pub fec_n: Option<u32>,
    /// Index of the configured relay server (waypoint) standing in for this region.
    pub waypoint: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    net: ipnet::IpNet,
    network: Option<NetworkType>,
    region: u16,
}

/// The topology section of the server's TOML config: regions, rules, tier parameters.
///
/// ```toml
/// [topology]
/// k = 8                    # substreams / FEC data shards
/// fec_n = 2                # default parity shards of a middle tier
/// mesh_c = 3               # connectivity of the top tier
/// mesh_max = 64            # largest top tier (mesh_c must be smaller)
/// origin_shortcuts = 8     # top-tier nodes the origin feeds beyond its ring neighbours
/// allow_region_hint = false
/// relays = ["relay-eu.example.net"]
///
/// [[topology.region]]
/// name = "eu-mobile"
/// fec_n = 4                # lossier: more redundancy
/// relay = "relay-eu.example.net"
///
/// [[topology.rule]]
/// cidr = "10.0.0.0/8"
/// network = "mobile"       # optional sub-criterion
/// region = "eu-mobile"
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyConfig {
    pub k: u32,
    pub fec_n: u32,
    pub mesh_c: u32,
    pub mesh_max: u32,
    /// See [`MeshConfig::origin_shortcuts`](super::mesh::MeshConfig::origin_shortcuts).
    pub origin_shortcuts: u32,
    pub allow_region_hint: bool,
    pub relays: Vec<String>,
    pub regions: Vec<RegionConfig>,
    /// The channels that run the hierarchy; empty: every channel. The others run one flat
    /// multi-tree (see [`TopologyConfig::applies_to`]).
    pub channels: Vec<String>,
    rules: Vec<Rule>,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            k: 8,
            fec_n: 2,
            mesh_c: 3,
            mesh_max: 64,
            origin_shortcuts: super::mesh::MeshConfig::default().origin_shortcuts,
            allow_region_hint: false,
            relays: Vec::new(),
            regions: Vec::new(),
            channels: Vec::new(),
            rules: Vec::new(),
        }
    }
}

mod raw {
    use serde::Deserialize;
    use toml::Spanned;

    #[derive(Deserialize, Default)]
    pub struct Doc {
        #[serde(default)]
        pub topology: Option<Spanned<Topology>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Topology {
        pub k: Option<Spanned<u32>>,
        pub fec_n: Option<Spanned<u32>>,
        pub mesh_c: Option<Spanned<u32>>,
        pub mesh_max: Option<Spanned<u32>>,
        pub origin_shortcuts: Option<Spanned<u32>>,
        pub allow_region_hint: Option<bool>,
        #[serde(default)]
        pub relays: Vec<Spanned<String>>,
        #[serde(default)]
        pub channels: Vec<Spanned<String>>,
        #[serde(default)]
        pub region: Vec<Region>,
        #[serde(default)]
        pub rule: Vec<Rule>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Region {
        pub name: Spanned<String>,
        pub fec_n: Option<Spanned<u32>>,
        pub relay: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rule {
        pub cidr: Spanned<String>,
        pub network: Option<Spanned<String>>,
        pub region: Spanned<String>,
    }
}

impl TopologyConfig {
    /// Whether `channel` runs the three-tier hierarchy: every channel when `channels` is empty,
    /// else the channels it lists (a large event as a hierarchy beside small flat channels).
    pub fn applies_to(&self, channel: &str) -> bool {
        self.channels.is_empty() || self.channels.iter().any(|c| c == channel)
    }

    /// Parses and validates the `[topology]` section of a TOML document (other sections are
    /// ignored: they belong to the rest of the server's config).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err = |offset: usize, message: String| ConfigError {
            line: line_of(offset),
            message,
        };
        let doc: raw::Doc = toml::from_str(text).map_err(|e| ConfigError {
            line: e.span().map_or(0, |s| line_of(s.start)),
            message: e.message().to_string(),
        })?;
        let Some(top) = doc.topology else {
            return Ok(TopologyConfig::default());
        };
        let top_span = top.span().start;
        let top = top.into_inner();
        let mut cfg = TopologyConfig::default();
        let get = |v: &Option<toml::Spanned<u32>>, d: u32| {
            v.as_ref()
                .map_or((d, top_span), |s| (*s.get_ref(), s.span().start))
        };
        let (k, k_at) = get(&top.k, cfg.k);
        let (fec_n, n_at) = get(&top.fec_n, cfg.fec_n);
        let (c, c_at) = get(&top.mesh_c, cfg.mesh_c);
        let (mesh_max, _) = get(&top.mesh_max, cfg.mesh_max);
        // More shortcuts than the tier has nodes link the origin to all of them.
        let (shortcuts, _) = get(&top.origin_shortcuts, cfg.origin_shortcuts);
        let check_fec = |k: u32, n: u32, at: usize| {
            protocol::fec::FecParams::new(k, n)
                .map(|_| ())
                .map_err(|e| err(at, e.to_string()))
        };
        check_fec(k, fec_n, k_at.max(n_at))?;
        if c == 0 || c >= mesh_max {
            return Err(err(
                c_at,
                format!("mesh_c = {c} must be at least 1 and smaller than the tier (mesh_max = {mesh_max})"),
            ));
        }
        cfg.k = k;
        cfg.fec_n = fec_n;
        cfg.mesh_c = c;
        cfg.mesh_max = mesh_max;
        cfg.origin_shortcuts = shortcuts;
        cfg.allow_region_hint = top.allow_region_hint.unwrap_or(false);
        for r in &top.relays {
            if cfg.relays.contains(r.get_ref()) {
                return Err(err(
                    r.span().start,
                    format!("relay {:?} listed twice", r.get_ref()),
                ));
            }
            cfg.relays.push(r.get_ref().clone());
        }
        for c in &top.channels {
            let name = c.get_ref();
            if name.is_empty() || cfg.channels.contains(name) {
                return Err(err(
                    c.span().start,
                    format!("channel {name:?} empty or listed twice"),
                ));
            }
            cfg.channels.push(name.clone());
        }
        for r in &top.region {
            let name = r.name.get_ref();
            if name.is_empty() || cfg.regions.iter().any(|x| &x.name == name) {
                return Err(err(
                    r.name.span().start,
                    format!("region name {name:?} empty or defined twice"),
                ));
            }
            if cfg.regions.len() >= usize::from(u16::MAX) {
                return Err(err(r.name.span().start, "too many regions".into()));
            }
            if let Some(n) = &r.fec_n {
                check_fec(k, *n.get_ref(), n.span().start)?;
            }
            let waypoint = match &r.relay {
                Some(relay) => Some(
                    cfg.relays
                        .iter()
                        .position(|x| x == relay.get_ref())
                        .ok_or_else(|| {
                            err(
                                relay.span().start,
                                format!("unknown relay {:?}", relay.get_ref()),
                            )
                        })? as u32,
                ),
                None => None,
            };
            cfg.regions.push(RegionConfig {
                name: name.clone(),
                fec_n: r.fec_n.as_ref().map(|n| *n.get_ref()),
                waypoint,
            });
        }
        let mut spans: Vec<usize> = Vec::new();
        for r in &top.rule {
            let net: ipnet::IpNet = r.cidr.get_ref().parse().map_err(|_| {
                err(
                    r.cidr.span().start,
                    format!("invalid CIDR {:?}", r.cidr.get_ref()),
                )
            })?;
            let net = net.trunc();
            let network = match &r.network {
                Some(n) => Some(n.get_ref().parse::<NetworkType>().map_err(|_| {
                    err(n.span().start, format!("unknown network type {:?} (dsl, cable, fiber, mobile, satellite, other)", n.get_ref()))
                })?),
                None => None,
            };
            let region = cfg
                .regions
                .iter()
                .position(|x| &x.name == r.region.get_ref())
                .ok_or_else(|| {
                    err(
                        r.region.span().start,
                        format!("unknown region {:?}", r.region.get_ref()),
                    )
                })? as u16;
            // Overlapping prefixes would make the partition depend on rule order; the same
            // prefix may appear once per network type (plus once without one, the default).
            for (other, at) in cfg.rules.iter().zip(&spans) {
                let overlap = other.net.contains(&net) || net.contains(&other.net);
                if overlap && (other.net != net || other.network == network) {
                    return Err(err(
                        r.cidr.span().start,
                        format!("CIDR {net} overlaps the rule on line {}", line_of(*at)),
                    ));
                }
            }
            spans.push(r.cidr.span().start);
            cfg.rules.push(Rule {
                net,
                network,
                region,
            });
        }
        Ok(cfg)
    }

    /// The region of a peer: a matching rule (one naming the peer's network type first), else
    /// its hint when hints are allowed and it names a configured region, else its /16 or /48.
    pub fn classify(&self, ip: IpAddr, network: Option<NetworkType>, hint: Option<&str>) -> Region {
        let mut fallback_rule = None;
        for r in &self.rules {
            if r.net.contains(&ip) {
                match r.network {
                    Some(n) if Some(n) == network => return Region::Named(r.region),
                    None => fallback_rule = Some(r.region),
                    Some(_) => {}
                }
            }
        }
        if let Some(r) = fallback_rule {
            return Region::Named(r);
        }
        if self.allow_region_hint {
            if let Some(i) = hint.and_then(|h| self.regions.iter().position(|x| x.name == h)) {
                return Region::Named(i as u16);
            }
        }
        Region::fallback(ip)
    }

    /// Display name of a region.
    pub fn name(&self, region: Region) -> String {
        match region {
            Region::Named(i) => self
                .regions
                .get(usize::from(i))
                .map_or_else(|| format!("region#{i}"), |r| r.name.clone()),
            Region::V4([a, b]) => format!("{a}.{b}.0.0/16"),
            Region::V6([a, b, c]) => format!("{a:x}:{b:x}:{c:x}::/48"),
        }
    }

    /// The hierarchy's settings for a region (its FEC redundancy and waypoint).
    pub fn settings(&self, region: Region) -> RegionSettings {
        match region {
            Region::Named(i) => {
                self.regions
                    .get(usize::from(i))
                    .map_or_else(RegionSettings::default, |r| RegionSettings {
                        fec_n: r.fec_n,
                        waypoint: r.waypoint,
                    })
            }
            _ => RegionSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const GOOD: &str = r#"
[server]
listen = "0.0.0.0:8080"

[topology]
k = 4
fec_n = 1
relays = ["relay-a"]

[[topology.region]]
name = "campus"

[[topology.region]]
name = "isp-mobile"
fec_n = 4
relay = "relay-a"

[[topology.region]]
name = "isp"

[[topology.rule]]
cidr = "192.0.2.0/24"
region = "campus"

[[topology.rule]]
cidr = "10.0.0.0/8"
network = "mobile"
region = "isp-mobile"

[[topology.rule]]
cidr = "10.0.0.0/8"
region = "isp"
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_map_prefixes_and_network_types_to_regions() {
        let c = TopologyConfig::from_toml(GOOD).unwrap();
        let name = |r| c.name(r);
        assert_eq!(name(c.classify(ip("192.0.2.7"), None, None)), "campus");
        assert_eq!(
            name(c.classify(ip("10.1.2.3"), Some(NetworkType::Mobile), None)),
            "isp-mobile"
        );
        assert_eq!(
            name(c.classify(ip("10.1.2.3"), Some(NetworkType::Dsl), None)),
            "isp"
        );
        assert_eq!(name(c.classify(ip("10.1.2.3"), None, None)), "isp");
        let mobile = c.classify(ip("10.9.9.9"), Some(NetworkType::Mobile), None);
        assert_eq!(
            c.settings(mobile),
            RegionSettings {
                fec_n: Some(4),
                waypoint: Some(0)
            }
        );
    }

    #[test]
    fn unmatched_peers_fall_into_their_slash_16_or_slash_48() {
        let c = TopologyConfig::from_toml(GOOD).unwrap();
        assert_eq!(
            c.classify(ip("203.0.113.9"), None, None),
            Region::V4([203, 0])
        );
        assert_eq!(c.name(Region::V4([203, 0])), "203.0.0.0/16");
        let v6 = c.classify(ip("2001:db8:aa:1::1"), None, None);
        assert_eq!(v6, Region::V6([0x2001, 0xdb8, 0xaa]));
        assert_eq!(c.name(v6), "2001:db8:aa::/48");
    }

    #[test]
    fn region_hints_are_honoured_only_when_allowed() {
        let c = TopologyConfig::from_toml(GOOD).unwrap();
        assert_eq!(
            c.classify(ip("127.0.0.1"), None, Some("campus")),
            Region::V4([127, 0])
        );
        let allowed =
            TopologyConfig::from_toml(&GOOD.replace("k = 4", "k = 4\nallow_region_hint = true"))
                .unwrap();
        assert_eq!(
            allowed.name(allowed.classify(ip("127.0.0.1"), None, Some("campus"))),
            "campus"
        );
        assert_eq!(
            allowed.classify(ip("127.0.0.1"), None, Some("nowhere")),
            Region::V4([127, 0])
        );
    }

    #[test]
    fn the_hierarchy_runs_on_the_channels_listed_or_on_every_channel() {
        let every = TopologyConfig::from_toml(GOOD).unwrap();
        assert!(every.applies_to("demo") && every.applies_to("anything"));
        let some = TopologyConfig::from_toml(
            &GOOD.replace("k = 4", "k = 4\nchannels = [\"event\", \"launch\"]"),
        )
        .unwrap();
        assert!(some.applies_to("event") && some.applies_to("launch"));
        assert!(!some.applies_to("demo"));
        for bad in [r#"channels = ["a", "a"]"#, r#"channels = [""]"#] {
            let e = TopologyConfig::from_toml(&GOOD.replace("k = 4", &format!("k = 4\n{bad}")))
                .unwrap_err();
            assert!(e.message.contains("empty or listed twice"), "{e:?}");
        }
    }

    #[test]
    fn bad_configs_are_refused_naming_the_line() {
        let line = |text: &str| TopologyConfig::from_toml(text).unwrap_err();
        let e = line("[topology]\nk = 4\n\n[[topology.region]]\nname = \"a\"\n\n[[topology.rule]]\ncidr = \"10.0.0.0/8\"\nregion = \"a\"\n\n[[topology.rule]]\ncidr = \"10.1.0.0/16\"\nregion = \"a\"\n");
        assert_eq!(e.line, 12, "{e}");
        assert!(e.message.contains("overlaps the rule on line 8"), "{e}");
        let e = line("[topology]\n[[topology.rule]]\ncidr = \"10.0.0.0/8\"\nregion = \"nope\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown region"));
        let e = line("[topology]\nk = 4\nfec_n = 17\n");
        assert_eq!(e.line, 3, "{e}");
        let e = line("[topology]\nk = 40\n");
        assert_eq!(e.line, 2, "{e}");
        let e = line("[topology]\n[[topology.region]]\nname = \"a\"\nfec_n = 99\n");
        assert_eq!(e.line, 4, "{e}");
        let e = line("[topology]\nmesh_max = 3\nmesh_c = 3\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("smaller than the tier"));
        let e = line("[topology]\norigin_shortcuts = -1\n");
        assert_eq!(e.line, 2, "{e}");
        let cfg = TopologyConfig::from_toml("[topology]\norigin_shortcuts = 2\n").unwrap();
        assert_eq!(cfg.origin_shortcuts, 2);
        assert_eq!(TopologyConfig::default().origin_shortcuts, 8);
        let e = line("[topology]\n[[topology.region]]\nname = \"a\"\n[[topology.rule]]\ncidr = \"10.0.0.0/33\"\nregion = \"a\"\n");
        assert_eq!(e.line, 5, "{e}");
        let e = line("[topology]\n[[topology.region]]\nname = \"a\"\n[[topology.rule]]\ncidr = \"10.0.0.0/8\"\nnetwork = \"pigeon\"\nregion = \"a\"\n");
        assert_eq!(e.line, 6, "{e}");
        let e = line("[topology]\nbogus = 1\n");
        assert_eq!(e.line, 2, "{e}");
        let e = line("[topology]\n[[topology.region]]\nname = \"a\"\nrelay = \"x\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(TopologyConfig::from_toml("[server]\nx = 1\n").is_ok());
    }
}
