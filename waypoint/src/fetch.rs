//! Fallback fetches from the origin over HTTP (the page's `fetch.rs`).

pub enum Fetched {
    Bytes(Vec<u8>),
    /// 404: not produced yet.
    NotYet,
    /// 410: left the origin's window.
    Gone,
    Failed(String),
}

pub async fn fetch_packet(http: &reqwest::Client, url: &str) -> Fetched {
    let resp = match http.get(url).send().await {
        Ok(r) => r,
        Err(e) => return Fetched::Failed(format!("GET {url}: {e}")),
    };
    match resp.status().as_u16() {
        200 => {}
        404 => return Fetched::NotYet,
        410 => return Fetched::Gone,
        s => return Fetched::Failed(format!("GET {url}: HTTP {s}")),
    }
    match resp.bytes().await {
        Ok(b) => Fetched::Bytes(b.to_vec()),
        Err(e) => Fetched::Failed(format!("GET {url}: reading body: {e}")),
    }
}
