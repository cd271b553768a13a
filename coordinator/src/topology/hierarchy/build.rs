//! The bulk build: a whole channel's hierarchy placed at once instead of peer by peer.
//!
//! 1. **Tiers, per region, strongest first** (the patent's greedy heuristic): the first
//!    `per_region` peers able to flood are preferred nodes; then every peer whose upload the
//!    bottom tier could not use (more units than `max_fanout`) and, among the rest above the
//!    stream rate, enough for `feeders_per_cluster` per bottom cluster, are middle nodes; all
//!    others are bottom nodes.
//! 2. **Bottom clusters** of about `(cluster_min + cluster_max) / 2` members, dealt in snake
//!    order by upload (1, 2, …, n, n, …, 2, 1, …) so every cluster gets the same mix; each
//!    cluster's trees are laid out in one pass ([`MultiTree::build`]: forwarders balanced over
//!    the trees, breadth first, leaves below).
//! 3. **Root feeds, matched across regions.** Each bottom cluster needs as many root feeds as its
//!    trees have roots ([`Cluster::root_feeds_needed`]); each middle node offers what its middle
//!    tree leaves it. Clusters take feeds from their own region's middle tier first, largest
//!    feeder first, splitting a strong node's feeds over several clusters. A cluster still short
//!    then **borrows from the region with the most spare middle-tier feeds** (cross-region
//!    borrowing: regions draw their capacity independently, so some lack what their neighbours
//!    have to spare; the borrowed links cross a region boundary, which the plans name like any
//!    other feeder link). Finally every cluster gets at least `feeders_per_cluster` distinct
//!    feeders where any are left, so one feeder's departure is not an outage.
//!
//! Cost: O(n log n + n·k) for the layout and O(clusters · (regions + middle nodes)) for the
//! matching; nothing is re-planned while peers arrive (100k peers: about 0.4 s in release on
//! the 2-core dev machine, see `docs/benchmarks.md`).
//!
//! [`Cluster::root_feeds_needed`]: crate::topology::cluster::Cluster::root_feeds_needed
//! [`MultiTree::build`]: crate::topology::MultiTree::build

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

use protocol::PeerId;

use super::super::cluster::{ClusterId, ClusterKind};
use super::super::mesh::History;
use super::super::multitree::Changes;
use super::super::region::Region;
use super::{Hierarchy, HierarchyConfig, PeerInfo, Tier};

/// Root feeds a middle node can still allot during the matching.
struct Offer {
    peer: PeerId,
    left: u32,
}

impl Hierarchy {
    /// Places many peers at once (see the module docs); a peer listed twice keeps its last entry.
    pub fn build(cfg: HierarchyConfig, peers: &[(PeerId, Region, u32, History)]) -> Self {
        let mut h = Hierarchy::new(cfg);
        let mut latest: FxHashMap<PeerId, (Region, u32)> =
            FxHashMap::with_capacity_and_hasher(peers.len(), Default::default());
        for (p, r, u, hist) in peers {
            latest.insert(*p, (*r, hist.effective_upload_kbps(*u)));
        }
        let mut per_region: BTreeMap<Region, Vec<(u32, PeerId)>> = BTreeMap::new();
        for (p, (r, u)) in latest {
            per_region.entry(r).or_default().push((u, p));
        }
        h.peers.reserve(peers.len());
        for (region, mut list) in per_region {
            list.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            h.build_region(region, list);
        }
        h.match_feeds();
        h
    }

    pub(super) fn insert_peer(&mut self, peer: PeerId, region: Region, upload: u32, tier: Tier) {
        self.peers.insert(
            peer,
            PeerInfo {
                region,
                upload,
                tier,
                feeds: Vec::new(),
                cluster: None,
                relay: false,
            },
        );
    }

    /// Tiers and clusters of one region; `list` is sorted strongest first.
    fn build_region(&mut self, region: Region, list: Vec<(u32, PeerId)>) {
        self.ensure_region(region);
        let mut aff = Changes::default();
        let min_pref = self.cfg.mesh.min_upload_kbps();
        let mut preferred = 0;
        let mut rest = Vec::with_capacity(list.len());
        for (u, p) in list {
            if preferred < self.cfg.mesh.per_region && u >= min_pref {
                self.insert_peer(p, region, u, Tier::Preferred);
                self.add_preferred(p, region, &mut aff);
                preferred += 1;
            } else {
                rest.push((u, p));
            }
        }
        let target = ((self.cfg.cluster_min + self.cfg.cluster_max) / 2).max(1);
        let wanted = self.cfg.feeders_per_cluster * rest.len().div_ceil(target).max(1);
        let (mut middle, mut bottom) = (Vec::new(), Vec::new());
        for (u, p) in rest {
            let strong = u >= self.cfg.stream_kbps
                && (self.units(u) > self.cfg.max_fanout || middle.len() < wanted);
            if strong {
                middle.push((u, p));
            } else {
                bottom.push((u, p));
            }
        }
        let Some(mid) = self.regions.get(&region).map(|r| r.middle) else {
            return;
        };
        for &(u, p) in &middle {
            self.insert_peer(p, region, u, Tier::Middle);
        }
        let members: Vec<(PeerId, u32)> = middle.iter().map(|(u, p)| (*p, *u)).collect();
        if let Some(c) = self.clusters.get_mut(&mid) {
            c.fill(&members);
        }
        if let Some(rs) = self.regions.get_mut(&region) {
            rs.idle_middle.extend(middle.iter().map(|m| m.1));
        }
        self.refresh_middle_feeders(region, &mut aff);

        let n = bottom.len().div_ceil(target);
        let ids: Vec<ClusterId> = (0..n).map(|_| self.empty_bottom_cluster(region)).collect();
        let mut members: Vec<Vec<(PeerId, u32)>> = vec![Vec::new(); n];
        for (i, (u, p)) in bottom.into_iter().enumerate() {
            let (round, pos) = (i / n, i % n);
            let j = if round % 2 == 0 { pos } else { n - 1 - pos };
            self.insert_peer(p, region, u, Tier::Bottom);
            if let Some(info) = self.peers.get_mut(&p) {
                info.cluster = Some(ids[j]);
            }
            members[j].push((p, u));
        }
        for (cid, m) in ids.iter().zip(&members) {
            if let Some(c) = self.clusters.get_mut(cid) {
                c.fill(m);
            }
        }
    }

