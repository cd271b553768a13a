//! Data channels between simulated peers: set-up, the queue of packets sent before the
//! channel opens, failure of unreachable pairs, and the ordering of an ordered channel.
//!
//! As in the web glue (`peer-wasm/src/web/peer.rs`): the engine's `Action::Connect` opens a
//! link; the side with the lower peer id offers, and the set-up starts when it does (the other
//! side's end waits for the offer, or is created by it). Packets the engine sends before the
//! channel opens wait in the link's queue (at most [`MAX_QUEUE`], oldest dropped first, like
//! the glue's `Link`); a send with no link at all is dropped, as the glue drops it.

use std::rc::Rc;

use rustc_hash::FxHashMap;

use crate::queue::Micros;

/// Packets queued per link direction while the channel opens (the glue's `MAX_QUEUE`).
pub const MAX_QUEUE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the offering side to start.
    Idle,
    Connecting,
    Open,
    /// The pair cannot connect; the attempt failed after the ICE timeout.
    Failed,
}

#[derive(Debug)]
pub struct Link {
    /// Generation: events of an older incarnation of the link are ignored.
    pub gen: u32,
    pub state: State,
    /// Whether each side (0: lower index, 1: higher) has its end (asked to connect).
    pub ends: [bool; 2],
    /// When the set-up started and when the channel opened.
    pub started: Option<Micros>,
    pub opened: Option<Micros>,
    /// Per direction (0: low to high): time the last message is delivered (ordering).
    pub last: [Micros; 2],
    /// Per direction: packets waiting for the channel to open.
    pub waiting: [Vec<Rc<Vec<u8>>>; 2],
}

/// The pair key and the direction of `from -> to`.
pub fn key(from: u32, to: u32) -> ((u32, u32), usize) {
    if from < to {
        ((from, to), 0)
    } else {
        ((to, from), 1)
    }
}

/// What a send on a link became.
#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The channel is open: transmit now (generation given).
    Transmit(u32),
    /// Queued until the channel opens.
    Queued,
    /// No link, or a failed one: dropped.
    Dropped,
}

#[derive(Debug, Default)]
pub struct Links {
    map: FxHashMap<(u32, u32), Link>,
    next_gen: u32,
    pub dropped: u64,
}

impl Links {
    pub fn get(&self, a: u32, b: u32) -> Option<&Link> {
        self.map.get(&key(a, b).0)
    }

