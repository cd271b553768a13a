//! The e2e tests' browser driver: headless Chromium over the Chrome DevTools
//! Protocol (CDP), spoken by [`chromiumoxide`].
//!
//! This module launches the browser itself (`--remote-debugging-port=0`, a
//! fresh profile, its stderr drained into a tail for error messages, the
//! whole process tree killed on drop) and hands the `DevTools listening on
//! ws://…` endpoint to [`chromiumoxide::Browser::connect_with_config`], which
//! owns the WebSocket, routes responses and events, and attaches to every
//! page through a flattened session. On top of it this module keeps what the
//! tests rely on: one browser with many pages, pages in their own window,
//! console and exception capture from the first line a page runs (see
//! [`crate::console`]), a timeout on every call, and calls that fail at once
//! when their page crashed, was closed, or the browser went away.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use e2e::cdp::{Browser, LaunchOptions};
//! let browser = Browser::launch(LaunchOptions::default()).await?;
//! let page = browser.new_page("data:text/html,<p>hi</p>").await?;
//! assert_eq!(page.eval("1 + 1").await?, serde_json::json!(2));
//! page.close().await?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use chromiumoxide::cdp::browser_protocol::inspector::{
    EventDetached as EventInspectorDetached, EventTargetCrashed,
};
use chromiumoxide::cdp::browser_protocol::log::EventEntryAdded;
use chromiumoxide::cdp::browser_protocol::target::{CreateTargetParams, EventDetachedFromTarget};
use chromiumoxide::cdp::js_protocol::runtime::{EventConsoleApiCalled, EventExceptionThrown};
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::HandlerConfig;
use chromiumoxide::types::{Command as CdpCommand, Method, MethodId};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Flags always passed to Chromium (besides `--remote-debugging-port=0` and
/// `--user-data-dir=<fresh temp dir>`). Suitable for running as root in a
/// container without a GPU or display.
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--no-default-browser-check",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--disable-features=TranslateUI",
    // Many viewer pages share one headless browser; none may have its muted video paused as
    // "background media" to save power.
    "--disable-background-media-suspend",
];

/// Default timeout of a single CDP call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to wait for Chromium to print its DevTools endpoint.
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How many stderr lines of Chromium to keep for error messages.
const STDERR_TAIL_LINES: usize = 60;
/// How many console lines to keep per page.
const CONSOLE_LOG_LINES: usize = 1000;

/// Options for [`Browser::launch`].
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Extra command-line arguments appended after [`CHROMIUM_FLAGS`].
    pub args: Vec<String>,
    /// Chromium binary; `None` means [`chromium_path()`].
    pub chromium: Option<PathBuf>,
    /// How long to wait for the `DevTools listening on` line.
    pub launch_timeout: Duration,
    /// Timeout of each CDP call (page loads and `eval` included).
    pub call_timeout: Duration,
    /// Run Chromium inside this network namespace (`ip netns exec`, see [`crate::netns`]);
    /// its DevTools endpoint, on the namespace's loopback, is forwarded to the test's.
    pub netns: Option<String>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            chromium: None,
            launch_timeout: DEFAULT_LAUNCH_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            netns: None,
        }
    }
}

/// Options for [`Browser::new_page_with`].
#[derive(Debug, Clone, Default)]
pub struct PageOptions {
    /// Open the page in its own window: it is then visible and focused
    /// (`visibilityState == "visible"`, `requestAnimationFrame` and video
    /// rendering run) at the cost of painting it. Opening is slower
    /// (~0.2 s per page here vs ~0.1 s for a tab).
    pub new_window: bool,
}

/// Locates Chromium: `$CHROMIUM`, else `/usr/bin/chromium`, else `chromium`
/// on `PATH`.
pub fn chromium_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("CHROMIUM={} does not exist or is not a file", p.display());
    }
    let default = Path::new("/usr/bin/chromium");
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    if let Some(p) = find_on_path("chromium") {
        return Ok(p);
    }
    bail!(
        "Chromium not found (looked at $CHROMIUM, /usr/bin/chromium and `chromium` on PATH); \
         install it with `apt-get install chromium` or set CHROMIUM=/path/to/chromium"
    )
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Extracts the WebSocket URL from Chromium's
/// `DevTools listening on ws://127.0.0.1:PORT/devtools/browser/UUID` line.
pub fn parse_devtools_line(line: &str) -> Option<&str> {
    let rest = line.trim().strip_prefix("DevTools listening on ")?.trim();
    (rest.starts_with("ws://") || rest.starts_with("wss://")).then_some(rest)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Raw commands and bounded calls.

/// Any CDP command, by name with JSON parameters, whose result comes back as
/// JSON. [`Browser::call`] and [`Page::call`] send these through chromiumoxide
/// (which otherwise speaks the typed commands of the CDP revision it was
/// generated from): a command or field newer than that revision still works,
/// and a result is never refused because Chromium added an enum value.
#[derive(Debug)]
struct RawCommand {
    method: String,
    params: Value,
}

impl RawCommand {
    fn new(method: &str, params: Value) -> Self {
        let params = if params.is_null() { json!({}) } else { params };
        Self {
            method: method.to_owned(),
            params,
        }
    }
}

impl serde::Serialize for RawCommand {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.params.serialize(s)
    }
}