    /// Matches the middle tier's root feeds to the bottom clusters' needs (module docs, step 3).
    fn match_feeds(&mut self) {
        // Offers per region, largest first.
        let mut offers: BTreeMap<Region, Vec<Offer>> = BTreeMap::new();
        for (region, rs) in &self.regions {
            let mut v: Vec<Offer> = rs
                .idle_middle
                .iter()
                .filter_map(|p| {
                    let info = self.peers.get(p)?;
                    Some(Offer {
                        peer: *p,
                        left: self.middle_slots(*p, info),
                    })
                })
                .collect();
            v.sort_unstable_by(|a, b| b.left.cmp(&a.left).then(a.peer.cmp(&b.peer)));
            offers.insert(*region, v);
        }
        // Needs, neediest first within each region.
        let mut needs: Vec<(Region, u32, ClusterId)> = self
            .clusters
            .values()
            .filter(|c| matches!(c.kind, ClusterKind::Bottom { .. }))
            .map(|c| (c.region, c.root_feeds_needed(), c.id))
            .collect();
        needs.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut left: Vec<u32> = needs.iter().map(|n| n.1).collect();

        // 1. Own region first.
        for (i, &(region, _, cid)) in needs.iter().enumerate() {
            if let Some(pool) = offers.get_mut(&region) {
                left[i] = self.take_feeds(pool, cid, left[i]);
            }
        }
        // 2. Borrow from the region with the most spare feeds.
        for (i, &(_, _, cid)) in needs.iter().enumerate() {
            while left[i] > 0 {
                let Some(pool) = offers
                    .values_mut()
                    .filter(|v| v.iter().any(|o| o.left > 0))
                    .max_by_key(|v| v.iter().map(|o| u64::from(o.left)).sum::<u64>())
                else {
                    break;
                };
                left[i] = self.take_feeds(pool, cid, left[i]);
            }
        }
        // 3. At least `feeders_per_cluster` distinct feeders, one root feed per tree each.
        let k = self.cfg.k;
        for &(region, _, cid) in &needs {
            let Some(pool) = offers.get_mut(&region) else {
                continue;
            };
            while self.feeder_count(cid) < self.cfg.feeders_per_cluster {
                let fed_by: Vec<PeerId> = self.feeder_set(cid);
                let Some(o) = pool
                    .iter_mut()
                    .find(|o| o.left > 0 && !fed_by.contains(&o.peer))
                else {
                    break;
                };
                let slots = o.left.min(k);
                o.left -= slots;
                let peer = o.peer;
                self.allot_feeder(peer, cid, slots);
            }
        }
        let mut aff = Changes::default();
        for (_, _, cid) in needs {
            self.refresh_bottom_feeders(cid, &mut aff);
        }
    }

    /// Allots up to `need` root feeds of `pool` (largest offers first) to `cid`; returns what is
    /// still needed.
    fn take_feeds(&mut self, pool: &mut [Offer], cid: ClusterId, mut need: u32) -> u32 {
        let mut i = 0;
        while need > 0 {
            // The pool is sorted largest first; skip exhausted offers.
            while i < pool.len() && pool[i].left == 0 {
                i += 1;
            }
            let Some(o) = pool.get_mut(i) else {
                break;
            };
            let slots = o.left.min(need);
            o.left -= slots;
            need -= slots;
            let peer = o.peer;
            self.allot_feeder(peer, cid, slots);
        }
        need
    }

    fn feeder_set(&self, cid: ClusterId) -> Vec<PeerId> {
        self.region_of_cluster(cid)
            .and_then(|r| self.regions.get(&r))
            .and_then(|r| r.feeders.get(&cid))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn feeder_count(&self, cid: ClusterId) -> usize {
        self.region_of_cluster(cid)
            .and_then(|r| self.regions.get(&r))
            .and_then(|r| r.feeders.get(&cid))
            .map_or(0, |s| s.len())
    }
}
