//! A digest of a peer's instructions, the same on the peer (wasm or native) and the server: a
//! peer reports it in its heartbeats ([`crate::heartbeat::Place`]), and a DCM that rebuilt a
//! channel after a failover compares it with the plan it would send, so that it re-instructs
//! only the peers whose plan it changed.
//!
//! The lists of a plan are sets (the order of children, flooding neighbours or feeds means
//! nothing to the peer), so they are hashed sorted. FNV-1a: it needs no dependency,
//! gives the same value on every target, and tells apart the plans of one channel, which is all
//! it is for (it is no defence against a peer that lies: such a peer only misses instructions
//! it would have been sent).

use crate::{Source, SubstreamPlan, TierPlan};

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= u64::from(*x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn source(&mut self, s: &Source) {
        match s {
            Source::Origin => self.u64(0),
            Source::Peer { id } => {
                self.u64(1);
                self.u64(id.0);
            }
        }
    }
}

/// The digest of instructions `substreams` and `tier`, as [`crate::ServerMsg::Instructions`]
/// carries them (the epoch is not part of it).
pub fn plan_digest(substreams: &[SubstreamPlan], tier: Option<&TierPlan>) -> u64 {
    let mut h = Fnv::new();
    let mut subs: Vec<&SubstreamPlan> = substreams.iter().collect();
    subs.sort_by_key(|s| s.index);
    h.u64(subs.len() as u64);
    for s in subs {
        h.u64(u64::from(s.index));
        h.source(&s.parent);
        let mut children: Vec<u64> = s.children.iter().map(|c| c.0).collect();
        children.sort_unstable();
        h.u64(children.len() as u64);
        for c in children {
            h.u64(c);
        }
    }
    let Some(t) = tier else {
        return h.0;
    };
    let fec = |f: Option<crate::FecSpec>| f.map_or(0, |x| (u64::from(x.k) << 32) | u64::from(x.n));
    h.u64(t.tier as u64 + 1);
    h.u64(t.region.len() as u64);
    h.bytes(t.region.as_bytes());
    h.u64(t.cluster.map_or(0, |c| c.wrapping_add(1)));
    h.u64(u64::from(t.plays));
    h.u64(fec(t.fec));
    let mut mesh: Vec<Option<u64>> = t
        .mesh
        .iter()
        .map(|m| match m {
            Source::Origin => None,
            Source::Peer { id } => Some(id.0),
        })
        .collect();
    mesh.sort_unstable();
    h.u64(mesh.len() as u64);
    for m in mesh {
        h.source(&m.map_or(Source::Origin, |id| Source::Peer {
            id: crate::PeerId(id),
        }));
    }
    let mut feeds: Vec<(u32, u64, u64)> = t
        .feeds
        .iter()
        .map(|f| (f.substream, f.to.0, fec(f.fec)))
        .collect();
    feeds.sort_unstable();
    h.u64(feeds.len() as u64);
    for (substream, to, code) in feeds {
        h.u64(to);
        h.u64(u64::from(substream));
        h.u64(code);
    }
    h.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FecSpec, Feed, PeerId, TierName};

    fn tier() -> TierPlan {
        TierPlan {
            tier: TierName::Middle,
            region: "eu".into(),
            cluster: Some(3),
            plays: true,
            fec: Some(FecSpec { k: 4, n: 2 }),
            mesh: Vec::new(),
            feeds: vec![Feed {
                to: PeerId(9),
                substream: 1,
                fec: None,
            }],
        }
    }

    fn subs() -> Vec<SubstreamPlan> {
        (0..4)
            .map(|i| SubstreamPlan {
                index: i,
                parent: Source::Peer { id: PeerId(7) },
                children: vec![PeerId(10 + u64::from(i))],
            })
            .collect()
    }

    #[test]
    fn every_field_of_a_plan_changes_its_digest() {
        let base = plan_digest(&subs(), Some(&tier()));
        assert_eq!(base, plan_digest(&subs(), Some(&tier())));
        assert_ne!(base, plan_digest(&subs(), None));
        let mut s = subs();
        s[2].parent = Source::Origin;
        assert_ne!(base, plan_digest(&s, Some(&tier())));
        let mut s = subs();
        s[1].children.clear();
        assert_ne!(base, plan_digest(&s, Some(&tier())));
        // Lists are sets: their order does not count.
        let mut s = subs();
        s[1].children.push(PeerId(99));
        let mut r = subs();
        r[1].children.insert(0, PeerId(99));
        r.reverse();
        assert_eq!(
            plan_digest(&s, Some(&tier())),
            plan_digest(&r, Some(&tier()))
        );
        let changes: [fn(&mut TierPlan); 6] = [
            |t| t.tier = TierName::Bottom,
            |t| t.cluster = Some(4),
            |t| t.plays = false,
            |t| t.fec = Some(FecSpec { k: 4, n: 3 }),
            |t| t.mesh.push(Source::Origin),
            |t| t.feeds[0].substream = 2,
        ];
        for change in changes {
            let mut t = tier();
            change(&mut t);
            assert_ne!(base, plan_digest(&subs(), Some(&t)));
        }
    }
}
