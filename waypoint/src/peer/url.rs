//! The control WebSocket's address.

/// The control WebSocket's URL for a server base URL (`http(s)://host:port`).
pub fn ws_url(server: &str, token: Option<&str>) -> String {
    let b = server.trim_end_matches('/');
    let rest = b
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| b.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| b.to_string());
    match token {
        Some(t) => format!("{rest}/ws?token={}", encode_component(t)),
        None => format!("{rest}/ws"),
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ws_url;

    #[test]
    fn control_url_follows_the_server_scheme_and_encodes_the_token() {
        assert_eq!(ws_url("http://h:8080/", None), "ws://h:8080/ws");
        assert_eq!(ws_url("https://h", None), "wss://h/ws");
        assert_eq!(
            ws_url("http://h", Some("a b/c+d")),
            "ws://h/ws?token=a%20b%2Fc%2Bd"
        );
    }
}
