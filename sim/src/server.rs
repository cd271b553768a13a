//! The server side of the world: the control connection in both directions (ordered, with
//! delay, through the peer's access link), the coordinator's outputs, the origin cutting
//! fragments, and fallback fetches answered at the origin.

use bytes::Bytes;

use coordinator::start::Start;

use crate::control::Down;
use crate::peer::{id_of, index_of};
use crate::queue::us;
use crate::world::{Arrival, Ev, FetchReply, Up, World, CTRL_BYTES, EPOCH_MS};

impl World {
    /// Sends `up` from peer `i` to the control center (ordered, through the peer's uplink).
    pub(crate) fn send_up(&mut self, i: u32, up: Up, bytes: usize) {
        let now = self.q.now();
        let p = &self.peers[i as usize];
        if p.ctrl_lost {
            return;
        }
        let (kbps, one_way) = (p.net.up_kbps, self.cfg.net.server_ms(&p.net));
        let left = self.wire.uplink(i as usize, bytes, now, kbps);
        let at = (left + us(one_way)).max(self.peers[i as usize].ctrl_up_last);
        self.peers[i as usize].ctrl_up_last = at;
        self.q.at(at, Ev::AtServer(i, up));
    }

    pub(crate) fn send_down(&mut self, i: u32, down: Down) {
        if !self.peers.get(i as usize).is_some_and(|p| p.alive) {
            return;
        }
        let bytes = match &down {
            Down::Packet(b) => {
                self.totals.origin_push_bytes += b.len() as u64;
                self.count_egress(b.len());
                b.len()
            }
            Down::Text(t) => t.len(),
            _ => CTRL_BYTES,
        };
        let now = self.q.now();
        let p = &self.peers[i as usize];
        let arrive = now + us(self.cfg.net.server_ms(&p.net));
        self.q.at(arrive, Ev::Arrive(i, Arrival::Down(down, bytes)));
    }

    pub(crate) fn count_egress(&mut self, bytes: usize) {
        let s = (self.q.now() / 1_000_000) as usize;
        if self.totals.egress_per_s.len() <= s {
            self.totals.egress_per_s.resize(s + 1, 0);
            self.totals.fallback_per_s.resize(s + 1, 0);
            let bridged = self.control.stats().origin_bridge_bytes;
            self.totals.bridge_total_at_s.resize(s + 1, bridged);
        }
        self.totals.egress_per_s[s] += bytes as u64;
    }

    pub(crate) fn at_server(&mut self, i: u32, up: Up) {
        let now = self.now_ms_u64();
        let id = id_of(i as usize);
        match up {
            Up::Join => {
                if !self.peers[i as usize].alive {
                    return;
                }
                let Some((older, newest, live)) = self.origin.live_position() else {
                    self.totals.server_errors += 1;
                    return;
                };
                let newest_cut_ms = self.origin.packet(newest).map_or(now, |p| p.created_ms);
                let chosen = self.start.choose(
                    now,
                    coordinator::start::StartCandidates {
                        older,
                        newest,
                        next: live + 1,
                        newest_cut_ms,
                        fragment_ms: f64::from(self.origin.cfg.fragment_ms),
                    },
                );
                match chosen {
                    Start::Older(_) => self.totals.starts_older += 1,
                    Start::NewestLate(_) => self.totals.starts_newest_late += 1,
                    Start::NextBudget(_) => self.totals.starts_next_budget += 1,
                }
                let start = chosen.seq();
                // The session sends the Welcome before the DCM hears of the join.
                let welcome = self.control.welcome(id, start, newest, live);
                self.send_down(i, Down::Msg(Box::new(welcome)));
                let net = self.peers[i as usize].net;
                self.control
                    .join(id, net.declared_kbps, net.region, net.nat, now);
            }
            Up::Heartbeat(hb) => {
                if self.peers[i as usize].alive {
                    self.control.heartbeat(id, hb, now);
                }
            }
            Up::Resume => {
                if !self.peers[i as usize].alive {
                    return;
                }
                let net = self.peers[i as usize].net;
                self.control
                    .resume(id, net.declared_kbps, net.region, net.nat, now);
            }
            Up::Leave => self.control.leave(id, now),
            Up::LinkFailed(other) => self.control.link_failed(id, other, now),
        }
        self.drain_control();
    }

    /// The DCM's server dies: every connected peer loses its control connection (what was in
    /// flight to or from the server is lost) and finds the new DCM after the lease expires
    /// (3 s) plus its own polling of the locator (every 250 ms ± 50 %, as the page does); the
    /// origin, on another server, goes on cutting packets and answering fallback fetches.
    pub(crate) fn fail_over(&mut self) {
        let now = self.q.now();
        self.totals.failover_at = Some(now);
        self.totals.stalls_at_failover = self.peers.iter().map(|p| p.playout.stalls).sum();
        self.control.fail(self.now_ms_u64());
        self.coord_timer = None;
        for i in 0..self.peers.len() {
            if !self.peers[i].alive {
                continue;
            }
            self.peers[i].ctrl_lost = true;
            if self.cfg.media {
                self.feed(i as u32, peer_wasm::engine::Input::Control { up: false });
            }
            let back = 3_000_000 + 125_000 + self.rng.below(375_000);
            self.q.at(now + back, Ev::Resume(i as u32));
            let ask = self.locate_delay();
            self.q.at(now + ask, Ev::Locate(i as u32));
        }
        self.drain_control();
    }

