//! A STUN responder (RFC 5389 Binding requests only) on two UDP ports, so that a page can tell
//! what kind of NAT it sits behind (issue 15).
//!
//! `--stun ADDR` binds `ADDR` and the port after it (`ADDR`'s port + 1; with port 0, two
//! consecutive free ports). A Binding request to either is answered with a Binding success
//! response carrying `XOR-MAPPED-ADDRESS`: the address the datagram came from. A page gathers server-reflexive candidates against both ports from one
//! socket: a NAT that maps one internal address to one external one whatever the destination
//! (endpoint-independent mapping) shows the same mapping twice, one that maps per destination
//! (endpoint-dependent, "symmetric") shows two. Nothing else is answered: a datagram that is
//! not a well-formed Binding request (garbage, a response, another method, TURN) is dropped
//! without a reply, and the reply carries nothing else (no `MAPPED-ADDRESS` for RFC 3489
//! clients, no `SOFTWARE`): 32 bytes (44 for IPv6) for a request of at least 20, so reflecting
//! traffic at a third party through it gains little.
//!
//! [`answer`] is the sans-IO core (bytes and source address in, bytes out); [`bind`] runs it
//! on tokio sockets. Messages are parsed and written by `stun_codec` (with `bytecodec`).

use std::io;
use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::XorMappedAddress;
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Largest datagram read; a Binding request from a browser is about 20 to 100 bytes.
const MAX_DATAGRAM: usize = 1500;

/// The reply to `request` (a datagram from `from`), or `None` when it is not a well-formed
/// Binding request and must be dropped.
pub fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let mut decoder = MessageDecoder::<Attribute>::new();
    // `Err`: not STUN at all; `Ok(Err(_))`: a STUN header whose attributes do not decode.
    let msg = decoder.decode_from_bytes(request).ok()?.ok()?;
    if msg.class() != MessageClass::Request || msg.method() != BINDING {
        return None;
    }
    let mut reply =
        Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, msg.transaction_id());
    reply.add_attribute(XorMappedAddress::new(from));
    MessageEncoder::new().encode_into_bytes(reply).ok()
}

/// The running responder: its two sockets' addresses. Dropping it stops both.
#[derive(Debug)]
pub struct StunServer {
    pub addrs: [SocketAddr; 2],
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for StunServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds `addr` and the port after it and answers Binding requests on both. With port 0,
/// picks two consecutive free ports (a few tries).
pub async fn bind(addr: SocketAddr) -> io::Result<StunServer> {
    let (a, b) = bind_pair(addr).await?;
    serve(a, b)
}

/// Answers Binding requests on two sockets bound elsewhere (e.g. in another network namespace,
/// as the NAT test bed does). Call within a tokio runtime.
pub fn serve_std(a: std::net::UdpSocket, b: std::net::UdpSocket) -> io::Result<StunServer> {
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    serve(UdpSocket::from_std(a)?, UdpSocket::from_std(b)?)
}

fn serve(a: UdpSocket, b: UdpSocket) -> io::Result<StunServer> {
    let addrs = [a.local_addr()?, b.local_addr()?];
    tracing::info!(first = %addrs[0], second = %addrs[1], "STUN responder listening");
    Ok(StunServer {
        addrs,
        tasks: vec![tokio::spawn(run(a)), tokio::spawn(run(b))],
    })
}

async fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, UdpSocket)> {
    let tries = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let first = UdpSocket::bind(addr).await?;
        let port = first.local_addr()?.port();
        let Some(next) = port.checked_add(1) else {
            last = Some(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the STUN port must be below 65535 (the next one is bound too)",
            ));
            continue;
        };
        match UdpSocket::bind(SocketAddr::new(addr.ip(), next)).await {
            Ok(second) => return Ok((first, second)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no pair of free UDP ports")))
}

async fn run(socket: UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // ICMP errors from earlier replies (port unreachable) surface here on Linux.
            Err(e) => {
                tracing::debug!("STUN receive: {e}");
                continue;
            }
        };
        let Some(reply) = answer(&buf[..n], from) else {
            tracing::trace!(
                bytes = n,
                "dropped a datagram that is not a Binding request"
            );
            continue;
        };
        if let Err(e) = socket.send_to(&reply, from).await {
            tracing::debug!("STUN reply: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_codec::TransactionId;

    fn request(class: MessageClass) -> Vec<u8> {
        let m = Message::<Attribute>::new(class, BINDING, TransactionId::new([7; 12]));
        MessageEncoder::new().encode_into_bytes(m).unwrap()
    }

    #[test]
    fn binding_request_gets_its_source_address_back() {
        let from: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let reply = answer(&request(MessageClass::Request), from).unwrap();
        let m = MessageDecoder::<Attribute>::new()
            .decode_from_bytes(&reply)
            .unwrap()
            .unwrap();
        assert_eq!(m.class(), MessageClass::SuccessResponse);
        assert_eq!(m.transaction_id(), TransactionId::new([7; 12]));
        assert_eq!(
            m.get_attribute::<XorMappedAddress>().unwrap().address(),
            from
        );
        assert_eq!(reply.len(), 32, "header and XOR-MAPPED-ADDRESS only");
    }

    #[test]
    fn non_requests_and_garbage_are_dropped() {
        let from: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert!(answer(&request(MessageClass::SuccessResponse), from).is_none());
        assert!(answer(&request(MessageClass::Indication), from).is_none());
        assert!(answer(b"GET / HTTP/1.1\r\n\r\n", from).is_none());
        assert!(answer(&[], from).is_none());
        let mut truncated = request(MessageClass::Request);
        truncated[3] = 8; // claims 8 bytes of attributes it does not have
        assert!(answer(&truncated, from).is_none());
    }
}
