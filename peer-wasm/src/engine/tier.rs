//! The peer's place in the three-tier hierarchy, as state the engine consults per packet:
//! flooding neighbours (top tier), the group assembler of a coded cluster (middle tier), and the
//! root feeds this peer sends into other clusters, with the parity it codes for them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use protocol::fec::{
    encode_parity_frames, Fec, FecError, FecParams, GroupAssembler, Recovered, DEFAULT_GROUP_WINDOW,
};
use protocol::{Feed, Packet, PeerId, Source, TierName, TierPlan};

/// Packets kept by sequence number for coding parity (a group must be complete to be coded).
/// Generous against reordering: groups are at most 32 packets.
const STORE_LEN: usize = 512;
/// Groups remembered as already coded / parity frames remembered as already relayed.
const SEEN_GROUPS: usize = 256;

/// The coded tier of this peer's own cluster.
pub(super) struct Coded {
    pub params: FecParams,
    pub assembler: GroupAssembler,
}

impl Coded {
    /// Sequence number of the last packet of `seq`'s group.
    pub fn group_end(&self, seq: u64) -> u64 {
        let k = u64::from(self.params.k());
        (seq / k).saturating_mul(k).saturating_add(k - 1)
    }
}

#[derive(Default)]
pub(super) struct Tiers {
    pub plan: Option<TierPlan>,
    /// Flooding neighbours that are peers (the origin, if in the mesh, pushes on the socket).
    pub mesh: Vec<PeerId>,
    pub feeds: Vec<Feed>,
    pub coded: Option<Coded>,
    /// One coder per `(k, n)` this peer produces parity for: building the matrix costs.
    coders: HashMap<(u32, u32), Fec>,
    /// Recent packets by seq, only kept while some feed wants parity.
    store: BTreeMap<u64, Rc<Vec<u8>>>,
    /// `(k, n, group)` already coded, so each group is coded once however its packets came.
    coded_groups: BTreeSet<(u32, u32, u64)>,
    /// `(group, shard index)` of parity frames already relayed.
    parity_seen: BTreeSet<(u64, u8)>,
}

impl Tiers {
    /// Applies a new plan; keeps the assembler when the cluster's code did not change.
    /// `k` is the Welcome's substream count. Returns why a coded plan could not be used.
    pub fn apply(&mut self, plan: Option<TierPlan>, k: u32) -> Result<(), FecError> {
        self.mesh = plan
            .iter()
            .flat_map(|t| t.mesh.iter())
            .filter_map(|s| match s {
                Source::Peer { id } => Some(*id),
                Source::Origin => None,
            })
            .collect();
        self.feeds = plan.as_ref().map(|t| t.feeds.clone()).unwrap_or_default();
        let mut result = Ok(());
        let spec = plan.as_ref().and_then(|t| t.fec);
        match spec {
            None => self.coded = None,
            Some(s)
                if self.coded.as_ref().map(|c| (c.params.k(), c.params.n()))
                    == Some((s.k, s.n)) => {}
            Some(s) => {
                // The coded trees split the stream like the plain ones: data tree i carries
                // seq mod k = i. A plan disagreeing with the Welcome cannot be followed.
                let built = if s.k == k {
                    FecParams::new(s.k, s.n).and_then(|params| {
                        Ok(Coded {
                            params,
                            assembler: GroupAssembler::new(params, DEFAULT_GROUP_WINDOW)?,
                        })
                    })
                } else {
                    Err(FecError::Inconsistent(
                        "coded tier's k differs from the Welcome's substreams",
                    ))
                };
                match built {
                    Ok(c) => self.coded = Some(c),
                    Err(e) => {
                        self.coded = None;
                        result = Err(e);
                    }
                }
            }
        }
        if !self.wants_parity() {
            self.store.clear();
        }
        self.plan = plan;
        result
    }

    pub fn tier_name(&self) -> Option<TierName> {
        self.plan.as_ref().map(|t| t.tier)
    }

    pub fn plays(&self) -> bool {
        self.plan.as_ref().is_none_or(|t| t.plays)
    }

    /// Number of trees of the peer's own cluster: `k`, or `k + n` when coded.
    pub fn trees(&self, k: u32) -> u32 {
        self.coded.as_ref().map_or(k, |c| c.params.total())
    }

    /// Peers this plan links us with outside the cluster's trees.
    pub fn neighbours(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.mesh
            .iter()
            .copied()
            .chain(self.feeds.iter().map(|f| f.to))
    }