    /// The page asks the locator every 250 ms ± 50 %.
    fn locate_delay(&mut self) -> crate::queue::Micros {
        125_000 + self.rng.below(250_000)
    }

    /// A locator's answer reaches peer `i` (a round trip to a server later): its live edge is
    /// what the origin had cut when the question arrived.
    pub(crate) fn on_locate(&mut self, i: u32) {
        let p = &self.peers[i as usize];
        if !p.alive || !p.ctrl_lost || !self.cfg.media {
            return;
        }
        if let Some((_, newest, _)) = self.origin.live_position() {
            self.feed(i, peer_wasm::engine::Input::LiveEdge { seq: newest });
        }
        let next = self.locate_delay();
        self.q.after(next, Ev::Locate(i));
    }

    /// Peer `i` reconnects to the new DCM's server: it resumes, then sends a heartbeat at once
    /// (as the page does after a resumed Welcome). A peer whose join had not reached the dead
    /// server yet joins anew.
    pub(crate) fn on_resume(&mut self, i: u32) {
        let p = &mut self.peers[i as usize];
        if !p.alive || !p.ctrl_lost {
            return;
        }
        p.ctrl_lost = false;
        if self.cfg.media {
            self.feed(i, peer_wasm::engine::Input::Control { up: true });
        }
        let p = &self.peers[i as usize];
        if p.heartbeat_ms.is_none() {
            self.send_up(i, Up::Join, CTRL_BYTES);
            return;
        }
        self.send_up(i, Up::Resume, CTRL_BYTES);
        let hb = self.peers[i as usize]
            .engine
            .as_mut()
            .and_then(|e| e.heartbeat());
        if let Some(hb) = hb {
            self.peers[i as usize].last_heartbeat_ms = self.now_ms();
            self.send_heartbeat(i, hb);
        }
    }

    /// Routes every output of the coordinator and re-arms its timer.
    pub(crate) fn drain_control(&mut self) {
        while let Some((peer, down)) = self.control.poll_output() {
            if let Some(i) = index_of(peer) {
                self.send_down(i as u32, down);
            }
        }
        if let Some(t) = self.control.poll_timeout() {
            let at = us((t as f64 - EPOCH_MS).max(0.0));
            if self.coord_timer.is_none_or(|c| at < c) {
                self.coord_timer = Some(at);
                self.q.at(at, Ev::CoordTimeout);
            }
        }
    }

    pub(crate) fn on_fragment(&mut self) {
        let now = self.now_ms_u64();
        let seqs = self.origin.cut(now);
        let frag_us = u64::from(self.origin.cfg.fragment_ms) * 1000;
        if self.origin.cfg.pace {
            let n = (seqs.end - seqs.start).max(1);
            for (i, seq) in seqs.enumerate() {
                self.q.after(frag_us * i as u64 / n, Ev::Release(seq));
            }
        } else {
            let packets: Vec<(u64, Bytes)> = seqs
                .filter_map(|s| self.origin.packet(s).map(|p| (s, p.bytes.clone())))
                .collect();
            self.control.packets(packets, now);
            self.drain_control();
        }
        self.q.after(frag_us, Ev::Fragment);
    }

    /// A paced origin releases packet `seq`.
    pub(crate) fn on_release(&mut self, seq: u64) {
        self.origin.release(seq);
        if let Some(p) = self.origin.packet(seq) {
            let packets = vec![(seq, p.bytes.clone())];
            self.control.packets(packets, self.now_ms_u64());
            self.drain_control();
        }
    }

    pub(crate) fn fetch_at_origin(&mut self, i: u32, seq: u64) {
        let reply = match self.origin.fetch(seq) {
            crate::origin::Fetched::Packet(p) => FetchReply::Packet(p.rc.clone()),
            crate::origin::Fetched::NotYet => FetchReply::NotYet,
            crate::origin::Fetched::Gone => FetchReply::Gone,
        };
        let bytes = match &reply {
            FetchReply::Packet(b) => b.len(),
            _ => CTRL_BYTES,
        };
        if let FetchReply::Packet(b) = &reply {
            self.totals.origin_fetch_bytes += b.len() as u64;
            self.count_egress(b.len());
            let s = (self.q.now() / 1_000_000) as usize;
            self.totals.fallback_per_s[s] += b.len() as u64;
            let tier = crate::report::tier_name(
                self.peers[i as usize]
                    .engine
                    .as_ref()
                    .and_then(|e| e.tier()),
            );
            let per_s = self.totals.fallback_by_tier_per_s.entry(tier).or_default();
            if per_s.len() <= s {
                per_s.resize(s + 1, 0);
            }
            per_s[s] += b.len() as u64;
        }
        self.trace_fetch(i, seq);
        let p = &self.peers[i as usize];
        let one_way = self.cfg.net.server_ms(&p.net);
        let lost = self.cfg.net.loss_delay_ms(2.0 * one_way, &mut self.rng);
        let arrive = self.q.now() + us(one_way + lost);
        self.q
            .at(arrive, Ev::Arrive(i, Arrival::Fetched(seq, reply, bytes)));
    }
}
