//! The origin's push decisions: which of the origin's new packets (and parity frames) go to which
//! peer's control socket, and the live-edge notices that tell peers how far the stream is.

use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use protocol::{PeerId, ServerMsg};

use super::planner::Push;
use super::{Background, Dcm, OutMsg, Output, EDGE_ALL_EVERY};

/// Packets a tree of the origin's resend window holds: a move between servers takes tens of
/// milliseconds, a few packets of a tree at most even for short fragments.
const RESEND_WINDOW_PER_TREE: usize = 8;

/// What the origin side of a DCM remembers between packets.
pub(super) struct OriginPush {
    k: u32,
    /// The newest packet of each substream (to prime new tree roots and bridges at once).
    newest: Vec<Option<(u64, Bytes)>>,
    /// The newest packets, to code parity shards for coded roots the origin feeds itself.
    recent: VecDeque<(u64, Bytes)>,
    /// The last [`RESEND_WINDOW_PER_TREE`] packets of each substream (in seq order, shared
    /// bytes): what a DCM that takes a channel over resends to the roots it starts feeding,
    /// past the seq each reports, so the packets cut while they moved servers are not fetched.
    resend: VecDeque<(u64, Bytes)>,
    /// One Reed-Solomon coder per parity count in use.
    fecs: FxHashMap<u32, protocol::fec::Fec>,
}

impl OriginPush {
    pub(super) fn new(k: u32) -> Self {
        OriginPush {
            k,
            newest: vec![None; k as usize],
            recent: VecDeque::new(),
            resend: VecDeque::new(),
            fecs: FxHashMap::default(),
        }
    }

    /// The packets of substream `sub` after `after` that the origin still holds, oldest first;
    /// with no `after`, the newest one only.
    pub(super) fn since(&self, sub: u32, after: Option<u64>) -> Vec<Bytes> {
        let Some(after) = after else {
            return self.newest_of(sub).into_iter().collect();
        };
        self.resend
            .iter()
            .filter(|(seq, _)| *seq > after && protocol::substream_of(*seq, self.k) == sub)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// The newest packet the origin has of substream `sub`.
    pub(super) fn newest_of(&self, sub: u32) -> Option<Bytes> {
        self.newest
            .get(sub as usize)?
            .as_ref()
            .map(|(_, b)| b.clone())
    }

    fn record(&mut self, seq: u64, bytes: &Bytes) {
        let sub = protocol::substream_of(seq, self.k) as usize;
        if let Some(slot) = self.newest.get_mut(sub) {
            if slot.as_ref().is_none_or(|(s, _)| *s <= seq) {
                *slot = Some((seq, bytes.clone()));
            }
        }
        if self.resend.back().is_none_or(|(s, _)| *s < seq) {
            self.resend.push_back((seq, bytes.clone()));
            while self.resend.len() > RESEND_WINDOW_PER_TREE * self.k as usize {
                self.resend.pop_front();
            }
        }
    }

    /// Parity frames (per parity count in `wanted`) of the group `seq` completes, for coded
    /// roots the origin feeds itself; empty when no such root exists or the group is not
    /// complete.
    fn parity_completed_by(
        &mut self,
        wanted: &BTreeSet<u32>,
        seq: u64,
        bytes: &Bytes,
    ) -> FxHashMap<u32, Vec<Bytes>> {
        let k = u64::from(self.k);
        let mut out = FxHashMap::default();
        if wanted.is_empty() {
            self.recent.clear();
            return out;
        }
        self.recent.push_back((seq, bytes.clone()));
        while self.recent.len() > 2 * k as usize {
            self.recent.pop_front();
        }
        if seq % k != k - 1 {
            return out;
        }
        let first = seq + 1 - k;
        let group: Vec<&[u8]> = (first..=seq)
            .filter_map(|s| self.recent.iter().find(|(q, _)| *q == s))
            .map(|(_, b)| b.as_ref())
            .collect();
        if group.len() != k as usize {
            return out;
        }
        let created = protocol::Packet::decode(bytes).map_or(0, |p| p.header.created_ms);
        for &n in wanted {
            let fec = match self.fecs.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match protocol::fec::FecParams::new(self.k, n).and_then(protocol::fec::Fec::new)
                    {
                        Ok(f) => e.insert(f),
                        Err(err) => {
                            tracing::warn!(n, "cannot code parity: {err}");
                            continue;
                        }
                    }
                }
            };
            match protocol::fec::encode_parity_frames(fec, seq / k, created, &group) {
                Ok(frames) => {
                    out.insert(n, frames.into_iter().map(Bytes::from).collect());
                }
                Err(err) => tracing::warn!(n, "cannot code parity: {err}"),
            }
        }
        out
    }
}

