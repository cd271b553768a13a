//! One WebRTC link (a str0m [`Rtc`] with one data channel, `p2p`) per neighbour the control
//! center named: the native twin of the browser's `peer-wasm/src/web/rtc.rs`. The lower peer id
//! offers, so two neighbours never both offer (no glare).
//!
//! Sans-IO like str0m itself: datagrams, signals and time go in, datagrams to send, signals for
//! the control socket and received packets come out. The peer's driver owns the UDP socket.
//!
//! ICE: the link offers one host candidate, the peer's UDP socket, inside its offer or answer
//! (no trickling from this side). The remote side's candidates arrive as `Signal::Ice`; a
//! browser hides its host addresses behind mDNS names (`….local`), which are skipped: its
//! connectivity checks to our candidate then teach str0m its address (a peer-reflexive
//! candidate), as with any browser-to-server WebRTC.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use protocol::{PeerId, Signal};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::Error;

/// The data channel's label (the browser's `createDataChannel("p2p")`).
pub const CHANNEL_LABEL: &str = "p2p";

/// Above this many buffered bytes we stop writing and wait for the buffer to drain (as the
/// browser's `HIGH_WATER`).
const HIGH_WATER: usize = 1024 * 1024;
const LOW_WATER: usize = 256 * 1024;
/// Packets queued per link while the channel opens or drains; older ones are dropped.
const MAX_QUEUE: usize = 512;

/// A data channel that has not opened this long after its link was created never will (the
/// browser's `LINK_OPEN_TIMEOUT_MS`).
pub const LINK_OPEN_TIMEOUT_MS: f64 = 10_000.0;

/// A link whose ICE consent checks have failed this long is closed. The browser's
/// RTCPeerConnection waits about as long before `failed`; str0m has no failed state, and a
/// loaded machine misses a few checks now and then, which must not cost a link.
const DISCONNECTED_CLOSE: Duration = Duration::from_secs(15);

/// What a link hands back to its peer.
#[derive(Debug)]
pub enum LinkEvent {
    /// Relay this to the neighbour through the control center.
    Signal(Signal),
    /// A binary message: a media packet or a parity frame.
    Packet(Vec<u8>),
    /// The link is gone (data channel closed, ICE failed or disconnected).
    Closed,
}

pub struct Link {
    peer: PeerId,
    rtc: Rtc,
    /// Our UDP socket's address (the destination of what we receive).
    local: SocketAddr,
    channel: Option<ChannelId>,
    pending: Option<SdpPendingOffer>,
    queue: VecDeque<Rc<Vec<u8>>>,
    /// Packets dropped because the queue overflowed or the channel refused them.
    pub dropped: u64,
    /// When the link was created and when its data channel opened (wall clock ms).
    pub created_ms: f64,
    pub opened_ms: Option<f64>,
    closed: bool,
    /// The peer was told of the close ([`LinkEvent::Closed`] is handed out once).
    close_reported: bool,
    /// The latest time given with an input.
    now: Instant,
    /// Since when ICE says the remote stopped answering.
    disconnected_since: Option<Instant>,
    timeout: Instant,
}

impl Link {
    pub fn new(peer: PeerId, local: SocketAddr, now: Instant, now_ms: f64) -> Result<Link, Error> {
        let mut rtc = Rtc::builder().build(now);
        let candidate = Candidate::host(local, "udp").map_err(|e| Error::Rtc(e.to_string()))?;
        rtc.add_local_candidate(candidate);
        Ok(Link {
            peer,
            rtc,
            local,
            channel: None,
            pending: None,
            queue: VecDeque::new(),
            dropped: 0,
            created_ms: now_ms,
            opened_ms: None,
            closed: false,
            close_reported: false,
            now,
            disconnected_since: None,
            timeout: now,
        })
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Offerer side: adds the data channel and returns the offer to relay.
    pub fn offer(&mut self) -> Result<Signal, Error> {
        let mut api = self.rtc.sdp_api();
        api.add_channel(CHANNEL_LABEL.to_string());
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| Error::Rtc("no change to offer".into()))?;
        self.pending = Some(pending);
        Ok(Signal::Offer {
            sdp: offer.to_sdp_string(),
        })
    }

