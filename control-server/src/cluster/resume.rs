//! Resume tokens: a peer keeps its id when it reconnects to another node of the cluster. The
//! token is an HMAC-SHA256 under the cluster secret of the channel and the peer id, so any node
//! can check it and no peer can take another's place. A leaf module.

use hmac::{Hmac, Mac};
use protocol::PeerId;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], channel: &str, peer: PeerId) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(secret).ok()?;
    m.update(b"p2p-resume\0");
    m.update(channel.as_bytes());
    m.update(b"\0");
    m.update(&peer.0.to_be_bytes());
    Some(m)
}

/// The token that lets `peer` resume on `channel`.
pub fn token(secret: &[u8], channel: &str, peer: PeerId) -> String {
    mac(secret, channel, peer).map_or_else(String::new, |m| {
        let digest: [u8; 32] = m.finalize().into_bytes().into();
        protocol::manifest::hex(&digest)
    })
}

/// Whether `token` is the one [`token`] gives (compared in constant time).
pub fn verify(secret: &[u8], channel: &str, peer: PeerId, token: &str) -> bool {
    let Some(bytes) = protocol::manifest::from_hex(token) else {
        return false;
    };
    mac(secret, channel, peer).is_some_and(|m| m.verify_slice(&bytes).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_peer_and_channel_only() {
        let t = token(b"secret", "demo", PeerId(42));
        assert_eq!(t.len(), 64);
        assert!(verify(b"secret", "demo", PeerId(42), &t));
        assert!(!verify(b"secret", "demo", PeerId(43), &t));
        assert!(!verify(b"secret", "other", PeerId(42), &t));
        assert!(!verify(b"other secret", "demo", PeerId(42), &t));
        assert!(!verify(b"secret", "demo", PeerId(42), "zz"));
        assert!(!verify(b"secret", "demo", PeerId(42), &t[..62]));
    }
}
