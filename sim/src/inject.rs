//! Injected faults beyond departures: throttled relays, as the browser swarm's `--throttle`
//! does (`tests/src/swarm.rs`): a third into the run, `n` relaying peers (two children or more,
//! picked with the seed) have their upload cap cut to a fifth of what their children need.
//! Their children's substreams become repairs to measure, and the coordinator's congestion
//! reports naming them are looked up two heartbeat intervals later (`congestion_detected`).

use crate::peer::{index_of, PendingRepair};
use crate::queue::us;
use crate::world::{Ev, World};

impl World {
    pub(crate) fn throttle(&mut self, n: usize) {
        let now_ms = self.now_ms();
        let now = self.q.now();
        let mut relays: Vec<(protocol::PeerId, usize)> = self
            .control
            .snapshot(now_ms as u64)
            .into_iter()
            .filter(|p| index_of(p.id).is_some_and(|i| self.peers[i].alive))
            .map(|p| (p.id, p.plan.iter().map(|s| s.children.len()).sum()))
            .filter(|(_, kids)| *kids >= 2)
            .collect();
        relays.sort_by_key(|r| r.0);
        let sub_kbps = f64::from(self.cfg.origin.stream_kbps) / f64::from(self.cfg.origin.k.max(1));
        for _ in 0..n.min(relays.len()) {
            let (id, kids) = relays.remove(self.rng.below(relays.len() as u64) as usize);
            let cut = ((kids as f64 * sub_kbps) / 5.0).max(16.0) as u32;
            let Some(i) = index_of(id) else { continue };
            let children: Vec<(protocol::PeerId, u32)> = self.peers[i]
                .engine
                .as_ref()
                .map(|e| {
                    e.plan()
                        .iter()
                        .flat_map(|s| s.children.iter().map(move |c| (*c, s.index)))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(e) = self.peers[i].engine.as_mut() {
                e.set_upload_kbps(cut);
            }
            for (child, substream) in children {
                if let Some(c) = index_of(child).and_then(|c| self.peers.get_mut(c)) {
                    c.repairs.push(PendingRepair {
                        substream,
                        old_parent: id,
                        since: now,
                    });
                }
            }
            self.totals.throttled.push((id, now_ms));
        }
        let hb = f64::from(self.cfg.control.heartbeat_ms);
        self.q.after(us(2.0 * hb + 1000.0), Ev::CheckCongestion);
    }

    pub(crate) fn check_congestion(&mut self) {
        let hb = f64::from(self.cfg.control.heartbeat_ms);
        let topo = self.control.topology(self.now_ms() as u64);
        let mut detected = 0;
        let mut detection = Vec::new();
        for (id, at) in &self.totals.throttled {
            let first = topo
                .congestion
                .iter()
                .filter(|c| c.link.parent == *id && c.at_ms as f64 >= *at)
                .map(|c| c.at_ms as f64 - at)
                .fold(
                    -1.0,
                    |best: f64, d| if best < 0.0 { d } else { best.min(d) },
                );
            if first >= 0.0 && first <= 2.0 * hb {
                detected += 1;
            }
            detection.push(first);
        }
        self.totals.congestion_detected = detected;
        self.totals.detection_ms = detection;
    }
}
