//! The STUN responder (`--stun`, issue 15): Binding requests on both of its ports are answered
//! with the address they came from; anything else gets no reply; pages learn its URLs from
//! `GET /api/connectivity`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytecodec::{DecodeExt, EncodeExt};
use control_server::config::Config;
use stun_codec::rfc5389::attributes::XorMappedAddress;
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};
use tokio::net::UdpSocket;

fn binding_request(id: u8) -> Vec<u8> {
    let m = Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new([id; 12]));
    MessageEncoder::new()
        .encode_into_bytes(m)
        .expect("encoding a Binding request")
}

/// The next datagram, decoded (fails after 5 s).
async fn reply(socket: &UdpSocket) -> Message<Attribute> {
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("a reply within 5 s")
        .expect("receiving");
    MessageDecoder::<Attribute>::new()
        .decode_from_bytes(&buf[..n])
        .expect("a STUN message")
        .expect("a whole STUN message")
}

#[tokio::test]
async fn binding_requests_on_both_ports_get_the_mapped_address() {
    let server = control_server::stun::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let [first, second] = server.addrs;
    assert_eq!(
        second.port(),
        first.port() + 1,
        "the second port follows the first"
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = client.local_addr().unwrap();
    for (id, to) in [(1u8, first), (2, second)] {
        client.send_to(&binding_request(id), to).await.unwrap();
        let m = reply(&client).await;
        assert_eq!(m.class(), MessageClass::SuccessResponse);
        assert_eq!(m.method(), BINDING);
        assert_eq!(m.transaction_id(), TransactionId::new([id; 12]));
        let mapped = m.get_attribute::<XorMappedAddress>().unwrap().address();
        assert_eq!(mapped, me, "XOR-MAPPED-ADDRESS is the request's source");
    }
}

#[tokio::test]
async fn malformed_datagrams_get_no_reply() {
    let server = control_server::stun::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut response = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new([3; 12]),
    );
    response.add_attribute(XorMappedAddress::new(client.local_addr().unwrap()));
    let response = MessageEncoder::new().encode_into_bytes(response).unwrap();
    let mut truncated = binding_request(4);
    truncated.truncate(12);
    for garbage in [
        b"definitely not STUN".to_vec(),
        truncated,
        response,
        vec![0u8; 20],
    ] {
        client.send_to(&garbage, server.addrs[0]).await.unwrap();
    }
    // Datagrams on loopback arrive in order: the first reply must be to this request, so none
    // of the garbage before it was answered.
    client
        .send_to(&binding_request(9), server.addrs[0])
        .await
        .unwrap();
    let m = reply(&client).await;
    assert_eq!(m.transaction_id(), TransactionId::new([9; 12]));
}

async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url).await.expect("GET");
    let text = response.text().await.expect("a body");
    serde_json::from_str(&text).expect("JSON")
}

#[tokio::test]
async fn pages_learn_the_stun_urls_and_their_address() {
    let stun = control_server::stun::bind("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    let (addr, _state) = common::start_server_with_addresses(Config {
        stun: stun.addrs.to_vec(),
        ..Config::default()
    })
    .await;
    let body = get_json(&format!("http://{addr}/api/connectivity")).await;
    let ports: Vec<u16> = stun.addrs.iter().map(SocketAddr::port).collect();
    assert_eq!(
        body["stun"],
        serde_json::json!([
            format!("stun:127.0.0.1:{}", ports[0]),
            format!("stun:127.0.0.1:{}", ports[1])
        ])
    );
    assert_eq!(body["observed"], "127.0.0.1");

    // Without --stun: no URLs.
    let (addr, _state) = common::start_server_with_addresses(Config::default()).await;
    let body = get_json(&format!("http://{addr}/api/connectivity")).await;
    assert_eq!(body["stun"], serde_json::json!([]));
}
