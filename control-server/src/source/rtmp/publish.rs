//! Who may publish what: the URL convention (application `live`, stream name
//! `CHANNEL?key=KEY`), the stream key, and HTTP ingest's checks on the channel (name, channels
//! created per address, one source at a time).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::board::Reason;
use crate::channel::SharedChannel;
use crate::AppState;

/// The one RTMP application name publishers use.
pub const APP: &str = "live";

/// Why a publish request was refused: the RTMP status code and the description the client
/// shows (ffmpeg prints it as `Server error: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{description}")]
pub struct Refusal {
    /// What kind of refusal, for the counters (`p2p_rtmp_refusals_total{reason}`).
    pub reason: Reason,
    pub code: &'static str,
    pub description: String,
}

impl Refusal {
    pub(super) fn new(reason: Reason, code: &'static str, description: impl Into<String>) -> Self {
        Refusal {
            reason,
            code,
            description: description.into(),
        }
    }
}

/// What a publish request names: `CHANNEL?key=KEY` (other query parameters are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishName {
    pub channel: String,
    pub key: Option<String>,
}

/// Whether a `connect` names the application publishers use (`live`, with or without a
/// trailing slash or query).
pub fn is_publish_app(app: &str) -> bool {
    let app = app.split('?').next().unwrap_or_default();
    app.trim_end_matches('/') == APP
}

/// Splits a publish request's stream name `CHANNEL?key=KEY`.
pub fn parse_publish_name(stream: &str) -> PublishName {
    let (channel, query) = stream.split_once('?').unwrap_or((stream, ""));
    let key = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .map(str::to_owned);
    PublishName {
        channel: channel.to_owned(),
        key,
    }
}

/// Checks a publish request's key against the server's `--ingest-key`.
pub fn check_key(expected: Option<&str>, name: &PublishName) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(Refusal::new(
            Reason::Key,
            "NetStream.Publish.Unauthorized",
            "RTMP ingest needs a stream key: start the server with --ingest-key",
        ));
    };
    match name.key.as_deref() {
        Some(k) if k == expected => Ok(()),
        Some(_) => Err(Refusal::new(
            Reason::Key,
            "NetStream.Publish.Unauthorized",
            "wrong stream key",
        )),
        None => Err(Refusal::new(
            Reason::Key,
            "NetStream.Publish.Unauthorized",
            format!(
                "missing stream key: publish to rtmp://HOST/{APP}/{}?key=KEY \
                 (OBS: Stream Key `{}?key=KEY`)",
                name.channel, name.channel
            ),
        )),
    }
}

/// Decides whether `name` may be published from `remote`, with HTTP ingest's checks, and
/// attaches the publisher to the channel (created if new).
pub(super) fn attach(
    state: &AppState,
    remote: SocketAddr,
    name: &PublishName,
) -> Result<SharedChannel, Refusal> {
    check_key(state.config.ingest_key.as_deref(), name)?;
    let busy = || {
        Refusal::new(
            Reason::Busy,
            "NetStream.Publish.BadName",
            format!("channel {:?} already has a live source", name.channel),
        )
    };
    let ch = match state.channel(&name.channel) {
        Some(ch) => ch,
        None => {
            if let Err(e) = state
                .addresses
                .may_create_channel(remote.ip(), |c| state.channel(c).is_some())
            {
                state.addresses.refusals.record(e.limit());
                return Err(Refusal::new(
                    Reason::Limit,
                    "NetStream.Publish.Rejected",
                    e.to_string(),
                ));
            }
            let ch = state
                .create_channel(&name.channel, state.config.default_stream_kbps)
                .map_err(|e| match e {
                    crate::ServerError::ChannelExists(_) => busy(),
                    e @ crate::ServerError::BadChannelName(_) => Refusal::new(
                        Reason::ChannelName,
                        "NetStream.Publish.BadName",
                        e.to_string(),
                    ),
                    e => Refusal::new(Reason::Server, "NetStream.Publish.BadName", e.to_string()),
                })?;
            state.addresses.ingest_created(remote.ip(), &name.channel);
            ch
        }
    };
    if ch.file.get().is_some() || ch.source_attached.swap(true, Ordering::SeqCst) {
        return Err(busy());
    }
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_name_carries_channel_and_key() {
        assert_eq!(
            parse_publish_name("cam1?key=s3cret"),
            PublishName {
                channel: "cam1".into(),
                key: Some("s3cret".into())
            }
        );
        assert_eq!(
            parse_publish_name("cam1?foo=1&key=k"),
            PublishName {
                channel: "cam1".into(),
                key: Some("k".into())
            }
        );
        assert_eq!(parse_publish_name("cam1").key, None);
        assert_eq!(parse_publish_name("cam1?").key, None);
    }

    #[test]
    fn only_the_live_application_is_accepted() {
        assert!(is_publish_app("live"));
        assert!(is_publish_app("live/"));
        assert!(is_publish_app("live?x=1"));
        assert!(!is_publish_app("app"));
        assert!(!is_publish_app("live2"));
        assert!(!is_publish_app(""));
    }

    #[test]
    fn keys_are_checked_like_http_ingest() {
        let name = |k: Option<&str>| PublishName {
            channel: "c".into(),
            key: k.map(Into::into),
        };
        assert!(check_key(Some("k"), &name(Some("k"))).is_ok());
        let wrong = check_key(Some("k"), &name(Some("x"))).expect_err("wrong");
        assert_eq!(wrong.code, "NetStream.Publish.Unauthorized");
        assert_eq!(wrong.description, "wrong stream key");
        let missing = check_key(Some("k"), &name(None)).expect_err("missing");
        assert!(
            missing.description.contains("c?key=KEY"),
            "{}",
            missing.description
        );
        assert!(
            check_key(None, &name(Some("k"))).is_err(),
            "no --ingest-key: no RTMP"
        );
    }
}
