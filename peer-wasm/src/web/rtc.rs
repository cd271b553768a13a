//! One WebRTC link (RTCPeerConnection + one data channel) per neighbour the control center
//! named. The lower peer id offers, so two neighbours never both offer (no glare).

use std::collections::VecDeque;
use std::rc::Rc;

use protocol::{PeerId, Signal};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelState,
    RtcDataChannelType, RtcIceCandidateInit, RtcPeerConnection, RtcPeerConnectionIceEvent,
    RtcSdpType, RtcSessionDescriptionInit,
};

use super::js_err;

/// Above this many buffered bytes we stop writing and wait for `bufferedamountlow`.
const HIGH_WATER: u32 = 1024 * 1024;
const LOW_WATER: u32 = 256 * 1024;
/// Packets queued per link while the channel opens or drains; older ones are dropped.
const MAX_QUEUE: usize = 512;

/// Events a link reports to the peer.
pub(crate) enum LinkEvent {
    Signal(PeerId, Signal),
    /// A binary message: a media packet or a parity frame (the engine dispatches on the first
    /// byte). Messages are whole frames of up to `protocol::fec::MAX_PARITY_FRAME` bytes, far
    /// below any browser's SCTP message limit (Chrome and Firefox take 256 KiB).
    Packet(PeerId, Vec<u8>),
    /// The channel opened or drained: queued packets can go.
    Writable(PeerId),
    /// The answering side received the offerer's data channel.
    Channel(PeerId, RtcDataChannel),
    Closed(PeerId),
}

pub(crate) type Sink = Rc<dyn Fn(LinkEvent)>;

struct ChannelHandlers {
    dc: RtcDataChannel,
    _on_open: Closure<dyn FnMut()>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut()>,
    _on_low: Closure<dyn FnMut()>,
}

impl Drop for ChannelHandlers {
    fn drop(&mut self) {
        self.dc.set_onopen(None);
        self.dc.set_onmessage(None);
        self.dc.set_onclose(None);
        self.dc.set_onbufferedamountlow(None);
        self.dc.close();
    }
}

/// A data channel that has not opened this long after its link was created never will: two
/// peers behind endpoint-dependent NATs, or UDP blocked. Under load a channel opens in 0.3-1.5 s.
pub(crate) const LINK_OPEN_TIMEOUT_MS: f64 = 10_000.0;

pub(crate) struct Link {
    peer: PeerId,
    pc: RtcPeerConnection,
    channel: Option<ChannelHandlers>,
    queue: VecDeque<Rc<Vec<u8>>>,
    sink: Sink,
    pub(crate) dropped: u64,
    /// When the data channel opened (wall clock ms), for statistics.
    pub(crate) opened_ms: Option<f64>,
    /// When the link was created (wall clock ms): one that has not opened within
    /// [`LINK_OPEN_TIMEOUT_MS`] is reported to the control center as failed.
    pub(crate) created_ms: f64,
    _on_ice: Closure<dyn FnMut(RtcPeerConnectionIceEvent)>,
    _on_dc: Closure<dyn FnMut(RtcDataChannelEvent)>,
    _on_state: Closure<dyn FnMut()>,
}

impl Link {
    pub(crate) fn new(peer: PeerId, ice_servers: &JsValue, sink: Sink) -> Result<Self, String> {
        let cfg = RtcConfiguration::new();
        if !ice_servers.is_undefined() && !ice_servers.is_null() {
            cfg.set_ice_servers(ice_servers);
        }
        let pc = RtcPeerConnection::new_with_configuration(&cfg)
            .map_err(|e| js_err("RTCPeerConnection", &e))?;
        let s = sink.clone();
        let on_ice = Closure::<dyn FnMut(RtcPeerConnectionIceEvent)>::new(
            move |ev: RtcPeerConnectionIceEvent| {
                if let Some(c) = ev.candidate() {
                    s(LinkEvent::Signal(
                        peer,
                        Signal::Ice {
                            candidate: c.candidate(),
                            sdp_mid: c.sdp_mid(),
                            sdp_m_line_index: c.sdp_m_line_index(),
                        },
                    ));
                }
            },
        );
        pc.set_onicecandidate(Some(on_ice.as_ref().unchecked_ref()));
        // The answering side learns of the channel here; it is wired up by the peer.
        let s = sink.clone();
        let on_dc =
            Closure::<dyn FnMut(RtcDataChannelEvent)>::new(move |ev: RtcDataChannelEvent| {
                s(LinkEvent::Channel(peer, ev.channel()));
            });
        pc.set_ondatachannel(Some(on_dc.as_ref().unchecked_ref()));
        let s = sink.clone();
        let pc2 = pc.clone();
        let on_state = Closure::<dyn FnMut()>::new(move || {
            use web_sys::RtcPeerConnectionState as S;
            if matches!(pc2.connection_state(), S::Failed | S::Closed) {
                s(LinkEvent::Closed(peer));
            }
        });
        pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
        Ok(Link {
            peer,
            pc,
            channel: None,
            queue: VecDeque::new(),
            sink,
            dropped: 0,
            opened_ms: None,
            created_ms: 0.0,
            _on_ice: on_ice,
            _on_dc: on_dc,
            _on_state: on_state,
        })
    }

