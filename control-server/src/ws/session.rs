use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use axum::extract::ConnectInfo;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::upgrade::{send_fragmented, PeerSocket, Upgrade};
use axum::extract::State;
use axum::response::Response;
use protocol::control::MAX_CONTROL_MESSAGE;
use protocol::{ClientMsg, ErrorCode, PeerId, ServerMsg, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::events::{DcmEvent, Outbound};
use crate::limits::Limit;
use crate::{AppState, SharedChannel};
use coordinator::topology::region::{NetworkType, Region};

/// Limits applied to every session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Messages per second a peer may send (burst twice as large).
    pub msgs_per_sec: f64,
    /// Protocol errors tolerated before the session is closed.
    pub max_errors: u32,
    /// Largest upload a peer may declare, kbit/s.
    pub max_upload_kbps: u32,
    /// Largest message (text or binary) a peer may send, bytes: at most
    /// [`MAX_CONTROL_MESSAGE`], which peers are built to stay under.
    pub max_message_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            msgs_per_sec: 100.0,
            max_errors: 20,
            max_upload_kbps: 10_000_000,
            max_message_bytes: MAX_CONTROL_MESSAGE,
        }
    }
}

/// Hard cap on a frame or message, well above [`MAX_CONTROL_MESSAGE`]: the session itself
/// refuses anything over `MAX_CONTROL_MESSAGE` with `too_large` and closes gracefully (the frame
/// was read, so nothing unread is left to make the kernel reset the connection). Only a frame
/// over this cap makes the WebSocket itself fail before the peer's input is read.
const HARD_MESSAGE_CAP: usize = 4 * MAX_CONTROL_MESSAGE;

pub async fn ws_handler(
    ws: Upgrade,
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    extensions: axum::http::Extensions,
) -> Response {
    // The peer's address decides its region. Servers built without connect info (some
    // embeddings) place everyone in 0.0.0.0's region.
    let remote = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    // The viewer token (`?token=`) is checked at join, where a refusal can name its reason.
    let token = crate::operator::presented_token(&headers, &uri);
    // Small buffers: control messages are tiny, and tens of thousands of sessions must fit in a
    // few KiB each (tungstenite's defaults are 128 KiB). A binary heartbeat is about 130 bytes;
    // the read buffer grows for a larger frame (a join, a signal) and reuses its space once the
    // frame is handled.
    // Each message is written as soon as it is sent (write buffer threshold 0), and one larger
    // than a fragment goes out in fragments (see `upgrade`).
    let config = WebSocketConfig::default()
        .max_message_size(Some(HARD_MESSAGE_CAP))
        .max_frame_size(Some(HARD_MESSAGE_CAP))
        .read_buffer_size(256)
        .write_buffer_size(0);
    ws.on_upgrade(config, move |socket| {
        run_session(socket, state, remote, token)
    })
}

struct Session {
    state: AppState,
    remote: IpAddr,
    out: crate::events::OutboundTx,
    joined: Option<(PeerId, SharedChannel)>,
    /// A download's live companion whose upload it shares (told when the download ends).
    companion: Option<(PeerId, SharedChannel)>,
    errors: u32,
    tokens: f64,
    last_refill: Instant,
    last_heartbeat: Option<(u64, Instant)>,
    hb_tokens: f64,
    /// The token the WebSocket URL presented (`?token=`), checked at join.
    token: Option<String>,
    /// Code of the last error sent, named in the close reason when the error budget runs out.
    last_error: Option<ErrorCode>,
    /// The session's place among its address's sessions (per-address limits), if tracked.
    address: Option<crate::limits::AddressSession>,
    /// Unique to this session (see [`crate::SessionInfo::serial`]).
    serial: u64,
}

/// Numbers the sessions ([`Session::serial`]).
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The close reason of a session whose peer resumed on a new connection to this node while this
/// one was still open (a half-open socket after a network blip).
pub const REPLACED: &str = "replaced by a new connection of this peer";

/// A peer that has not taken a control message for this long is cut loose: its session must
/// not hold its queue (and the DCM's messages to it) forever.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a closing session keeps reading (and discarding) the peer's input after its close
/// frame, so the kernel does not reset the connection over unread input before the peer has read
/// the last error and the close frame.
const CLOSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes a closing session discards at most before it drops the connection anyway.
const CLOSE_DRAIN_BYTES: usize = 4 << 20;

