//! The event queue: a binary heap of `(time, insertion number)`, so events at the same
//! microsecond run in the order they were scheduled and a seeded run is reproducible exactly.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Simulated time in microseconds since the start of the run.
pub type Micros = u64;

/// Milliseconds (as the engine and coordinator take them) of a simulated instant.
pub fn ms(t: Micros) -> f64 {
    t as f64 / 1000.0
}

/// Microseconds of a duration in milliseconds (negative and NaN become 0).
pub fn us(ms: f64) -> Micros {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() as Micros
    } else {
        0
    }
}

struct Entry<E> {
    at: Micros,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Entry<E> {
    /// Reversed: the heap's maximum is the earliest event.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Earliest-first queue of events with a virtual clock that only moves forward.
pub struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    next_seq: u64,
    now: Micros,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            next_seq: 0,
            now: 0,
        }
    }
}

impl<E> EventQueue<E> {
    pub fn now(&self) -> Micros {
        self.now
    }

    /// Schedules `ev` at `at`; an instant in the past means "now" (time never goes back).
    pub fn at(&mut self, at: Micros, ev: E) {
        let at = at.max(self.now);
        self.heap.push(Entry {
            at,
            seq: self.next_seq,
            ev,
        });
        self.next_seq += 1;
    }

    /// Schedules `ev` `delay` microseconds from now.
    pub fn after(&mut self, delay: Micros, ev: E) {
        self.at(self.now.saturating_add(delay), ev);
    }

    /// The earliest event at or before `until`, advancing the clock to it.
    pub fn pop_until(&mut self, until: Micros) -> Option<E> {
        if self.heap.peek()?.at > until {
            return None;
        }
        let e = self.heap.pop()?;
        self.now = e.at;
        Some(e.ev)
    }

    /// Moves the clock to `t` (used when the run ends between events).
    pub fn advance_to(&mut self, t: Micros) {
        self.now = self.now.max(t);
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Time of the earliest pending event.
    pub fn peek_time(&self) -> Option<Micros> {
        self.heap.peek().map(|e| e.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_fifo_at_equal_times() {
        let mut q = EventQueue::default();
        q.at(30, "c");
        q.at(10, "a1");
        q.at(10, "a2");
        q.at(20, "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop_until(u64::MAX)).collect();
        assert_eq!(order, ["a1", "a2", "b", "c"]);
        assert_eq!(q.now(), 30);
    }

    #[test]
    fn clock_never_goes_back() {
        let mut q = EventQueue::default();
        q.at(100, 1);
        assert_eq!(q.pop_until(u64::MAX), Some(1));
        // Scheduled "in the past": runs now.
        q.at(50, 2);
        q.after(5, 3);
        assert_eq!(q.peek_time(), Some(100));
        assert_eq!(q.pop_until(u64::MAX), Some(2));
        assert_eq!(q.now(), 100);
        assert_eq!(q.pop_until(u64::MAX), Some(3));
        assert_eq!(q.now(), 105);
    }

    #[test]
    fn pop_until_stops_at_the_horizon() {
        let mut q = EventQueue::default();
        q.at(10, 'x');
        q.at(20, 'y');
        assert_eq!(q.pop_until(15), Some('x'));
        assert_eq!(q.pop_until(15), None);
        assert_eq!(q.len(), 1);
        q.advance_to(15);
        assert_eq!(q.now(), 15);
    }

    #[test]
    fn unit_conversions_round_and_clamp() {
        assert_eq!(us(1.5), 1500);
        assert_eq!(us(-3.0), 0);
        assert_eq!(us(f64::NAN), 0);
        assert!((ms(2500) - 2.5).abs() < 1e-12);
    }
}
