//! NAT classification from gathered ICE candidates (issue 15), sans-IO: the page gathers
//! candidates against the server's two STUN ports (`web/nat.rs`) and hands their SDP lines
//! here.
//!
//! - two different server-reflexive mappings of one base: endpoint-dependent mapping;
//! - one mapping: endpoint-independent, unless it is one of the host candidates' addresses
//!   (no NAT at all: open);
//! - no mapping: open if a host candidate carries the address the server saw the page from,
//!   otherwise outbound UDP is blocked;
//! - a `relay` candidate: a TURN relay is usable (`turn`).
//!
//! What Chrome shows (Debian's Chromium, in the network namespaces of `tests/tests/nat.rs`,
//! with mDNS hiding of host addresses off): behind an endpoint-independent NAT, one host
//! candidate and one srflx candidate (the second STUN port's identical mapping is not surfaced
//! again); behind an endpoint-dependent NAT, one host and two srflx candidates with the same
//! `raddr rport` and different ports; with UDP dropped, only the host candidate; on a public
//! address, *no host candidate at all* and one srflx candidate carrying the host's own
//! address with `raddr 0.0.0.0` (hence the "folded host" rule below: one mapping, no host
//! candidate, and the mapping is the address the server sees). libwebrtc also drops a srflx
//! candidate equal to a visible host candidate (hence "no mapping, a host candidate on the
//! observed address" is open too). Without camera or microphone permission (never granted to
//! an `http://` page other than localhost) host candidates are `<uuid>.local` mDNS names and
//! srflx candidates carry `raddr 0.0.0.0`; a host that cannot be told from an
//! endpoint-independent NAT is classified endpoint-independent, the conservative answer (such
//! a peer is paired with fewer peers, never with one it cannot reach).

use std::collections::{BTreeMap, BTreeSet};

use protocol::{Connectivity, NatClass};

/// One ICE candidate, as much of it as classification needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub udp: bool,
    pub address: String,
    pub port: u16,
    /// `host`, `srflx`, `prflx` or `relay`.
    pub kind: String,
    /// The base (`raddr rport`) of a srflx or relay candidate.
    pub related: Option<(String, u16)>,
}

impl Candidate {
    /// Parses an SDP `candidate:` attribute (with or without the `a=` prefix), e.g.
    /// `candidate:1 1 udp 1677729535 198.51.100.7 40000 typ srflx raddr 10.0.0.2 rport 5000`.
    pub fn parse(line: &str) -> Option<Candidate> {
        let line = line.trim().trim_start_matches("a=");
        let rest = line.strip_prefix("candidate:")?;
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        if f.len() < 8 || f[6] != "typ" {
            return None;
        }
        let value = |key: &str| {
            f.iter()
                .position(|x| *x == key)
                .and_then(|i| f.get(i + 1))
                .copied()
        };
        let related = match (value("raddr"), value("rport").and_then(|p| p.parse().ok())) {
            (Some(a), Some(p)) => Some((a.to_string(), p)),
            _ => None,
        };
        Some(Candidate {
            udp: f[2].eq_ignore_ascii_case("udp"),
            address: f[4].to_string(),
            port: f[5].parse().ok()?,
            kind: f[7].to_string(),
            related,
        })
    }
}

/// What classification found: the connectivity to report and the mappings it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub connectivity: Connectivity,
    /// Distinct server-reflexive mappings, `address:port`.
    pub mappings: Vec<String>,
}

