//! Data channels at work: opening (or failing) after set-up, packets on the wire between
//! peers, and the replies of fallback fetches reaching the peer.

use std::rc::Rc;

use peer_wasm::engine::Input;

use crate::peer::id_of;
use crate::queue::{ms, us};
use crate::world::{Arrival, Ev, FetchReply, Up, World, CTRL_BYTES};

impl World {
    pub(crate) fn on_link_open(&mut self, a: u32, b: u32, gen: u32) {
        let now = self.q.now();
        let alive = |w: &World, x: u32| w.peers.get(x as usize).is_some_and(|p| p.alive);
        if !alive(self, a) || !alive(self, b) {
            self.links.close(a, b);
            return;
        }
        let started = self.links.get(a, b).and_then(|l| l.started);
        let Some(waiting) = self.links.open(a, b, gen, now) else {
            return;
        };
        self.totals.links_opened += 1;
        if let Some(s) = started {
            self.totals.setup_ms.push(ms(now - s));
        }
        let (lo, hi) = (a.min(b), a.max(b));
        let [low_to_high, high_to_low] = waiting;
        for p in low_to_high {
            self.transmit(lo, hi, gen, p);
        }
        for p in high_to_low {
            self.transmit(hi, lo, gen, p);
        }
    }

    pub(crate) fn on_link_fail(&mut self, a: u32, b: u32, gen: u32) {
        if !self.links.fail(a, b, gen) {
            return;
        }
        self.totals.link_failures += 1;
        // Both ends see ICE fail, drop the link and tell the control center, as the glue does
        // (`LinkEvent::Closed` of a link that never opened).
        self.links.close(a, b);
        for (me, other) in [(a, b), (b, a)] {
            if self.peers[me as usize].alive {
                self.send_up(me, Up::LinkFailed(id_of(other as usize)), CTRL_BYTES);
                self.tell_closed(me, other);
            }
        }
    }

    /// Peer `from` closes its link to `to` (its engine's Disconnect, or its page closing): the
    /// link goes at once, and `to` hears of it one path delay later, as a data channel's close
    /// reaches the other end.
    pub(crate) fn close_link(&mut self, from: u32, to: u32) {
        if self.links.get(from, to).is_none() {
            return;
        }
        self.links.close(from, to);
        let (f, t) = (self.peers[from as usize].net, self.peers[to as usize].net);
        let one_way = self.cfg.net.path_ms(&f, &t);
        self.q.after(us(one_way), Ev::LinkClosed(to, from));
    }

    pub(crate) fn on_link_closed(&mut self, to: u32, from: u32) {
        // A link asked for since is a new one: this close is not about it.
        if self.peers[to as usize].alive && self.links.get(from, to).is_none() {
            self.tell_closed(to, from);
        }
    }

    /// Tells `me`'s engine that its link to `other` closed, if a handover keeps that link: the
    /// glue tells every close, but an input is also a poll, and polls at extra moments shift
    /// the run (see docs/simulator.md).
    fn tell_closed(&mut self, me: u32, other: u32) {
        let peer = id_of(other as usize);
        if self.peers[me as usize]
            .engine
            .as_ref()
            .is_some_and(|e| e.hands_over(peer))
        {
            self.feed(me, Input::LinkClosed { peer });
        }
    }

    /// Puts `packet` on the open link `from -> to`.
    pub(crate) fn transmit(&mut self, from: u32, to: u32, gen: u32, packet: Rc<Vec<u8>>) {
        let now = self.q.now();
        let (fnet, tnet) = (self.peers[from as usize].net, self.peers[to as usize].net);
        let one_way = self.cfg.net.path_ms(&fnet, &tnet);
        let left = self
            .wire
            .uplink(from as usize, packet.len(), now, fnet.up_kbps);
        let lost = self.cfg.net.loss_delay_ms(2.0 * one_way, &mut self.rng);
        let arrive = left + us(one_way + lost);
        // An ordered channel: nothing arrives before what was sent on it earlier.
        let ordered = self.links.order(from, to, arrive);
        self.q
            .at(ordered, Ev::Arrive(to, Arrival::Data { from, gen, packet }));
    }

    /// `a` reaches peer `to`'s downlink now and takes its turn there.
    pub(crate) fn on_arrive(&mut self, to: u32, a: Arrival) {
        let now = self.q.now();
        let Some(p) = self.peers.get(to as usize) else {
            return;
        };
        let bytes = match &a {
            Arrival::Data { packet, .. } => packet.len(),
            Arrival::Down(_, bytes) | Arrival::Fetched(_, _, bytes) => *bytes,
        };
        let done = self.wire.downlink(to as usize, bytes, now, p.net.down_kbps);
        match a {
            Arrival::Data { from, gen, packet } => {
                // The link's order holds: its messages arrive in order (see `transmit`) and the
                // downlink serves arrivals in turn. (Ordering `done` against the link's latest
                // arrival would hold each message until the next one arrives.)
                self.q.at(
                    done,
                    Ev::Data {
                        to,
                        from,
                        gen,
                        packet,
                    },
                );
            }
            Arrival::Down(down, _) => {
                // The control connection is one ordered stream.
                let at = done.max(p.ctrl_down_last);
                self.peers[to as usize].ctrl_down_last = at;
                self.q.at(at, Ev::AtPeer(to, down));
            }
            Arrival::Fetched(seq, reply, _) => {
                self.q.at(done, Ev::Fetched(to, seq, reply));
            }
        }
    }

    pub(crate) fn on_data(&mut self, to: u32, from: u32, gen: u32, packet: &Rc<Vec<u8>>) {
        if !self.links.current(to, from, gen) || !self.peers[to as usize].alive {
            return;
        }
        self.feed_packet(
            to,
            peer_wasm::engine::From::Peer(id_of(from as usize)),
            packet,
        );
    }

    pub(crate) fn on_fetched(&mut self, i: u32, seq: u64, reply: FetchReply) {
        use peer_wasm::engine::Input;
        if !self.peers[i as usize].alive {
            return;
        }
        match reply {
            FetchReply::Packet(p) => self.feed_packet(i, peer_wasm::engine::From::OriginFetch, &p),
            FetchReply::NotYet => self.feed(i, Input::FetchFailed { seq, gone: false }),
            FetchReply::Gone => self.feed(i, Input::FetchFailed { seq, gone: true }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{RunConfig, Scenario};

    #[test]
    fn a_packet_held_in_a_slow_uplink_does_not_book_the_receivers_downlink_before_it_arrives() {
        let cfg = RunConfig::new(2, 10, Scenario::Steady)
            .world_config()
            .expect("a valid run");
        let mut w = World::new(cfg);
        // Two peers that join long after the test: only the wire is exercised.
        let (a, b) = (w.add_peer(60_000_000), w.add_peer(60_000_000));
        w.peers[a as usize].net.up_kbps = 100.0;
        // 16 KiB at 100 kbit/s: out of a's uplink after 1.31 s.
        w.transmit(a, b, 0, Rc::new(vec![0u8; 16_384]));
        w.run_until(500_000);
        assert_eq!(
            w.wire.downlink_backlog(b as usize, w.q.now()),
            0,
            "b's downlink is free for whatever arrives before that packet"
        );
        w.run_until(3_000_000);
        // It was served when it arrived.
        assert!(w.wire.downlink_backlog(b as usize, 0) >= 1_310_000);
    }
}
