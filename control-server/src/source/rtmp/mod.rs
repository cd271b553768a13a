//! RTMP ingest (`--rtmp ADDR`): OBS, ffmpeg and hardware encoders publish a channel at
//! `rtmp://HOST:PORT/live/CHANNEL?key=KEY`.
//!
//! The convention, one for every client: application `live`, stream name `CHANNEL?key=KEY`
//! (the stream key is the server's `--ingest-key`, the one HTTP ingest takes). OBS: Server
//! `rtmp://HOST:1935/live`, Stream Key `CHANNEL?key=KEY`; ffmpeg splits the URL the same way.
//!
//! `rml_rtmp` (sans-IO) does the handshake and the chunk streams; this module moves bytes
//! between it and a tokio socket, decides who may publish (the checks of HTTP ingest: key,
//! channel name, channels created per address, one source per channel), and feeds the FLV tags
//! through the [`super::flv`] remuxer into [`LiveIngest`], the path HTTP ingest takes.
//!
//! A publisher that reconnects resumes its channel: packet numbers continue after the window's
//! latest, and the media timeline continues where the previous connection ended, so viewers'
//! players keep their MediaSource and play on once the new fragments arrive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rml_rtmp::chunk_io::ChunkSerializer;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::messages::RtmpMessage;
use rml_rtmp::rml_amf0::Amf0Value;
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::flv::{Output, RemuxError, Remuxer};
use super::ingest::LiveIngest;
use crate::channel::SharedChannel;
use crate::AppState;

mod board;
mod publish;
pub use board::{Reason, RtmpBoard, RtmpChannelView, RtmpProblem, RtmpView};
use publish::attach;
pub use publish::{check_key, is_publish_app, parse_publish_name, PublishName, Refusal, APP};

/// Longest the handshake may take.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);
/// Longest a connection may stay silent (a publisher sends media many times a second). A
/// publisher whose link died without a FIN holds its channel this long: its encoder's
/// reconnection is refused as a second publisher until then.
const IDLE_TIME: Duration = Duration::from_secs(10);
/// Bytes a connection may send before its publish request is accepted: the commands before it
/// take a few hundred; more is a client that never publishes, holding buffers.
const MAX_BYTES_BEFORE_PUBLISH: u64 = 1 << 20;
/// Longest a refused publisher is read from so that it sees the refusal (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(3);
/// Chunk size announced to clients (rml_rtmp's default), also used for our own status messages.
const CHUNK_SIZE: u32 = 4096;

