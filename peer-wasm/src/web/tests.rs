//! Browser tests of the web glue (`wasm-pack test --headless --chrome`): real MediaSource, real
//! RTCPeerConnections and data channels inside one page.

use std::cell::RefCell;
use std::rc::Rc;

use protocol::PeerId;
use wasm_bindgen::JsValue;
use wasm_bindgen_test::*;

use super::rtc::{sleep_ms, Link, LinkEvent};

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn media_source_accepts_the_demo_codec() {
    assert!(web_sys::MediaSource::is_type_supported(
        r#"video/mp4; codecs="avc1.42c01e""#
    ));
}

#[wasm_bindgen_test]
fn a_codec_the_browser_cannot_play_is_named() {
    let ok = r#"video/mp4; codecs="avc1.42c01e, mp4a.40.2""#;
    assert_eq!(super::media::unsupported(ok), None);
    let e = super::media::unsupported(r#"video/mp4; codecs="avc1.42c01e, xyz9.1""#)
        .expect("an unknown codec is not playable");
    assert!(e.starts_with("unsupported codec"), "{e}");
    assert!(
        e.contains("xyz9.1") && !e.contains("cannot play avc1"),
        "{e}"
    );
}

#[wasm_bindgen_test]
fn js_errors_become_readable_messages() {
    let e = js_sys::Error::new("boom");
    assert_eq!(super::js_err("ctx", &e.into()), "ctx: boom");
    assert_eq!(
        super::js_err("ctx", &JsValue::from_str("plain")),
        "ctx: plain"
    );
}

/// Two links in one page, signaling wired directly: the offerer's packet arrives at the
/// answerer over a real data channel, and queued packets wait for the channel to open.
#[wasm_bindgen_test]
async fn two_links_exchange_packets_over_a_real_data_channel() {
    type Slot = Rc<RefCell<Option<Link>>>;
    let a_slot: Slot = Rc::new(RefCell::new(None));
    let b_slot: Slot = Rc::new(RefCell::new(None));
    let received: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();

    // Events are applied on the next turn so no RefCell is borrowed twice.
    fn route(target: Slot, received: Rc<RefCell<Vec<Vec<u8>>>>) -> Rc<dyn Fn(LinkEvent)> {
        Rc::new(move |ev: LinkEvent| {
            let target = target.clone();
            let received = received.clone();
            wasm_bindgen_futures::spawn_local(async move {
                match ev {
                    // A signal produced by one side is handed to the other.
                    LinkEvent::Signal(_, s) => {
                        if let Some(l) = target.borrow_mut().as_mut() {
                            l.on_signal(s);
                        }
                    }
                    LinkEvent::Packet(_, p) => received.borrow_mut().push(p),
                    _ => {}
                }
            });
        })
    }
    // a's signals go to b and vice versa; channel events go to their own link.
    let a_events = {
        let b = b_slot.clone();
        let a = a_slot.clone();
        let r = received.clone();
        let to_b = route(b, r.clone());
        Rc::new(move |ev: LinkEvent| match ev {
            LinkEvent::Writable(_) => {
                let a = a.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    if let Some(l) = a.borrow_mut().as_mut() {
                        l.flush();
                    }
                });
            }
            other => to_b(other),
        }) as Rc<dyn Fn(LinkEvent)>
    };
    let b_events = {
        let a = a_slot.clone();
        let b = b_slot.clone();
        let r = received.clone();
        let to_a = route(a, r);
        Rc::new(move |ev: LinkEvent| match ev {
            LinkEvent::Channel(_, dc) => {
                let b = b.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    if let Some(l) = b.borrow_mut().as_mut() {
                        l.attach_channel(dc);
                    }
                });
            }
            LinkEvent::Packet(_, p) => to_a(LinkEvent::Packet(PeerId(1), p)),
            other => to_a(other),
        }) as Rc<dyn Fn(LinkEvent)>
    };
    *a_slot.borrow_mut() = Some(Link::new(PeerId(2), &JsValue::UNDEFINED, a_events).unwrap());
    *b_slot.borrow_mut() = Some(Link::new(PeerId(1), &JsValue::UNDEFINED, b_events).unwrap());
    {
        let mut a = a_slot.borrow_mut();
        let a = a.as_mut().unwrap();
        a.offer();
        // Queued before the channel is open: must not be lost.
        a.send(Rc::new(vec![1, 2, 3]));
        // The largest frame the engine sends: a parity frame of a maximal packet.
        a.send(Rc::new(vec![4; protocol::fec::MAX_PARITY_FRAME]));
    }
    for _ in 0..200 {
        if received.borrow().len() >= 2 {
            break;
        }
        sleep_ms(50).await;
    }
    let got = received.borrow().clone();
    assert_eq!(got.len(), 2, "packets received: {}", got.len());
    assert_eq!(got[0], vec![1, 2, 3]);
    assert_eq!(got[1], vec![4; protocol::fec::MAX_PARITY_FRAME]);
    assert!(a_slot.borrow().as_ref().unwrap().is_open());
    // Dropping a link closes its connection and detaches its callbacks.
    a_slot.borrow_mut().take();
    b_slot.borrow_mut().take();
}
