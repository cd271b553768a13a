//! MediaSource playback: init segment first, then media bytes in order as the engine delivers
//! them. Also keeps the player near the live edge and counts stalls.
//!
//! Where `MediaSource` is missing but `ManagedMediaSource` exists (iOS Safari 17.1+), the managed
//! one is used: same API, attached with remote playback (AirPlay) disabled, as WebKit requires.
//! web-sys has no binding for it, so it is constructed through `js_sys::Reflect`.
//!
//! The video element may opt out of the defaults (muted, autoplay) with the attributes
//! `data-p2p-muted="false"` and `data-p2p-autoplay="false"` (the embeddable player sets them).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{HtmlVideoElement, MediaSource, MediaSourceReadyState, SourceBuffer};

use super::{js_err, perf_now};
use crate::engine::PlayoutSizing;

/// Seconds of media kept behind the playhead before older data is removed.
const KEEP_BEHIND_S: f64 = 20.0;
// How far behind the buffered end the playhead runs (target and maximum before it jumps
// forward), and the media buffered before playback starts, follow the stream's fragment
// duration: see `crate::engine::playout`, which sizes them.
/// Media played before a `waiting` counts as a stall rather than a start-up hiccup.
const STARTUP_GRACE_S: f64 = 1.0;

#[derive(Default)]
struct PlayState {
    playing_since: Option<f64>,
    first_playing_ms: Option<f64>,
    /// Media time at which playback first started.
    first_playing_at: Option<f64>,
    stalls: u32,
    own_seek: bool,
    errors: Vec<String>,
}