/// A running RTMP listener.
pub struct RtmpServer {
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RtmpServer {
    /// Stops accepting publishers (connections already open go on).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Where each channel's media timeline ended when its last RTMP publisher left, µs.
type ResumePoints = Arc<Mutex<HashMap<String, u64>>>;

/// Binds `addr` and accepts RTMP publishers for `state`'s channels until the runtime stops.
pub async fn listen(addr: SocketAddr, state: AppState) -> std::io::Result<RtmpServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    state.rtmp.set_listening(local_addr);
    let resume: ResumePoints = Arc::default();
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, remote)) => {
                    let _ = socket.set_nodelay(true);
                    tokio::spawn(connection(socket, remote, state.clone(), resume.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: try again shortly.
                    tracing::warn!("RTMP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tracing::info!("RTMP ingest listening on rtmp://{local_addr}/{APP}/CHANNEL?key=KEY");
    Ok(RtmpServer { local_addr, task })
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("RTMP protocol error: {0}")]
    Session(String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("silent for {0:?}")]
    Idle(Duration),
    #[error("sent {0} bytes without publishing")]
    TooMuchBeforePublish(u64),
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("stream refused: {0}")]
    Media(#[from] RemuxError),
    #[error("ingest: {0}")]
    Ingest(#[from] super::ingest::IngestError),
}

/// The channel a connection publishes.
struct Publisher {
    channel: SharedChannel,
    remuxer: Remuxer,
    live: Option<LiveIngest>,
    started: std::time::Instant,
    fragments: u64,
}

impl Publisher {
    async fn apply(&mut self, outputs: Vec<Output>) -> Result<(), ConnError> {
        for o in outputs {
            match o {
                Output::Init(bytes) => {
                    let changed = self
                        .channel
                        .init()
                        .is_none_or(|(init, _, _)| init[..] != bytes[..]);
                    tracing::info!(
                        channel = %self.channel.name,
                        changed,
                        "RTMP init segment"
                    );
                    // A fresh splitter for the new init segment; packet numbers continue.
                    let mut live = LiveIngest::new(self.channel.clone());
                    live.push(&bytes).await?;
                    self.live = Some(live);
                }
                Output::Fragment(bytes) => {
                    if let Some(live) = self.live.as_mut() {
                        live.push(&bytes).await?;
                        self.fragments += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// The publisher left: flushes the held-back samples, frees the channel for the next
    /// publisher and records where the timeline ended.
    async fn close(
        mut self,
        board: &RtmpBoard,
        resume: &ResumePoints,
        result: &Result<(), ConnError>,
    ) {
        match self.remuxer.finish() {
            Ok(out) => {
                if let Err(e) = self.apply(out).await {
                    tracing::warn!(channel = %self.channel.name, "last RTMP fragment lost: {e}");
                }
            }
            Err(e) => tracing::warn!(channel = %self.channel.name, "last RTMP fragment lost: {e}"),
        }
        if let Ok(mut m) = resume.lock() {
            m.insert(self.channel.name.clone(), self.remuxer.end_us());
        }
        self.channel.source_attached.store(false, Ordering::SeqCst);
        // A refused stream or request is on the board already (`Conn::media`, `Conn::refuse`).
        let error = match result {
            Err(ConnError::Media(_) | ConnError::Refused(_)) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        board.left(&self.channel.name, error.as_deref());
        let (fragments, seconds) = (self.fragments, self.started.elapsed().as_secs());
        match result {
            Ok(()) => tracing::info!(
                channel = %self.channel.name,
                fragments,
                seconds,
                "RTMP publisher left"
            ),
            Err(e) => tracing::warn!(
                channel = %self.channel.name,
                fragments,
                seconds,
                "RTMP publisher dropped: {e}"
            ),
        }
    }
}

async fn connection(
    mut socket: TcpStream,
    remote: SocketAddr,
    state: AppState,
    resume: ResumePoints,
) {
    let mut publisher = None;
    let result = run(&mut socket, remote, &state, &resume, &mut publisher).await;
    match publisher {
        Some(p) => p.close(&state.rtmp, &resume, &result).await,
        None => match &result {
            Err(ConnError::Refused(r)) => {
                tracing::info!(code = r.code, "RTMP publish refused: {}", r.description);
            }
            Err(e) => {
                state.rtmp.failed_connection(&e.to_string());
                tracing::info!("RTMP connection ended before publishing: {e}");
            }
            Ok(()) => tracing::debug!("RTMP connection closed before publishing"),
        },
    }
    let _ = socket.shutdown().await;
}

/// Reads once, within `limit`; `Ok(0)` at the end of the stream.
async fn read_some(
    socket: &mut TcpStream,
    buf: &mut [u8],
    limit: Duration,
) -> Result<usize, ConnError> {
    match tokio::time::timeout(limit, socket.read(buf)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnError::Idle(limit)),
    }
}

async fn run(
    socket: &mut TcpStream,
    remote: SocketAddr,
    state: &AppState,
    resume: &ResumePoints,
    publisher: &mut Option<Publisher>,
) -> Result<(), ConnError> {
    let mut buf = vec![0u8; 64 * 1024];
    // Handshake.
    let mut handshake = Handshake::new(PeerType::Server);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIME;
    let remaining = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let n = read_some(socket, &mut buf, left).await?;
        if n == 0 {
            return Ok(());
        }
        match handshake
            .process_bytes(&buf[..n])
            .map_err(|e| ConnError::Handshake(format!("{e:?}")))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                socket.write_all(&response_bytes).await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                socket.write_all(&response_bytes).await?;
                // At most what the last read brought, so it fits `buf` (checked below).
                break remaining_bytes;
            }
        }
    };
    let mut config = ServerSessionConfig::new();
    config.chunk_size = CHUNK_SIZE;
    let (session, initial) =
        ServerSession::new(config).map_err(|e| ConnError::Session(format!("{e:?}")))?;
    let mut conn = Conn {
        session,
        out: Vec::new(),
        remote,
        close_after_flush: false,
    };
    conn.results(initial, state, resume, publisher).await?;
    let mut received = 0u64;
    let mut n = remaining.len();
    buf.get_mut(..n)
        .ok_or_else(|| ConnError::Handshake(format!("{n} bytes after the handshake")))?
        .copy_from_slice(&remaining);
    loop {
        received += n as u64;
        if publisher.is_none() && received > MAX_BYTES_BEFORE_PUBLISH {
            return Err(ConnError::TooMuchBeforePublish(received));
        }
        let results = conn
            .session
            .handle_input(&buf[..n])
            .map_err(|e| ConnError::Session(format!("{e:?}")))?;
        let outcome = conn.results(results, state, resume, publisher).await;
        if !conn.out.is_empty() {
            socket.write_all(&conn.out).await?;
            conn.out.clear();
        }
        if outcome.is_err() {
            linger(socket, &mut buf).await;
        }
        outcome?;
        if conn.close_after_flush {
            return Ok(());
        }
        n = read_some(socket, &mut buf, IDLE_TIME).await?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// After a refusal: reads and discards what the client still sends, until it hangs up or
/// [`LINGER_TIME`] passes. A publisher reads the server's messages only between its writes
/// (ffmpeg checks after each packet): closing at once would make it fail on a broken pipe
/// before it reads why.
async fn linger(socket: &mut TcpStream, buf: &mut [u8]) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Ok(n) = socket.read(buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// One connection's RTMP session and the bytes it has to send.
struct Conn {
    session: ServerSession,
    out: Vec<u8>,
    remote: SocketAddr,
    close_after_flush: bool,
}

impl Conn {
    async fn results(
        &mut self,
        results: Vec<ServerSessionResult>,
        state: &AppState,
        resume: &ResumePoints,
        publisher: &mut Option<Publisher>,
    ) -> Result<(), ConnError> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.out.extend_from_slice(&p.bytes),
                ServerSessionResult::RaisedEvent(e) => {
                    self.event(e, state, resume, publisher).await?;
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        results: Result<Vec<ServerSessionResult>, rml_rtmp::sessions::ServerSessionError>,
    ) -> Result<(), ConnError> {
        for r in results.map_err(|e| ConnError::Session(format!("{e:?}")))? {
            if let ServerSessionResult::OutboundResponse(p) = r {
                self.out.extend_from_slice(&p.bytes);
            }
        }
        Ok(())
    }

    /// Refuses request `request_id` of a publisher naming `channel` with `refusal`, and
    /// records it on the board; the connection ends once it is sent.
    fn refuse(
        &mut self,
        state: &AppState,
        channel: Option<&str>,
        request_id: u32,
        refusal: Refusal,
    ) -> Result<(), ConnError> {
        let exists = channel.is_some_and(|c| state.channel(c).is_some());
        state.rtmp.refused(channel, exists, &refusal);
        let r = self
            .session
            .reject_request(request_id, refusal.code, &refusal.description);
        self.send(r)?;
        self.close_after_flush = true;
        Err(ConnError::Refused(refusal))
    }

    async fn event(
        &mut self,
        event: ServerSessionEvent,
        state: &AppState,
        resume: &ResumePoints,
        publisher: &mut Option<Publisher>,
    ) -> Result<(), ConnError> {
        match event {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                if is_publish_app(&app_name) {
                    let r = self.session.accept_request(request_id);
                    self.send(r)
                } else {
                    self.refuse(
                        state,
                        None,
                        request_id,
                        Refusal::new(
                            Reason::Application,
                            "NetConnection.Connect.Rejected",
                            format!(
                                "unknown application {app_name:?}: publish to \
                                 rtmp://HOST/{APP}/CHANNEL?key=KEY"
                            ),
                        ),
                    )
                }
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => {
                let name = parse_publish_name(&stream_key);
                if let Some(p) = publisher.as_ref() {
                    let channel = p.channel.name.clone();
                    return self.refuse(
                        state,
                        Some(&channel),
                        request_id,
                        Refusal::new(
                            Reason::Busy,
                            "NetStream.Publish.BadName",
                            "this connection already publishes a channel",
                        ),
                    );
                }
                match attach(state, self.remote, &name) {
                    Ok(channel) => {
                        let r = self.session.accept_request(request_id);
                        if let Err(e) = self.send(r) {
                            channel.source_attached.store(false, Ordering::SeqCst);
                            return Err(e);
                        }
                        state.rtmp.started(&channel.name);
                        let resume_us = resume
                            .lock()
                            .ok()
                            .and_then(|m| m.get(&channel.name).copied())
                            .unwrap_or(0);
                        tracing::info!(
                            channel = %channel.name,
                            resume_ms = resume_us / 1000,
                            "RTMP publisher started"
                        );
                        *publisher = Some(Publisher {
                            channel,
                            remuxer: Remuxer::new(resume_us),
                            live: None,
                            started: std::time::Instant::now(),
                            fragments: 0,
                        });
                        Ok(())
                    }
                    Err(refusal) => self.refuse(state, Some(&name.channel), request_id, refusal),
                }
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                let Some(p) = publisher.as_mut() else {
                    return Ok(());
                };
                if let (Some(w), Some(h)) = (metadata.video_width, metadata.video_height) {
                    p.remuxer.set_dimensions(w, h);
                }
                let verdict =
                    Remuxer::check_metadata(metadata.video_codec_id, metadata.audio_codec_id)
                        .map(|()| Vec::new());
                self.media(&state.rtmp, p, verdict).await
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                let Some(p) = publisher.as_mut() else {
                    return Ok(());
                };
                let out = p.remuxer.push_video(timestamp.value, &data);
                self.media(&state.rtmp, p, out).await
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                let Some(p) = publisher.as_mut() else {
                    return Ok(());
                };
                let out = p.remuxer.push_audio(timestamp.value, &data);
                self.media(&state.rtmp, p, out).await
            }
            ServerSessionEvent::PublishStreamFinished { .. } => {
                self.close_after_flush = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn media(
        &mut self,
        board: &RtmpBoard,
        p: &mut Publisher,
        out: Result<Vec<Output>, RemuxError>,
    ) -> Result<(), ConnError> {
        match out {
            Ok(outputs) => p.apply(outputs).await,
            Err(e) => {
                let reason = match e {
                    RemuxError::UnsupportedVideo(_) | RemuxError::UnsupportedAudio(_) => {
                        Reason::Codec
                    }
                    RemuxError::Malformed { .. } | RemuxError::Mp4(_) => Reason::Malformed,
                };
                board.stream_refused(&p.channel.name, reason, &e.to_string());
                // Tell the publisher why (ffmpeg prints `Server error: …`), then hang up.
                if let Some(bytes) = status_error(&e.to_string()) {
                    self.out.extend_from_slice(&bytes);
                }
                self.close_after_flush = true;
                Err(e.into())
            }
        }
    }
}

/// An `onStatus` error on the publishing stream, serialized on its own: a chunk with a full
/// (type 0) header stands alone, whatever the session's serializer sent before.
fn status_error(description: &str) -> Option<Vec<u8>> {
    let mut serializer = ChunkSerializer::new();
    serializer
        .set_max_chunk_size(CHUNK_SIZE, RtmpTimestamp::new(0))
        .ok()?;
    let mut status = HashMap::new();
    status.insert(
        "level".to_owned(),
        Amf0Value::Utf8String("error".to_owned()),
    );
    status.insert(
        "code".to_owned(),
        Amf0Value::Utf8String("NetStream.Publish.Rejected".to_owned()),
    );
    status.insert(
        "description".to_owned(),
        Amf0Value::Utf8String(description.to_owned()),
    );
    let message = RtmpMessage::Amf0Command {
        command_name: "onStatus".to_owned(),
        transaction_id: 0.0,
        command_object: Amf0Value::Null,
        additional_arguments: vec![Amf0Value::Object(status)],
    };
    // rml_rtmp gives the first stream a client creates id 1.
    let payload = message
        .into_message_payload(RtmpTimestamp::new(0), 1)
        .ok()?;
    serializer
        .serialize(&payload, true, false)
        .ok()
        .map(|p| p.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_error_is_one_self_contained_chunk() {
        let bytes =
            status_error("video codec 7 (H.264) only; got codec id 12 (HEVC)").expect("serialized");
        // Format 0 header on chunk stream 3 (commands), then the AMF0 "onStatus" string.
        assert_eq!(bytes[0] & 0xc0, 0);
        assert!(bytes.windows(8).any(|w| w == b"onStatus"));
        assert!(bytes.len() < CHUNK_SIZE as usize);
    }
}
