//! [`RtmpBoard`] (on [`crate::AppState`]): what the RTMP listener did, for the dashboard's
//! channel table, the operator overview and `/metrics`, the way [`crate::source::hls::PullBoard`]
//! holds the HLS pulls'. The RTMP connection code writes it; nothing here does I/O.
//!
//! Channel names of refused publishers come from unauthenticated clients: a channel gets an
//! entry only if it exists (the board grows no faster than the channel registry), and a refusal
//! for a name that is not a channel shows only as the listener's last error.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::publish::Refusal;

/// Longest message kept (descriptions may quote what a client sent, such as its app name).
const MAX_MESSAGE: usize = 300;

/// Why a publisher was refused: the `reason` label of `p2p_rtmp_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `connect` to another application than `live`.
    Application,
    /// Wrong or missing stream key (or no `--ingest-key`).
    Key,
    /// The channel already has a live source (or the connection already publishes).
    Busy,
    /// Not a valid channel name.
    ChannelName,
    /// The address created as many channels as it may.
    Limit,
    /// A codec other than H.264 video and AAC audio.
    Codec,
    /// A tag the remuxer cannot read.
    Malformed,
    /// The server could not start the channel.
    Server,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Application,
        Reason::Key,
        Reason::Busy,
        Reason::ChannelName,
        Reason::Limit,
        Reason::Codec,
        Reason::Malformed,
        Reason::Server,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Application => "application",
            Reason::Key => "key",
            Reason::Busy => "busy",
            Reason::ChannelName => "channel_name",
            Reason::Limit => "limit",
            Reason::Codec => "codec",
            Reason::Malformed => "malformed",
            Reason::Server => "server",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A channel's RTMP side, as the dashboard shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RtmpChannelView {
    /// An RTMP publisher feeds the channel now.
    pub publishing: bool,
    /// When the current (or last) publisher started, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Publishers accepted for the channel.
    pub publishes: u64,
    /// Publishers refused for the channel (it existed then).
    pub refusals: u64,
    /// Publishers whose connection ended with an error (refusals of their stream included).
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

/// The last thing that went wrong at the listener, on any channel name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RtmpProblem {
    /// The channel the client named, if it got that far.
    pub channel: Option<String>,
    /// A refusal's [`Reason`] label, `dropped` (a publisher's connection failed) or
    /// `connection` (it failed before publishing).
    pub kind: &'static str,
    pub message: String,
    pub at_ms: u64,
}

/// The listener as a whole, for the operator overview.
#[derive(Debug, Clone, Serialize)]
pub struct RtmpView {
    /// `rtmp://ADDR/live`, the address the listener is bound to.
    pub listening: String,
    pub publishers: u64,
    pub publishes: u64,
    /// Refusals by reason label (every reason, zeros included).
    pub refusals: BTreeMap<&'static str, u64>,
    pub dropped: u64,
    pub failed_connections: u64,
    pub last_error: Option<RtmpProblem>,
}