/// What writing one queued message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Sent,
    /// A close frame went out: the session ends.
    Closed,
    /// The peer is gone or too slow.
    Failed,
}

/// A close reason fits a control frame: at most 123 bytes, cut at a character boundary.
fn close_reason(reason: &str) -> Utf8Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Utf8Bytes::from(&reason[..end])
}

/// Writes one queued message.
async fn write_out(socket: &mut PeerSocket, item: Box<Outbound>) -> Written {
    let (msg, last) = match *item {
        Outbound::Msg(m) => match serde_json::to_string(&*m) {
            Ok(s) => (Message::Text(Utf8Bytes::from(s)), false),
            Err(e) => {
                tracing::error!("serializing server message: {e}");
                return Written::Sent;
            }
        },
        Outbound::Packet(b) => (Message::Binary(b), false),
        Outbound::Text(t) => (Message::Text(t), false),
        Outbound::Close(reason) => (
            Message::Close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: close_reason(&reason),
            })),
            true,
        ),
        Outbound::Evict(reason) => {
            // The error first, so the page can tell its viewer why, then the close.
            let error = ServerMsg::Error {
                code: ErrorCode::Evicted,
                message: reason.clone(),
            };
            if let Ok(s) = serde_json::to_string(&error) {
                let _ = tokio::time::timeout(
                    SEND_TIMEOUT,
                    socket.send(Message::Text(Utf8Bytes::from(s))),
                )
                .await;
            }
            (
                Message::Close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: close_reason(&reason),
                })),
                true,
            )
        }
    };
    let sent = matches!(
        tokio::time::timeout(SEND_TIMEOUT, send_fragmented(socket, msg)).await,
        Ok(Ok(()))
    );
    match (sent, last) {
        (false, _) => Written::Failed,
        (true, true) => Written::Closed,
        (true, false) => Written::Sent,
    }
}

/// How the session loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The peer closed, left, failed or is too slow: nothing more to say to it.
    ByPeer,
    /// The server sent its close frame (with a reason).
    CloseSent,
    /// The server ends the session and has not sent a close frame yet.
    ByServer,
}

