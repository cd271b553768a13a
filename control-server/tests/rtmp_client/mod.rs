//! A publisher speaking RTMP through rml_rtmp's client session, sending synthetic FLV tags:
//! for what ffmpeg cannot be made to do (stop in the middle of a tag, send garbage mid-stream),
//! and for tests that need no ffmpeg. Shared by the RTMP integration tests (`mod rtmp_client;`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Publisher {
    pub socket: TcpStream,
    session: ClientSession,
}

impl Publisher {
    /// Connects to application `live` and publishes `stream`; `Err` with the server's
    /// description (or what happened) when refused.
    pub async fn publish(addr: SocketAddr, stream: &str) -> Result<Publisher, String> {
        let mut socket = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut hs = Handshake::new(PeerType::Client);
        let p0p1 = hs
            .generate_outbound_p0_and_p1()
            .map_err(|e| format!("{e:?}"))?;
        socket.write_all(&p0p1).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 16 * 1024];
        let remaining = loop {
            let n = socket.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            match hs.process_bytes(&buf[..n]).map_err(|e| format!("{e:?}"))? {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    socket
                        .write_all(&response_bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    socket
                        .write_all(&response_bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                    break remaining_bytes;
                }
            }
        };
        let (session, results) =
            ClientSession::new(ClientSessionConfig::new()).map_err(|e| format!("{e:?}"))?;
        let mut p = Publisher { socket, session };
        p.write(results).await?;
        let results = p
            .session
            .handle_input(&remaining)
            .map_err(|e| format!("{e:?}"))?;
        p.write(results).await?;
        let r = p
            .session
            .request_connection("live".into())
            .map_err(|e| format!("{e:?}"))?;
        p.write(vec![r]).await?;
        p.until(|e| matches!(e, ClientSessionEvent::ConnectionRequestAccepted))
            .await?;
        let r = p
            .session
            .request_publishing(stream.into(), PublishRequestType::Live)
            .map_err(|e| format!("{e:?}"))?;
        p.write(vec![r]).await?;
        p.until(|e| matches!(e, ClientSessionEvent::PublishRequestAccepted))
            .await?;
        Ok(p)
    }

    async fn write(&mut self, results: Vec<ClientSessionResult>) -> Result<(), String> {
        for r in results {
            if let ClientSessionResult::OutboundResponse(p) = r {
                self.socket
                    .write_all(&p.bytes)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Reads until an event matches; `Err` with the refusal's text if the server refuses
    /// or hangs up first.
    async fn until(&mut self, want: impl Fn(&ClientSessionEvent) -> bool) -> Result<(), String> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), self.socket.read(&mut buf))
                .await
                .map_err(|_| "no answer within 10 s".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            let results = self
                .session
                .handle_input(&buf[..n])
                .map_err(|e| format!("{e:?}"))?;
            let mut hit = None;
            for r in &results {
                if let ClientSessionResult::RaisedEvent(e) = r {
                    if want(e) {
                        hit = Some(());
                    } else if let ClientSessionEvent::UnknownTransactionResultReceived {
                        additional_values,
                        ..
                    } = e
                    {
                        return Err(format!("refused: {additional_values:?}"));
                    }
                }
            }
            self.write(results).await?;
            if hit.is_some() {
                return Ok(());
            }
        }
    }

    /// The RTMP bytes of one video message, not sent.
    pub fn video_bytes(&mut self, ts: u32, tag: Vec<u8>) -> Vec<u8> {
        match self
            .session
            .publish_video_data(Bytes::from(tag), RtmpTimestamp::new(ts), false)
        {
            Ok(ClientSessionResult::OutboundResponse(p)) => p.bytes,
            other => panic!("cannot serialize video: {other:?}"),
        }
    }

    pub async fn video(&mut self, ts: u32, tag: Vec<u8>) {
        let bytes = self.video_bytes(ts, tag);
        self.socket.write_all(&bytes).await.expect("send video");
    }
}

/// An SPS of High profile, level 3.1 (from an x264 encode), and its PPS.
const SPS: &[u8] = b"gd\0\x1f\xac$\x84\x01@\x16\xec\x04@\0\0\x03\0@\0\0\x0c#\xc6\x0c\x92";
const PPS: &[u8] = b"h\xee2\xc8\xb0";

pub fn avc_sequence_header() -> Vec<u8> {
    let mut t = vec![0x17, 0, 0, 0, 0, 1, SPS[1], SPS[2], SPS[3], 0xff, 0xe1];
    t.extend_from_slice(&(SPS.len() as u16).to_be_bytes());
    t.extend_from_slice(SPS);
    t.push(1);
    t.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
    t.extend_from_slice(PPS);
    t
}

/// A video tag holding one NAL unit of `len` bytes.
pub fn picture(key: bool, len: usize) -> Vec<u8> {
    let mut t = vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0];
    t.extend_from_slice(&(len as u32).to_be_bytes());
    t.extend(std::iter::repeat_n(if key { 0x65 } else { 0x41 }, len));
    t
}

/// `seconds` of 25 fps pictures from `start_ms`, a keyframe every second.
pub async fn send_seconds(p: &mut Publisher, start_ms: u32, seconds: u32) {
    for i in 0..seconds * 25 {
        p.video(start_ms + i * 40, picture(i % 25 == 0, 3000)).await;
    }
}
