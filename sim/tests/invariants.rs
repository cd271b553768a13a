//! Small deterministic scenarios asserting the system's invariants (issue 11, item 5).

use sim::{RunConfig, Scenario};

fn small(scenario: Scenario, peers: usize, seconds: u64) -> RunConfig {
    RunConfig {
        // A lighter stream keeps the test fast in debug builds; every path is still exercised.
        stream_kbps: 400,
        // Every pair connects here; `unreachable_pairs_are_placed_around` covers the others.
        unreachable_pct: Some(0.0),
        seed: 7,
        ..RunConfig::new(peers, seconds, scenario)
    }
}

#[test]
fn steady_swarm_delivers_every_packet_byte_exact_without_a_stall() {
    let cfg = small(Scenario::Steady, 120, 40);
    let r = sim::run(&cfg, false).expect("valid configuration");
    let inv = &r.invariants;
    assert_eq!(r.viewers, 120);
    assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
    assert_eq!(inv.viewers_without_data, 0, "{inv:?}");
    assert_eq!(inv.incomplete_viewers, 0, "{inv:?}");
    assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
    assert_eq!(inv.cycles, 0, "{inv:?}");
    assert_eq!(inv.coordinator, None);
    assert_eq!(r.stalls, 0, "{}", r.table());
    assert!(r.continuity >= 0.999, "{}", r.table());
    assert!(r.p2p_share > 0.5, "{}", r.table());
}

#[test]
fn churn_keeps_the_trees_whole_and_the_bytes_exact() {
    let cfg = RunConfig {
        churn_pct: 20.0,
        ..small(Scenario::Churn, 80, 45)
    };
    let r = sim::run(&cfg, false).expect("valid configuration");
    let inv = &r.invariants;
    assert!(r.departures > 0, "{}", r.table());
    assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
    assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
    assert_eq!(inv.cycles, 0, "{inv:?}");
    assert_eq!(inv.coordinator, None);
    assert!(r.repairs_measured > 0, "{}", r.table());
    // Departures are repaired (bridged, fallbacks in time) without a viewer noticing.
    assert_eq!(r.stalls, 0, "{}", r.table());
    assert!(r.continuity >= 0.999, "{}", r.table());
}

#[test]
fn same_seed_same_run() {
    let cfg = small(Scenario::MassFailure, 40, 20);
    let a = sim::run(&cfg, false).expect("valid configuration");
    let b = sim::run(&cfg, false).expect("valid configuration");
    assert_eq!(a.events, b.events);
    assert_eq!(a.bytes_from_peers, b.bytes_from_peers);
    assert_eq!(a.repair_ms, b.repair_ms);
    assert_eq!(a.latency_ms, b.latency_ms);
}

#[test]
fn control_only_runs_without_engines() {
    let r = sim::run(&small(Scenario::ControlOnly, 500, 10), false).expect("valid");
    assert_eq!(r.viewers, 500);
    assert_eq!(r.bytes_played, 0);
    assert_eq!(r.invariants.wrong_parent_count, 0);
    assert!(r.heartbeat_bytes_avg > 0.0);
}

#[test]
fn impossible_runs_are_refused_naming_the_flag() {
    let e = sim::run(&small(Scenario::Steady, 0, 10), false).err();
    assert!(e.is_some_and(|m| m.contains("--peers")));
    let cfg = RunConfig {
        loss_pct: Some(100.0),
        ..small(Scenario::Steady, 10, 10)
    };
    assert!(sim::run(&cfg, false).is_err_and(|m| m.contains("--loss")));
}

#[test]
fn hierarchy_keeps_its_invariants() {
    let cfg = RunConfig {
        regions: 3,
        hierarchy: true,
        ..small(Scenario::Steady, 150, 30)
    };
    let r = sim::run(&cfg, false).expect("valid configuration");
    let inv = &r.invariants;
    assert!(r.tiers.len() >= 2, "{:?}", r.tiers);
    assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
    assert_eq!(inv.incomplete_viewers, 0, "{inv:?}");
    assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
    assert_eq!(inv.cycles, 0, "{inv:?}");
    assert_eq!(inv.coordinator, None);
}

#[test]
fn unreachable_pairs_are_placed_around() {
    // Random pairs the DCM learns of only when their data channel fails.
    let cfg = RunConfig {
        unreachable_pct: Some(20.0),
        nat_model: sim::net::NatModel::Pairs,
        ..small(Scenario::Steady, 100, 40)
    };
    let r = sim::run(&cfg, false).expect("valid configuration");
    let inv = &r.invariants;
    assert!(r.link_failures > 0, "{}", r.table());
    assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
    assert_eq!(inv.incomplete_viewers, 0, "{inv:?}");
    assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
    assert_eq!(inv.cycles, 0, "{inv:?}");
    assert_eq!(inv.coordinator, None);
    assert!(r.continuity >= 0.999, "{}", r.table());
}

#[test]
fn nat_classes_reported_at_join_leave_no_link_to_fail() {
    // The same share of unreachable pairs, from NAT classes the peers report at join: the DCM
    // never links a pair that cannot connect, flat or in a hierarchy.
    for hierarchy in [false, true] {
        let cfg = RunConfig {
            unreachable_pct: Some(20.0),
            nat_model: sim::net::NatModel::Classes,
            regions: if hierarchy { 3 } else { 1 },
            hierarchy,
            ..small(Scenario::Steady, 150, 40)
        };
        let r = sim::run(&cfg, false).expect("valid configuration");
        let inv = &r.invariants;
        assert_eq!(r.link_failures, 0, "hierarchy {hierarchy}: {}", r.table());
        assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
        assert_eq!(inv.incomplete_viewers, 0, "{inv:?}");
        assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
        assert_eq!(inv.cycles, 0, "{inv:?}");
        assert_eq!(inv.coordinator, None);
    }
}

#[test]
fn a_dcm_failover_is_taken_over_from_the_heartbeats_keeping_the_links() {
    for hierarchy in [false, true] {
        let cfg = RunConfig {
            hierarchy,
            regions: if hierarchy { 3 } else { 1 },
            ..small(Scenario::Failover, 120, 40)
        };
        let r = sim::run(&cfg, false).expect("valid configuration");
        let inv = &r.invariants;
        let f = r.failover.as_ref().expect("a failover report");
        println!("hierarchy {hierarchy}:\n{}", r.table());
        assert_eq!(f.resumed as usize, f.peers_at_failover, "{}", r.table());
        assert_eq!(f.recoveries, 1);
        assert!(f.links_reported > 0 && f.links_kept >= 0.9, "{}", r.table());
        assert_eq!(inv.mismatched_viewers, 0, "{inv:?}");
        assert_eq!(inv.wrong_parent_count, 0, "{inv:?}");
        assert_eq!(inv.cycles, 0, "{inv:?}");
        assert_eq!(inv.coordinator, None);
        assert!(r.continuity >= 0.99, "{}", r.table());
    }
}
