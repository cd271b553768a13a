//! Random tokens (operator token, relay recruit tokens): a leaf module.

/// A fresh random token: 32 hex digits from the OS's random source (`getrandom`), or `None` if
/// the OS gives none (never on the platforms we run on; a guessable token is never made).
pub fn random_token() -> Option<String> {
    let mut buf = [0u8; 16];
    getrandom::fill(&mut buf).ok()?;
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}
