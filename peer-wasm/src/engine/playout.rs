//! How far behind the live edge the player runs, sized from the stream's fragment duration
//! (issue 14).
//!
//! The origin cuts a fragment per keyframe and publishes it whole, so a player's buffered end
//! does not grow smoothly: it stands still for a fragment's duration `D`, then jumps by `D`. The
//! playhead must therefore be more than `D` behind the buffered end right after a jump, or it
//! runs dry before the next fragment has crossed the swarm: the fixed 2 s lag of the 1 s demo
//! clip stalls 2 s fragments at every boundary that comes a little late, and 4 s ones always.
//!
//! [`PlayoutSizing::for_fragment`] turns `D` into the player's target and maximum lag, its
//! start-up cushion, and the engine's playout deadline; for `D` = 1 s it gives exactly the
//! constants the player had before. [`FragmentClock`] learns `D`: from the Welcome's
//! `fragment_ms` (what the origin measured) and from the delivered packets themselves (every
//! packet of a fragment carries the time the origin cut it, so `created_ms` steps by `D`).

use std::collections::VecDeque;

/// The fragment duration assumed until one is known: the demo clip's.
pub const DEFAULT_FRAGMENT_S: f64 = 1.0;

/// Durations outside this range are a source pausing or a clock jump, not a fragment.
const MIN_FRAGMENT_S: f64 = 0.1;
const MAX_FRAGMENT_S: f64 = 10.0;

/// Fragment steps remembered: the longest of them is the answer.
const RECENT: usize = 8;

/// The playout figures for one fragment duration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlayoutSizing {
    /// The fragment duration these figures are for (s).
    pub fragment_s: f64,
    /// Where the player keeps the playhead behind the buffered end (s), and how far it may fall
    /// behind before it jumps forward to the target again.
    pub target_lag_s: f64,
    pub max_lag_s: f64,
    /// Media buffered before playback starts (s), or waited for at most this long (ms).
    pub startup_buffer_s: f64,
    pub startup_timeout_ms: f64,
    /// A packet is on time if it is here within this long of being cut at the origin.
    pub playout_delay_ms: f64,
    /// A gap at the head older than this is skipped rather than waited for.
    pub give_up_ms: f64,
}

impl PlayoutSizing {
    /// Target lag `max(2 s, D + 1 s, 2 D)`: a fragment's step, plus the time the next fragment
    /// takes to cross the swarm. A tree provisioned at 1.5 times the stream rate hands a
    /// fragment down a hop in two thirds of `D` (its packets come one after another), and a
    /// packet the tree failed still needs a fallback period and a fetch: `1.5 D`, the first
    /// guess, stalled 4 s fragments in the swarm (docs/benchmarks.md, issue 14). The player jumps
    /// forward only beyond the target plus `max(3 s, 2 D)`, starts once `max(1.5 s, 1.5 D)` is
    /// buffered (joiners get the last two fragments at once), and a packet is on time within the
    /// target lag plus half a second of its cutting.
    pub fn for_fragment(fragment_s: f64) -> PlayoutSizing {
        let d = if fragment_s.is_finite() {
            fragment_s.clamp(MIN_FRAGMENT_S, MAX_FRAGMENT_S)
        } else {
            DEFAULT_FRAGMENT_S
        };
        let target_lag_s = 2.0f64.max(d + 1.0).max(2.0 * d);
        let playout_delay_ms = (target_lag_s + 0.5) * 1000.0;
        PlayoutSizing {
            fragment_s: d,
            target_lag_s,
            max_lag_s: target_lag_s + 3.0f64.max(2.0 * d),
            startup_buffer_s: 1.5f64.max(1.5 * d),
            startup_timeout_ms: 3000.0f64.max(2000.0 * d),
            playout_delay_ms,
            give_up_ms: playout_delay_ms + 3500.0,
        }
    }
}

impl Default for PlayoutSizing {
    fn default() -> Self {
        PlayoutSizing::for_fragment(DEFAULT_FRAGMENT_S)
    }
}

/// Learns the stream's fragment duration.
#[derive(Debug, Clone, Default)]
pub struct FragmentClock {
    /// What the origin announced (Welcome `fragment_ms`), ms.
    hint_ms: Option<f64>,
    /// `created_ms` of the last packet delivered.
    last_created: Option<u64>,
    /// The last steps of `created_ms` between fragments, ms.
    recent: VecDeque<f64>,
}

impl FragmentClock {
    pub fn hint(&mut self, ms: f64) {
        if (MIN_FRAGMENT_S * 1000.0..=MAX_FRAGMENT_S * 1000.0).contains(&ms) {
            self.hint_ms = Some(ms);
        }
    }

    /// A packet cut at `created_ms` was delivered (in sequence order). Packets of one fragment
    /// share their `created_ms`; a new value starts the next fragment.
    pub fn note(&mut self, created_ms: u64) {
        if let Some(last) = self.last_created {
            if created_ms != last {
                let step = created_ms.saturating_sub(last) as f64;
                if (MIN_FRAGMENT_S * 1000.0..=MAX_FRAGMENT_S * 1000.0).contains(&step) {
                    self.recent.push_back(step);
                    while self.recent.len() > RECENT {
                        self.recent.pop_front();
                    }
                }
            }
        }
        self.last_created = Some(created_ms);
    }