    pub fn get_mut(&mut self, a: u32, b: u32) -> Option<&mut Link> {
        self.map.get_mut(&key(a, b).0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Peer `me` asks for a link to `other`. Returns `Some(gen)` when this starts the set-up
    /// (the caller schedules its opening or failure).
    pub fn connect(&mut self, me: u32, other: u32, now: Micros) -> Option<u32> {
        let (k, side) = key(me, other);
        let gen = self.next_gen;
        let link = self.map.entry(k).or_insert_with(|| Link {
            gen,
            state: State::Idle,
            ends: [false; 2],
            started: None,
            opened: None,
            last: [0; 2],
            waiting: [Vec::new(), Vec::new()],
        });
        if link.gen == gen {
            self.next_gen = self.next_gen.wrapping_add(1);
        }
        link.ends[side] = true;
        // The lower index is the lower peer id: it offers.
        let offers = side == 0;
        if offers && link.state == State::Idle {
            link.state = State::Connecting;
            link.started = Some(now);
            return Some(link.gen);
        }
        None
    }

    /// The set-up of generation `gen` finished: the channel opens and the queued packets go
    /// (returned per direction). `None` if that link is gone or was replaced.
    pub fn open(&mut self, a: u32, b: u32, gen: u32, now: Micros) -> Option<[Vec<Rc<Vec<u8>>>; 2]> {
        let link = self.map.get_mut(&key(a, b).0)?;
        if link.gen != gen || link.state != State::Connecting {
            return None;
        }
        link.state = State::Open;
        link.opened = Some(now);
        // The offer reached the other side: it has its end now, whether or not it asked.
        link.ends = [true; 2];
        Some(std::mem::take(&mut link.waiting))
    }

    /// The set-up of generation `gen` failed (unreachable pair). True if it was current.
    pub fn fail(&mut self, a: u32, b: u32, gen: u32) -> bool {
        let Some(link) = self.map.get_mut(&key(a, b).0) else {
            return false;
        };
        if link.gen != gen || link.state != State::Connecting {
            return false;
        }
        link.state = State::Failed;
        self.dropped += (link.waiting[0].len() + link.waiting[1].len()) as u64;
        link.waiting = [Vec::new(), Vec::new()];
        true
    }

    /// `from` sends `packet` to `to`.
    pub fn send(&mut self, from: u32, to: u32, packet: &Rc<Vec<u8>>) -> SendOutcome {
        let (k, dir) = key(from, to);
        let Some(link) = self.map.get_mut(&k) else {
            self.dropped += 1;
            return SendOutcome::Dropped;
        };
        if !link.ends[dir] {
            self.dropped += 1;
            return SendOutcome::Dropped;
        }
        match link.state {
            State::Open => SendOutcome::Transmit(link.gen),
            State::Idle | State::Connecting => {
                let q = &mut link.waiting[dir];
                q.push(packet.clone());
                if q.len() > MAX_QUEUE {
                    q.remove(0);
                    self.dropped += 1;
                }
                SendOutcome::Queued
            }
            State::Failed => {
                self.dropped += 1;
                SendOutcome::Dropped
            }
        }
    }

    /// Orders a delivery on the link `from -> to`: returns the delivery time, no earlier than
    /// the previous message's on that direction.
    pub fn order(&mut self, from: u32, to: u32, at: Micros) -> Micros {
        let (k, dir) = key(from, to);
        match self.map.get_mut(&k) {
            Some(l) => {
                let t = at.max(l.last[dir]);
                l.last[dir] = t;
                t
            }
            None => at,
        }
    }

    /// Whether a delivery of generation `gen` is still valid.
    pub fn current(&self, a: u32, b: u32, gen: u32) -> bool {
        self.get(a, b)
            .is_some_and(|l| l.gen == gen && l.state == State::Open)
    }

    /// Closes the link (either side's Disconnect, or a peer leaving): both ends go, and
    /// messages in flight are dropped when they arrive.
    pub fn close(&mut self, a: u32, b: u32) {
        self.map.remove(&key(a, b).0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt() -> Rc<Vec<u8>> {
        Rc::new(vec![1, 2, 3])
    }

    #[test]
    fn lower_side_offers_and_queued_packets_flow_on_open() {
        let mut l = Links::default();
        // The higher side asks first: nothing starts, but its sends wait.
        assert_eq!(l.connect(7, 3, 0), None);
        assert_eq!(l.send(7, 3, &pkt()), SendOutcome::Queued);
        // The lower side has no end yet: its send is dropped, as the glue drops it.
        assert_eq!(l.send(3, 7, &pkt()), SendOutcome::Dropped);
        let gen = l.connect(3, 7, 10).expect("offerer starts the set-up");
        assert_eq!(
            l.connect(3, 7, 11),
            None,
            "a second ask does not restart it"
        );
        let waiting = l.open(3, 7, gen, 100).expect("opens");
        assert_eq!(waiting[1].len(), 1);
        assert!(waiting[0].is_empty());
        assert_eq!(l.send(3, 7, &pkt()), SendOutcome::Transmit(gen));
        assert!(l.current(7, 3, gen));
    }

    #[test]
    fn closed_or_replaced_links_drop_stale_events() {
        let mut l = Links::default();
        let g1 = l.connect(1, 2, 0).expect("starts");
        l.close(1, 2);
        assert!(l.open(1, 2, g1, 5).is_none());
        let g2 = l.connect(1, 2, 6).expect("starts again");
        assert_ne!(g1, g2);
        assert!(l.open(1, 2, g1, 7).is_none(), "old generation");
        assert!(l.open(1, 2, g2, 8).is_some());
        assert!(!l.current(1, 2, g1));
    }

    #[test]
    fn failed_links_drop_what_waits_and_what_follows() {
        let mut l = Links::default();
        let g = l.connect(1, 2, 0).expect("starts");
        assert_eq!(l.send(1, 2, &pkt()), SendOutcome::Queued);
        assert!(l.fail(1, 2, g));
        assert_eq!(l.send(1, 2, &pkt()), SendOutcome::Dropped);
        assert_eq!(l.dropped, 2);
    }

    #[test]
    fn ordered_channel_never_delivers_out_of_order() {
        let mut l = Links::default();
        let g = l.connect(1, 2, 0).expect("starts");
        l.open(1, 2, g, 0);
        // A lost message delays the next ones on the same direction, not the other direction.
        assert_eq!(l.order(1, 2, 500), 500);
        assert_eq!(l.order(1, 2, 200), 500);
        assert_eq!(l.order(2, 1, 200), 200);
    }

    #[test]
    fn the_wait_queue_is_bounded() {
        let mut l = Links::default();
        l.connect(1, 2, 0);
        for _ in 0..MAX_QUEUE + 10 {
            l.send(1, 2, &pkt());
        }
        assert_eq!(l.get(1, 2).map(|x| x.waiting[0].len()), Some(MAX_QUEUE));
        assert_eq!(l.dropped, 10);
    }
}
