//! Rebuilding a hierarchy from what its peers report, for a DCM that takes a channel over after
//! its server failed (patent FIG. 7: the new owner rebuilds its state from the heartbeats).
//!
//! Each peer's heartbeat names its tier and cluster as its last instructions gave them
//! ([`protocol::Place`]) and its parent in each tree of its cluster. The rebuild keeps all of it
//! that is consistent:
//!
//! * **Tiers.** A peer stays in the tier it reports when it still qualifies: a preferred node
//!   must be a viewer (not a relay) that reaches most peers and has the mesh's upload (at most
//!   `per_region` per region, strongest first); a middle node must reach most peers and take the
//!   full stream. Everyone else, and everyone who reports no place, is left to the caller to
//!   place as a joiner.
//! * **Clusters** keep their logical ids (the ids of the DCMs managing them, which the peers
//!   know): a region's middle cluster takes the id its members report most; a bottom cluster the
//!   id its members report, in the region of the first peer that reports it.
//! * **The mesh** is a function of its members, so the same preferred nodes give the same mesh.
//! * **Feeds between tiers.** A middle node feeds the bottom clusters whose roots name it as
//!   their parent: all its root feeds go to the cluster where it fed the most roots, after the
//!   others got as many as it fed there. The dealing of feeds over the trees then gives each
//!   feeder the quotas it had, so each root keeps its feeder.
//! * **Trees.** Each cluster's trees are restored link by link ([`Cluster::restore`]).
//!
//! A bottom cluster that lost feeders takes idle middle nodes, as after a departure. Nothing else
//! is re-balanced: the next joins and leaves do that as they always do.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{PeerId, Source};

use super::{Hierarchy, Tier};
use crate::topology::cluster::{Cluster, ClusterId};
use crate::topology::multitree::{Changes, ObservedPeer};
use crate::topology::region::Region;

/// One peer of a hierarchy as its heartbeat and its session describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedMember {
    pub peer: PeerId,
    pub region: Region,
    /// Effective upload, kbit/s.
    pub upload_kbps: u32,
    /// A recruited relay (claims 19, 43): never a preferred node.
    pub relay: bool,
    /// The tier and cluster its last instructions gave it.
    pub tier: Tier,
    pub cluster: Option<ClusterId>,
    /// (tree, where the peer receives it from) in its own cluster.
    pub parents: Vec<(u32, Source)>,
}

impl Hierarchy {
    /// Rebuilds an empty hierarchy from `observed` (see the module documentation) and returns
    /// the peers it did not place, ascending: the caller places them as joiners. Region
    /// settings and the peers' classes ([`Hierarchy::set_connectivity`]) must be set first. A
    /// hierarchy that is not empty is left as it is and every peer is returned.
    pub fn restore(&mut self, observed: &[ObservedMember]) -> Vec<PeerId> {
        let mut latest: BTreeMap<PeerId, &ObservedMember> = BTreeMap::new();
        for o in observed {
            latest.insert(o.peer, o);
        }
        if !self.peers.is_empty() {
            return latest.into_keys().collect();
        }
        // Fresh ids never collide with the reported ones.
        if let Some(max) = latest.values().filter_map(|o| o.cluster).map(|c| c.0).max() {
            self.next_cluster = self.next_cluster.max(max.saturating_add(1));
        }
        let mut unplaced = Vec::new();
        let mut per_region: BTreeMap<Region, Vec<&ObservedMember>> = BTreeMap::new();
        for o in latest.values() {
            per_region.entry(o.region).or_default().push(o);
        }
        let mut taken: BTreeSet<ClusterId> = BTreeSet::new();
        for (region, list) in &per_region {
            self.restore_region(*region, list, &mut taken, &mut unplaced);
        }
        let members = |c: &Cluster| -> Vec<ObservedPeer> {
            c.members()
                .filter_map(|(p, _)| latest.get(&p))
                .map(|o| ObservedPeer {
                    peer: o.peer,
                    upload_kbps: o.upload_kbps,
                    parents: o.parents.clone(),
                })
                .collect()
        };
        // Middle trees first: a middle node's root feeds are what its own tree leaves it.
        let middles: Vec<ClusterId> = self.regions.values().map(|r| r.middle).collect();
        for cid in &middles {
            self.restore_cluster(*cid, &members);
        }
        self.restore_feeds(&latest);
        let bottoms: Vec<ClusterId> = self
            .regions
            .values()
            .flat_map(|r| r.bottom.iter().copied())
            .collect();
        let mut aff = Changes::default();
        for cid in &bottoms {
            self.refresh_bottom_feeders(*cid, &mut aff);
            self.restore_cluster(*cid, &members);
        }
        // Clusters whose feeders did not come back take idle middle nodes, as after a leave.
        for cid in &bottoms {
            self.top_up_feeders(*cid, &mut aff);
        }
        let regions: Vec<Region> = self.regions.keys().copied().collect();
        for r in regions {
            self.drop_region_if_empty(r, &mut aff);
        }
        unplaced.sort_unstable();
        unplaced
    }

