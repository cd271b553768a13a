//! Console errors a browser test expects, and the check that it saw no others.
//!
//! [`crate::cdp::Page::console_errors`] collects uncaught exceptions, `console.error` and
//! `console.assert` calls, and `Log` entries of level `error` (failed resource loads among them).
//! Every browser test fails on any of those it does not expect; the ones it expects are listed
//! explicitly, each with the reason, and matched as narrowly as their text allows.

use anyhow::{bail, Result};

/// A console error that is expected by design, recognised by substrings of its line.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    /// Why this error is expected (shown when a test fails on another one).
    pub why: &'static str,
    /// Every one of these substrings is in the error's line.
    pub all_of: &'static [&'static str],
}

impl Allowed {
    pub fn matches(&self, line: &str) -> bool {
        self.all_of.iter().all(|s| line.contains(s))
    }
}

/// A peer fetches a packet it is missing from the origin (`/api/channels/{id}/packets/{seq}`);
/// one that is not cut yet, or has left the origin's window, is a 404, which Chromium logs as a
/// failed resource load.
pub const PACKET_FETCH_404: Allowed = Allowed {
    why: "origin fallback fetch of a packet not cut yet (404)",
    all_of: &["status of 404", "/packets/"],
};

/// Chromium asks the server of every page shown in a window for `/favicon.ico`; the control
/// server (and the test's site server) has none.
pub const FAVICON_404: Allowed = Allowed {
    why: "Chromium's request for /favicon.ico, which the server does not have (404)",
    all_of: &["status of 404", "/favicon.ico)"],
};

/// What a viewer page (the demo page or an embedded player) may log as an error.
pub const VIEWER_PAGE: &[Allowed] = &[PACKET_FETCH_404, FAVICON_404];

/// The operator APIs refuse a dashboard that has no token (it then asks for one).
pub const OPERATOR_API_401: Allowed = Allowed {
    why: "operator API call without a token, refused by design (401)",
    all_of: &["status of 401", "/api/operator/"],
};

/// The errors in `errors` that no entry of `allowed` matches.
pub fn unexpected<'a>(
    errors: impl IntoIterator<Item = &'a String>,
    allowed: &[Allowed],
) -> Vec<&'a String> {
    errors
        .into_iter()
        .filter(|e| !allowed.iter().any(|a| a.matches(e)))
        .collect()
}

/// Fails, listing them, if `errors` (of the pages named by `whose`) has any error not in
/// `allowed`.
pub fn ensure_only_expected(whose: &str, errors: &[String], allowed: &[Allowed]) -> Result<()> {
    let bad = unexpected(errors, allowed);
    if !bad.is_empty() {
        let expected: Vec<&str> = allowed.iter().map(|a| a.why).collect();
        bail!(
            "{} unexpected console error(s) in {whose}: {bad:#?}\n(expected only: {expected:?})",
            bad.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_is_narrow() {
        let fetch = "log.error [network]: Failed to load resource: the server responded with a \
                     status of 404 (Not Found) (http://127.0.0.1:4000/api/channels/demo/packets/77)"
            .to_owned();
        let other_404 = "log.error [network]: Failed to load resource: the server responded with \
                         a status of 404 (Not Found) (http://127.0.0.1:4000/pkg/peer.js)"
            .to_owned();
        let favicon = "log.error [network]: Failed to load resource: the server responded with \
                       a status of 404 (Not Found) (http://127.0.0.1:4000/favicon.ico)"
            .to_owned();
        let exception = "exception: Uncaught TypeError: x is undefined".to_owned();
        let errors = vec![fetch, other_404.clone(), exception.clone(), favicon];
        assert_eq!(
            unexpected(&errors, &[PACKET_FETCH_404]),
            vec![&other_404, &exception, &errors[3]]
        );
        assert_eq!(
            unexpected(&errors, VIEWER_PAGE),
            vec![&other_404, &exception]
        );
        assert!(ensure_only_expected("pages", &errors[..1], &[PACKET_FETCH_404]).is_ok());
        let err =
            ensure_only_expected("pages", &errors, VIEWER_PAGE).expect_err("two unexpected errors");
        assert!(format!("{err}").contains("2 unexpected"), "{err}");
    }
}
