//! The HTTP side of a pull: one GET of a playlist or segment, whole, bounded in time and size,
//! with its failure classified (timeout, connection, HTTP status, body cut short) for the
//! pull's status and log.

use std::time::Duration;

use reqwest::{Client, Url};

/// The HTTP client of the pulls: rustls (no OpenSSL), redirects followed, connect timeout 3 s.
pub fn client() -> reqwest::Result<Client> {
    Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .user_agent(concat!("p2p-live-origin/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A request that failed (and is retried).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {kind} ({detail})")]
    Network {
        url: String,
        kind: &'static str,
        detail: String,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: not a playlist ({detail})")]
    Playlist { url: String, detail: String },
}

impl FetchError {
    fn network(url: &Url, e: &reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else if e.is_body() || e.is_decode() {
            "body cut short"
        } else {
            "request failed"
        };
        // reqwest's message repeats the URL; the source chain says what happened.
        let mut detail = String::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail = s.to_string();
            source = s.source();
        }
        if detail.is_empty() {
            detail = e.to_string();
        }
        FetchError::Network {
            url: url.to_string(),
            kind,
            detail,
        }
    }
}

/// One GET, whole body, within `timeout` and `limit` bytes; returns the final URL (after
/// redirects, the base of relative URIs) and the body.
pub async fn fetch(
    client: &Client,
    url: &Url,
    range: Option<(u64, u64)>,
    timeout: Duration,
    limit: usize,
) -> Result<(Url, Vec<u8>), FetchError> {
    let mut req = client.get(url.clone()).timeout(timeout);
    if let Some((offset, length)) = range {
        let last = offset + length.saturating_sub(1);
        req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{last}"));
    }
    let mut resp = req.send().await.map_err(|e| FetchError::network(url, &e))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let too_large = || FetchError::TooLarge {
        url: url.to_string(),
        limit,
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let final_url = resp.url().clone();
    let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::network(url, &e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((final_url, body))
}