    /// Tiers and cluster membership of one region's peers (trees come later).
    fn restore_region(
        &mut self,
        region: Region,
        list: &[&ObservedMember],
        taken: &mut BTreeSet<ClusterId>,
        unplaced: &mut Vec<PeerId>,
    ) {
        self.ensure_region(region);
        // The middle cluster takes the id its members report most (ties: the lowest).
        let mut votes: BTreeMap<ClusterId, usize> = BTreeMap::new();
        for o in list.iter().filter(|o| o.tier == Tier::Middle) {
            if let Some(c) = o.cluster {
                *votes.entry(c).or_default() += 1;
            }
        }
        let wanted = votes
            .iter()
            .filter(|(c, _)| !taken.contains(c))
            .max_by_key(|(c, n)| (**n, std::cmp::Reverse(**c)))
            .map(|(c, _)| *c);
        let mid = self.rekey_middle(region, wanted);
        taken.insert(mid);

        let min_pref = self.cfg.mesh.min_upload_kbps();
        let mut preferred: Vec<&ObservedMember> = list
            .iter()
            .copied()
            .filter(|o| o.tier == Tier::Preferred)
            .collect();
        preferred.sort_by_key(|o| (std::cmp::Reverse(o.upload_kbps), o.peer));
        let mut count = 0;
        let mut aff = Changes::default();
        for o in preferred {
            if o.relay
                || self.limited(o.peer)
                || o.upload_kbps < min_pref
                || count >= self.cfg.mesh.per_region
            {
                unplaced.push(o.peer);
                continue;
            }
            self.insert_restored(o, Tier::Preferred, None);
            self.add_preferred(o.peer, region, &mut aff);
            count += 1;
        }

        let mut bottom: BTreeMap<ClusterId, Vec<&ObservedMember>> = BTreeMap::new();
        for o in list {
            match o.tier {
                Tier::Preferred => {}
                Tier::Middle => {
                    let fits = o.cluster == Some(mid)
                        && !self.limited(o.peer)
                        && o.upload_kbps >= self.cfg.stream_kbps;
                    if fits {
                        self.insert_restored(o, Tier::Middle, None);
                        self.add_to_cluster(mid, o);
                    } else {
                        unplaced.push(o.peer);
                    }
                }
                Tier::Bottom => match o.cluster.filter(|c| !taken.contains(c)) {
                    Some(c) => bottom.entry(c).or_default().push(o),
                    None => unplaced.push(o.peer),
                },
            }
        }
        for (cid, members) in bottom {
            taken.insert(cid);
            self.bottom_cluster_with_id(region, cid);
            for o in members {
                self.insert_restored(o, Tier::Bottom, Some(cid));
                self.add_to_cluster(cid, o);
            }
        }
    }

    /// Gives the region's (empty) middle cluster the id `wanted`, if any; returns its id.
    fn rekey_middle(&mut self, region: Region, wanted: Option<ClusterId>) -> ClusterId {
        let Some(rs) = self.regions.get_mut(&region) else {
            return ClusterId(0);
        };
        let old = rs.middle;
        let Some(id) = wanted.filter(|id| *id != old && !self.clusters.contains_key(id)) else {
            return old;
        };
        rs.middle = id;
        if let Some(mut c) = self.clusters.remove(&old) {
            c.id = id;
            self.clusters.insert(id, c);
        }
        id
    }