impl Dcm {
    /// The origin's signed manifest of the packets about to come: to every peer (a slice at a
    /// time, as live-edge notices), and kept for joiners.
    pub(super) fn broadcast_manifest(&mut self, frame: Bytes) {
        self.manifests.push_back(frame.clone());
        while self.manifests.len() > super::JOIN_MANIFESTS {
            self.manifests.pop_front();
        }
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        let small = ids.len() <= super::BACKGROUND_SLICE;
        let job = Background::Edge {
            msg: OutMsg::Packet(frame),
            ids,
            next: 0,
        };
        if small {
            // All of it now, before the packets it covers, which the origin pushes next: a peer
            // fed by a root then has the manifest when the packets reach it and checks them at
            // once. A larger channel gets it a slice at a time, as live-edge notices; its trees
            // are deeper, and the packets take longer to reach the peers that need it.
            self.background.push_front(job);
            self.background_slice(super::BACKGROUND_SLICE);
        } else {
            self.background.push_back(job);
        }
    }

    /// A joiner's backlog of manifests, queued before its first instructions.
    pub(super) fn send_manifests_to(&mut self, peer: PeerId) {
        for i in 0..self.manifests.len() {
            let frame = self.manifests[i].clone();
            self.stats.manifests_sent += 1;
            self.outputs.push_back(Output::Send {
                peer,
                msg: OutMsg::Packet(frame),
            });
        }
    }

    /// New packets from the origin: a live-edge notice (in turns, see `edge_every`), then each
    /// packet pushed to the peers the origin feeds and to those it bridges.
    pub(super) fn push_from_origin(&mut self, packets: Vec<(u64, Bytes)>) {
        let mut made = Vec::with_capacity(packets.len());
        for (seq, bytes) in &packets {
            if let Ok(p) = protocol::Packet::decode(bytes) {
                made.push((*seq, p.header.created_ms));
            }
            self.origin.record(*seq, bytes);
        }
        self.production.record_batch(&made);
        // On a signed channel the manifest sent to everyone before these packets was the notice.
        let signed = !self.manifests.is_empty();
        if let Some(edge) = packets.last().map(|p| p.0).filter(|_| !signed) {
            // Serialized once: with tens of thousands of peers this notice dominates otherwise.
            if let Ok(text) = serde_json::to_string(&ServerMsg::LiveEdge { seq: edge }) {
                let text: Arc<str> = Arc::from(text);
                // The fed peers take turns, a quarter per notice, so that no notice goes to
                // everyone at once and holds up the heartbeats queued behind it.
                let turn = self.edges % EDGE_ALL_EVERY;
                self.edges += 1;
                let everyone = self.recovering();
                let mut ids: Vec<PeerId> = self
                    .peers
                    .keys()
                    .filter(|p| {
                        everyone || p.0 % EDGE_ALL_EVERY == turn || self.edge_every.contains(p)
                    })
                    .copied()
                    .collect();
                // Deterministic order, whatever the map's.
                ids.sort_unstable();
                self.background.push_back(Background::Edge {
                    msg: OutMsg::Text(text),
                    ids,
                    next: 0,
                });
            }
        }
        let k = self.k;
        let wanted: BTreeSet<u32> = self
            .origin_fed
            .values()
            .flatten()
            .filter_map(|p| match p {
                Push::Parity { n, .. } => Some(*n),
                _ => None,
            })
            .collect();
        let mut fed: Vec<(&PeerId, &Vec<Push>)> = self.origin_fed.iter().collect();
        fed.sort_unstable_by_key(|f| *f.0);
        let mut pushed = 0u64;
        let mut bridged = 0u64;
        for (seq, bytes) in packets {
            let sub = protocol::substream_of(seq, k);
            let parity = self.origin.parity_completed_by(&wanted, seq, &bytes);
            for (peer, pushes) in &fed {
                if !self.peers.contains_key(peer) {
                    continue;
                }
                for push in pushes.iter() {
                    let frame = match *push {
                        Push::Full => Some(&bytes),
                        Push::Data { substream } if substream == sub => Some(&bytes),
                        Push::Data { .. } => None,
                        Push::Parity { index, n } => parity
                            .get(&n)
                            .and_then(|frames| frames.get(index.saturating_sub(k) as usize)),
                    };
                    let Some(frame) = frame else {
                        continue;
                    };
                    pushed += frame.len() as u64;
                    self.outputs.push_back(Output::Send {
                        peer: **peer,
                        msg: OutMsg::Packet(frame.clone()),
                    });
                }
            }
            if self.bridges.is_empty() {
                continue;
            }
            for (peer, bridges) in self.bridges.iter() {
                if !bridges.iter().any(|b| b.substream == sub) || !self.peers.contains_key(peer) {
                    continue;
                }
                bridged += bytes.len() as u64;
                self.outputs.push_back(Output::Send {
                    peer: *peer,
                    msg: OutMsg::Packet(bytes.clone()),
                });
            }
        }
        self.stats.origin_push_bytes += pushed + bridged;
        self.stats.origin_bridge_bytes += bridged;
    }
}
