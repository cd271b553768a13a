//! The control-only scenario's peers: no engine and no media, only the control traffic a
//! healthy peer would send. Each heartbeat reports its last instructions with every parent
//! and child link up to date (the newest packet of each substream), a full buffer and no
//! upload backlog, so the coordinator does all its per-heartbeat work (view, congestion
//! checks) without finding anything to repair.

use protocol::{ChildLink, Heartbeat, ParentLink};

use crate::origin::SyntheticOrigin;
use crate::peer::SimPeer;

/// The newest packet of substream `sub` the origin had made by now.
fn newest_of(produced: u64, sub: u32, k: u64) -> Option<u64> {
    let last = produced.checked_sub(1)?;
    let back = (last % k + k - u64::from(sub) % k) % k;
    last.checked_sub(back)
}

pub fn heartbeat(p: &mut SimPeer, origin: &SyntheticOrigin, now_ms: f64) -> Heartbeat {
    let k = u64::from(origin.cfg.k.max(1));
    let produced = origin.produced();
    let ts = now_ms as u64;
    p.last_heartbeat_ms = now_ms;
    let parents = p
        .plan
        .iter()
        .map(|s| ParentLink {
            substream: s.index,
            parent: s.parent,
            last_seq: newest_of(produced, s.index, k),
            last_ts_ms: Some(ts),
        })
        .collect();
    let children = p
        .plan
        .iter()
        .flat_map(|s| {
            s.children.iter().map(move |c| ChildLink {
                substream: s.index,
                child: *c,
                last_seq: newest_of(produced, s.index, k),
                last_ts_ms: Some(ts),
            })
        })
        .collect();
    Heartbeat {
        client_id: p.id,
        seq: p.heartbeats_sent + 1,
        local_ts_ms: ts,
        parents,
        children,
        buffer: vec![4; k as usize],
        bytes_from_peers: 0,
        bytes_from_origin: 0,
        bytes_up: 0,
        origin_fallbacks: 0,
        upload_kbps: p.net.declared_kbps,
        send_backlog_ms: 0,
        place: None,
    }
}

#[cfg(test)]
mod tests {
    use super::newest_of;

    #[test]
    fn newest_packet_of_each_substream() {
        // Packets 0..10 made, k = 4: substream 1's newest is 9, substream 2's is 6.
        assert_eq!(newest_of(10, 1, 4), Some(9));
        assert_eq!(newest_of(10, 2, 4), Some(6));
        assert_eq!(newest_of(10, 3, 4), Some(7));
        assert_eq!(newest_of(2, 3, 4), None);
        assert_eq!(newest_of(0, 0, 4), None);
    }
}