    fn insert_restored(&mut self, o: &ObservedMember, tier: Tier, cluster: Option<ClusterId>) {
        self.insert_peer(o.peer, o.region, o.upload_kbps, tier);
        if let Some(info) = self.peers.get_mut(&o.peer) {
            info.relay = o.relay;
            info.cluster = cluster;
        }
    }

    /// Records a member (its upload and class) without placing it in the trees yet.
    fn add_to_cluster(&mut self, cid: ClusterId, o: &ObservedMember) {
        let nat = self.nat.get(&o.peer).copied();
        if let Some(c) = self.clusters.get_mut(&cid) {
            c.set_connectivity(o.peer, nat);
            c.reserve_member(o.peer, o.upload_kbps);
        }
    }

    fn restore_cluster(
        &mut self,
        cid: ClusterId,
        members: &impl Fn(&Cluster) -> Vec<ObservedPeer>,
    ) {
        let Some(c) = self.clusters.get(&cid) else {
            return;
        };
        let observed = members(c);
        if let Some(c) = self.clusters.get_mut(&cid) {
            c.restore(&observed);
        }
    }

    /// Which middle node feeds which bottom cluster, from the parents the bottom roots name.
    fn restore_feeds(&mut self, latest: &BTreeMap<PeerId, &ObservedMember>) {
        // Per middle node: the bottom clusters whose roots name it, with how many roots.
        let mut fed: BTreeMap<PeerId, BTreeMap<ClusterId, u32>> = BTreeMap::new();
        for (p, info) in &self.peers {
            let (Tier::Bottom, Some(cid)) = (info.tier, info.cluster) else {
                continue;
            };
            let Some(o) = latest.get(p) else { continue };
            for (_, src) in &o.parents {
                let Source::Peer { id } = src else { continue };
                if self.peers.get(id).is_some_and(|i| i.tier == Tier::Middle) {
                    *fed.entry(*id).or_default().entry(cid).or_default() += 1;
                }
            }
        }
        for (m, clusters) in fed {
            let mut order: Vec<(u32, ClusterId)> =
                clusters.into_iter().map(|(c, n)| (n, c)).collect();
            order.sort_by_key(|(n, c)| (std::cmp::Reverse(*n), *c));
            let Some(&(_, main)) = order.first() else {
                continue;
            };
            for &(n, c) in &order[1..] {
                let Some(info) = self.peers.get(&m) else {
                    break;
                };
                let allotted: u32 = info.feeds.iter().map(|f| f.1).sum();
                // Keep at least one feed for the main cluster.
                let give = n.min(
                    self.middle_slots(m, info)
                        .saturating_sub(allotted)
                        .saturating_sub(1),
                );
                if give > 0 {
                    self.allot_feeder(m, c, give);
                }
            }
            self.assign_feeder(m, main);
        }
        // Middle nodes that feed nothing are idle.
        let idle: Vec<(Region, PeerId)> = self
            .peers
            .iter()
            .filter(|(_, i)| i.tier == Tier::Middle && i.feeds.is_empty())
            .map(|(p, i)| (i.region, *p))
            .collect();
        for (r, p) in idle {
            if let Some(rs) = self.regions.get_mut(&r) {
                rs.idle_middle.insert(p);
            }
        }
    }

    /// Gives a bottom cluster with fewer than `feeders_per_cluster` feeders idle middle nodes
    /// of its region.
    fn top_up_feeders(&mut self, cid: ClusterId, aff: &mut Changes) {
        let Some(region) = self.region_of_cluster(cid) else {
            return;
        };
        let mut added = false;
        while let Some(m) = self.regions.get(&region).and_then(|rs| {
            let have = rs.feeders.get(&cid).map_or(0, BTreeSet::len);
            (have < self.cfg.feeders_per_cluster)
                .then(|| rs.idle_middle.first().copied())
                .flatten()
        }) {
            self.assign_feeder(m, cid);
            added = true;
        }
        if added {
            self.refresh_bottom_feeders(cid, aff);
        }
    }
}
