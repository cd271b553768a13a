//! Serialization on each peer's access link: one FIFO uplink and one FIFO downlink per peer,
//! drained at the peer's capacity. A message's bits leave the uplink only after everything
//! queued before it (what an SCTP send buffer shared by a page's data channels does), and
//! reach the page only after everything that arrived before it on the downlink.
//!
//! Simplification: the downlink slot is reserved when the message is sent, not when it
//! arrives, so two messages racing to one peer are served in sending order. Downlinks are
//! several times the stream rate in the default mix, so this only matters for a saturated
//! downlink (documented in `docs/simulator.md`).

use crate::queue::Micros;

/// Microseconds `bytes` take at `kbps`.
pub fn serialize_us(bytes: usize, kbps: f64) -> Micros {
    if kbps <= 0.0 {
        return Micros::MAX / 4;
    }
    // bits / (kbit/s) = ms; * 1000 = us.
    ((bytes as f64 * 8.0) / kbps * 1000.0).ceil() as Micros
}

#[derive(Debug, Default)]
pub struct Wire {
    up_free: Vec<Micros>,
    down_free: Vec<Micros>,
}

impl Wire {
    /// Makes room for peers `0..n`.
    pub fn grow(&mut self, n: usize) {
        if self.up_free.len() < n {
            self.up_free.resize(n, 0);
            self.down_free.resize(n, 0);
        }
    }

    /// Queues `bytes` on `peer`'s uplink at `now`; returns when its last bit has left.
    pub fn uplink(&mut self, peer: usize, bytes: usize, now: Micros, kbps: f64) -> Micros {
        self.grow(peer + 1);
        let start = self.up_free[peer].max(now);
        let done = start.saturating_add(serialize_us(bytes, kbps));
        self.up_free[peer] = done;
        done
    }

    /// Queues `bytes` arriving at `peer` at `arrive` on its downlink; returns when the last
    /// bit is in.
    pub fn downlink(&mut self, peer: usize, bytes: usize, arrive: Micros, kbps: f64) -> Micros {
        self.grow(peer + 1);
        let start = self.down_free[peer].max(arrive);
        let done = start.saturating_add(serialize_us(bytes, kbps));
        self.down_free[peer] = done;
        done
    }

    /// How far ahead of `now` the peer's downlink is booked (its queue, in time).
    pub fn downlink_backlog(&self, peer: usize, now: Micros) -> Micros {
        self.down_free
            .get(peer)
            .map_or(0, |t| t.saturating_sub(now))
    }

    /// How far ahead of `now` the peer's uplink is booked (its queue, in time).
    pub fn uplink_backlog(&self, peer: usize, now: Micros) -> Micros {
        self.up_free.get(peer).map_or(0, |t| t.saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialization_time_is_size_over_rate() {
        // 1000 bytes at 8000 kbit/s: 1 ms.
        assert_eq!(serialize_us(1000, 8000.0), 1000);
        assert_eq!(serialize_us(16_384, 1000.0), 131_072);
    }

    #[test]
    fn uplink_is_a_fifo_at_the_capacity() {
        let mut w = Wire::default();
        // Two 1000-byte messages at once on an 8 Mbit/s uplink: the second leaves 1 ms later.
        assert_eq!(w.uplink(0, 1000, 0, 8000.0), 1000);
        assert_eq!(w.uplink(0, 1000, 0, 8000.0), 2000);
        assert_eq!(w.uplink_backlog(0, 500), 1500);
        // After the queue drained, a message leaves one serialization time after it was sent.
        assert_eq!(w.uplink(0, 1000, 10_000, 8000.0), 11_000);
        // Another peer's uplink is independent.
        assert_eq!(w.uplink(1, 1000, 0, 8000.0), 1000);
    }

    #[test]
    fn downlink_serves_arrivals_in_turn() {
        let mut w = Wire::default();
        assert_eq!(w.downlink(2, 2000, 5000, 16_000.0), 6000);
        // Arrives while the first is still coming in: waits for it.
        assert_eq!(w.downlink(2, 2000, 5500, 16_000.0), 7000);
        assert_eq!(w.downlink(2, 2000, 9000, 16_000.0), 10_000);
    }

    #[test]
    fn zero_capacity_never_delivers() {
        assert!(serialize_us(1, 0.0) > 1_000_000_000_000);
    }
}