/// Classifies `candidates` gathered against two STUN servers; `observed` is the address the
/// control server saw the page's request come from (without port).
pub fn classify(candidates: &[Candidate], observed: Option<&str>) -> Classified {
    let turn = candidates.iter().any(|c| c.kind == "relay");
    let hosts: BTreeSet<&str> = candidates
        .iter()
        .filter(|c| c.kind == "host" && c.udp)
        .map(|c| c.address.as_str())
        .collect();
    // Mappings per base; a hidden base (mDNS, `0.0.0.0`) counts as one.
    let mut by_base: BTreeMap<(String, u16), BTreeSet<(String, u16)>> = BTreeMap::new();
    for c in candidates.iter().filter(|c| c.kind == "srflx" && c.udp) {
        let base = c.related.clone().unwrap_or_default();
        by_base
            .entry(base)
            .or_default()
            .insert((c.address.clone(), c.port));
    }
    let mappings: BTreeSet<String> = by_base
        .values()
        .flatten()
        .map(|(a, p)| {
            if a.contains(':') {
                format!("[{a}]:{p}")
            } else {
                format!("{a}:{p}")
            }
        })
        .collect();
    let class = if by_base.values().any(|m| m.len() > 1) {
        NatClass::EndpointDependent
    } else if !by_base.is_empty() {
        let all_host = by_base
            .values()
            .flatten()
            .all(|(a, _)| hosts.contains(a.as_str()));
        // What Chrome shows for a public host: no host candidate at all, and one srflx
        // candidate with the host's own address (`raddr 0.0.0.0`), the address the server sees.
        let folded_host = !candidates.iter().any(|c| c.kind == "host")
            && by_base
                .values()
                .flatten()
                .all(|(a, _)| observed == Some(a.as_str()));
        if all_host || folded_host {
            NatClass::Open
        } else {
            NatClass::EndpointIndependent
        }
    } else if observed.is_some_and(|o| hosts.contains(o)) {
        NatClass::Open
    } else {
        NatClass::UdpBlocked
    };
    Classified {
        connectivity: Connectivity { class, turn },
        mappings: mappings.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(lines: &[&str]) -> Vec<Candidate> {
        lines.iter().map(|l| Candidate::parse(l).unwrap()).collect()
    }

    const HOST: &str = "candidate:1 1 udp 2122260223 10.200.1.2 41000 typ host generation 0";
    const MDNS: &str =
        "candidate:2 1 udp 2122260223 1f0c8a8e-5d2b-4b7a-9c7e-2d7b1c0e9f11.local 41000 typ host";

    #[test]
    fn parses_srflx_with_its_base() {
        let x = Candidate::parse(
            "a=candidate:842163049 1 udp 1677729535 198.51.100.7 40000 typ srflx raddr 10.0.0.2 \
             rport 5000 generation 0 ufrag abcd network-cost 999",
        )
        .unwrap();
        assert!(x.udp);
        assert_eq!(x.kind, "srflx");
        assert_eq!((x.address.as_str(), x.port), ("198.51.100.7", 40000));
        assert_eq!(x.related, Some(("10.0.0.2".into(), 5000)));
        assert!(Candidate::parse("").is_none());
        assert!(Candidate::parse("candidate:1 1 udp x").is_none());
    }

    #[test]
    fn two_mappings_of_one_base_are_endpoint_dependent() {
        let got = classify(
            &c(&[
                HOST,
                "candidate:3 1 udp 1 192.0.2.1 50001 typ srflx raddr 10.200.1.2 rport 41000",
                "candidate:4 1 udp 1 192.0.2.1 50002 typ srflx raddr 10.200.1.2 rport 41000",
            ]),
            Some("192.0.2.1"),
        );
        assert_eq!(got.connectivity.class, NatClass::EndpointDependent);
        assert_eq!(got.mappings, ["192.0.2.1:50001", "192.0.2.1:50002"]);
    }

    #[test]
    fn one_mapping_is_endpoint_independent_unless_it_is_a_host_address() {
        let srflx = "candidate:3 1 udp 1 192.0.2.1 41000 typ srflx raddr 0.0.0.0 rport 0";
        let got = classify(&c(&[MDNS, srflx]), Some("192.0.2.1"));
        assert_eq!(got.connectivity.class, NatClass::EndpointIndependent);
        let public_host = "candidate:1 1 udp 2122260223 192.0.2.1 41000 typ host";
        let got = classify(&c(&[public_host, srflx]), Some("192.0.2.1"));
        assert_eq!(got.connectivity.class, NatClass::Open);
    }

    #[test]
    fn a_lone_srflx_on_the_observed_address_without_host_candidates_is_open() {
        let srflx = "candidate:3 1 udp 1 10.200.0.101 54306 typ srflx raddr 0.0.0.0 rport 0";
        let got = classify(&c(&[srflx]), Some("10.200.0.101"));
        assert_eq!(got.connectivity.class, NatClass::Open);
        // Behind a NAT the host candidate is there (real or mDNS): endpoint-independent.
        let got = classify(&c(&[MDNS, srflx]), Some("10.200.0.101"));
        assert_eq!(got.connectivity.class, NatClass::EndpointIndependent);
    }

    #[test]
    fn no_mapping_is_open_on_the_observed_address_else_udp_blocked() {
        let public_host = "candidate:1 1 udp 2122260223 192.0.2.1 41000 typ host";
        let open = classify(&c(&[public_host]), Some("192.0.2.1"));
        assert_eq!(open.connectivity, Connectivity::OPEN);
        let blocked = classify(&c(&[HOST, MDNS]), Some("192.0.2.1"));
        assert_eq!(blocked.connectivity.class, NatClass::UdpBlocked);
        assert!(!blocked.connectivity.turn);
        assert_eq!(classify(&[], None).connectivity.class, NatClass::UdpBlocked);
    }

    #[test]
    fn a_relay_candidate_means_turn() {
        let got = classify(
            &c(&[
                HOST,
                "candidate:5 1 udp 1 192.0.2.9 60000 typ relay raddr 0.0.0.0 rport 0",
            ]),
            Some("192.0.2.1"),
        );
        assert_eq!(
            got.connectivity,
            Connectivity {
                class: NatClass::UdpBlocked,
                turn: true
            }
        );
    }
}
