//! Abuse limits per network address (issue 13): concurrent control sessions, joins per minute,
//! bytes per second of control traffic, channels HTTP ingest may create. The per-session limits
//! (messages per second, message size) live in [`crate::ws::SessionLimits`]; every limit's
//! refusals are counted in `p2p_limit_refusals_total{limit}` (see [`Limit`]).
//!
//! Addresses are keyed by [`AddressKey`]: an IPv4 address, or the /64 prefix of an IPv6 one (a
//! subscriber gets at least a /64, so its 2^64 addresses must not count as 2^64 subscribers).
//! Sessions of a server embedded without connect info have no address (`0.0.0.0`): per-address
//! limits do not apply to them.
//!
//! Memory is bounded: an entry lives while a session of its address is open, while the address
//! still has an ingest channel, or until its buckets have refilled (at most a minute after its
//! last join); idle entries are swept at most every [`SWEEP_EVERY`], and when the table holds
//! more than [`MAX_IDLE_ENTRIES`] entries every entry without an open session is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often the table looks for idle entries.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Entries kept without an open session before all of them are dropped at once.
pub const MAX_IDLE_ENTRIES: usize = 65_536;

/// Per-address limits; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressLimits {
    /// Control WebSocket sessions open at once (joined or not).
    pub sessions: u32,
    /// Joins per minute (a bucket of this many joins, refilled evenly over a minute).
    pub joins_per_minute: u32,
    /// Bytes per second of control traffic the server reads from the address's sessions
    /// (text and binary messages), with a burst of [`BYTES_BURST_SECS`] seconds' worth.
    pub control_bytes_per_sec: u32,
    /// Channels HTTP ingest may create for the address (that still exist).
    pub ingest_channels: u32,
}

/// The control-traffic bucket holds this many seconds of the rate: a page joining a large swarm
/// signals with a dozen peers at once.
pub const BYTES_BURST_SECS: u32 = 4;

impl Default for AddressLimits {
    fn default() -> Self {
        AddressLimits {
            sessions: 128,
            joins_per_minute: 240,
            control_bytes_per_sec: 1 << 20,
            ingest_channels: 16,
        }
    }
}

impl AddressLimits {
    /// All limits off.
    pub const OFF: AddressLimits = AddressLimits {
        sessions: 0,
        joins_per_minute: 0,
        control_bytes_per_sec: 0,
        ingest_channels: 0,
    };
}

/// Every limit with a refusal counter, labelled in `p2p_limit_refusals_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    SessionsPerAddress,
    JoinsPerMinute,
    ControlBytesPerSec,
    IngestChannelsPerAddress,
    MessagesPerSec,
    HeartbeatRate,
    MessageSize,
    NotLinked,
    /// Joins refused for their viewer token (`--token-secret`).
    ViewerToken,
    /// Joins refused because the address was banned after an eviction (`--ban-secs`).
    BannedAddress,
}

impl Limit {
    pub const ALL: [Limit; 10] = [
        Limit::SessionsPerAddress,
        Limit::JoinsPerMinute,
        Limit::ControlBytesPerSec,
        Limit::IngestChannelsPerAddress,
        Limit::MessagesPerSec,
        Limit::HeartbeatRate,
        Limit::MessageSize,
        Limit::NotLinked,
        Limit::ViewerToken,
        Limit::BannedAddress,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::SessionsPerAddress => "sessions_per_address",
            Limit::JoinsPerMinute => "joins_per_minute",
            Limit::ControlBytesPerSec => "control_bytes_per_sec",
            Limit::IngestChannelsPerAddress => "ingest_channels_per_address",
            Limit::MessagesPerSec => "messages_per_sec",
            Limit::HeartbeatRate => "heartbeat_rate",
            Limit::MessageSize => "message_size",
            Limit::NotLinked => "not_linked",
            Limit::ViewerToken => "viewer_token",
            Limit::BannedAddress => "banned_address",
        }
    }
}

/// Refusals per [`Limit`], since start.
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; Limit::ALL.len()]);

