//! What the engine reports about itself: the FIG. 9 heartbeat (per tree: parent, last sequence
//! number and buffer; per child: last sequence number sent) and per-link timing for statistics.

use std::collections::BTreeSet;

use protocol::{ChildLink, Heartbeat, ParentLink};

use super::Engine;

impl Engine {
    /// Packets held per tree ahead of the playout point (FIG. 9 Buffersize S_i). A parity
    /// tree of a coded cluster reports the groups held ahead, its shards being one per group.
    pub fn buffered_per_substream(&self) -> Vec<u32> {
        let mut v = vec![0u32; self.trees() as usize];
        for seq in self.held.keys() {
            if let Some(slot) = v.get_mut(protocol::substream_of(*seq, self.k) as usize) {
                *slot += 1;
            }
        }
        if v.len() > self.k as usize {
            let k = u64::from(self.k);
            let groups: BTreeSet<u64> = self.held.keys().map(|s| s / k).collect();
            for slot in &mut v[self.k as usize..] {
                *slot = groups.len() as u32;
            }
        }
        v
    }

    /// Builds the next FIG. 9 heartbeat.
    pub fn heartbeat(&mut self) -> Option<Heartbeat> {
        let me = self.me?;
        self.hb_seq += 1;
        // This heartbeat reports the new parents' progress: no extra one is needed for it.
        self.bridge_ended = false;
        let parents = self
            .plan
            .iter()
            .map(|s| {
                let (last_seq, last_ts_ms) = self
                    .parent_last
                    .get(s.index as usize)
                    .copied()
                    .unwrap_or((None, None));
                ParentLink {
                    substream: s.index,
                    parent: s.parent,
                    last_seq,
                    last_ts_ms,
                }
            })
            .collect();
        let children = self
            .plan
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
            .map(|(child, substream)| {
                let last = self.child_last.get(&(child, substream));
                ChildLink {
                    substream,
                    child,
                    last_seq: last.map(|l| l.0),
                    last_ts_ms: last.map(|l| l.1),
                }
            })
            .collect();
        Some(Heartbeat {
            client_id: me,
            seq: self.hb_seq,
            local_ts_ms: self.now as u64,
            parents,
            children,
            buffer: self.buffered_per_substream(),
            bytes_from_peers: self.counters.bytes_from_peers,
            bytes_from_origin: self.counters.bytes_from_origin,
            bytes_up: self.counters.bytes_up,
            origin_fallbacks: self.counters.origin_fallbacks,
            upload_kbps: self.bucket.rate_kbps(),
            send_backlog_ms: self.send_backlog_ms() as u32,
            place: self.place,
        })
    }

    /// Parent links replaced by instructions, oldest first (for statistics).
    pub fn past_links(&self) -> Vec<protocol::report::LinkStat> {
        self.past_links.iter().cloned().collect()
    }

    /// Current parent per substream with its timing (for statistics).
    pub fn link_stats(&self) -> Vec<protocol::report::LinkStat> {
        self.plan
            .iter()
            .map(|s| {
                let (since, first) = self
                    .parent_timing
                    .get(s.index as usize)
                    .copied()
                    .unwrap_or((0.0, None));
                protocol::report::LinkStat {
                    substream: s.index,
                    parent: s.parent,
                    since_ms: since,
                    first_packet_ms: first,
                    parent_open_ms: None,
                    until_ms: None,
                    bridged_ms: self.bridged.get(s.index as usize).copied().flatten(),
                }
            })
            .collect()
    }
}
