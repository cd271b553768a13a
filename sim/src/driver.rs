//! The peer driver: what the page's glue (`peer-wasm/src/web/peer.rs`) does with the engine's
//! actions, done over the simulated network instead of WebRTC, fetch and MediaSource.

use peer_wasm::engine::{Action, From, Input};

use crate::links::SendOutcome;
use crate::peer::index_of;
use crate::queue::us;
use crate::world::{Ev, World};

impl World {
    /// Feeds one input to peer `i`'s engine at the current time and carries out its actions.
    pub(crate) fn feed(&mut self, i: u32, input: Input<'_>) {
        let now = self.now_ms();
        let Some(e) = self.peers[i as usize].engine.as_mut() else {
            return;
        };
        let actions = e.handle(input, now);
        self.run_actions(i, actions);
    }

    /// A packet arrives at peer `i` from `from` (repairs waiting for its substream end here).
    pub(crate) fn feed_packet(&mut self, i: u32, from: From, packet: &[u8]) {
        let p = &mut self.peers[i as usize];
        // A catch-up want (`protocol::want`) is not a packet of its substream.
        if !p.repairs.is_empty() && !protocol::want::is_want(packet) {
            let k = p.engine.as_ref().map_or(1, |e| e.substreams());
            if let Some(seq) = protocol::packet::peek_seq(packet) {
                let sub = protocol::substream_of(seq, k);
                let now = self.q.now();
                let new_source = |old| match from {
                    From::Peer(id) => id != old,
                    From::OriginPush => true,
                    // A fallback fetch is not a repair of the tree.
                    From::OriginFetch => false,
                };
                let mut done = Vec::new();
                p.repairs.retain(|r| {
                    if r.substream == sub && new_source(r.old_parent) {
                        done.push(crate::queue::ms(now - r.since));
                        false
                    } else {
                        true
                    }
                });
                self.totals.repairs_ms.extend(done);
            }
        }
        self.feed(
            i,
            Input::Packet {
                from,
                bytes: packet,
            },
        );
    }

    fn run_actions(&mut self, i: u32, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, packet } => {
                    let Some(j) = index_of(to) else { continue };
                    let j = j as u32;
                    if let SendOutcome::Transmit(gen) = self.links.send(i, j, &packet) {
                        self.transmit(i, j, gen, packet);
                    }
                }
                Action::Fetch { seq } => {
                    // The HTTP request travels to the origin; the reply is decided there.
                    let net = self.peers[i as usize].net;
                    let one_way = self.cfg.net.server_ms(&net);
                    self.q.after(us(one_way), Ev::FetchAtOrigin(i, seq));
                }
                Action::Deliver { seq, payload } => {
                    // Byte-exact: the payload the player gets is the origin's.
                    let same = self.origin.packet(seq).and_then(|p| {
                        protocol::Packet::decode(&p.rc)
                            .ok()
                            .map(|p| p.payload == payload.as_slice())
                    });
                    if same != Some(true) {
                        self.peers[i as usize].mismatched += 1;
                    }
                    self.deliver(i, seq)
                }
                Action::Connect { peer } => {
                    let Some(j) = index_of(peer) else { continue };
                    self.connect(i, j as u32);
                }
                Action::Disconnect { peer } => {
                    if let Some(j) = index_of(peer) {
                        self.close_link(i, j as u32);
                    }
                }
                // The simulated origin does not sign (every simulated peer is honest).
                Action::ReportForgery { .. } => {}
            }
        }
    }

    /// Peer `i` asks for a data channel to `j`: if this starts the set-up, its opening (or,
    /// for a pair that can never connect, its failure after the ICE timeout) is scheduled.
    fn connect(&mut self, i: u32, j: u32) {
        if j as usize >= self.peers.len() || i == j {
            return;
        }
        let now = self.q.now();
        let Some(gen) = self.links.connect(i, j, now) else {
            return;
        };
        let (a, b) = (i.min(j), i.max(j));
        let (pa, pb) = (&self.peers[a as usize].net, &self.peers[b as usize].net);
        if self.cfg.net.cannot_connect(self.cfg.seed, (a, pa), (b, pb)) {
            let t = us(self.cfg.net.ice_timeout_ms);
            self.q.after(t, Ev::LinkFail(a, b, gen));
        } else {
            let one_way = self
                .cfg
                .net
                .path_ms(&self.peers[a as usize].net, &self.peers[b as usize].net);
            let setup = self.cfg.net.setup_time_ms(one_way, &mut self.rng);
            self.q.after(us(setup), Ev::LinkOpen(a, b, gen));
        }
    }

    /// In-order media for the player: a fragment whose packets all came in order is playable.
    fn deliver(&mut self, i: u32, seq: u64) {
        let now = self.now_ms();
        let frag_ms = f64::from(self.origin.cfg.fragment_ms);
        let per = self.origin.packets_per_fragment().max(1);
        let ends = self.origin.ends_fragment(seq);
        let created = self.origin.packet(seq).map(|p| p.created_ms as f64);
        let p = &mut self.peers[i as usize];
        if p.last_delivered.is_none_or(|l| l + 1 != seq) {
            p.run_start = seq;
        }
        p.last_delivered = Some(seq);
        if ends && seq + 1 >= p.run_start + per {
            if let Some(c) = created {
                // Media time: the fragment's creation time at the origin.
                let stalls = p.playout.stalls;
                p.playout.add(c, c + frag_ms, now);
                if p.playout.stalls > stalls {
                    self.trace_stall(i);
                }
            }
        }
    }
}