impl Refusals {
    pub fn record(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}

/// What per-address limits count: an IPv4 address, or an IPv6 address's /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    /// `None` for the unspecified address (a server embedded without connect info).
    pub fn of(addr: IpAddr) -> Option<AddressKey> {
        let addr = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(prefix.into())
                }
            },
            v4 => v4,
        };
        (!addr.is_unspecified()).then_some(AddressKey(addr))
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(_) => write!(f, "{}/64", self.0),
            IpAddr::V4(_) => write!(f, "{}", self.0),
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Bucket {
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, capacity: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(capacity);
        self.at = now;
    }

    /// Takes `n` tokens if there are that many; otherwise the wait until there will be.
    fn take(&mut self, n: f64, rate: f64, capacity: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, capacity, now);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / rate.max(1e-9)))
        }
    }
}

/// One address's counters. Sessions hold it through an [`AddressSession`].
#[derive(Debug)]
pub struct AddressEntry {
    key: AddressKey,
    sessions: AtomicU32,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    joins: Bucket,
    bytes: Bucket,
    /// Channels HTTP ingest created for the address.
    ingest_channels: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a per-address limit refused something: the message names the limit and its flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("too many sessions from {addr}: at most {max} at once (--max-sessions-per-address)")]
    Sessions { addr: AddressKey, max: u32 },
    #[error(
        "too many joins from {addr}: at most {max} per minute (--max-joins-per-minute); \
         try again in {retry_s} s"
    )]
    Joins {
        addr: AddressKey,
        max: u32,
        retry_s: u64,
    },
    #[error(
        "control traffic from {addr} exceeds {max} bytes/s (--max-control-bytes-per-sec); \
         message dropped"
    )]
    Bytes { addr: AddressKey, max: u32 },
    #[error(
        "{addr} already created {max} channels by HTTP ingest (--max-ingest-channels-per-address)"
    )]
    IngestChannels { addr: AddressKey, max: u32 },
}

impl LimitError {
    pub fn limit(&self) -> Limit {
        match self {
            LimitError::Sessions { .. } => Limit::SessionsPerAddress,
            LimitError::Joins { .. } => Limit::JoinsPerMinute,
            LimitError::Bytes { .. } => Limit::ControlBytesPerSec,
            LimitError::IngestChannels { .. } => Limit::IngestChannelsPerAddress,
        }
    }
}

/// The per-address table, one per server (in [`crate::AppState`]).
#[derive(Debug)]
pub struct AddressTable {
    limits: AddressLimits,
    entries: Mutex<HashMap<AddressKey, Arc<AddressEntry>>>,
    last_sweep: Mutex<Instant>,
    /// Refusals of every limit, per-session ones included.
    pub refusals: Refusals,
}

/// A session's hold on its address's entry: counted among the address's sessions until
/// dropped.
#[derive(Debug)]
pub struct AddressSession {
    entry: Arc<AddressEntry>,
    limits: AddressLimits,
}

