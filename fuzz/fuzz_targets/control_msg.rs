//! The control-message parser, as the server runs it on every text frame of a control socket
//! (`serde_json::from_str::<ClientMsg>` in `control-server/src/ws/session.rs`), and as a peer
//! runs it on the server's (`ServerMsg`): any text up to the frame limit gives a message or an
//! error, never a panic; a message that parses survives a serialize/parse round unchanged, so
//! what the server relays or logs is what the peer sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::control::MAX_CONTROL_MESSAGE;
use protocol::{ClientMsg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    // The server refuses larger frames before parsing; text frames are valid UTF-8.
    if data.len() > MAX_CONTROL_MESSAGE {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(msg) = serde_json::from_str::<ClientMsg>(text) {
        let json = serde_json::to_string(&msg).expect("a client message serializes");
        let again: ClientMsg = serde_json::from_str(&json).expect("its JSON parses");
        assert_eq!(again, msg);
    }
    if let Ok(msg) = serde_json::from_str::<ServerMsg>(text) {
        let json = serde_json::to_string(&msg).expect("a server message serializes");
        let again: ServerMsg = serde_json::from_str(&json).expect("its JSON parses");
        assert_eq!(again, msg);
    }
});
