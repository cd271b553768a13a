//! Flooding with duplicate elimination: the top tier's forwarding rule (patent FIG. 6, step 606).
//!
//! Preferred nodes form a c-connected overlay mesh. "When a node A receives a new packet, i.e., a
//! packet that it has not seen so far, from neighbor N, node A sends a copy of the received packet
//! to each of its neighbors, except N." Every node then gets every packet even when up to `c − 1`
//! nodes fail at once, and each node accepts each packet exactly once.
//!
//! [`Flooder`] is that rule as a pure state machine, shared by the wasm peer (which moves the
//! bytes) and the control center's tests (which simulate whole meshes). Memory is bounded: it
//! remembers a sliding window of sequence numbers, and packets older than the window count as
//! seen (they are past the live edge anyway).

/// Default window: the origin keeps 4096 packets, so nothing older can still be relayed usefully.
pub const DEFAULT_WINDOW: u64 = 4096;

/// What to do with a received packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flood<N> {
    /// First time seen: accept it (play/decode/pass down) and send it to these neighbours.
    Forward(Vec<N>),
    /// Seen before, or older than the window: drop it.
    Duplicate,
}

/// Duplicate elimination over a sliding window of sequence numbers.
#[derive(Debug, Clone)]
pub struct Flooder {
    /// `seen[seq % window]`, valid for `seq` in `newest + 1 − window ..= newest`.
    seen: Vec<bool>,
    newest: Option<u64>,
}

impl Default for Flooder {
    fn default() -> Self {
        Flooder::new(DEFAULT_WINDOW)
    }
}

impl Flooder {
    /// A window of `window` sequence numbers (at least 1).
    pub fn new(window: u64) -> Self {
        Flooder {
            seen: vec![false; window.clamp(1, 1 << 20) as usize],
            newest: None,
        }
    }

    /// Marks `seq` seen; `true` when it had not been seen (and is inside the window).
    pub fn first_sight(&mut self, seq: u64) -> bool {
        let w = self.seen.len() as u64;
        let slot = (seq % w) as usize;
        match self.newest {
            Some(newest) if seq <= newest => {
                if newest - seq >= w || self.seen[slot] {
                    return false;
                }
            }
            Some(newest) => {
                // Slide the window: forget the slots between the old and the new edge.
                let gap = (seq - newest).min(w);
                for s in (seq + 1 - gap)..seq {
                    self.seen[(s % w) as usize] = false;
                }
                self.newest = Some(seq);
            }
            None => self.newest = Some(seq),
        }
        self.seen[slot] = true;
        true
    }

    /// The rule: packet `seq` arrived from neighbour `from` (`None`: from the source, e.g. the
    /// origin injecting it). New packets go to every neighbour except `from`.
    pub fn on_packet<N: Copy + PartialEq>(
        &mut self,
        seq: u64,
        from: Option<N>,
        neighbours: &[N],
    ) -> Flood<N> {
        if !self.first_sight(seq) {
            return Flood::Duplicate;
        }
        Flood::Forward(
            neighbours
                .iter()
                .copied()
                .filter(|n| Some(*n) != from)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn new_packets_go_to_everyone_but_the_sender() {
        let mut f = Flooder::default();
        assert_eq!(
            f.on_packet(5, Some(2), &[1, 2, 3]),
            Flood::Forward(vec![1, 3])
        );
        assert_eq!(f.on_packet(5, Some(1), &[1, 2, 3]), Flood::Duplicate);
        assert_eq!(
            f.on_packet(6, None, &[1, 2, 3]),
            Flood::Forward(vec![1, 2, 3])
        );
        assert_eq!(
            f.on_packet(4, Some(3), &[1, 2, 3]),
            Flood::Forward(vec![1, 2])
        );
    }

    #[test]
    fn window_slides_and_old_packets_count_as_seen() {
        let mut f = Flooder::new(4);
        assert!(f.first_sight(10));
        assert!(f.first_sight(8));
        assert!(!f.first_sight(6), "older than the window");
        assert!(f.first_sight(13)); // forgets 11, 12 slots (and 9, 10 leave the window)
        assert!(!f.first_sight(10));
        assert!(f.first_sight(11));
        assert!(!f.first_sight(11));
        assert!(f.first_sight(12));
        assert!(f.first_sight(1000));
        assert!(!f.first_sight(13));
        assert!(f.first_sight(999));
    }

    /// A circulant mesh (each node linked to the nearest 2 on each side), the source injecting at
    /// node 0, messages delivered in a scrambled order: every node accepts every packet once.
    #[test]
    fn flooding_delivers_each_packet_exactly_once_per_node() {
        let m = 9usize;
        let neighbours: Vec<Vec<usize>> = (0..m)
            .map(|i| vec![(i + 1) % m, (i + 2) % m, (i + m - 1) % m, (i + m - 2) % m])
            .collect();
        let mut nodes: Vec<Flooder> = (0..m).map(|_| Flooder::default()).collect();
        let mut accepted = vec![vec![0u32; 50]; m];
        let mut queue: VecDeque<(usize, Option<usize>, u64)> = VecDeque::new();
        for seq in 0..50 {
            queue.push_back((0, None, seq));
        }
        let mut step = 0u64;
        while let Some((to, from, seq)) = queue.pop_front() {
            step += 1;
            if let Flood::Forward(next) = nodes[to].on_packet(seq, from, &neighbours[to]) {
                accepted[to][seq as usize] += 1;
                for n in next {
                    // Scramble delivery order a little: some messages overtake others.
                    if step.is_multiple_of(3) {
                        queue.push_front((n, Some(to), seq));
                    } else {
                        queue.push_back((n, Some(to), seq));
                    }
                }
            }
        }
        assert!(accepted.iter().flatten().all(|c| *c == 1));
    }
}