    fn wants_parity(&self) -> bool {
        self.feeds.iter().any(is_parity_feed)
    }

    /// Feeds that get packet `seq` as is: `(to, substream)`.
    pub fn data_feeds(&self, seq: u64, k: u32) -> Vec<(PeerId, u32)> {
        self.feeds
            .iter()
            .filter(|f| gets_as_is(f, seq, k))
            .map(|f| (f.to, f.substream))
            .collect()
    }

    /// Whether some feed gets packet `seq` as is (`data_feeds` without building the list).
    pub fn feeds_packet(&self, seq: u64, k: u32) -> bool {
        self.feeds.iter().any(|f| gets_as_is(f, seq, k))
    }

    /// A packet was seen for the first time. When it completes a group some feed wants parity
    /// of, codes the group (once) and returns the frames to send: `(to, shard index, frame)`.
    pub fn parity_for(
        &mut self,
        seq: u64,
        packet: &Rc<Vec<u8>>,
    ) -> Vec<(PeerId, u32, Rc<Vec<u8>>)> {
        if !self.wants_parity() {
            return Vec::new();
        }
        self.store.insert(seq, packet.clone());
        while self.store.len() > STORE_LEN {
            self.store.pop_first();
        }
        let codes: BTreeSet<(u32, u32)> = self
            .feeds
            .iter()
            .filter(|f| is_parity_feed(f))
            .filter_map(|f| f.fec.map(|s| (s.k, s.n)))
            .collect();
        let mut out = Vec::new();
        for (k, n) in codes {
            let Ok(params) = FecParams::new(k, n) else {
                continue;
            };
            let (group, _) = params.group_of(seq);
            if self.coded_groups.contains(&(k, n, group)) {
                continue;
            }
            let first = params.first_seq(group);
            let packets: Option<Vec<&Rc<Vec<u8>>>> = (first..first + u64::from(k))
                .map(|s| self.store.get(&s))
                .collect();
            let Some(packets) = packets else {
                continue;
            };
            let slices: Vec<&[u8]> = packets.iter().map(|p| p.as_slice()).collect();
            let created_ms = slices
                .iter()
                .filter_map(|p| Packet::decode(p).ok())
                .map(|p| p.header.created_ms)
                .max()
                .unwrap_or(0);
            let fec = match self.coders.entry((k, n)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => match Fec::new(params) {
                    Ok(f) => e.insert(f),
                    Err(_) => continue,
                },
            };
            let Ok(frames) = encode_parity_frames(fec, group, created_ms, &slices) else {
                continue;
            };
            self.coded_groups.insert((k, n, group));
            while self.coded_groups.len() > SEEN_GROUPS {
                self.coded_groups.pop_first();
            }
            let frames: Vec<Rc<Vec<u8>>> = frames.into_iter().map(Rc::new).collect();
            for f in &self.feeds {
                if f.fec.map(|s| (s.k, s.n)) != Some((k, n)) || f.substream < k {
                    continue;
                }
                if let Some(frame) = frames.get((f.substream - k) as usize) {
                    out.push((f.to, f.substream, frame.clone()));
                }
            }
        }
        out
    }

    /// True the first time parity shard `index` of `group` shows up.
    pub fn first_parity_sight(&mut self, group: u64, index: u8) -> bool {
        if !self.parity_seen.insert((group, index)) {
            return false;
        }
        while self.parity_seen.len() > SEEN_GROUPS * 4 {
            self.parity_seen.pop_first();
        }
        true
    }

    /// Feeds a first-seen data packet to the assembler of a coded cluster.
    pub fn assemble_packet(&mut self, seq: u64, packet: &[u8]) -> Result<Vec<Recovered>, FecError> {
        match self.coded.as_mut() {
            Some(c) => c.assembler.add_packet(seq, packet),
            None => Ok(Vec::new()),
        }
    }
}

fn is_parity_feed(f: &Feed) -> bool {
    f.fec.is_some_and(|s| f.substream >= s.k)
}

/// Whether feed `f` gets packet `seq` as is: a data substream of it (the cluster's own `k`
/// when coded), that `seq` belongs to.
fn gets_as_is(f: &Feed, seq: u64, k: u32) -> bool {
    let kf = f.fec.map_or(k, |s| s.k).max(1);
    f.substream < kf && protocol::substream_of(seq, kf) == f.substream
}
