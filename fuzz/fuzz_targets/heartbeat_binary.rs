//! The binary heartbeat decoder (`protocol::heartbeat::binary`), the first thing the server does
//! with a peer's binary frame: any bytes give a heartbeat or an error, never a panic or a huge
//! allocation, and a decoded heartbeat survives an encode/decode round unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::heartbeat::binary;

fuzz_target!(|data: &[u8]| {
    let Ok(hb) = binary::decode(data) else {
        return;
    };
    let bytes = binary::encode(&hb);
    let again = binary::decode(&bytes).expect("an encoded heartbeat decodes");
    assert_eq!(again, hb);
    // The same heartbeat as the JSON the server also accepts.
    let json = serde_json::to_string(&protocol::ClientMsg::Heartbeat(hb.clone()))
        .expect("a heartbeat serializes");
    match serde_json::from_str::<protocol::ClientMsg>(&json) {
        Ok(protocol::ClientMsg::Heartbeat(h)) => assert_eq!(h, hb),
        other => panic!("JSON heartbeat came back as {other:?}"),
    }
});