impl Method for RawCommand {
    fn identifier(&self) -> MethodId {
        Cow::Owned(self.method.clone())
    }
}

impl CdpCommand for RawCommand {
    type Response = Value;
}

/// Awaits `call` for at most `timeout`, failing at once (with the reason)
/// when `gone` is set: the page crashed or was closed, or the browser went
/// away.
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    gone: &watch::Sender<Option<String>>,
    call: impl Future<Output = std::result::Result<T, CdpError>>,
) -> Result<T> {
    let mut gone = gone.subscribe();
    if let Some(reason) = gone.borrow_and_update().clone() {
        bail!("CDP {what}: {reason}");
    }
    let gone = async {
        match gone.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the browser was dropped".to_owned(),
        }
    };
    tokio::pin!(gone);
    tokio::select! {
        r = call => match r {
            Ok(v) => Ok(v),
            // chromiumoxide dropped the request: its page or the browser is going away. Say why
            // if that is known within a moment.
            Err(e @ CdpError::ChannelSendError(_)) => {
                match tokio::time::timeout(Duration::from_secs(2), gone).await {
                    Ok(reason) => bail!("CDP {what}: {reason}"),
                    Err(_) => bail!("CDP {what} failed: {e}"),
                }
            }
            Err(e) => bail!("CDP {what} failed: {e}"),
        },
        reason = &mut gone => bail!("CDP {what}: {reason}"),
        () = tokio::time::sleep(timeout) => {
            bail!("CDP {what} timed out after {timeout:?} (no response from Chromium)")
        }
    }
}

fn set_once(reason_slot: &watch::Sender<Option<String>>, reason: &str) {
    reason_slot.send_if_modified(|r| {
        let unset = r.is_none();
        if unset {
            *r = Some(reason.to_owned());
        }
        unset
    });
}

/// The session id, method and parameters of a CDP event sent to a page
/// session, from its JSON text.
fn page_event(text: &str) -> Option<(String, String, Value)> {
    let mut v: Value = serde_json::from_str(text).ok()?;
    let session = v.get("sessionId")?.as_str()?.to_owned();
    let method = v.get("method")?.as_str()?.to_owned();
    Some((
        session,
        method,
        v.get_mut("params").map(Value::take).unwrap_or(Value::Null),
    ))
}

// ---------------------------------------------------------------------------
// Event text.