    /// A signal from the neighbour; returns the answer to relay when it was an offer.
    pub fn on_signal(&mut self, signal: Signal) -> Result<Option<Signal>, Error> {
        match signal {
            Signal::Offer { sdp } => {
                let offer =
                    SdpOffer::from_sdp_string(&sdp).map_err(|e| Error::Sdp(e.to_string()))?;
                let answer = self
                    .rtc
                    .sdp_api()
                    .accept_offer(offer)
                    .map_err(|e| Error::Rtc(e.to_string()))?;
                Ok(Some(Signal::Answer {
                    sdp: answer.to_sdp_string(),
                }))
            }
            Signal::Answer { sdp } => {
                let pending = self
                    .pending
                    .take()
                    .ok_or_else(|| Error::Sdp("an answer without our offer".into()))?;
                let answer =
                    SdpAnswer::from_sdp_string(&sdp).map_err(|e| Error::Sdp(e.to_string()))?;
                self.rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| Error::Rtc(e.to_string()))?;
                Ok(None)
            }
            Signal::Ice { candidate, .. } => {
                let c = candidate.trim();
                let c = c.strip_prefix("a=").unwrap_or(c);
                if c.is_empty() {
                    return Ok(None); // end of candidates
                }
                match Candidate::from_sdp_string(c) {
                    Ok(c) => self.rtc.add_remote_candidate(c),
                    // mDNS host names and TCP candidates: learnt as peer-reflexive instead.
                    Err(e) => tracing::trace!(peer = %self.peer.0, "remote candidate skipped: {e}"),
                }
                Ok(None)
            }
        }
    }

    /// Whether a datagram from `source` belongs to this link (ICE credentials, DTLS state).
    pub fn accepts(&self, source: SocketAddr, bytes: &[u8], now: Instant) -> bool {
        match self.input(source, bytes, now) {
            Some(input) => self.rtc.accepts(&input),
            None => false,
        }
    }

    fn input<'a>(&self, source: SocketAddr, bytes: &'a [u8], now: Instant) -> Option<Input<'a>> {
        let contents = bytes.try_into().ok()?;
        Some(Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        ))
    }

    pub fn receive(&mut self, source: SocketAddr, bytes: &[u8], now: Instant) {
        self.now = now;
        let Some(input) = self.input(source, bytes, now) else {
            return;
        };
        if let Err(e) = self.rtc.handle_input(input) {
            tracing::debug!(peer = %self.peer.0, "link input failed: {e}");
            self.close();
        }
    }

    /// When the link next wants [`Link::handle_timeout`].
    pub fn timeout(&self) -> Instant {
        self.timeout
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.closed {
            return;
        }
        if self
            .disconnected_since
            .is_some_and(|t| now.saturating_duration_since(t) >= DISCONNECTED_CLOSE)
        {
            tracing::debug!(peer = %self.peer.0, "link disconnected for {DISCONNECTED_CLOSE:?}");
            self.close();
            return;
        }
        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
            tracing::debug!(peer = %self.peer.0, "link timeout failed: {e}");
            self.close();
        }
    }

    /// Drains str0m's outputs: datagrams go to `transmit`, events to `events`. Call after
    /// every input.
    pub fn poll(
        &mut self,
        now_ms: f64,
        mut transmit: impl FnMut(SocketAddr, &[u8]),
        events: &mut Vec<LinkEvent>,
    ) {
        loop {
            if !self.closed && !self.rtc.is_alive() {
                self.close();
            }
            if self.closed {
                if !self.close_reported {
                    self.close_reported = true;
                    events.push(LinkEvent::Closed);
                }
                return;
            }
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.timeout = match self.disconnected_since {
                        // Wake up to close it if it stays so.
                        Some(d) => t.min(d + DISCONNECTED_CLOSE),
                        None => t,
                    };
                    return;
                }
                Ok(Output::Transmit(t)) => transmit(t.destination, &t.contents),
                Ok(Output::Event(ev)) => match ev {
                    Event::ChannelOpen(id, _label) => {
                        self.channel = Some(id);
                        self.opened_ms.get_or_insert(now_ms);
                        if let Some(mut ch) = self.rtc.channel(id) {
                            ch.set_buffered_amount_low_threshold(LOW_WATER);
                        }
                        self.flush();
                    }
                    Event::ChannelData(d) if d.binary => {
                        events.push(LinkEvent::Packet(d.data));
                    }
                    Event::ChannelBufferedAmountLow(_) => {
                        self.flush();
                    }
                    Event::ChannelClose(_) => self.close(),
                    Event::IceConnectionStateChange(state) => {
                        if state == IceConnectionState::Disconnected {
                            self.disconnected_since.get_or_insert(self.now);
                        } else {
                            self.disconnected_since = None;
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(peer = %self.peer.0, "link failed: {e}");
                    self.close();
                }
            }
        }
    }

    /// Queues a packet and writes as much as the channel accepts without overfilling.
    pub fn send(&mut self, packet: Rc<Vec<u8>>) {
        self.queue.push_back(packet);
        while self.queue.len() > MAX_QUEUE {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.flush();
    }

    /// Writes queued packets while the channel takes them; true if it wrote any (the link
    /// then has datagrams to hand out on the next [`Link::poll`]).
    pub fn flush(&mut self) -> bool {
        let Some(id) = self.channel else { return false };
        let Some(mut ch) = self.rtc.channel(id) else {
            return false;
        };
        let mut wrote = false;
        while ch.buffered_amount() < HIGH_WATER {
            let Some(p) = self.queue.front() else { break };
            match ch.write(true, p) {
                Ok(true) => {
                    wrote = true;
                    self.queue.pop_front();
                }
                // The association's send buffer is full: wait for it to drain.
                Ok(false) => break,
                Err(_) => {
                    self.queue.pop_front();
                    self.dropped += 1;
                }
            }
        }
        wrote
    }

    pub fn is_open(&self) -> bool {
        self.channel.is_some() && !self.closed
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.rtc.disconnect();
            // Nothing more to wake up for: the peer drops the link once told.
            self.timeout = self.now + Duration::from_secs(3600);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two links wired back to back in memory, on a simulated clock: what one transmits is
    /// received by the other, time jumps to the earliest timeout.
    struct Pair {
        a: Link,
        b: Link,
        now: Instant,
        got_a: Vec<Vec<u8>>,
        got_b: Vec<Vec<u8>>,
    }

    impl Pair {
        fn step(&mut self) {
            let mut wire = Vec::new();
            let mut events = Vec::new();
            let addr_a = self.a.local;
            let addr_b = self.b.local;
            self.a.poll(
                0.0,
                |to, bytes| wire.push((addr_a, to, bytes.to_vec())),
                &mut events,
            );
            for e in events.drain(..) {
                if let LinkEvent::Packet(p) = e {
                    self.got_a.push(p);
                }
            }
            self.b.poll(
                0.0,
                |to, bytes| wire.push((addr_b, to, bytes.to_vec())),
                &mut events,
            );
            for e in events.drain(..) {
                if let LinkEvent::Packet(p) = e {
                    self.got_b.push(p);
                }
            }
            if wire.is_empty() {
                self.now = self.a.timeout().min(self.b.timeout()).max(self.now);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                return;
            }
            for (from, to, bytes) in wire {
                if to == addr_b {
                    self.b.receive(from, &bytes, self.now);
                } else if to == addr_a {
                    self.a.receive(from, &bytes, self.now);
                }
            }
        }
    }

    #[test]
    fn two_links_open_the_channel_and_carry_packets_both_ways_without_sockets() {
        let now = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:1000".parse().expect("addr");
        let b_addr: SocketAddr = "10.0.0.2:2000".parse().expect("addr");
        let mut a = Link::new(PeerId(1), a_addr, now, 0.0).expect("link a");
        let mut b = Link::new(PeerId(2), b_addr, now, 0.0).expect("link b");
        let offer = a.offer().expect("offer");
        let answer = b
            .on_signal(offer)
            .expect("accept offer")
            .expect("an answer");
        assert!(a.on_signal(answer).expect("accept answer").is_none());
        // Candidates travel inside the SDP; a browser's mDNS one is skipped without error.
        let mdns = Signal::Ice {
            candidate: "candidate:1 1 udp 2122260223 0c5d2a7e.local 50000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
        };
        assert!(b.on_signal(mdns).expect("mDNS candidate").is_none());
        let mut pair = Pair {
            a,
            b,
            now,
            got_a: Vec::new(),
            got_b: Vec::new(),
        };
        // Queued before the channel opens: sent once it does.
        pair.a.send(Rc::new(vec![7u8; 60_000]));
        for _ in 0..2000 {
            if pair.a.is_open() && pair.b.is_open() && !pair.got_b.is_empty() {
                break;
            }
            pair.step();
        }
        assert!(
            pair.a.is_open() && pair.b.is_open(),
            "the data channel did not open"
        );
        assert!(
            pair.now < now + Duration::from_secs(5),
            "opening took {:?}",
            pair.now - now
        );
        pair.b.send(Rc::new(b"back".to_vec()));
        for _ in 0..2000 {
            if !pair.got_a.is_empty() {
                break;
            }
            pair.step();
        }
        assert_eq!(pair.got_b, vec![vec![7u8; 60_000]]);
        assert_eq!(pair.got_a, vec![b"back".to_vec()]);
    }
}