/// One task per session reads the peer's messages and writes what the session and the DCM
/// queued for it. A single task (rather than a reader and a writer around a split socket)
/// costs one wake-up per message and no lock between the halves, which is what lets tens of
/// thousands of sessions share two cores.
///
/// The session is built here and the loop is an async block (see below), which keeps the
/// session's task small: it lives as long as the peer stays connected.
fn run_session(
    mut socket: PeerSocket,
    state: AppState,
    remote: IpAddr,
    token: Option<String>,
) -> impl std::future::Future<Output = ()> + Send {
    let (out_tx, mut out_rx) = mpsc::channel::<Box<Outbound>>(1024);
    let limits = state.limits;
    let address = state.addresses.open_session(remote);
    let mut session = Session {
        state,
        remote,
        out: out_tx,
        joined: None,
        companion: None,
        errors: 0,
        tokens: limits.msgs_per_sec * 2.0,
        last_refill: Instant::now(),
        last_heartbeat: None,
        hb_tokens: 3.0,
        token,
        last_error: None,
        address: None,
        serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };

    // Over the address's session limit: the refusal and its reason go out, then the close.
    let refused = match address {
        Ok(a) => {
            session.address = a;
            false
        }
        Err(e) => {
            session.state.addresses.refusals.record(e.limit());
            !session.refuse(ErrorCode::TooManySessions, e.to_string())
        }
    };
    // An async block, not an async fn: a block uses what it captures in place, where an async
    // fn copies its arguments into locals and its future keeps room for both (the socket and
    // the session twice: 672 bytes in every session's task).
    async move {
        let ended = loop {
            if refused {
                break Ended::ByServer;
            }
            tokio::select! {
                // Queued messages first: an error reaches the peer before its next message is
                // read.
                biased;
                item = out_rx.recv() => {
                    // Never `None`: the session holds a sender.
                    let Some(item) = item else { break Ended::ByServer };
                    if matches!(*item, Outbound::Evict(_)) {
                        session.state.ban(session.remote);
                    }
                    if let Outbound::Msg(m) = &*item {
                        if let ServerMsg::Error { code: ErrorCode::NotLinked, .. } = **m {
                            session.state.addresses.refusals.record(Limit::NotLinked);
                        }
                    }
                    match Box::pin(write_out(&mut socket, item)).await {
                        Written::Sent => {}
                        Written::Closed => break Ended::CloseSent,
                        Written::Failed => break Ended::ByPeer,
                    }
                }
                msg = socket.next() => {
                    let Some(msg) = msg else { break Ended::ByPeer };
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => {
                            // Frames over the hard cap land here: tell the peer why before the
                            // socket goes (its input can no longer be read).
                            tracing::debug!("websocket error: {e}");
                            session.refuse(ErrorCode::TooLarge, format!("websocket error: {e}"));
                            break Ended::ByServer;
                        }
                    };
                    let len = match &msg {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) => b.len(),
                        _ => 0,
                    };
                    let max_len = session.state.limits.max_message_bytes;
                    let data = matches!(msg, Message::Text(_) | Message::Binary(_));
                    let over_bytes = if data && len <= max_len {
                        session.over_bytes(len)
                    } else {
                        None
                    };
                    let keep_going = match msg {
                        Message::Text(_) | Message::Binary(_) if len > max_len => {
                            session.state.addresses.refusals.record(Limit::MessageSize);
                            session.refuse(
                                ErrorCode::TooLarge,
                                format!("message of {len} bytes exceeds {max_len}"),
                            )
                        }
                        // The address's control traffic, in bytes per second: over it, the message
                        // is dropped unparsed.
                        Message::Text(_) | Message::Binary(_) if over_bytes.is_some() => {
                            over_bytes == Some(true)
                        }
                        // Every peer message, text or binary, spends one token of the session's
                        // budget.
                        Message::Text(_) | Message::Binary(_) if !session.take_token() => {
                            session.state.addresses.refusals.record(Limit::MessagesPerSec);
                            session
                                .error(ErrorCode::RateLimited, "too many messages; slow down".into())
                        }
                        // Boxed (one small allocation per message): the handlers' futures are
                        // large and would otherwise sit in every idle session's task.
                        Message::Text(text) => Box::pin(session.on_text(text.as_str())).await,
                        Message::Binary(frame) => match session.on_binary(&frame) {
                            Ok(keep_going) => keep_going,
                            // The DCM's queue is full: wait for room (boxed, as above).
                            Err((ch, ev)) => {
                                let _ = Box::pin(ch.dcm.send(ev)).await;
                                true
                            }
                        },
                        Message::Close(_) => break Ended::ByPeer,
                        // Pings are answered by tungstenite; raw frames are never read.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
                    };
                    if !keep_going {
                        break Ended::ByServer;
                    }
                }
            }
        };
        // Boxed, as the handlers are: the leave's DCM sends and the close's timers would otherwise
        // sit in every session's task for its whole life (the task is as large as its largest
        // state).
        Box::pin(session.leave()).await;
        drop(session);
        if ended != Ended::ByPeer {
            Box::pin(close_gracefully(&mut socket, &mut out_rx, ended)).await;
        }
    }
}

/// Ends a session the server closes: what is still queued (a last error, the close frame) goes
/// out, a close frame follows if none was queued, and then the peer's input is read and
/// discarded until its close, for at most [`CLOSE_DRAIN`] and [`CLOSE_DRAIN_BYTES`]. Dropping
/// the socket with unread input would make the kernel reset the connection, and a reset throws
/// away what the peer had not read yet: the error and the close frame with its reason.
async fn close_gracefully(
    socket: &mut PeerSocket,
    out_rx: &mut mpsc::Receiver<Box<Outbound>>,
    ended: Ended,
) {
    let mut close_sent = ended == Ended::CloseSent;
    while !close_sent {
        let Ok(item) = out_rx.try_recv() else { break };
        match write_out(socket, item).await {
            Written::Sent => {}
            Written::Closed => close_sent = true,
            Written::Failed => return,
        }
    }
    if !close_sent {
        let bye = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static("session ended"),
        }));
        if !matches!(
            tokio::time::timeout(SEND_TIMEOUT, socket.send(bye)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + CLOSE_DRAIN;
    let mut discarded = 0usize;
    while discarded < CLOSE_DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
            Ok(Some(Ok(m))) => discarded += m.into_data().len().max(1),
        }
    }
}

