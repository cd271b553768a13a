//! Resume tokens: a peer keeps its id when it reconnects to another node of the cluster. The
//! token is `{issued_ms}.{mac}`: when it was issued (ms since the Unix epoch) and an
//! HMAC-SHA256 under the cluster secret of the channel, the peer id and that time, so any node
//! can check it, no peer can take another's place, and a token stops opening anything once it
//! is older than the cluster's token lifetime (`--resume-token-ttl`). A connected peer is sent a
//! fresh token well before its own expires ([`reissue_due_ms`]). A leaf module.

use hmac::{Hmac, Mac};
use protocol::PeerId;
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// How far in the future a token's issue time may be: the nodes' clocks differ a little (they
/// are kept in step by NTP). A token from further ahead is refused as invalid.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// Why a resume token is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResumeError {
    /// Not a token of this cluster for this channel and peer: malformed, forged, tampered with,
    /// or issued for another peer or channel.
    #[error("resume token does not verify for {peer} on channel {channel:?}")]
    Invalid { peer: PeerId, channel: String },
    /// A genuine token, older than the lifetime.
    #[error("resume token of {peer} expired {late_s} s ago (tokens last {ttl_s} s)")]
    Expired {
        peer: PeerId,
        late_s: u64,
        ttl_s: u64,
    },
}

fn mac(secret: &[u8], channel: &str, peer: PeerId, issued_ms: u64) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(secret).ok()?;
    m.update(b"p2p-resume-v2\0");
    m.update(channel.as_bytes());
    m.update(b"\0");
    m.update(&peer.0.to_be_bytes());
    m.update(&issued_ms.to_be_bytes());
    Some(m)
}

/// The token that lets `peer` resume on `channel`, issued at `issued_ms`.
pub fn token(secret: &[u8], channel: &str, peer: PeerId, issued_ms: u64) -> String {
    mac(secret, channel, peer, issued_ms).map_or_else(String::new, |m| {
        let digest: [u8; 32] = m.finalize().into_bytes().into();
        format!("{issued_ms}.{}", protocol::manifest::hex(&digest))
    })
}

/// Checks `token` at `now_ms`: it must be one [`token`] gave for this channel and peer (the MAC
/// is compared in constant time), issued at most `ttl_ms` ago.
pub fn verify(
    secret: &[u8],
    channel: &str,
    peer: PeerId,
    token: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<(), ResumeError> {
    let invalid = || ResumeError::Invalid {
        peer,
        channel: channel.to_string(),
    };
    let (issued, digest) = token.split_once('.').ok_or_else(invalid)?;
    // Digits only: `u64::from_str` would also take a leading '+'.
    if issued.is_empty() || issued.len() > 20 || !issued.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let issued_ms: u64 = issued.parse().map_err(|_| invalid())?;
    let bytes = protocol::manifest::from_hex(digest).ok_or_else(invalid)?;
    let genuine =
        mac(secret, channel, peer, issued_ms).is_some_and(|m| m.verify_slice(&bytes).is_ok());
    if !genuine || issued_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
        return Err(invalid());
    }
    let expires = issued_ms.saturating_add(ttl_ms);
    if now_ms > expires {
        return Err(ResumeError::Expired {
            peer,
            late_s: (now_ms - expires).div_ceil(1000),
            ttl_s: ttl_ms / 1000,
        });
    }
    Ok(())
}

/// When a connected peer holding a token issued at `issued_ms` is sent a fresh one: at half the
/// lifetime, moved by up to an eighth of it either way by the peer id, so that peers that got
/// their tokens together (every peer of a node that failed resumes at once) are not all sent
/// new ones in the same instant. Always at least three eighths of the lifetime before expiry.
pub fn reissue_due_ms(issued_ms: u64, peer: PeerId, ttl_ms: u64) -> u64 {
    let spread = (ttl_ms / 4).max(1);
    // A multiplicative hash: consecutive ids (one node's) land far apart in the window.
    let offset = peer.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    issued_ms + ttl_ms / 2 - ttl_ms / 8 + offset % spread
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 600_000;
    const T: u64 = 1_800_000_000_000;

    fn check(
        secret: &[u8],
        channel: &str,
        peer: u64,
        token: &str,
        now: u64,
    ) -> Result<(), ResumeError> {
        verify(secret, channel, PeerId(peer), token, now, TTL)
    }

    #[test]
    fn a_fresh_token_opens_its_own_peer_and_channel_only() {
        let t = token(b"secret", "demo", PeerId(42), T);
        assert_eq!(check(b"secret", "demo", 42, &t, T), Ok(()));
        assert_eq!(check(b"secret", "demo", 42, &t, T + TTL), Ok(()));
        assert!(matches!(
            check(b"secret", "demo", 43, &t, T),
            Err(ResumeError::Invalid { .. })
        ));
        assert!(check(b"secret", "other", 42, &t, T).is_err());
        assert!(check(b"other secret", "demo", 42, &t, T).is_err());
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let t = token(b"secret", "demo", PeerId(42), T);
        let err = check(b"secret", "demo", 42, &t, T + TTL + 1_500).expect_err("expired");
        assert_eq!(
            err,
            ResumeError::Expired {
                peer: PeerId(42),
                late_s: 2,
                ttl_s: 600
            }
        );
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn a_tampered_or_malformed_token_is_refused_as_invalid() {
        let t = token(b"secret", "demo", PeerId(42), T);
        let (issued, mac) = t.split_once('.').expect("a dot");
        assert_eq!(issued, T.to_string());
        // A later issue time under the same MAC: the way to stretch a token's life.
        let later = format!("{}.{mac}", T + TTL);
        assert!(matches!(
            check(b"secret", "demo", 42, &later, T + TTL + 10),
            Err(ResumeError::Invalid { .. })
        ));
        let mut flipped = t.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        for bad in [
            flipped.as_str(),
            mac,
            "",
            ".",
            "zz",
            &t[..t.len() - 2],
            &format!("+{t}"),
            &format!("{issued}.{}", "00".repeat(32)),
            &format!("99999999999999999999999.{mac}"),
        ] {
            assert!(
                matches!(
                    check(b"secret", "demo", 42, bad, T),
                    Err(ResumeError::Invalid { .. })
                ),
                "{bad:?} was not refused as invalid"
            );
        }
    }

    #[test]
    fn a_token_from_the_future_beyond_clock_skew_is_refused() {
        let ahead = token(b"secret", "demo", PeerId(42), T + CLOCK_SKEW_MS + 1);
        assert!(check(b"secret", "demo", 42, &ahead, T).is_err());
        let slightly = token(b"secret", "demo", PeerId(42), T + 5_000);
        assert_eq!(check(b"secret", "demo", 42, &slightly, T), Ok(()));
    }

    #[test]
    fn a_fresh_token_is_due_between_three_and_five_eighths_of_the_lifetime() {
        let mut dues = std::collections::BTreeSet::new();
        for id in 1..200u64 {
            for peer in [PeerId(id), PeerId((7 << 32) + id)] {
                let due = reissue_due_ms(T, peer, TTL);
                assert!(
                    (T + TTL * 3 / 8..T + TTL * 5 / 8).contains(&due),
                    "{peer}: {due}"
                );
                dues.insert(due / 10_000);
            }
        }
        // Spread over the window, not one instant.
        assert!(dues.len() > 10, "{dues:?}");
        // Short lifetimes too.
        let due = reissue_due_ms(T, PeerId(3), 2_000);
        assert!((T + 750..T + 1_250).contains(&due), "{due}");
    }
}