/// Human-readable text of a `Runtime.ExceptionDetails`.
fn exception_text(details: &Value) -> String {
    let text = details
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("Uncaught");
    let ex = details.get("exception").unwrap_or(&Value::Null);
    let mut out = if let Some(desc) = ex.get("description").and_then(Value::as_str) {
        if desc.starts_with(text) {
            desc.to_owned()
        } else {
            format!("{text} {desc}")
        }
    } else if let Some(v) = ex.get("value").filter(|v| !v.is_null()) {
        format!("{text} {}", value_text(v))
    } else {
        text.to_owned()
    };
    if let Some(url) = details.get("url").and_then(Value::as_str) {
        let line = details
            .get("lineNumber")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        let col = details
            .get("columnNumber")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        out.push_str(&format!(" ({}:{line}:{col})", truncate(url, 120)));
    }
    out
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Text of a `Runtime.RemoteObject` (as logged by `console.*`).
fn remote_object_text(o: &Value) -> String {
    if let Some(v) = o.get("value") {
        return value_text(v);
    }
    for key in ["unserializableValue", "description"] {
        if let Some(s) = o.get(key).and_then(Value::as_str) {
            return s.to_owned();
        }
    }
    o.get("type")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------
// Per-page state fed by events.

struct SessionState {
    errors: Mutex<Vec<String>>,
    console: Mutex<VecDeque<String>>,
    /// Set when the page crashed, was detached or closed, or the browser went
    /// away; calls then fail at once with this reason.
    gone: watch::Sender<Option<String>>,
    /// Becomes `true` once the session is detached (tab closed) or the
    /// browser connection is gone.
    detached: watch::Sender<bool>,
}

impl SessionState {
    fn new() -> Self {
        Self {
            errors: Mutex::default(),
            console: Mutex::default(),
            gone: watch::Sender::new(None),
            detached: watch::Sender::new(false),
        }
    }

    fn mark_gone(&self, reason: &str) {
        set_once(&self.gone, reason);
    }

    fn log(&self, line: String) {
        let mut c = lock(&self.console);
        if c.len() >= CONSOLE_LOG_LINES {
            c.pop_front();
        }
        c.push_back(line);
    }

    fn error(&self, line: String) {
        self.log(line.clone());
        lock(&self.errors).push(line);
    }

    /// Records one CDP event of this page, given as its method and JSON
    /// parameters (chromiumoxide's typed events are turned back into JSON, so
    /// an event it could not parse is recorded the same way).
    fn on_event(&self, method: &str, p: &Value) {
        match method {
            "Runtime.exceptionThrown" => {
                let d = p.get("exceptionDetails").unwrap_or(&Value::Null);
                self.error(format!("exception: {}", exception_text(d)));
            }
            "Runtime.consoleAPICalled" => {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("log");
                let text = p
                    .get("args")
                    .and_then(Value::as_array)
                    .map(|args| {
                        args.iter()
                            .map(remote_object_text)
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let line = format!("console.{kind}: {text}");
                if kind == "error" || kind == "assert" {
                    self.error(line);
                } else {
                    self.log(line);
                }
            }
            "Log.entryAdded" => {
                let e = p.get("entry").unwrap_or(&Value::Null);
                let level = e.get("level").and_then(Value::as_str).unwrap_or("info");
                let source = e.get("source").and_then(Value::as_str).unwrap_or("other");
                let text = e.get("text").and_then(Value::as_str).unwrap_or("");
                let mut line = format!("log.{level} [{source}]: {text}");
                if let Some(url) = e.get("url").and_then(Value::as_str) {
                    line.push_str(&format!(" ({})", truncate(url, 120)));
                }
                if level == "error" {
                    self.error(line);
                } else {
                    self.log(line);
                }
            }
            "Inspector.targetCrashed" => {
                self.mark_gone("page (renderer) crashed");
                self.error("renderer crashed".to_owned());
            }
            "Inspector.detached" => {
                let reason = p.get("reason").and_then(Value::as_str).unwrap_or("?");
                self.mark_gone(&format!("inspector detached: {reason}"));
            }
            _ => {}
        }
    }
}

/// Feeds a page's console, exception, log and crash events into its state
/// until the page (or the browser) goes away. Listening starts before the
/// page navigates anywhere, so nothing the page logs is missed.
async fn capture_events(page: &chromiumoxide::Page, state: Arc<SessionState>) -> Result<()> {
    let listen = async {
        anyhow::Ok((
            page.event_listener::<EventConsoleApiCalled>().await?,
            page.event_listener::<EventExceptionThrown>().await?,
            page.event_listener::<EventEntryAdded>().await?,
            page.event_listener::<EventTargetCrashed>().await?,
            page.event_listener::<EventInspectorDetached>().await?,
        ))
    };
    let (mut console, mut exceptions, mut log, mut crashed, mut detached) = listen
        .await
        .context("subscribing to the page's console and log events")?;
    tokio::spawn(async move {
        loop {
            let (method, params) = tokio::select! {
                Some(e) = console.next() => (EventConsoleApiCalled::IDENTIFIER, serde_json::to_value(&*e)),
                Some(e) = exceptions.next() => (EventExceptionThrown::IDENTIFIER, serde_json::to_value(&*e)),
                Some(e) = log.next() => (EventEntryAdded::IDENTIFIER, serde_json::to_value(&*e)),
                Some(e) = crashed.next() => (EventTargetCrashed::IDENTIFIER, serde_json::to_value(&*e)),
                Some(e) = detached.next() => (EventInspectorDetached::IDENTIFIER, serde_json::to_value(&*e)),
                else => break,
            };
            match params {
                Ok(params) => state.on_event(method, &params),
                Err(e) => {
                    tracing::warn!(target: "cdp", "could not re-encode a {method} event: {e}")
                }
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// Browser.

/// What the browser, its pages and the background tasks share.
struct Shared {
    browser: chromiumoxide::Browser,
    call_timeout: Duration,
    /// Set once the DevTools connection is gone: why. Every call then fails.
    closed: watch::Sender<Option<String>>,
    /// Open pages by flattened session id.
    sessions: Mutex<HashMap<String, Arc<SessionState>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Shared {
    async fn call(&self, method: &str, params: Value, timeout: Duration) -> Result<Value> {
        let call = self.browser.execute(RawCommand::new(method, params));
        Ok(bounded(method, timeout, &self.closed, call).await?.result)
    }

    fn shutdown(&self, reason: &str) {
        set_once(&self.closed, reason);
        for s in lock(&self.sessions).values() {
            s.mark_gone(reason);
            s.detached.send_replace(true);
        }
    }

    fn session_gone(&self, session_id: &str, reason: &str) {
        if let Some(s) = lock(&self.sessions).remove(session_id) {
            s.mark_gone(reason);
            s.detached.send_replace(true);
        }
    }

    /// A message chromiumoxide could not parse into its typed model (the
    /// system's Chromium may be newer than the protocol revision it was
    /// generated from). A page event among them is still recorded, so that no
    /// console error is lost; anything else is logged.
    fn on_unparsed(&self, text: &str, err: &serde_json::Error) {
        let event = page_event(text).and_then(|(sid, method, params)| {
            let session = lock(&self.sessions).get(&sid).cloned()?;
            Some((session, method, params))
        });
        match event {
            Some((session, method, params)) => {
                tracing::debug!(target: "cdp", "recording {method}, which chromiumoxide could not parse ({err})");
                session.on_event(&method, &params);
            }
            None => tracing::warn!(
                target: "cdp",
                "chromiumoxide could not parse a CDP message ({err}): {}",
                truncate(text, 300)
            ),
        }
    }

    fn stderr_tail(&self) -> String {
        lock(&self.stderr_tail)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A headless Chromium process and its DevTools connection.
///
/// Dropping it kills Chromium and all its descendant processes, waits for
/// the browser process, and removes the temporary profile directory.
pub struct Browser {
    shared: Arc<Shared>,
    child: Child,
    pid: u32,
    ws_url: String,
    user_data_dir: Option<tempfile::TempDir>,
    tasks: Vec<JoinHandle<()>>,
    /// The DevTools endpoint's way out of Chromium's network namespace, if it runs in one.
    _forwarder: Option<crate::netns::Forwarder>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.pid)
            .field("ws_url", &self.ws_url)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Spawns headless Chromium and connects to its DevTools endpoint.
    pub async fn launch(opts: LaunchOptions) -> Result<Browser> {
        let exe = match opts.chromium.clone() {
            Some(p) => p,
            None => chromium_path()?,
        };
        let user_data_dir = tempfile::Builder::new()
            .prefix("e2e-chromium-")
            .tempdir()
            .context("creating a temporary Chromium profile directory")?;
        let mut args: Vec<OsString> = CHROMIUM_FLAGS.iter().map(OsString::from).collect();
        args.push("--remote-debugging-port=0".into());
        let mut udd = OsString::from("--user-data-dir=");
        udd.push(user_data_dir.path());
        args.push(udd);
        args.extend(opts.args.iter().map(OsString::from));
        args.push("about:blank".into());

        let mut command = match &opts.netns {
            // `ip netns exec` execs Chromium itself: the child's pid is the browser's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        let pid = child.id();

        // Drain stderr for the whole browser lifetime (a full pipe would
        // block Chromium), keeping a tail for error messages.
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (url_tx, url_rx) = oneshot::channel::<String>();
        let stderr = child.stderr.take().context("chromium stderr not piped")?;
        // Closed once Chromium (and every child process sharing its stderr) is gone.
        let (closed_tx, closed_rx) = oneshot::channel::<()>();
        spawn_stderr_reader(stderr, Arc::clone(&stderr_tail), url_tx, closed_tx);

        let browser_guard = KillOnDrop {
            child: Some(child),
            pid,
        };
        let tail = |t: &Arc<Mutex<VecDeque<String>>>| {
            lock(t).iter().cloned().collect::<Vec<_>>().join("\n")
        };
        let ws_url = match tokio::time::timeout(opts.launch_timeout, url_rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => {
                let status = browser_guard.finish();
                bail!(
                    "Chromium ({}) exited ({status}) before printing its DevTools endpoint; \
                     stderr:\n{}",
                    exe.display(),
                    tail(&stderr_tail)
                );
            }
            Err(_) => {
                drop(browser_guard);
                bail!(
                    "Chromium ({}) did not print `DevTools listening on ws://…` within {:?}; \
                     stderr:\n{}",
                    exe.display(),
                    opts.launch_timeout,
                    tail(&stderr_tail)
                );
            }
        };

        let mut forwarder = None;
        let ws_url = match &opts.netns {
            None => ws_url,
            Some(ns) => {
                let (port, path) = ws_url
                    .strip_prefix("ws://127.0.0.1:")
                    .and_then(|r| r.split_once('/'))
                    .context("a DevTools endpoint on 127.0.0.1")?;
                let port: u16 = port.parse().context("the DevTools port")?;
                let f = crate::netns::Forwarder::start(ns, ([127, 0, 0, 1], port).into()).await?;
                let url = format!("ws://{}/{path}", f.local);
                forwarder = Some(f);
                url
            }
        };
        let config = HandlerConfig {
            // Plain HTTP on loopback only; nothing to ignore.
            ignore_https_errors: false,
            // Handed to us instead (see `Shared::on_unparsed`), so that no page event is lost.
            ignore_invalid_messages: false,
            // No device-metrics override: pages keep the window's size, as a viewer's do.
            viewport: None,
            context_ids: Vec::new(),
            request_timeout: opts.call_timeout,
            request_intercept: false,
            cache_enabled: true,
        };
        let connect = chromiumoxide::Browser::connect_with_config(ws_url.clone(), config);
        let (browser, mut handler) = match tokio::time::timeout(opts.call_timeout, connect).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => bail!(
                "connecting to Chromium DevTools at {ws_url}: {e}; stderr:\n{}",
                tail(&stderr_tail)
            ),
            Err(_) => bail!("connecting to Chromium DevTools at {ws_url} timed out"),
        };
        let shared = Arc::new(Shared {
            browser,
            call_timeout: opts.call_timeout,
            closed: watch::Sender::new(None),
            sessions: Mutex::default(),
            stderr_tail,
        });

        // chromiumoxide's handler drives the connection: it must be polled for anything to move.
        let handler_shared = Arc::clone(&shared);
        let driver = tokio::spawn(async move {
            let reason = loop {
                match handler.next().await {
                    None => break "Chromium closed the DevTools connection".to_owned(),
                    Some(Ok(())) => {}
                    Some(Err(CdpError::InvalidMessage(text, err))) => {
                        handler_shared.on_unparsed(&text, &err);
                    }
                    Some(Err(e @ CdpError::Ws(_))) => {
                        break format!("DevTools connection error: {e}")
                    }
                    Some(Err(e)) => tracing::warn!(target: "cdp", "CDP handler: {e}"),
                }
            };
            let tail = handler_shared.stderr_tail();
            let tail = tail.lines().rev().take(3).collect::<Vec<_>>();
            let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
            handler_shared.shutdown(&format!("{reason}; chromium stderr tail: {tail}"));
        });

        // chromiumoxide's handler does not end when the connection does; a browser that exits
        // fails every call at once, with what it said last.
        let exit_shared = Arc::clone(&shared);
        let exited = tokio::spawn(async move {
            if closed_rx.await.is_ok() {
                let tail = exit_shared.stderr_tail();
                let tail = tail.lines().rev().take(3).collect::<Vec<_>>();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                exit_shared.shutdown(&format!("Chromium exited; its stderr ended with: {tail}"));
            }
        });

        // Pages that go away (closed by a test, by themselves, or by Chromium): their session
        // is detached.
        let detached = shared.browser.event_listener::<EventDetachedFromTarget>();
        let mut detached = match tokio::time::timeout(opts.call_timeout, detached).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                driver.abort();
                exited.abort();
                bail!("subscribing to Chromium's target events: {e}")
            }
            Err(_) => {
                driver.abort();
                exited.abort();
                bail!("subscribing to Chromium's target events timed out")
            }
        };
        let events_shared = Arc::clone(&shared);
        let events = tokio::spawn(async move {
            while let Some(e) = detached.next().await {
                events_shared.session_gone(e.session_id.as_ref(), "page detached/closed");
            }
        });

        let (child, pid) = browser_guard.disarm();
        Ok(Browser {
            shared,
            child,
            pid,
            ws_url,
            user_data_dir: Some(user_data_dir),
            tasks: vec![driver, exited, events],
            _forwarder: forwarder,
        })
    }

    /// PID of the Chromium browser process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The browser's DevTools WebSocket URL.
    pub fn ws_url(&self) -> &str {
        &self.ws_url
    }

    /// The last lines Chromium wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.shared.stderr_tail()
    }

    /// Sends a browser-level CDP command (no session) and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.shared
            .call(method, params, self.shared.call_timeout)
            .await
    }

    /// `Browser.getVersion`.
    pub async fn version(&self) -> Result<Value> {
        self.call("Browser.getVersion", json!({})).await
    }

    /// Opens a new tab (chromiumoxide attaches to it through a flattened
    /// session and enables the `Page`, `Runtime` and `Log` domains), enables
    /// `Inspector` (crash reports), starts capturing its console, then
    /// navigates to `url` and waits for its `load` event. Console output
    /// from the very start of the page is captured.
    ///
    /// The tab shares the browser's one window, so every tab but the most
    /// recently opened is `document.visibilityState == "hidden"` (timers
    /// still run unthrottled thanks to the launch flags; nothing is painted).
    /// Use [`Browser::new_page_with`] and [`PageOptions::new_window`] for a
    /// visible, focused page.
    pub async fn new_page(&self, url: &str) -> Result<Page> {
        self.new_page_with(url, PageOptions::default()).await
    }

    /// [`Browser::new_page`] with options.
    pub async fn new_page_with(&self, url: &str, opts: PageOptions) -> Result<Page> {
        let shared = &self.shared;
        let params = CreateTargetParams::builder()
            .url("about:blank")
            .new_window(opts.new_window)
            .build()
            .map_err(|e| anyhow!("Target.createTarget parameters: {e}"))?;
        let created = bounded(
            "Target.createTarget",
            shared.call_timeout,
            &shared.closed,
            shared.browser.new_page(params),
        )
        .await
        .with_context(|| format!("opening a page at {}", truncate(url, 200)))?;
        let target_id = created.target_id().as_ref().to_owned();
        let session_id = created.session_id().as_ref().to_owned();
        let state = Arc::new(SessionState::new());
        lock(&shared.sessions).insert(session_id.clone(), Arc::clone(&state));
        let page = Page {
            inner: created,
            shared: Arc::clone(shared),
            target_id: target_id.clone(),
            session_id,
            state,
        };
        let ready = async {
            capture_events(&page.inner, Arc::clone(&page.state)).await?;
            page.call("Inspector.enable", json!({})).await?;
            // chromiumoxide turns these on for its own bookkeeping, which these pages do not
            // use; left on, Chromium would report (and buffer the bodies of) every request of
            // every viewer page.
            page.call("Network.disable", json!({})).await?;
            page.call("Performance.disable", json!({})).await?;
            // Every page behaves as the focused, visible one (timers, video), like a viewer's tab.
            page.call(
                "Emulation.setFocusEmulationEnabled",
                json!({ "enabled": true }),
            )
            .await?;
            page.navigate(url).await
        };
        match ready.await {
            Ok(()) => Ok(page),
            Err(e) => {
                let _ = self
                    .call("Target.closeTarget", json!({ "targetId": target_id }))
                    .await;
                lock(&shared.sessions).remove(&page.session_id);
                Err(e.context(format!("opening a page at {}", truncate(url, 200))))
            }
        }
    }

    /// Summed resident memory (MiB) of Chromium and all its descendants.
    pub fn rss_mb(&self) -> f64 {
        let mut pids = descendants(self.pid);
        pids.push(self.pid);
        let kb: u64 = pids.into_iter().filter_map(vm_rss_kb).sum();
        kb as f64 / 1024.0
    }

    /// Summed proportional set size (MiB) of Chromium and its descendants:
    /// shared pages are split among the processes sharing them, so unlike
    /// [`Browser::rss_mb`] this does not count Chromium's code once per
    /// process. Reads `/proc/<pid>/smaps_rollup`.
    pub fn pss_mb(&self) -> f64 {
        let mut pids = descendants(self.pid);
        pids.push(self.pid);
        let kb: u64 = pids
            .into_iter()
            .filter_map(|pid| {
                let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
                parse_kb_field(&s, "Pss:")
            })
            .sum();
        kb as f64 / 1024.0
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.shared.shutdown("browser was dropped");
        for t in &self.tasks {
            t.abort();
        }
        let mut pids = descendants(self.pid);
        let _ = self.child.kill();
        for &p in &pids {
            kill_pid(p);
        }
        let _ = self.child.wait();
        // Give the killed descendants a moment to disappear before removing
        // the profile directory they may still hold files in.
        pids.retain(|&p| is_alive(p));
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pids.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            pids.retain(|&p| is_alive(p));
        }
        if let Some(dir) = self.user_data_dir.take() {
            let path = dir.path().to_path_buf();
            if dir.close().is_err() {
                std::thread::sleep(Duration::from_millis(200));
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Kills the browser if launching fails half-way.
struct KillOnDrop {
    child: Option<Child>,
    pid: u32,
}

impl KillOnDrop {
    fn disarm(mut self) -> (Child, u32) {
        let child = self
            .child
            .take()
            .expect("KillOnDrop child present until disarmed");
        (child, self.pid)
    }

    /// Waits for an already-exiting browser, returning its exit status text.
    fn finish(mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "unknown status".to_owned();
        };
        for _ in 0..50 {
            if let Ok(Some(status)) = child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in descendants(self.pid) {
            kill_pid(p);
        }
        let _ = child.kill();
        child
            .wait()
            .map(|s| s.to_string())
            .unwrap_or_else(|e| format!("wait failed: {e}"))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            for p in descendants(self.pid) {
                kill_pid(p);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_stderr_reader(
    stderr: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    url_tx: oneshot::Sender<String>,
    closed_tx: oneshot::Sender<()>,
) {
    let spawned = std::thread::Builder::new()
        .name("chromium-stderr".into())
        .spawn(move || {
            let mut url_tx = Some(url_tx);
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                tracing::debug!(target: "chromium", "{line}");
                if let Some(url) = parse_devtools_line(&line) {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(url.to_owned());
                    }
                }
                let mut t = lock(&tail);
                if t.len() >= STDERR_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
            let _ = closed_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!("could not spawn the chromium stderr reader thread: {e}");
    }
}

// ---------------------------------------------------------------------------
// Page.

/// One tab, driven through chromiumoxide's flattened CDP session. Cheap to
/// clone; all clones refer to the same tab.
#[derive(Clone)]
pub struct Page {
    inner: chromiumoxide::Page,
    shared: Arc<Shared>,
    target_id: String,
    session_id: String,
    state: Arc<SessionState>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("target_id", &self.target_id)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl Page {
    /// The CDP target id of this tab.
    pub fn target_id(&self) -> &str {
        &self.target_id
    }

    /// The flattened CDP session id of this tab.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Sends a CDP command in this page's session.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.call_with_timeout(method, params, self.shared.call_timeout)
            .await
    }

    /// Like [`Page::call`] with an explicit timeout. chromiumoxide gives up on
    /// a page's command after 30 s whatever the timeout.
    pub async fn call_with_timeout(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let call = self.inner.execute(RawCommand::new(method, params));
        let r = bounded(method, timeout, &self.state.gone, call)
            .await
            .with_context(|| format!("page {}", self.target_id))?;
        Ok(r.result)
    }

    /// Navigates to `url` and waits for the `load` event (chromiumoxide
    /// answers `Page.navigate` once the new document has loaded).
    pub async fn navigate(&self, url: &str) -> Result<()> {
        let r = self
            .call("Page.navigate", json!({ "url": url }))
            .await
            .with_context(|| format!("navigating to {}", truncate(url, 200)))?;
        if let Some(err) = r.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {} failed: {err}", truncate(url, 200));
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression (awaiting a returned promise) and
    /// returns its value as JSON; `undefined` becomes `null`. A thrown
    /// exception or rejected promise becomes an `Err` with its text.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        self.eval_with_timeout(expression, self.shared.call_timeout)
            .await
    }

    /// Like [`Page::eval`] with an explicit timeout (at most 30 s, see
    /// [`Page::call_with_timeout`]).
    pub async fn eval_with_timeout(&self, expression: &str, timeout: Duration) -> Result<Value> {
        let r = self
            .call_with_timeout(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": true,
                }),
                timeout,
            )
            .await?;
        if let Some(details) = r.get("exceptionDetails") {
            bail!(
                "JavaScript error in page {}: {}\n  evaluating: {}",
                self.target_id,
                exception_text(details),
                truncate(expression, 300)
            );
        }
        let result = r.get("result").unwrap_or(&Value::Null);
        if let Some(v) = result.get("value") {
            return Ok(v.clone());
        }
        if let Some(u) = result.get("unserializableValue").and_then(Value::as_str) {
            return Ok(Value::String(u.to_owned()));
        }
        Ok(Value::Null)
    }

    /// Polls `expression` every 100 ms until it evaluates to a truthy value
    /// (returned), failing after `timeout` with the last value or error.
    pub async fn wait_for(&self, expression: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let last = self
                .eval_with_timeout(expression, left.max(Duration::from_millis(100)))
                .await;
            match &last {
                Ok(v) if is_truthy(v) => return last,
                _ if Instant::now() >= deadline => {
                    let last = match last {
                        Ok(v) => format!("last value {v}"),
                        Err(e) => format!("last error: {e:#}"),
                    };
                    bail!(
                        "page {}: `{}` not truthy within {timeout:?} ({last})",
                        self.target_id,
                        truncate(expression, 200)
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Saves a PNG screenshot of the viewport.
    pub async fn screenshot(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = r
            .get("data")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("Page.captureScreenshot returned no data"))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("decoding the screenshot")?;
        tokio::fs::write(path, png)
            .await
            .with_context(|| format!("writing screenshot {}", path.display()))
    }

    /// Errors seen so far: uncaught exceptions (`Runtime.exceptionThrown`),
    /// `console.error`/`console.assert` calls, and `Log` entries of level
    /// `error` (e.g. failed resource loads).
    pub fn console_errors(&self) -> Vec<String> {
        lock(&self.state.errors).clone()
    }

    /// The last (up to 1000) console/log lines of all levels, errors included.
    pub fn console_log(&self) -> Vec<String> {
        lock(&self.state.console).iter().cloned().collect()
    }

    /// Closes the tab (`Target.closeTarget`) and waits until Chromium has
    /// destroyed it (its session detached).
    pub async fn close(self) -> Result<()> {
        let mut detached = self.state.detached.subscribe();
        let timeout = self.shared.call_timeout;
        let r = self
            .shared
            .call(
                "Target.closeTarget",
                json!({ "targetId": self.target_id }),
                timeout,
            )
            .await
            .with_context(|| format!("closing page {}", self.target_id))?;
        if r.get("success").and_then(Value::as_bool) == Some(false) {
            bail!("Target.closeTarget({}) reported failure", self.target_id);
        }
        let wait = async { detached.wait_for(|d| *d).await.is_ok() };
        let done = tokio::time::timeout(timeout, wait).await;
        self.state.mark_gone("page was closed");
        lock(&self.shared.sessions).remove(&self.session_id);
        if done.is_err() {
            bail!(
                "page {} was not destroyed within {timeout:?} after Target.closeTarget",
                self.target_id,
            );
        }
        Ok(())
    }
}

fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

// ---------------------------------------------------------------------------
// /proc helpers.

/// Parses the parent PID out of a `/proc/<pid>/stat` line (robust to
/// spaces and parentheses in the command name).
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// Parses `VmRSS` (in kB) out of a `/proc/<pid>/status` file.
pub fn parse_status_vm_rss_kb(status: &str) -> Option<u64> {
    parse_kb_field(status, "VmRSS:")
}

fn parse_kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_vm_rss_kb(&status)
}

/// All transitive child processes of `root` (not including `root`).
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat_ppid)
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                if k != root && !out.contains(&k) {
                    out.push(k);
                    queue.push(k);
                }
            }
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn kill_pid(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devtools_line() {
        assert_eq!(
            parse_devtools_line(
                "DevTools listening on ws://127.0.0.1:36779/devtools/browser/5b1c-42\n"
            ),
            Some("ws://127.0.0.1:36779/devtools/browser/5b1c-42")
        );
        assert_eq!(parse_devtools_line("[123:456:ERROR:foo.cc(1)] nope"), None);
        assert_eq!(parse_devtools_line("DevTools listening on nothing"), None);
    }

    #[test]
    fn stat_and_status() {
        let stat = "4242 (chromium (x) y) S 17 4242 4242 0 -1 4194560 1234";
        assert_eq!(parse_stat_ppid(stat), Some(17));
        assert_eq!(parse_stat_ppid("garbage"), None);
        let status = "Name:\tchromium\nVmPeak:\t  9000 kB\nVmRSS:\t  123456 kB\nThreads: 4\n";
        assert_eq!(parse_status_vm_rss_kb(status), Some(123_456));
        assert_eq!(parse_status_vm_rss_kb("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn exception_and_console_text() {
        let d = json!({
            "text": "Uncaught",
            "exception": { "type": "object", "description": "Error: boom\n    at <anonymous>:1:7" }
        });
        assert_eq!(
            exception_text(&d),
            "Uncaught Error: boom\n    at <anonymous>:1:7"
        );
        let d = json!({ "text": "Uncaught", "exception": { "type": "string", "value": "str" } });
        assert_eq!(exception_text(&d), "Uncaught str");
        assert_eq!(
            remote_object_text(&json!({"type": "string", "value": "hi"})),
            "hi"
        );
        assert_eq!(
            remote_object_text(&json!({"type": "number", "value": 3})),
            "3"
        );
        assert_eq!(
            remote_object_text(&json!({"type": "undefined"})),
            "undefined"
        );
        assert_eq!(
            remote_object_text(&json!({"type": "number", "unserializableValue": "NaN"})),
            "NaN"
        );
    }

    #[test]
    fn an_event_chromiumoxide_cannot_parse_is_still_recorded() {
        // A `type` newer than chromiumoxide's protocol revision.
        let text = r#"{"method":"Runtime.consoleAPICalled","sessionId":"S1",
            "params":{"type":"futureKind","args":[{"type":"string","value":"boom"}]}}"#;
        assert!(
            serde_json::from_str::<chromiumoxide::cdp::CdpEventMessage>(text).is_err(),
            "chromiumoxide refuses it"
        );
        let (sid, method, params) = page_event(text).expect("a page event");
        assert_eq!(
            (sid.as_str(), method.as_str()),
            ("S1", "Runtime.consoleAPICalled")
        );
        let state = SessionState::new();
        state.on_event(&method, &params);
        assert_eq!(
            state.console.lock().unwrap().back().unwrap(),
            "console.futureKind: boom"
        );
        let error = r#"{"method":"Log.entryAdded","sessionId":"S1",
            "params":{"entry":{"level":"error","source":"brandNew","text":"404"}}}"#;
        let (_, method, params) = page_event(error).expect("a page event");
        state.on_event(&method, &params);
        assert_eq!(
            state.errors.lock().unwrap().as_slice(),
            ["log.error [brandNew]: 404"]
        );
        assert!(page_event(r#"{"id":3,"result":{}}"#).is_none());
        assert!(page_event(r#"{"method":"Target.targetCreated","params":{}}"#).is_none());
    }

    #[test]
    fn truthiness_and_truncation() {
        assert!(!is_truthy(&json!(null)));
        assert!(!is_truthy(&json!(0)));
        assert!(!is_truthy(&json!("")));
        assert!(is_truthy(&json!({})));
        assert!(is_truthy(&json!(2)));
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("hi", 10), "hi");
    }

    #[test]
    fn self_is_alive_and_has_rss() {
        assert!(is_alive(std::process::id()));
        assert!(vm_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }
}