impl Session {
    /// Queues an error for the peer; returns false once the peer has used up its error budget.
    /// Never waits: the session's own task drains the queue, and a peer whose queue is full is
    /// cut loose anyway.
    fn error(&mut self, code: ErrorCode, message: String) -> bool {
        self.errors += 1;
        self.last_error = Some(code);
        tracing::info!(?code, %message, "protocol error from peer");
        if self
            .out
            .try_send(Outbound::msg(ServerMsg::Error { code, message }))
            .is_err()
        {
            return false;
        }
        if self.errors >= self.state.limits.max_errors {
            let last = serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = self.out.try_send(Box::new(Outbound::Close(format!(
                "too many protocol errors (last: {last})"
            ))));
            return false;
        }
        true
    }

    /// Queues an error and a close frame whose reason is the error's message: the session ends
    /// (gracefully, see [`close_gracefully`]). Always false.
    fn refuse(&mut self, code: ErrorCode, message: String) -> bool {
        tracing::info!(?code, %message, "session refused");
        self.last_error = Some(code);
        let reason = message.clone();
        if self
            .out
            .try_send(Outbound::msg(ServerMsg::Error { code, message }))
            .is_ok()
        {
            let _ = self.out.try_send(Box::new(Outbound::Close(reason)));
        }
        false
    }

    /// The viewer-token check at join (`--token-secret`): the static `--viewer-token` and the
    /// operator token still open every channel; otherwise a signed token for `channel`.
    fn check_viewer_token(&self, channel: &str) -> Result<(), crate::viewer_token::TokenError> {
        let config = &self.state.config;
        let Some(secret) = config.token_secret.as_deref() else {
            return Ok(());
        };
        let given = self.token.as_deref().unwrap_or_default();
        let static_ok = config
            .viewer_token
            .as_deref()
            .is_some_and(|t| crate::operator::token_matches(t, given))
            || crate::operator::token_matches(self.state.operator_token(), given);
        if static_ok {
            return Ok(());
        }
        let claims = crate::viewer_token::validate(
            secret.as_bytes(),
            self.token.as_deref(),
            channel,
            crate::viewer_token::unix_now_s(),
        )?;
        tracing::debug!(channel, sub = ?claims.sub, "viewer token accepted");
        Ok(())
    }

    /// Spends `len` bytes of the address's control-traffic budget: `None` within it. Over it
    /// the caller drops the message: a `rate_limited` error is queued (it counts against the
    /// session's error budget) and `Some(keep_going)` returned.
    fn over_bytes(&mut self, len: usize) -> Option<bool> {
        let e = self.address.as_ref()?.traffic(len).err()?;
        self.state.addresses.refusals.record(e.limit());
        Some(self.error(ErrorCode::RateLimited, e.to_string()))
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = self.state.limits.msgs_per_sec;
        self.tokens = (self.tokens + now.duration_since(self.last_refill).as_secs_f64() * rate)
            .min(rate * 2.0);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    async fn on_text(&mut self, text: &str) -> bool {
        let msg: ClientMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return self.error(ErrorCode::Malformed, format!("malformed message: {e}")),
        };
        match (msg, self.joined.clone()) {
            (
                ClientMsg::Join {
                    version,
                    channel,
                    upload_kbps,
                    region,
                    network,
                    companion,
                    relay_token,
                    resume,
                    connectivity,
                    waypoint,
                },
                None,
            ) => {
                let req = JoinRequest {
                    version,
                    channel,
                    upload_kbps,
                    region_hint: region,
                    network,
                    companion,
                    relay_token,
                    resume,
                    connectivity,
                    waypoint,
                };
                // Boxed: joining is rare and its future large; every session's task would
                // otherwise carry its size for life.
                Box::pin(self.join(req)).await
            }
            (ClientMsg::Join { .. }, Some(_)) => {
                self.error(ErrorCode::AlreadyJoined, "already joined".into())
            }
            (_, None) => self.error(ErrorCode::NotJoined, "send join first".into()),
            (ClientMsg::Signal { to, signal }, Some((me, ch))) => {
                if to == me {
                    return self.error(ErrorCode::NotLinked, "cannot signal yourself".into());
                }
                let _ = ch
                    .dcm
                    .send(DcmEvent::Signal {
                        from: me,
                        to,
                        signal,
                    })
                    .await;
                true
            }
            (ClientMsg::Heartbeat(hb), Some((me, ch))) => match self.on_heartbeat(me, &ch, hb) {
                Ok(keep_going) => keep_going,
                Err(ev) => {
                    let _ = ch.dcm.send(ev).await;
                    true
                }
            },
            (ClientMsg::Connectivity(connectivity), Some((me, ch))) => {
                let _ = ch
                    .dcm
                    .send(DcmEvent::Connectivity {
                        peer: me,
                        connectivity,
                    })
                    .await;
                true
            }
            (ClientMsg::LinkFailed { peer }, Some((me, ch))) => {
                if peer == me {
                    return self.error(ErrorCode::NotLinked, "a link with yourself".into());
                }
                let _ = ch
                    .dcm
                    .send(DcmEvent::LinkFailed { reporter: me, peer })
                    .await;
                true
            }
            (ClientMsg::Forged { peer, seq, hash }, Some((me, ch))) => {
                if peer == me {
                    return self.error(ErrorCode::NotLinked, "a report about yourself".into());
                }
                let Some(received) = protocol::manifest::from_hex(&hash) else {
                    return self.error(
                        ErrorCode::Malformed,
                        "forged: hash must be 64 hex digits (the SHA-256 received)".into(),
                    );
                };
                use coordinator::dcm::hostile::Evidence;
                let evidence = match ch.packet_digest(seq) {
                    Some(origin) if origin == received => Evidence::Refuted,
                    Some(_) => Evidence::Holds,
                    None => Evidence::Unknown,
                };
                let _ = ch
                    .dcm
                    .send(DcmEvent::Forged {
                        reporter: me,
                        accused: peer,
                        seq,
                        evidence,
                    })
                    .await;
                true
            }
            (ClientMsg::Leave, Some(_)) => false,
        }
    }

