//! Signed, expiring viewer tokens (`--token-secret`): HS256 JSON Web Tokens that a site
//! owner's backend mints for one viewer of one channel.
//!
//! Claims: `channel` (the channel the token opens), `exp` (expiry, Unix seconds) and an optional
//! `sub` (the site's viewer id, logged on join). A browser's WebSocket cannot read an HTTP status,
//! so the token is checked when the session joins, and a refusal is a [`protocol::ServerMsg::Error`]
//! with one of three codes (see [`TokenError::code`]) followed by a close frame.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Clock skew tolerated between the minting backend and this server, in seconds.
pub const EXPIRY_LEEWAY_S: u64 = 30;

/// Shortest secret accepted: RFC 7518 §3.2 asks for a key at least as long as the hash (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// The claims of a viewer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerClaims {
    /// The channel the token lets its holder join.
    pub channel: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The site's id for the viewer (optional; logged, never interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("viewer token expired at {exp} (server time {now}, Unix seconds); ask the site for a fresh one")]
    Expired { exp: u64, now: u64 },
    #[error("viewer token is for channel {token:?}, not {joined:?}")]
    WrongChannel { token: String, joined: String },
    #[error("this server needs a viewer token to join (the player's `token` option)")]
    Missing,
    #[error("viewer token invalid: {0}")]
    Invalid(String),
}

impl TokenError {
    /// The error code the session sends with the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired { .. } => ErrorCode::TokenExpired,
            TokenError::WrongChannel { .. } => ErrorCode::TokenWrongChannel,
            TokenError::Missing | TokenError::Invalid(_) => ErrorCode::TokenInvalid,
        }
    }
}

/// Checks `token` against `secret` for a join of `channel` at `now_s` (Unix seconds): the
/// signature first (HS256 only), then the expiry (with [`EXPIRY_LEEWAY_S`]), then the channel.
pub fn validate(
    secret: &[u8],
    token: Option<&str>,
    channel: &str,
    now_s: u64,
) -> Result<ViewerClaims, TokenError> {
    let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked below against the caller's clock, so tests and the server agree.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp"]);
    let data =
        jsonwebtoken::decode::<ViewerClaims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|e| {
                TokenError::Invalid(match e.kind() {
                    ErrorKind::InvalidSignature => {
                        "bad signature (minted with another secret?)".into()
                    }
                    ErrorKind::InvalidAlgorithm => "not signed with HS256".into(),
                    ErrorKind::MissingRequiredClaim(c) => format!("claim {c:?} missing"),
                    ErrorKind::Json(j) => format!("claims are not {{channel, exp, sub?}}: {j}"),
                    _ => format!("malformed token ({e})"),
                })
            })?;
    let claims = data.claims;
    if claims.exp.saturating_add(EXPIRY_LEEWAY_S) < now_s {
        return Err(TokenError::Expired {
            exp: claims.exp,
            now: now_s,
        });
    }
    if claims.channel != channel {
        return Err(TokenError::WrongChannel {
            token: claims.channel,
            joined: channel.to_string(),
        });
    }
    Ok(claims)
}

/// Current Unix time in seconds.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn mint(secret: &[u8], channel: &str, exp: u64) -> String {
        let claims = ViewerClaims {
            channel: channel.into(),
            exp,
            sub: Some("viewer-7".into()),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("mint")
    }

    #[test]
    fn a_valid_token_opens_its_channel() {
        let t = mint(SECRET, "demo", NOW + 60);
        let c = validate(SECRET, Some(&t), "demo", NOW).expect("valid");
        assert_eq!(c.channel, "demo");
        assert_eq!(c.sub.as_deref(), Some("viewer-7"));
        // Within the leeway it still opens.
        let t = mint(SECRET, "demo", NOW - EXPIRY_LEEWAY_S);
        assert!(validate(SECRET, Some(&t), "demo", NOW).is_ok());
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let t = mint(SECRET, "demo", NOW - EXPIRY_LEEWAY_S - 1);
        let e = validate(SECRET, Some(&t), "demo", NOW).expect_err("expired");
        assert!(matches!(e, TokenError::Expired { .. }), "{e}");
        assert_eq!(e.code(), ErrorCode::TokenExpired);
    }

    #[test]
    fn a_token_for_another_channel_is_refused() {
        let t = mint(SECRET, "other", NOW + 60);
        let e = validate(SECRET, Some(&t), "demo", NOW).expect_err("wrong channel");
        assert_eq!(e.code(), ErrorCode::TokenWrongChannel);
        assert!(e.to_string().contains("\"other\""), "{e}");
    }

    #[test]
    fn bad_signature_malformed_missing_or_other_algorithms_are_invalid() {
        let t = mint(b"another secret, thirty-two bytes!", "demo", NOW + 60);
        let e = validate(SECRET, Some(&t), "demo", NOW).expect_err("bad signature");
        assert_eq!(e.code(), ErrorCode::TokenInvalid);
        assert!(e.to_string().contains("signature"), "{e}");
        // An expired token with a bad signature is invalid, not expired: nothing in it is trusted.
        let t = mint(b"another secret, thirty-two bytes!", "demo", NOW - 3600);
        assert_eq!(
            validate(SECRET, Some(&t), "demo", NOW).map_err(|e| e.code()),
            Err(ErrorCode::TokenInvalid)
        );
        for bad in [None, Some(""), Some("not.a.jwt"), Some("garbage")] {
            let e = validate(SECRET, bad, "demo", NOW).expect_err("malformed");
            assert_eq!(e.code(), ErrorCode::TokenInvalid, "{bad:?}: {e}");
        }
        // HS512 with the right secret is still refused: only HS256 is accepted.
        let t = encode(
            &Header::new(Algorithm::HS512),
            &ViewerClaims {
                channel: "demo".into(),
                exp: NOW + 60,
                sub: None,
            },
            &EncodingKey::from_secret(SECRET),
        )
        .expect("mint");
        assert_eq!(
            validate(SECRET, Some(&t), "demo", NOW).map_err(|e| e.code()),
            Err(ErrorCode::TokenInvalid)
        );
        // Claims without `exp` or `channel`.
        #[derive(Serialize)]
        struct NoExp {
            channel: String,
        }
        let t = encode(
            &Header::new(Algorithm::HS256),
            &NoExp {
                channel: "demo".into(),
            },
            &EncodingKey::from_secret(SECRET),
        )
        .expect("mint");
        let e = validate(SECRET, Some(&t), "demo", NOW).expect_err("no exp");
        assert_eq!(e.code(), ErrorCode::TokenInvalid);
        assert!(e.to_string().contains("exp"), "{e}");
    }
}