impl Drop for AddressSession {
    fn drop(&mut self) {
        self.entry.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AddressSession {
    /// A join: spends one of the address's joins of the minute.
    pub fn join(&self) -> Result<(), LimitError> {
        let max = self.limits.joins_per_minute;
        if max == 0 {
            return Ok(());
        }
        let (rate, cap) = (f64::from(max) / 60.0, f64::from(max));
        lock(&self.entry.buckets)
            .joins
            .take(1.0, rate, cap, Instant::now())
            .map_err(|wait| LimitError::Joins {
                addr: self.entry.key,
                max,
                retry_s: wait.as_secs().max(1),
            })
    }

    /// `bytes` of control traffic read from the session.
    pub fn traffic(&self, bytes: usize) -> Result<(), LimitError> {
        let max = self.limits.control_bytes_per_sec;
        if max == 0 {
            return Ok(());
        }
        let rate = f64::from(max);
        lock(&self.entry.buckets)
            .bytes
            .take(
                bytes as f64,
                rate,
                rate * f64::from(BYTES_BURST_SECS),
                Instant::now(),
            )
            .map_err(|_| LimitError::Bytes {
                addr: self.entry.key,
                max,
            })
    }
}

impl AddressTable {
    pub fn new(limits: AddressLimits) -> Self {
        AddressTable {
            limits,
            entries: Mutex::default(),
            last_sweep: Mutex::new(Instant::now()),
            refusals: Refusals::default(),
        }
    }

    pub fn limits(&self) -> AddressLimits {
        self.limits
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, key: AddressKey, now: Instant) -> Arc<AddressEntry> {
        self.sweep(now);
        let mut entries = lock(&self.entries);
        entries
            .entry(key)
            .or_insert_with(|| {
                Arc::new(AddressEntry {
                    key,
                    sessions: AtomicU32::new(0),
                    buckets: Mutex::new(Buckets {
                        joins: Bucket::full(f64::from(self.limits.joins_per_minute), now),
                        bytes: Bucket::full(
                            f64::from(self.limits.control_bytes_per_sec)
                                * f64::from(BYTES_BURST_SECS),
                            now,
                        ),
                        ingest_channels: Vec::new(),
                    }),
                })
            })
            .clone()
    }

    /// Drops idle entries (no session, no ingest channel, buckets refilled), at most every
    /// [`SWEEP_EVERY`]; beyond [`MAX_IDLE_ENTRIES`] (then every second at most), every entry
    /// without a session or ingest channel.
    fn sweep(&self, now: Instant) {
        {
            let mut last = lock(&self.last_sweep);
            let since = now.saturating_duration_since(*last);
            let crowded = || lock(&self.entries).len() > MAX_IDLE_ENTRIES;
            // A crowded table is swept sooner, but still not on every new session.
            if since < SWEEP_EVERY && !(since >= Duration::from_secs(1) && crowded()) {
                return;
            }
            *last = now;
        }
        let limits = self.limits;
        let mut entries = lock(&self.entries);
        let crowded = entries.len() > MAX_IDLE_ENTRIES;
        entries.retain(|_, e| {
            if e.sessions.load(Ordering::Relaxed) > 0 || Arc::strong_count(e) > 1 {
                return true;
            }
            let b = lock(&e.buckets);
            if !b.ingest_channels.is_empty() {
                return true;
            }
            if crowded {
                return false;
            }
            let since = |bucket: &Bucket| now.saturating_duration_since(bucket.at).as_secs_f64();
            let joins_full = limits.joins_per_minute == 0
                || b.joins.tokens + since(&b.joins) * f64::from(limits.joins_per_minute) / 60.0
                    >= f64::from(limits.joins_per_minute);
            let bytes_full = limits.control_bytes_per_sec == 0
                || b.bytes.tokens + since(&b.bytes) * f64::from(limits.control_bytes_per_sec)
                    >= f64::from(limits.control_bytes_per_sec) * f64::from(BYTES_BURST_SECS);
            !(joins_full && bytes_full)
        });
    }

    /// A new control session from `addr`. `Ok(None)`: the address is not tracked (no limit of
    /// sessions, joins or traffic is on, or the address is unknown).
    pub fn open_session(&self, addr: IpAddr) -> Result<Option<AddressSession>, LimitError> {
        let l = self.limits;
        if l.sessions == 0 && l.joins_per_minute == 0 && l.control_bytes_per_sec == 0 {
            return Ok(None);
        }
        let Some(key) = AddressKey::of(addr) else {
            return Ok(None);
        };
        let entry = self.entry(key, Instant::now());
        let before = entry.sessions.fetch_add(1, Ordering::Relaxed);
        let session = AddressSession { entry, limits: l };
        if l.sessions != 0 && before >= l.sessions {
            // Dropping `session` gives the slot back.
            return Err(LimitError::Sessions {
                addr: key,
                max: l.sessions,
            });
        }
        Ok(Some(session))
    }

    /// Whether HTTP ingest may create another channel for `addr`; `exists` tells which of the
    /// channels it created before still exist. On success the caller creates the channel and
    /// calls [`AddressTable::ingest_created`].
    pub fn may_create_channel(
        &self,
        addr: IpAddr,
        exists: impl Fn(&str) -> bool,
    ) -> Result<(), LimitError> {
        let max = self.limits.ingest_channels;
        let Some(key) = AddressKey::of(addr).filter(|_| max != 0) else {
            return Ok(());
        };
        let entry = self.entry(key, Instant::now());
        let mut b = lock(&entry.buckets);
        b.ingest_channels.retain(|c| exists(c));
        if b.ingest_channels.len() >= max as usize {
            return Err(LimitError::IngestChannels { addr: key, max });
        }
        Ok(())
    }

    /// Records that HTTP ingest created `channel` for `addr`.
    pub fn ingest_created(&self, addr: IpAddr, channel: &str) {
        if self.limits.ingest_channels == 0 {
            return;
        }
        let Some(key) = AddressKey::of(addr) else {
            return;
        };
        let entry = self.entry(key, Instant::now());
        lock(&entry.buckets)
            .ingest_channels
            .push(channel.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn sessions_are_counted_per_address_and_given_back() {
        let t = AddressTable::new(AddressLimits {
            sessions: 2,
            ..AddressLimits::default()
        });
        let a = t.open_session(v4(1)).expect("first");
        let b = t.open_session(v4(1)).expect("second");
        let e = t.open_session(v4(1)).expect_err("third");
        assert_eq!(e.limit(), Limit::SessionsPerAddress);
        assert!(e.to_string().contains("--max-sessions-per-address"), "{e}");
        // Another address is unaffected.
        assert!(t.open_session(v4(2)).is_ok());
        drop(a);
        let c = t.open_session(v4(1)).expect("a slot was given back");
        drop((b, c));
        // Unknown addresses are not tracked.
        assert!(matches!(
            t.open_session(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Ok(None)
        ));
    }

    #[test]
    fn ipv6_counts_per_64_prefix() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::2".parse().expect("v6");
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().expect("v6");
        let key = |x: Ipv6Addr| AddressKey::of(IpAddr::V6(x));
        assert_eq!(key(a), key(b));
        assert_ne!(key(a), key(c));
        assert_eq!(
            key(a).map(|k| k.to_string()).as_deref(),
            Some("2001:db8:1:2::/64")
        );
        let mapped: Ipv6Addr = "::ffff:192.0.2.7".parse().expect("v6");
        assert_eq!(key(mapped), AddressKey::of(v4(7)));
    }

    #[test]
    fn joins_refill_over_a_minute() {
        let t = AddressTable::new(AddressLimits {
            joins_per_minute: 3,
            ..AddressLimits::default()
        });
        let s = t.open_session(v4(1)).expect("open").expect("tracked");
        for _ in 0..3 {
            s.join().expect("under the limit");
        }
        let e = s.join().expect_err("fourth join");
        assert!(matches!(e, LimitError::Joins { retry_s, .. } if (1..=20).contains(&retry_s)));
        // The refill: pretend 20 s went by.
        lock(&s.entry.buckets).joins.at -= Duration::from_secs(20);
        s.join().expect("one join refilled");
    }

    #[test]
    fn traffic_is_limited_in_bytes_per_second_with_a_burst() {
        let t = AddressTable::new(AddressLimits {
            control_bytes_per_sec: 1000,
            ..AddressLimits::default()
        });
        let s = t.open_session(v4(1)).expect("open").expect("tracked");
        let other = t.open_session(v4(1)).expect("open").expect("tracked");
        s.traffic(3000).expect("within the burst");
        other.traffic(900).expect("within the burst");
        // The bucket is shared by the address's sessions.
        assert!(other.traffic(500).is_err());
        let far = t.open_session(v4(9)).expect("open").expect("tracked");
        far.traffic(3000)
            .expect("another address has its own bucket");
    }

    #[test]
    fn idle_entries_expire() {
        let t = AddressTable::new(AddressLimits::default());
        let s = t.open_session(v4(1)).expect("open").expect("tracked");
        s.join().expect("join");
        drop(s);
        assert_eq!(t.len(), 1);
        // Not yet refilled: kept.
        *lock(&t.last_sweep) -= SWEEP_EVERY;
        t.sweep(Instant::now());
        assert_eq!(t.len(), 1);
        // A minute later the joins bucket is full again: dropped.
        let later = Instant::now() + Duration::from_secs(61);
        t.sweep(later);
        assert_eq!(t.len(), 0);
        // An address with an open session stays.
        let _held = t.open_session(v4(2)).expect("open");
        t.sweep(later + SWEEP_EVERY * 7);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ingest_channels_count_only_while_they_exist() {
        let t = AddressTable::new(AddressLimits {
            ingest_channels: 2,
            ..AddressLimits::default()
        });
        let live = std::cell::RefCell::new(vec!["a".to_string(), "b".to_string()]);
        let exists = |c: &str| live.borrow().iter().any(|l| l == c);
        t.may_create_channel(v4(1), exists).expect("first");
        t.ingest_created(v4(1), "a");
        t.may_create_channel(v4(1), exists).expect("second");
        t.ingest_created(v4(1), "b");
        let e = t.may_create_channel(v4(1), exists).expect_err("third");
        assert_eq!(e.limit(), Limit::IngestChannelsPerAddress);
        t.may_create_channel(v4(2), exists)
            .expect("another address");
        live.borrow_mut().retain(|c| c != "a");
        t.may_create_channel(v4(1), exists)
            .expect("a channel was removed");
    }
}