    /// Binary frames from peers carry compact heartbeats (see `protocol::heartbeat::binary`).
    /// Handled without waiting (no future, nothing boxed: the common message of tens of
    /// thousands of sessions); `Err` holds the event for the DCM when its queue was full, for
    /// the caller to send when there is room.
    fn on_binary(&mut self, frame: &[u8]) -> Result<bool, (SharedChannel, DcmEvent)> {
        let Some((me, ch)) = self.joined.clone() else {
            return Ok(self.error(ErrorCode::NotJoined, "send join first".into()));
        };
        match protocol::heartbeat::binary::decode(frame) {
            Ok(hb) => self.on_heartbeat(me, &ch, hb).map_err(|ev| (ch, ev)),
            Err(e) => Ok(self.error(ErrorCode::Malformed, e.to_string())),
        }
    }

    /// Checks a heartbeat and queues it for the DCM: `Ok(keep_going)`, or `Err` with the event
    /// when the DCM's queue is full (a heartbeat is not dropped for that; the caller waits).
    fn on_heartbeat(
        &mut self,
        me: PeerId,
        ch: &SharedChannel,
        hb: protocol::Heartbeat,
    ) -> Result<bool, DcmEvent> {
        if hb.client_id != me {
            return Ok(self.error(
                ErrorCode::WrongPeer,
                format!(
                    "heartbeat claims to be {} but this session is {me}",
                    hb.client_id
                ),
            ));
        }
        // Bounded so a forged heartbeat cannot make the DCM allocate or iterate much.
        // A coded middle tier has up to k + n trees.
        let k = self.state.config.substreams as usize
            + if self.state.config.topology.is_some() {
                usize::from(protocol::fec::MAX_PARITY_SHARDS)
            } else {
                0
            };
        if hb.parents.len() > k || hb.buffer.len() > k || hb.children.len() > 64 * k {
            return Ok(self.error(
                ErrorCode::Malformed,
                "heartbeat lists more links than a peer can have".into(),
            ));
        }
        // Timestamps are the peer's clock: skew is tolerated, nonsense is not.
        let server_ms = crate::channel::now_ms();
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let stamps = hb
            .parents
            .iter()
            .filter_map(|p| p.last_ts_ms)
            .chain(hb.children.iter().filter_map(|c| c.last_ts_ms));
        if hb.local_ts_ms.abs_diff(server_ms) > DAY_MS
            || stamps.into_iter().any(|t| t > hb.local_ts_ms + 1000)
        {
            return Ok(self.error(
                ErrorCode::Malformed,
                format!(
                    "heartbeat timestamps are absurd (local_ts_ms {})",
                    hb.local_ts_ms
                ),
            ));
        }
        let now = Instant::now();
        if let Some((last_seq, _)) = self.last_heartbeat {
            if hb.seq <= last_seq {
                return Ok(self.error(
                    ErrorCode::Malformed,
                    format!("heartbeat seq {} does not follow {last_seq}", hb.seq),
                ));
            }
        }
        // At most two heartbeats per interval on average, with a burst of three: network jitter
        // can bunch two regular heartbeats, and a peer may report early when congested.
        let interval = f64::from(self.state.config.heartbeat_ms.max(1)) / 1000.0;
        if let Some((_, last_at)) = self.last_heartbeat {
            self.hb_tokens = (self.hb_tokens
                + now.duration_since(last_at).as_secs_f64() * 2.0 / interval)
                .min(3.0);
        }
        if self.hb_tokens < 1.0 {
            self.state.addresses.refusals.record(Limit::HeartbeatRate);
            return Ok(self.error(ErrorCode::RateLimited, "heartbeats too frequent".into()));
        }
        self.hb_tokens -= 1.0;
        self.last_heartbeat = Some((hb.seq, now));
        let ev = DcmEvent::Heartbeat {
            peer: me,
            heartbeat: Box::new(hb),
            received: now,
        };
        match ch.dcm.try_send(ev) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(true),
            Err(mpsc::error::TrySendError::Full(ev)) => Err(ev),
        }
    }

    async fn join(&mut self, req: JoinRequest) -> bool {
        let JoinRequest {
            version,
            channel,
            upload_kbps,
            region_hint,
            network,
            companion,
            relay_token,
            resume,
            connectivity,
            waypoint,
        } = req;
        // Every join attempt from the address counts, refused ones included.
        if let Some(Err(e)) = self.address.as_ref().map(|a| a.join()) {
            self.state.addresses.refusals.record(e.limit());
            return self.refuse(ErrorCode::RateLimited, e.to_string());
        }
        if version != PROTOCOL_VERSION {
            return self
                .error(
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
                );
        }
        // A waypoint server presents the operator's token instead of a viewer's.
        if let Some(t) = &waypoint {
            if !crate::operator::token_matches(self.state.operator_token(), t) {
                return self.refuse(
                    ErrorCode::BadWaypointToken,
                    "a waypoint joins with the operator token (--operator-token)".into(),
                );
            }
        }
        // A recruited relay presents its relay token and a download its live companion instead:
        // both are checked below, and the page's viewer token names the live channel.
        if relay_token.is_none() && companion.is_none() && waypoint.is_none() {
            if let Err(e) = self.check_viewer_token(&channel) {
                self.state.addresses.refusals.record(Limit::ViewerToken);
                return self.refuse(e.code(), e.to_string());
            }
        }
        if upload_kbps > self.state.limits.max_upload_kbps {
            return self.error(
                ErrorCode::BadCapacity,
                format!(
                    "declared upload {upload_kbps} kbit/s exceeds the limit of {} kbit/s",
                    self.state.limits.max_upload_kbps
                ),
            );
        }
        let network = match network.as_deref().map(str::parse::<NetworkType>) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(())) => {
                return self.error(
                    ErrorCode::Malformed,
                    "network must be one of dsl, cable, fiber, mobile, satellite, other".into(),
                )
            }
        };
        if region_hint.as_ref().is_some_and(|r| r.len() > 64) {
            return self.error(
                ErrorCode::Malformed,
                "region hint longer than 64 characters".into(),
            );
        }
        let region = match &self.state.config.topology {
            Some(t) => t.classify(self.remote, network, region_hint.as_deref()),
            None => Region::fallback(self.remote),
        };
        if let Some(left) = self.state.banned(self.remote) {
            self.state.addresses.refusals.record(Limit::BannedAddress);
            self.error(
                ErrorCode::Banned,
                format!(
                    "this address was evicted for sending forged data; refused for {} s more",
                    left.as_secs().max(1)
                ),
            );
            let _ = self
                .out
                .try_send(Box::new(Outbound::Close("address banned".into())));
            return false;
        }
        // Cluster mode: the channel's DCM may run on another node (FIG. 7's resource service
        // locator); the peer is sent there.
        #[cfg(feature = "cluster")]
        if let Some(cluster) = self.state.cluster().cloned() {
            let runs_here = self.state.channel(&channel).is_some();
            match cluster.place(&channel, runs_here).await {
                crate::cluster::Placement::Here => {}
                crate::cluster::Placement::There { url } => {
                    cluster
                        .counters
                        .redirects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let redirect = ServerMsg::Redirect {
                        url,
                        dcm: channel.clone(),
                    };
                    if self.out.try_send(Outbound::msg(redirect)).is_ok() {
                        let _ = self
                            .out
                            .try_send(Box::new(Outbound::Close("redirected".into())));
                    }
                    return false;
                }
                crate::cluster::Placement::Unavailable(message) => {
                    return self.refuse(ErrorCode::Unavailable, message);
                }
            }
        }
        let Some(ch) = self.state.channel(&channel) else {
            return self.error(
                ErrorCode::UnknownChannel,
                format!("no channel named {channel:?}"),
            );
        };
        // A peer coming back from another node, or on a new connection to this one, keeps its
        // id (and so its links).
        let resumed = match &resume {
            None => None,
            Some(r) => match self.check_resume(&ch.name, r) {
                Ok(()) => Some(r.peer),
                Err(message) => {
                    tracing::info!(peer = %r.peer, channel = %ch.name, "resume refused: {message}");
                    return self.refuse(ErrorCode::BadResume, message);
                }
            },
        };
        let file = ch.file().cloned();
        let media = match (&file, ch.init()) {
            (Some(_), _) => Some(("application/octet-stream".to_string(), ch.stream_kbps())),
            (None, Some((_, mime, kbps))) => Some((mime, kbps)),
            (None, None) => None,
        };
        let (Some((mime, stream_kbps)), Some(position)) =
            (media, ch.choose_join_position(crate::channel::now_ms()))
        else {
            return self.error(
                ErrorCode::UnknownChannel,
                format!("channel {channel:?} has no live source yet"),
            );
        };
        // A download beside a live session of the same page: live keeps what it needs.
        let mut placed_kbps = upload_kbps;
        let mut granted = None;
        // In a cluster the live companion may be a session of another node (the two channels'
        // DCMs run where their first viewers went): the download then goes without the split.
        let companion = companion.filter(|live| !self.companion_elsewhere(*live));
        if let Some(live) = companion {
            let s = match self.split_with(live, &ch, upload_kbps).await {
                Ok(s) => s,
                Err(message) => return self.error(ErrorCode::BadCompanion, message),
            };
            placed_kbps = s.file_kbps;
            granted = Some(s.file_kbps);
        }
        let peer = resumed.unwrap_or_else(|| self.state.next_peer_id());
        // A recruited relay: its token fixes its region and the upload it offers.
        let (region, placed_kbps, relay) = match &relay_token {
            None => (region, placed_kbps, false),
            Some(t) => {
                match self
                    .state
                    .relays
                    .redeem(t, &ch.name, peer, crate::channel::now_ms())
                {
                    Some(g) => (g.region, g.upload_kbps.min(upload_kbps.max(1)), true),
                    None => {
                        return self.error(
                            ErrorCode::BadRelayToken,
                            format!(
                                "relay token unknown, used, expired or not for channel {channel:?}"
                            ),
                        )
                    }
                }
            }
        };
        // Registered before the DCM hears of the peer: a session this one replaces can then no
        // longer report the peer's departure (only the registered session unregisters it).
        let issued_ms = crate::channel::now_ms();
        let info = crate::SessionInfo {
            remote: self.remote,
            channel: ch.clone(),
            upload_kbps,
            out: self.out.clone(),
            serial: self.serial,
            token_issued_ms: issued_ms,
        };
        match self.state.register_session(peer, info, resumed.is_some()) {
            crate::Registered::Fresh => {}
            crate::Registered::Replaced { old } => {
                // Only a verified resume token for this channel and peer gets here. The DCM
                // keeps the peer's place and moves it to this session when the join reaches it.
                // (A full queue means the old session is stuck: it ends by itself, silently.)
                tracing::info!(%peer, channel = %ch.name, "resume replaces the peer's session still open here");
                let _ = old.try_send(Box::new(Outbound::Close(REPLACED.into())));
            }
            crate::Registered::InUse => {
                return self.refuse(
                    ErrorCode::BadResume,
                    format!("{peer} is connected already, to another channel"),
                );
            }
        }
        self.joined = Some((peer, ch.clone()));
        let base = format!("/api/channels/{}", ch.name);
        let welcome = ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: peer,
            channel: ch.name.clone(),
            heartbeat_ms: self.state.config.heartbeat_ms,
            substreams: self.state.config.substreams,
            stream_kbps,
            mime,
            init_url: format!("{base}/init"),
            packet_url: format!("{base}/packets/"),
            start_seq: position.start,
            live_seq: position.live,
            file,
            upload_kbps: granted,
            public_key: ch.public_key(),
            fragment_ms: ch.fragment_ms(),
            live_start_seq: position.newest_fragment,
        };
        // Welcome is queued before the DCM can queue instructions: the peer sees them in order.
        if self.out.try_send(Outbound::msg(welcome)).is_err() {
            return false;
        }
        #[cfg(feature = "cluster")]
        if let Some(cluster) = self.state.cluster() {
            let msg = ServerMsg::Cluster {
                dcm: ch.name.clone(),
                resume_token: cluster.resume_token(&ch.name, peer, issued_ms),
                nodes: cluster.node_urls(),
            };
            if self.out.try_send(Outbound::msg(msg)).is_err() {
                return false;
            }
        }
        let _ = ch
            .dcm
            .send(DcmEvent::Join {
                peer,
                upload_kbps: placed_kbps,
                region,
                relay,
                out: self.out.clone(),
                resumed: resumed.is_some(),
                connectivity,
                waypoint: waypoint.is_some(),
            })
            .await;
        true
    }

    /// Whether `live` may be a session of another node of the cluster (unknown here).
    fn companion_elsewhere(&self, live: PeerId) -> bool {
        #[cfg(feature = "cluster")]
        if self.state.cluster().is_some() {
            return self.state.session(live).is_none();
        }
        let _ = live;
        false
    }

    /// Checks a resume: its token must be the cluster's for this channel and peer, and not
    /// expired. (A session of the peer still open here is replaced when the join registers.)
    fn check_resume(&self, channel: &str, r: &protocol::Resume) -> Result<(), String> {
        #[cfg(feature = "cluster")]
        if let Some(cluster) = self.state.cluster() {
            return cluster
                .verify_resume(channel, r.peer, &r.token, crate::channel::now_ms())
                .map_err(|e| e.to_string());
        }
        let _ = (channel, r);
        Err("this server is not part of a cluster: join without resume".into())
    }

    /// Checks a download's companion (a live session of the same address) and asks its DCM
    /// for the download's share of the page's upload.
    async fn split_with(
        &mut self,
        live: PeerId,
        download: &SharedChannel,
        upload_kbps: u32,
    ) -> Result<crate::dcm::split::UploadSplit, String> {
        if download.file().is_none() {
            return Err(format!(
                "companion is for downloads; channel {:?} is not a file channel",
                download.name
            ));
        }
        let Some(info) = self.state.session(live) else {
            return Err(format!("companion {live} is not a joined session"));
        };
        if info.remote != self.remote {
            return Err(format!("companion {live} is a session of another address"));
        }
        if info.channel.file().is_some() {
            return Err(format!(
                "companion {live} is a download, not a live session"
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let asked = info
            .channel
            .dcm
            .send(DcmEvent::SplitUpload {
                peer: live,
                capacity_kbps: upload_kbps,
                file_rate_kbps: download.stream_kbps(),
                reply: tx,
            })
            .await;
        match (asked, rx.await) {
            (Ok(()), Ok(Some(s))) => {
                self.companion = Some((live, info.channel));
                Ok(s)
            }
            _ => Err(format!("companion {live} has left its channel")),
        }
    }

    async fn leave(&mut self) {
        if let Some((peer, ch)) = self.joined.take() {
            // A session a resume replaced leaves quietly: the peer is still there.
            if self.state.unregister_session(peer, self.serial) {
                let _ = ch.dcm.send(DcmEvent::Leave { peer }).await;
            }
        }
        if let Some((live, ch)) = self.companion.take() {
            let _ = ch.dcm.send(DcmEvent::EndSplit { peer: live }).await;
        }
    }
}

/// The fields of a `join` message.
struct JoinRequest {
    version: u32,
    channel: String,
    upload_kbps: u32,
    region_hint: Option<String>,
    network: Option<String>,
    companion: Option<PeerId>,
    relay_token: Option<String>,
    resume: Option<protocol::Resume>,
    connectivity: Option<protocol::Connectivity>,
    waypoint: Option<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((peer, ch)) = self.joined.take() {
            if self.state.unregister_session(peer, self.serial) {
                let _ = ch.dcm.try_send(DcmEvent::Leave { peer });
            }
        }
        if let Some((live, ch)) = self.companion.take() {
            let _ = ch.dcm.try_send(DcmEvent::EndSplit { peer: live });
        }
    }
}