/// Counters and per-channel state of the RTMP listener.
#[derive(Debug, Default)]
pub struct RtmpBoard {
    listening: Mutex<Option<SocketAddr>>,
    publishers: AtomicU64,
    publishes: AtomicU64,
    refusals: [AtomicU64; Reason::ALL.len()],
    dropped: AtomicU64,
    failed_connections: AtomicU64,
    channels: Mutex<HashMap<String, RtmpChannelView>>,
    last_error: Mutex<Option<RtmpProblem>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn clip(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

impl RtmpBoard {
    /// The listener is bound to `addr`.
    pub fn set_listening(&self, addr: SocketAddr) {
        *lock(&self.listening) = Some(addr);
    }

    /// Where the listener is bound, if RTMP ingest is on.
    pub fn listening(&self) -> Option<SocketAddr> {
        *lock(&self.listening)
    }

    fn problem(&self, channel: Option<&str>, kind: &'static str, message: &str) {
        *lock(&self.last_error) = Some(RtmpProblem {
            channel: channel.map(|c| clip(c.to_owned())),
            kind,
            message: clip(message.to_owned()),
            at_ms: crate::channel::now_ms(),
        });
    }

    fn on_channel(&self, channel: &str, f: impl FnOnce(&mut RtmpChannelView)) {
        f(lock(&self.channels).entry(channel.to_owned()).or_default());
    }

    fn channel_error(v: &mut RtmpChannelView, message: &str) {
        v.errors += 1;
        v.last_error = Some(clip(message.to_owned()));
        v.last_error_ms = Some(crate::channel::now_ms());
    }

    /// A publisher naming `channel` was refused; `exists`: the channel exists (so it gets the
    /// refusal in its row).
    pub fn refused(&self, channel: Option<&str>, exists: bool, refusal: &Refusal) {
        self.refusals[refusal.reason.index()].fetch_add(1, Ordering::Relaxed);
        let message = format!("{}: {}", refusal.code, refusal.description);
        self.problem(channel, refusal.reason.label(), &message);
        if let Some(c) = channel.filter(|_| exists) {
            self.on_channel(c, |v| {
                v.refusals += 1;
                Self::channel_error(v, &format!("publisher refused: {message}"));
            });
        }
    }

    /// A publisher's stream was refused after it started (codec, malformed tag).
    pub fn stream_refused(&self, channel: &str, reason: Reason, message: &str) {
        self.refusals[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.problem(Some(channel), reason.label(), message);
        self.on_channel(channel, |v| {
            v.refusals += 1;
            Self::channel_error(v, &format!("stream refused: {message}"));
        });
    }

    /// A publisher of `channel` was accepted.
    pub fn started(&self, channel: &str) {
        self.publishers.fetch_add(1, Ordering::Relaxed);
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.on_channel(channel, |v| {
            v.publishing = true;
            v.publishes += 1;
            v.since_ms = Some(crate::channel::now_ms());
        });
    }

    /// The publisher of `channel` left; `error`: its connection failed (`None`: it finished,
    /// or its stream was refused and [`RtmpBoard::stream_refused`] said so).
    pub fn left(&self, channel: &str, error: Option<&str>) {
        // Saturating: a `left` without `started` must not wrap the gauge.
        let _ = self
            .publishers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if let Some(e) = error {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.problem(Some(channel), "dropped", e);
        }
        self.on_channel(channel, |v| {
            v.publishing = false;
            if let Some(e) = error {
                Self::channel_error(v, &format!("publisher dropped: {e}"));
            }
        });
    }

    /// A connection ended with an error before it published (not RTMP, a failed handshake,
    /// silence).
    pub fn failed_connection(&self, message: &str) {
        self.failed_connections.fetch_add(1, Ordering::Relaxed);
        self.problem(None, "connection", message);
    }

    pub fn publishers(&self) -> u64 {
        self.publishers.load(Ordering::Relaxed)
    }

    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Relaxed)
    }

    pub fn refusals(&self, reason: Reason) -> u64 {
        self.refusals[reason.index()].load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn failed_connections(&self) -> u64 {
        self.failed_connections.load(Ordering::Relaxed)
    }

    /// The channel's RTMP row, if an RTMP publisher ever published or was refused there.
    pub fn channel(&self, channel: &str) -> Option<RtmpChannelView> {
        lock(&self.channels).get(channel).cloned()
    }

    /// The listener's view, if it listens.
    pub fn view(&self) -> Option<RtmpView> {
        let addr = self.listening()?;
        Some(RtmpView {
            listening: format!("rtmp://{addr}/{}", super::APP),
            publishers: self.publishers(),
            publishes: self.publishes(),
            refusals: Reason::ALL
                .iter()
                .map(|r| (r.label(), self.refusals(*r)))
                .collect(),
            dropped: self.dropped(),
            failed_connections: self.failed_connections(),
            last_error: lock(&self.last_error).clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(reason: Reason) -> Refusal {
        Refusal::new(reason, "NetStream.Publish.Unauthorized", "wrong stream key")
    }

    #[test]
    fn refusals_count_by_reason_and_only_existing_channels_get_a_row() {
        let b = RtmpBoard::default();
        assert!(b.view().is_none(), "no listener, no view");
        b.set_listening("127.0.0.1:1935".parse().expect("addr"));
        b.refused(Some("nosuch"), false, &refusal(Reason::Key));
        b.refused(Some("cam"), true, &refusal(Reason::Key));
        assert!(b.channel("nosuch").is_none());
        let row = b.channel("cam").expect("row");
        assert_eq!((row.refusals, row.publishing), (1, false));
        assert!(row
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("wrong stream key")));
        let v = b.view().expect("view");
        assert_eq!(v.listening, "rtmp://127.0.0.1:1935/live");
        assert_eq!(v.refusals["key"], 2);
        assert_eq!(v.refusals["busy"], 0);
        assert_eq!(v.last_error.and_then(|p| p.channel).as_deref(), Some("cam"));
    }

    #[test]
    fn publishers_are_counted_while_they_publish() {
        let b = RtmpBoard::default();
        b.started("cam");
        assert_eq!(b.publishers(), 1);
        assert!(b.channel("cam").is_some_and(|v| v.publishing));
        b.left("cam", Some("silent for 10s"));
        b.left("cam", None);
        assert_eq!((b.publishers(), b.publishes(), b.dropped()), (0, 1, 1));
        let row = b.channel("cam").expect("row");
        assert!(!row.publishing);
        assert_eq!(row.errors, 1);
    }

    #[test]
    fn long_messages_are_clipped() {
        let b = RtmpBoard::default();
        b.failed_connection(&"é".repeat(400));
        let p = lock(&b.last_error).clone().expect("problem");
        assert!(p.message.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert_eq!(b.failed_connections(), 1);
    }
}
