//! TEMPORARY: a minimal flat multi-tree placer standing in for the real coordinator core
//! (`coordinator::Dcm`) until that crate lands, only so the harness can be exercised end to end.
//! It is not the system under test and its figures mean nothing: no heartbeats are read, no
//! congestion is detected, no bridges, no hierarchy. Delete it when `coordinator/READY` exists.
//!
//! Placement: each peer is interior in one tree (the one with the least capacity so far) with
//! `declared / (stream / k)` slots (at most `max_fanout`), and a leaf in the others. A node goes
//! under the oldest node of the tree with a free slot, or under the origin. On a departure the
//! orphans (with their subtrees) are placed again the same way, never under their own subtree.

use std::collections::VecDeque;

use protocol::{PeerId, ServerMsg, Source, SubstreamPlan};
use rustc_hash::{FxHashMap, FxHashSet};

struct Node {
    slots: u32,
    interior: u32,
    /// Per tree: parent (`None`: the origin) and children.
    parent: Vec<Option<PeerId>>,
    children: Vec<Vec<PeerId>>,
}

pub struct Placeholder {
    k: u32,
    unit_kbps: u32,
    max_fanout: u32,
    nodes: FxHashMap<PeerId, Node>,
    /// Per tree: interior nodes in joining order (candidates for parents).
    interior: Vec<VecDeque<PeerId>>,
    capacity: Vec<u64>,
    pub origin_children: Vec<Vec<PeerId>>,
    dirty: FxHashSet<PeerId>,
    epoch: u64,
}

impl Placeholder {
    pub fn new(k: u32, stream_kbps: u32, max_fanout: u32) -> Self {
        let k = k.max(1);
        Placeholder {
            k,
            unit_kbps: (stream_kbps / k).max(1),
            max_fanout,
            nodes: FxHashMap::default(),
            interior: vec![VecDeque::new(); k as usize],
            capacity: vec![0; k as usize],
            origin_children: vec![Vec::new(); k as usize],
            dirty: FxHashSet::default(),
            epoch: 0,
        }
    }

    pub fn join(&mut self, peer: PeerId, upload_kbps: u32) {
        let slots = (upload_kbps / self.unit_kbps).min(self.max_fanout);
        let interior = (0..self.k)
            .min_by_key(|t| self.capacity[*t as usize])
            .unwrap_or(0);
        self.capacity[interior as usize] += u64::from(slots);
        self.nodes.insert(
            peer,
            Node {
                slots,
                interior,
                parent: vec![None; self.k as usize],
                children: vec![Vec::new(); self.k as usize],
            },
        );
        if slots > 0 {
            self.interior[interior as usize].push_back(peer);
        }
        for t in 0..self.k {
            self.place(peer, t);
        }
    }

    pub fn leave(&mut self, peer: PeerId) {
        let Some(node) = self.nodes.remove(&peer) else {
            return;
        };
        self.capacity[node.interior as usize] -= u64::from(node.slots);
        self.interior[node.interior as usize].retain(|p| *p != peer);
        self.dirty.remove(&peer);
        for t in 0..self.k as usize {
            match node.parent[t] {
                Some(p) => {
                    if let Some(n) = self.nodes.get_mut(&p) {
                        n.children[t].retain(|c| *c != peer);
                        self.dirty.insert(p);
                    }
                }
                None => self.origin_children[t].retain(|c| *c != peer),
            }
            for orphan in &node.children[t] {
                self.place(*orphan, t as u32);
            }
        }
    }

    /// Whether `anc` is `p` or one of its ancestors in tree `t`.
    fn is_ancestor(&self, anc: PeerId, mut p: PeerId, t: usize) -> bool {
        for _ in 0..10_000 {
            if p == anc {
                return true;
            }
            match self.nodes.get(&p).and_then(|n| n.parent[t]) {
                Some(q) => p = q,
                None => return false,
            }
        }
        true
    }

    fn place(&mut self, peer: PeerId, t: u32) {
        let ti = t as usize;
        let parent = self.interior[ti].iter().copied().find(|c| {
            *c != peer
                && self
                    .nodes
                    .get(c)
                    .is_some_and(|n| (n.children[ti].len() as u32) < n.slots)
                && !self.is_ancestor(peer, *c, ti)
        });
        match parent {
            Some(p) => {
                if let Some(n) = self.nodes.get_mut(&p) {
                    n.children[ti].push(peer);
                }
                self.dirty.insert(p);
            }
            None => self.origin_children[ti].push(peer),
        }
        if let Some(n) = self.nodes.get_mut(&peer) {
            n.parent[ti] = parent;
        }
        self.dirty.insert(peer);
    }

    pub fn plan(&self, peer: PeerId) -> Option<Vec<SubstreamPlan>> {
        let n = self.nodes.get(&peer)?;
        Some(
            (0..self.k as usize)
                .map(|t| SubstreamPlan {
                    index: t as u32,
                    parent: n.parent[t].map_or(Source::Origin, |id| Source::Peer { id }),
                    children: n.children[t].clone(),
                })
                .collect(),
        )
    }

    pub fn interior_of(&self, peer: PeerId) -> Option<u32> {
        self.nodes.get(&peer).map(|n| n.interior)
    }

    /// Instructions for every peer whose plan changed since the last call.
    pub fn take_instructions(&mut self) -> Vec<(PeerId, ServerMsg)> {
        let mut dirty: Vec<PeerId> = self.dirty.drain().collect();
        dirty.sort();
        let mut out = Vec::with_capacity(dirty.len());
        for p in dirty {
            if let Some(plan) = self.plan(p) {
                self.epoch += 1;
                out.push((
                    p,
                    ServerMsg::Instructions {
                        epoch: self.epoch,
                        substreams: plan,
                        tier: None,
                    },
                ));
            }
        }
        out
    }

    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.nodes.keys().copied()
    }
}