    /// Offerer side: create the data channel and send an offer.
    pub(crate) fn offer(&mut self) {
        let dc = self.pc.create_data_channel("p2p");
        self.attach_channel(dc);
        let pc = self.pc.clone();
        let sink = self.sink.clone();
        let peer = self.peer;
        wasm_bindgen_futures::spawn_local(async move {
            match make_description(&pc, RtcSdpType::Offer).await {
                Ok(sdp) => sink(LinkEvent::Signal(peer, Signal::Offer { sdp })),
                Err(e) => web_sys::console::warn_1(&JsValue::from_str(&e)),
            }
        });
    }

    pub(crate) fn attach_channel(&mut self, dc: RtcDataChannel) {
        dc.set_binary_type(RtcDataChannelType::Arraybuffer);
        dc.set_buffered_amount_low_threshold(LOW_WATER);
        let peer = self.peer;
        let s = self.sink.clone();
        let on_open = Closure::<dyn FnMut()>::new(move || s(LinkEvent::Writable(peer)));
        let s = self.sink.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            let data = ev.data();
            if data.is_instance_of::<js_sys::ArrayBuffer>() {
                s(LinkEvent::Packet(
                    peer,
                    js_sys::Uint8Array::new(&data).to_vec(),
                ));
            }
        });
        let s = self.sink.clone();
        let on_close = Closure::<dyn FnMut()>::new(move || s(LinkEvent::Closed(peer)));
        let s = self.sink.clone();
        let on_low = Closure::<dyn FnMut()>::new(move || s(LinkEvent::Writable(peer)));
        dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        dc.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        dc.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
        self.channel = Some(ChannelHandlers {
            dc,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
            _on_low: on_low,
        });
    }

    pub(crate) fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Offer { sdp } => {
                let pc = self.pc.clone();
                let sink = self.sink.clone();
                let peer = self.peer;
                wasm_bindgen_futures::spawn_local(async move {
                    let res = async {
                        set_remote(&pc, RtcSdpType::Offer, &sdp).await?;
                        make_description(&pc, RtcSdpType::Answer).await
                    }
                    .await;
                    match res {
                        Ok(sdp) => sink(LinkEvent::Signal(peer, Signal::Answer { sdp })),
                        Err(e) => web_sys::console::warn_1(&JsValue::from_str(&e)),
                    }
                });
            }
            Signal::Answer { sdp } => {
                let pc = self.pc.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    if let Err(e) = set_remote(&pc, RtcSdpType::Answer, &sdp).await {
                        web_sys::console::warn_1(&JsValue::from_str(&e));
                    }
                });
            }
            Signal::Ice {
                candidate,
                sdp_mid,
                sdp_m_line_index,
            } => {
                let init = RtcIceCandidateInit::new(&candidate);
                init.set_sdp_mid(sdp_mid.as_deref());
                init.set_sdp_m_line_index(sdp_m_line_index);
                let pc = self.pc.clone();
                wasm_bindgen_futures::spawn_local(async move { add_candidate(&pc, init).await });
            }
        }
    }

    /// Queues a packet and writes as much as the channel accepts without overfilling.
    pub(crate) fn send(&mut self, packet: Rc<Vec<u8>>) {
        self.queue.push_back(packet);
        while self.queue.len() > MAX_QUEUE {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.flush();
    }

    pub(crate) fn flush(&mut self) {
        let Some(ch) = &self.channel else { return };
        if ch.dc.ready_state() != RtcDataChannelState::Open {
            return;
        }
        while ch.dc.buffered_amount() < HIGH_WATER {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            if ch.dc.send_with_u8_array(&p).is_err() {
                self.dropped += 1;
            }
        }
    }

    pub(crate) fn pc(&self) -> &RtcPeerConnection {
        &self.pc
    }

    pub(crate) fn is_open(&self) -> bool {
        self.channel
            .as_ref()
            .is_some_and(|c| c.dc.ready_state() == RtcDataChannelState::Open)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.channel = None;
        self.pc.set_onicecandidate(None);
        self.pc.set_ondatachannel(None);
        self.pc.set_onconnectionstatechange(None);
        self.pc.close();
    }
}

pub(crate) async fn make_description(
    pc: &RtcPeerConnection,
    kind: RtcSdpType,
) -> Result<String, String> {
    let promise = match kind {
        RtcSdpType::Offer => pc.create_offer(),
        _ => pc.create_answer(),
    };
    let desc = JsFuture::from(promise)
        .await
        .map_err(|e| js_err("creating description", &e))?;
    let sdp = js_sys::Reflect::get(&desc, &JsValue::from_str("sdp"))
        .ok()
        .and_then(|v| v.as_string())
        .ok_or("description without sdp")?;
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(&sdp);
    JsFuture::from(pc.set_local_description(&init))
        .await
        .map_err(|e| js_err("setLocalDescription", &e))?;
    Ok(sdp)
}

async fn set_remote(pc: &RtcPeerConnection, kind: RtcSdpType, sdp: &str) -> Result<(), String> {
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(sdp);
    JsFuture::from(pc.set_remote_description(&init))
        .await
        .map(|_| ())
        .map_err(|e| js_err("setRemoteDescription", &e))
}

/// Adds a remote ICE candidate once the remote description is in place (candidates can
/// overtake the offer/answer they belong to).
async fn add_candidate(pc: &RtcPeerConnection, c: RtcIceCandidateInit) {
    for _ in 0..200 {
        if pc.remote_description().is_some() {
            break;
        }
        sleep_ms(25).await;
    }
    if let Err(e) =
        JsFuture::from(pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&c))).await
    {
        web_sys::console::warn_1(&JsValue::from_str(&js_err("addIceCandidate", &e)));
    }
}

pub(crate) async fn sleep_ms(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = JsFuture::from(promise).await;
}