    /// The fragment duration to size the playout for (ms): the longest recent step, and the
    /// origin's word while fewer than a few steps have been seen; `None` while nothing is known.
    pub fn fragment_ms(&self) -> Option<f64> {
        let measured = self.recent.iter().copied().reduce(f64::max);
        match (measured, self.hint_ms) {
            (Some(m), Some(h)) if self.recent.len() < 3 => Some(m.max(h)),
            (Some(m), _) => Some(m),
            (None, h) => h,
        }
    }

    pub fn sizing(&self) -> PlayoutSizing {
        self.fragment_ms()
            .map_or_else(PlayoutSizing::default, |ms| {
                PlayoutSizing::for_fragment(ms / 1000.0)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn demo_clip_keeps_the_former_constants() {
        let s = PlayoutSizing::for_fragment(1.0);
        assert_eq!(s.target_lag_s, 2.0);
        assert_eq!(s.max_lag_s, 5.0);
        assert_eq!(s.startup_buffer_s, 1.5);
        assert_eq!(s.startup_timeout_ms, 3000.0);
        assert_eq!(s.playout_delay_ms, 2500.0);
        assert_eq!(s.give_up_ms, 6000.0);
        assert_eq!(PlayoutSizing::default(), s);
    }

    #[test]
    fn lag_covers_a_fragment_and_a_margin() {
        for d in [0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0] {
            let s = PlayoutSizing::for_fragment(d);
            // Right before the next fragment lands, at least a second (or half a fragment) is
            // still buffered.
            assert!(
                s.target_lag_s - d >= 1.0f64.min(0.5 * d).max(0.5),
                "{d}: {s:?}"
            );
            assert!(s.target_lag_s >= 1.5 * d, "{d}: {s:?}");
            // Jumping forward never happens right after a fragment lands at the target lag
            // (the lag is then at most the target plus a fragment).
            assert!(s.max_lag_s > s.target_lag_s + d, "{d}: {s:?}");
            // Joiners get two fragments at once: enough to start.
            assert!(s.startup_buffer_s <= (2.0 * d).max(1.5), "{d}: {s:?}");
            assert!(s.playout_delay_ms > s.target_lag_s * 1000.0);
            assert!(s.give_up_ms > s.playout_delay_ms);
        }
        let two = PlayoutSizing::for_fragment(2.0);
        assert_eq!(two.target_lag_s, 4.0);
        assert_eq!(two.max_lag_s, 8.0);
        let four = PlayoutSizing::for_fragment(4.0);
        assert_eq!(four.target_lag_s, 8.0);
        assert_eq!(four.max_lag_s, 16.0);
        assert_eq!(four.playout_delay_ms, 8500.0);
    }

    #[test]
    fn nonsense_durations_are_clamped() {
        assert_eq!(
            PlayoutSizing::for_fragment(f64::NAN),
            PlayoutSizing::default()
        );
        assert_eq!(PlayoutSizing::for_fragment(1e9).fragment_s, MAX_FRAGMENT_S);
        assert_eq!(PlayoutSizing::for_fragment(0.0).fragment_s, MIN_FRAGMENT_S);
    }

    #[test]
    fn clock_learns_the_step_of_created_ms() {
        let mut c = FragmentClock::default();
        assert_eq!(c.fragment_ms(), None);
        assert_eq!(c.sizing(), PlayoutSizing::default());
        // Three packets per fragment, fragments cut every 2 s.
        for t in [10_000u64, 12_000, 14_000] {
            for _ in 0..3 {
                c.note(t);
            }
        }
        assert_eq!(c.fragment_ms(), Some(2000.0));
        assert_eq!(c.sizing().target_lag_s, 4.0);
    }

    #[test]
    fn origin_hint_counts_until_steps_are_seen() {
        let mut c = FragmentClock::default();
        c.hint(4000.0);
        assert_eq!(c.fragment_ms(), Some(4000.0));
        // One short step (a clip's last fragment before its loop) does not undo the hint...
        c.note(0);
        c.note(1000);
        assert_eq!(c.fragment_ms(), Some(4000.0));
        // ...a run of them does.
        for t in [2000, 3000, 4000] {
            c.note(t);
        }
        assert_eq!(c.fragment_ms(), Some(1000.0));
        // Garbage hints and pauses are ignored.
        c.hint(0.0);
        c.note(60_000);
        assert_eq!(c.fragment_ms(), Some(1000.0));
    }

    /// The engine learns 2 s fragments from the packets it delivers (and from the Welcome's
    /// hint): its playout deadline grows, so a packet 3 s old still counts as on time.
    #[test]
    fn engine_raises_its_playout_delay_for_long_fragments() {
        use crate::engine::{Engine, EngineConfig, From, Input};
        use protocol::packet::{encode, PacketHeader, FLAG_RANDOM_ACCESS};
        use protocol::{PeerId, Source, SubstreamPlan};

        let packet = |seq: u64| {
            // Four packets a fragment, a fragment cut every 2 s.
            let created_ms = seq / 4 * 2000;
            let flags = if seq.is_multiple_of(4) {
                FLAG_RANDOM_ACCESS
            } else {
                0
            };
            (
                created_ms,
                encode(
                    &PacketHeader {
                        seq,
                        flags,
                        created_ms,
                    },
                    &[seq as u8; 100],
                ),
            )
        };
        let mut e = Engine::new(EngineConfig::default(), 0.0);
        assert_eq!(e.playout(), PlayoutSizing::default());
        e.handle(
            Input::Welcome {
                peer_id: PeerId(1),
                substreams: 1,
                start_seq: 0,
                live_seq: 0,
                live_start_seq: None,
            },
            0.0,
        );
        e.handle(
            Input::Instructions {
                plan: vec![SubstreamPlan {
                    index: 0,
                    parent: Source::Origin,
                    children: vec![],
                }],
                tier: None,
            },
            0.0,
        );
        for seq in 0..8 {
            let (t, bytes) = packet(seq);
            e.handle(
                Input::Packet {
                    from: From::OriginPush,
                    bytes: &bytes,
                },
                t as f64,
            );
        }
        assert_eq!(e.playout().fragment_s, 2.0);
        assert_eq!(e.playout().target_lag_s, 4.0);
        assert_eq!(e.playout_delay_ms(), 4500.0);
        // The third fragment arrives 3 s after it was cut: late for the demo clip's 2.5 s
        // deadline, on time for 2 s fragments.
        for seq in 8..12 {
            let (t, bytes) = packet(seq);
            e.handle(
                Input::Packet {
                    from: From::OriginPush,
                    bytes: &bytes,
                },
                t as f64 + 3000.0,
            );
        }
        assert_eq!(e.counters.packets_played, 12);
        assert_eq!(e.counters.late, 0);
        assert_eq!(e.counters.on_time, 12);

        // A Welcome hint alone sizes the playout before any packet.
        let mut e = Engine::new(EngineConfig::default(), 0.0);
        e.set_fragment_hint(4000.0);
        assert_eq!(e.playout().target_lag_s, 8.0);
        assert_eq!(e.playout_delay_ms(), 8500.0);
    }

    /// A 2 s fragment of 16 packets announced at once: its trees hand the packets down over
    /// about 1.3 s, so the origin is asked for each one only a fallback period after it was due,
    /// not for all of them 600 ms after the notice.
    #[test]
    fn a_long_fragment_announced_at_once_is_fetched_as_its_packets_fall_due() {
        use crate::engine::{Action, Engine, EngineConfig, Input};
        use protocol::{PeerId, Source, SubstreamPlan};

        let fetched_by = |fragment_ms: f64, at: f64| -> Vec<u64> {
            let mut e = Engine::new(EngineConfig::default(), 0.0);
            e.set_fragment_hint(fragment_ms);
            e.handle(
                Input::Welcome {
                    peer_id: PeerId(1),
                    substreams: 4,
                    start_seq: 16,
                    live_seq: 15,
                    live_start_seq: None,
                },
                0.0,
            );
            e.handle(
                Input::Instructions {
                    plan: (0..4)
                        .map(|i| SubstreamPlan {
                            index: i,
                            parent: Source::Peer { id: PeerId(9) },
                            children: vec![],
                        })
                        .collect(),
                    tier: None,
                },
                0.0,
            );
            let mut fetched = Vec::new();
            let mut t = 0.0;
            fetched.extend(
                e.handle(Input::LiveEdge { seq: 31 }, t)
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Fetch { seq } => Some(seq),
                        _ => None,
                    }),
            );
            while t < at {
                t += 50.0;
                fetched.extend(
                    e.handle(Input::Tick, t)
                        .into_iter()
                        .filter_map(|a| match a {
                            Action::Fetch { seq } => Some(seq),
                            _ => None,
                        }),
                );
            }
            fetched
        };
        // (The joiner starts at 16, after the newest packet: nothing is fetched at the Welcome,
        // and 16..=31 are the burst.)
        // The demo clip's 1 s fragments: everything after the fallback period, as before.
        assert_eq!(fetched_by(1000.0, 700.0).len(), 16);
        // 2 s fragments: the first packets then, the last ones about 1.3 s later.
        let early = fetched_by(2000.0, 700.0);
        assert!(!early.is_empty() && early.len() < 4, "{early:?}");
        assert!(early.iter().all(|s| *s < 20), "{early:?}");
        assert_eq!(fetched_by(2000.0, 2000.0).len(), 16);
    }

    #[test]
    fn longest_recent_step_wins_and_ages_out() {
        let mut c = FragmentClock::default();
        let mut t = 0;
        for step in [1000, 4000, 1000, 1000] {
            t += step;
            c.note(t);
        }
        assert_eq!(c.fragment_ms(), Some(4000.0));
        for _ in 0..RECENT {
            t += 1000;
            c.note(t);
        }
        assert_eq!(c.fragment_ms(), Some(1000.0));
    }
}