/// A `MediaSource`, or a `ManagedMediaSource` where only that exists.
pub(crate) fn new_media_source() -> Result<(MediaSource, bool), String> {
    let global = js_sys::global();
    let get = |name: &str| {
        js_sys::Reflect::get(&global, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
    };
    if get("MediaSource").is_function() {
        return MediaSource::new()
            .map(|s| (s, false))
            .map_err(|e| js_err("MediaSource", &e));
    }
    let managed = get("ManagedMediaSource");
    if !managed.is_function() {
        return Err(
            "this browser has neither MediaSource nor ManagedMediaSource: it cannot play".into(),
        );
    }
    let ctor: js_sys::Function = managed.unchecked_into();
    let source = js_sys::Reflect::construct(&ctor, &js_sys::Array::new())
        .map_err(|e| js_err("ManagedMediaSource", &e))?;
    // ManagedMediaSource only has the API of MediaSource (plus power hints), so the web-sys
    // binding's methods apply; they are looked up on the object at call time.
    Ok((source.unchecked_into::<MediaSource>(), true))
}

/// Whether this browser's MediaSource (or ManagedMediaSource) says it can play `mime`; `None`
/// when neither exists.
fn type_supported(mime: &str) -> Option<bool> {
    let global = js_sys::global();
    ["MediaSource", "ManagedMediaSource"]
        .iter()
        .find_map(|name| {
            let ctor = js_sys::Reflect::get(&global, &JsValue::from_str(name)).ok()?;
            let f = js_sys::Reflect::get(&ctor, &JsValue::from_str("isTypeSupported")).ok()?;
            let f: js_sys::Function = f.dyn_into().ok()?;
            let yes = f.call1(&ctor, &JsValue::from_str(mime)).ok()?;
            Some(yes.is_truthy())
        })
}

/// An error naming what this browser cannot play of `mime` (each codec of its `codecs`
/// parameter is asked about alone), or `None` if it can play it all. A type without a `codecs` parameter names nothing to refuse: `addSourceBuffer` has the last
/// word on it.
pub(crate) fn unsupported(mime: &str) -> Option<String> {
    let container = mime.split(';').next().unwrap_or(mime).trim();
    let codecs: Vec<&str> = mime
        .split_once("codecs=")
        .map(|(_, c)| c.trim_matches(|ch: char| ch == '"' || ch == '\'' || ch.is_whitespace()))
        .map(|c| {
            c.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if codecs.is_empty() || type_supported(mime)? {
        return None;
    }
    let refused: Vec<&str> = codecs
        .iter()
        .copied()
        .filter(|c| type_supported(&format!("{container}; codecs=\"{c}\"")) == Some(false))
        .collect();
    Some(if refused.is_empty() {
        format!("unsupported codec: this browser cannot play {mime}")
    } else {
        format!(
            "unsupported codec: this browser cannot play {} (the stream is {mime})",
            refused.join(", ")
        )
    })
}

pub(crate) struct Media {
    video: HtmlVideoElement,
    source: MediaSource,
    object_url: String,
    autoplay: bool,
    mime: String,
    buffer: Option<SourceBuffer>,
    init: Option<Vec<u8>>,
    init_appended: bool,
    queue: VecDeque<Vec<u8>>,
    started: bool,
    state: Rc<RefCell<PlayState>>,
    _on_open: Closure<dyn FnMut()>,
    on_update_end: Closure<dyn FnMut()>,
    on_playing: Closure<dyn FnMut()>,
    on_waiting: Closure<dyn FnMut()>,
    on_seeked: Closure<dyn FnMut()>,
    opened: Rc<RefCell<bool>>,
    play_catch: Option<Closure<dyn FnMut(JsValue)>>,
    first_media_at: Option<f64>,
    /// Lag and start-up cushion for the stream's fragment duration (the engine learns it).
    playout: PlayoutSizing,
}

impl Media {
    /// `pump` is called when the source opens or an append finishes, so queued bytes move on.
    pub(crate) fn new(
        video: HtmlVideoElement,
        mime: String,
        pump: Rc<dyn Fn()>,
    ) -> Result<Self, String> {
        if let Some(e) = unsupported(&mime) {
            return Err(e);
        }
        let (source, managed) = new_media_source()?;
        let opened = Rc::new(RefCell::new(false));
        let o = opened.clone();
        let p = pump.clone();
        let on_open = Closure::<dyn FnMut()>::new(move || {
            *o.borrow_mut() = true;
            p();
        });
        source.set_onsourceopen(Some(on_open.as_ref().unchecked_ref()));
        let p = pump;
        let on_update_end = Closure::<dyn FnMut()>::new(move || p());
        let state = Rc::new(RefCell::new(PlayState::default()));
        let s = state.clone();
        let v = video.clone();
        let on_playing = Closure::<dyn FnMut()>::new(move || {
            let mut s = s.borrow_mut();
            let now = perf_now();
            s.first_playing_ms.get_or_insert(now);
            s.first_playing_at.get_or_insert(v.current_time());
            s.playing_since = Some(now);
        });
        let s = state.clone();
        let v = video.clone();
        let on_waiting = Closure::<dyn FnMut()>::new(move || {
            let mut s = s.borrow_mut();
            // A stall is the playhead starving after playback started, not our own live seek,
            // and not the decoder's underflow in the first second of playback (a busy page
            // starting up), which is part of start-up, like in players' usual metrics.
            let past_startup = s
                .first_playing_at
                .is_some_and(|t0| v.current_time() - t0 >= STARTUP_GRACE_S);
            if s.playing_since.is_some() && !s.own_seek && past_startup {
                s.stalls += 1;
                let ranges = v.buffered();
                let buffered: Vec<String> = (0..ranges.length())
                    .map(|i| {
                        format!(
                            "{:.2}-{:.2}",
                            ranges.start(i).unwrap_or(0.0),
                            ranges.end(i).unwrap_or(0.0)
                        )
                    })
                    .collect();
                let msg = format!(
                    "stall at {:.2} s (buffered {})",
                    v.current_time(),
                    buffered.join(", ")
                );
                s.errors.push(msg);
            }
            s.playing_since = None;
        });
        let s = state.clone();
        let on_seeked = Closure::<dyn FnMut()>::new(move || {
            s.borrow_mut().own_seek = false;
        });
        let target: &web_sys::EventTarget = video.as_ref();
        for (name, f) in [
            ("playing", &on_playing),
            ("waiting", &on_waiting),
            ("seeked", &on_seeked),
        ] {
            target
                .add_event_listener_with_callback(name, f.as_ref().unchecked_ref())
                .map_err(|e| js_err("addEventListener", &e))?;
        }
        let opted_out = |name: &str| video.get_attribute(name).as_deref() == Some("false");
        let autoplay = !opted_out("data-p2p-autoplay");
        // Autoplay with sound is refused by browsers without a user gesture: muted by default.
        video.set_muted(!opted_out("data-p2p-muted"));
        // Never the element's own autoplay: it would start playback on the first appended
        // frames, before the start-up cushion is buffered. We call play() ourselves.
        video.set_autoplay(false);
        if managed {
            // WebKit opens a ManagedMediaSource only with remote playback (AirPlay) disabled.
            js_sys::Reflect::set(
                &video,
                &JsValue::from_str("disableRemotePlayback"),
                &JsValue::TRUE,
            )
            .map_err(|e| js_err("disableRemotePlayback", &e))?;
        }
        let object_url = web_sys::Url::create_object_url_with_source(&source)
            .map_err(|e| js_err("createObjectURL", &e))?;
        video.set_src(&object_url);
        Ok(Media {
            video,
            source,
            object_url,
            autoplay,
            mime,
            buffer: None,
            init: None,
            init_appended: false,
            queue: VecDeque::new(),
            started: false,
            state,
            _on_open: on_open,
            on_update_end,
            on_playing,
            on_waiting,
            on_seeked,
            opened,
            play_catch: None,
            first_media_at: None,
            playout: PlayoutSizing::default(),
        })
    }

    /// Sizes the lag behind the live edge for the stream's fragment duration.
    pub(crate) fn set_playout(&mut self, playout: PlayoutSizing) {
        self.playout = playout;
    }

    pub(crate) fn set_init(&mut self, init: Vec<u8>) {
        self.init = Some(init);
        self.pump();
    }

    pub(crate) fn push(&mut self, bytes: Vec<u8>) {
        self.queue.push_back(bytes);
        // Bounded: if the decoder stops consuming, drop the oldest rather than grow forever.
        while self.queue.len() > 2000 {
            self.queue.pop_front();
        }
        self.pump();
    }

    /// Appends what can be appended now.
    pub(crate) fn pump(&mut self) {
        if !*self.opened.borrow() || self.source.ready_state() != MediaSourceReadyState::Open {
            return;
        }
        if self.buffer.is_none() {
            match self.source.add_source_buffer(&self.mime) {
                Ok(sb) => {
                    sb.set_onupdateend(Some(self.on_update_end.as_ref().unchecked_ref()));
                    self.buffer = Some(sb);
                }
                Err(e) => {
                    self.error(js_err(&format!("addSourceBuffer({})", self.mime), &e));
                    return;
                }
            }
        }
        let Some(sb) = self.buffer.clone() else {
            return;
        };
        if sb.updating() {
            return;
        }
        if !self.init_appended {
            let Some(init) = self.init.as_ref() else {
                return;
            };
            let view = js_sys::Uint8Array::from(&init[..]);
            if let Err(e) = sb.append_buffer_with_array_buffer_view(&view) {
                self.error(js_err("appending init segment", &e));
            }
            self.init_appended = true;
            return;
        }
        self.start_if_ready(&sb);
        if self.queue.is_empty() {
            self.trim(&sb);
            return;
        }
        // Coalesce queued packets into one append: fewer updateend round trips.
        let total: usize = self.queue.iter().map(Vec::len).sum();
        let mut data = Vec::with_capacity(total);
        while let Some(b) = self.queue.pop_front() {
            data.extend_from_slice(&b);
        }
        let view = js_sys::Uint8Array::from(&data[..]);
        if let Err(e) = sb.append_buffer_with_array_buffer_view(&view) {
            self.error(js_err("appendBuffer", &e));
        }
    }

    fn start_if_ready(&mut self, sb: &SourceBuffer) {
        let Ok(ranges) = sb.buffered() else { return };
        if ranges.length() == 0 {
            return;
        }
        let start = ranges.start(0).unwrap_or(0.0);
        let end = ranges.end(ranges.length() - 1).unwrap_or(start);
        let now = self.video.current_time();
        if !self.started {
            // Start with a cushion: a late packet or a repair then drains it instead of
            // stalling the picture. (Joiners get about two fragments at once.) The lag must
            // exceed a fragment: the buffered end then stands still for that long.
            let p = self.playout;
            let first = *self.first_media_at.get_or_insert_with(perf_now);
            if end - start < p.startup_buffer_s && perf_now() - first < p.startup_timeout_ms {
                return;
            }
            self.started = true;
            self.seek(start.max(end - p.target_lag_s - 0.5));
            if !self.autoplay {
                // The page starts playback itself (e.g. the player's play()).
                return;
            }
            if let Ok(p) = self.video.play() {
                // Autoplay refusal is reported as an error; the page can offer a play button.
                let state = self.state.clone();
                let on_err = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                    state.borrow_mut().errors.push(js_err("video.play()", &e));
                });
                let _ = p.catch(&on_err);
                // Owned here so it outlives the promise (dropped with the player).
                self.play_catch = Some(on_err);
            }
        } else if end - now > self.playout.max_lag_s {
            self.seek(end - self.playout.target_lag_s);
        }
    }

    fn seek(&mut self, t: f64) {
        self.state.borrow_mut().own_seek = true;
        self.video.set_current_time(t);
    }

    fn trim(&mut self, sb: &SourceBuffer) {
        let Ok(ranges) = sb.buffered() else { return };
        if ranges.length() == 0 {
            return;
        }
        let start = ranges.start(0).unwrap_or(0.0);
        let now = self.video.current_time();
        if now - start > KEEP_BEHIND_S + 10.0 {
            let _ = sb.remove(start, now - KEEP_BEHIND_S);
        }
    }

    fn error(&mut self, msg: String) {
        web_sys::console::warn_1(&JsValue::from_str(&msg));
        self.state.borrow_mut().errors.push(msg);
    }

    pub(crate) fn current_time(&self) -> f64 {
        self.video.current_time()
    }

    /// Seconds of media the playhead can play without a stall: to the end of the buffered
    /// range it is in (0 in a hole).
    pub(crate) fn buffer_ahead(&self) -> f64 {
        let ranges = self.video.buffered();
        let now = self.video.current_time();
        (0..ranges.length())
            .filter_map(|i| Some((ranges.start(i).ok()?, ranges.end(i).ok()?)))
            .find(|(start, end)| *start <= now + 0.05 && now <= *end)
            .map_or(0.0, |(_, end)| (end - now).max(0.0))
    }

    pub(crate) fn playing(&self) -> bool {
        self.state.borrow().playing_since.is_some() && !self.video.paused()
    }

    pub(crate) fn stalls(&self) -> u32 {
        self.state.borrow().stalls
    }

    pub(crate) fn first_playing_ms(&self) -> Option<f64> {
        self.state.borrow().first_playing_ms
    }

    pub(crate) fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut self.state.borrow_mut().errors)
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        self.source.set_onsourceopen(None);
        if let Some(sb) = &self.buffer {
            sb.set_onupdateend(None);
        }
        let target: &web_sys::EventTarget = self.video.as_ref();
        for (name, f) in [
            ("playing", &self.on_playing),
            ("waiting", &self.on_waiting),
            ("seeked", &self.on_seeked),
        ] {
            let _ = target.remove_event_listener_with_callback(name, f.as_ref().unchecked_ref());
        }
        let _ = self.video.pause();
        self.video.remove_attribute("src").ok();
        self.video.load();
        let _ = web_sys::Url::revoke_object_url(&self.object_url);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::*;

    /// Hides `MediaSource` and offers the real one as `ManagedMediaSource` (as iOS Safari does):
    /// the player still opens, with remote playback disabled.
    #[wasm_bindgen_test]
    async fn falls_back_to_managed_media_source() {
        let global = js_sys::global();
        let key = JsValue::from_str("MediaSource");
        let managed_key = JsValue::from_str("ManagedMediaSource");
        let original = js_sys::Reflect::get(&global, &key).expect("MediaSource");
        js_sys::Reflect::set(&global, &managed_key, &original).expect("set");
        js_sys::Reflect::set(&global, &key, &JsValue::UNDEFINED).expect("hide");
        let made = new_media_source();
        let document = web_sys::window()
            .and_then(|w| w.document())
            .expect("document");
        let video: HtmlVideoElement = document
            .create_element("video")
            .expect("video")
            .unchecked_into();
        let opened = Rc::new(RefCell::new(0u32));
        let o = opened.clone();
        let media = Media::new(
            video.clone(),
            r#"video/mp4; codecs="avc1.42c01e""#.into(),
            Rc::new(move || *o.borrow_mut() += 1),
        );
        js_sys::Reflect::set(&global, &key, &original).expect("restore");
        js_sys::Reflect::delete_property(&global, &managed_key).expect("delete");
        let (_, managed) = made.expect("a managed media source");
        assert!(managed);
        let media = media.expect("media on a managed source");
        assert!(video.src().starts_with("blob:"));
        let disabled = js_sys::Reflect::get(&video, &JsValue::from_str("disableRemotePlayback"))
            .expect("disableRemotePlayback");
        assert_eq!(disabled, JsValue::TRUE);
        // The source opens once attached.
        for _ in 0..50 {
            if *opened.borrow() > 0 {
                break;
            }
            super::super::rtc::sleep_ms(20).await;
        }
        assert!(*opened.borrow() > 0, "sourceopen never fired");
        drop(media);
    }

    #[wasm_bindgen_test]
    fn attributes_opt_out_of_autoplay_and_mute() {
        let document = web_sys::window()
            .and_then(|w| w.document())
            .expect("document");
        let video: HtmlVideoElement = document
            .create_element("video")
            .expect("video")
            .unchecked_into();
        video
            .set_attribute("data-p2p-autoplay", "false")
            .expect("attr");
        video
            .set_attribute("data-p2p-muted", "false")
            .expect("attr");
        let media = Media::new(video.clone(), "video/mp4".into(), Rc::new(|| ())).expect("media");
        assert!(!media.autoplay);
        assert!(!video.muted());
        assert!(!video.autoplay());
    }
}
