// The embeddable P2P live player: `mount(element, options)` and the `<p2p-player>` element.
//
// Built by esbuild (see ../build.mjs) into one classic script, `/player.js`, so that a site
// owner's page needs only:
//
//   <script src="https://HOST/player.js"></script>
//   <p2p-player server="https://HOST" channel="demo"></p2p-player>
//
// The wasm peer is loaded at run time from `${server}/pkg/peer.js` (CORS is on for it).

import { StatsOverlay } from './overlay.js';

/** Where this script was loaded from: the default server. */
const SCRIPT_ORIGIN = (() => {
  try {
    const s = document.currentScript;
    if (s && s.src) return new URL(s.src).origin;
  } catch (_) { /* fall through */ }
  return location.origin;
})();

export const VERSION = '1';

const DEFAULTS = {
  server: SCRIPT_ORIGIN,
  channel: 'demo',
  upload_kbps: 2000,
  autoplay: true,
  muted: true,
  controls: true,
  token: null,
  public_key: null,
  stats: false,
  ice_servers: null,
  stats_interval_ms: 1000,
};

/** One wasm module per server, loaded once and shared by every player on the page. */
const modules = new Map();

function loadPeer(server) {
  let p = modules.get(server);
  if (!p) {
    p = (async () => {
      const mod = await import(`${server}/pkg/peer.js`);
      await mod.default({ module_or_path: `${server}/pkg/peer_bg.wasm` });
      return mod;
    })();
    p.catch(() => modules.delete(server));
    modules.set(server, p);
  }
  return p;
}

// Server error codes the player reports as their own `error` codes (the peer logs a server
// error as `server error <Code>: <message>`, the code in Rust's spelling); others are `server`.
const SERVER_CODES = {
  TokenExpired: 'token_expired',
  TokenWrongChannel: 'token_wrong_channel',
  TokenInvalid: 'token_invalid',
  TooManySessions: 'too_many_sessions',
};

function errorCode(message) {
  if (message.startsWith('control connection closed')) return 'disconnected';
  const server = /^server error (\w+)/.exec(message);
  if (server) return SERVER_CODES[server[1]] || 'server';
  if (message.includes('video.play()')) return 'autoplay_blocked';
  if (message.startsWith('unsupported codec')) return 'unsupported_codec';
  if (/MediaSource|SourceBuffer|appendBuffer|init segment/.test(message)) return 'media';
  return 'peer';
}

function attachRoot(element) {
  if (element.shadowRoot) return element.shadowRoot;
  try {
    return element.attachShadow({ mode: 'open' });
  } catch (_) {
    return element; // elements that cannot host a shadow root get plain children
  }
}

const STYLE = `
  .p2p-player { position: relative; width: 100%; height: 100%; background: #000; overflow: hidden; }
  .p2p-player video { display: block; width: 100%; height: 100%; object-fit: contain; background: #000; }
  .p2p-stats { position: absolute; top: 6px; left: 6px; padding: 4px 7px; border-radius: 4px;
    font: 11px/1.35 ui-monospace, SFMono-Regular, Menlo, monospace; color: #e8f5e9;
    background: rgba(0, 0, 0, 0.62); pointer-events: none; white-space: pre; }
  .p2p-stats[hidden] { display: none; }
`;

/**
 * A player bound to one element. Emits `ready`, `playing`, `stall`, `stats` and `error`
 * (CustomEvents with a `detail`) on itself and on the element it was mounted on.
 */
export class Player extends EventTarget {
  constructor(element, options = {}) {
    super();
    if (!element) throw new TypeError('mount: an element is required');
    this.element = element;
    this.options = { ...DEFAULTS, ...clean(options) };
    this.options.server = String(this.options.server).replace(/\/+$/, '');
    this.peer = null;
    this.lastStats = null;
    this.destroyed = false;
    this._ready = false;
    this._stalls = 0;
    this._stallMessage = undefined;
    this._errors = [];
    this._lastBytes = null;
    this._lastStatsAt = 0;
    this._timer = null;

    this.root = attachRoot(element);
    this.box = document.createElement('div');
    this.box.className = 'p2p-player';
    this.box.part = 'player';
    const style = document.createElement('style');
    style.textContent = STYLE;
    this.video = document.createElement('video');
    this.video.part = 'video';
    this.video.playsInline = true;
    this.video.setAttribute('playsinline', '');
    this.video.muted = !!this.options.muted;
    this.video.controls = !!this.options.controls;
    if (!this.options.muted) this.video.setAttribute('data-p2p-muted', 'false');
    if (!this.options.autoplay) this.video.setAttribute('data-p2p-autoplay', 'false');
    this.overlay = new StatsOverlay();
    this.overlay.show(!!this.options.stats);
    this.box.append(style, this.video, this.overlay.el);
    this.root.append(this.box);

    this._onPlaying = () => this._emit('playing', {
      current_time: this.video.currentTime,
      startup_ms: this.lastStats ? this.lastStats.startup_ms : null,
    });
    this.video.addEventListener('playing', this._onPlaying);
    this._start();
  }

  async _start() {
    const { server } = this.options;
    if (!('MediaSource' in window) && !('ManagedMediaSource' in window)) {
      return this._fail('unsupported', 'this browser has neither MediaSource nor ManagedMediaSource');
    }
    if (!('RTCPeerConnection' in window)) {
      return this._fail('unsupported', 'this browser has no WebRTC (RTCPeerConnection)');
    }
    let mod;
    try {
      mod = await loadPeer(server);
    } catch (e) {
      return this._fail('load_failed', `could not load the player from ${server}/pkg/: ${e && e.message || e}`);
    }
    if (this.destroyed) return;
    try {
      const o = this.options;
      this.peer = new mod.P2pPeer({
        server,
        channel: String(o.channel),
        upload_kbps: Math.max(0, Math.round(Number(o.upload_kbps) || 0)),
        decode: true,
        ice_servers: o.ice_servers || undefined,
        token: o.token || undefined,
        public_key: o.public_key || undefined,
      }, this.video);
      this.peer.start();
    } catch (e) {
      return this._fail('start_failed', String(e && e.message || e));
    }
    this._timer = setInterval(() => this._tick(), 250);
  }

  _tick() {
    if (this.destroyed || !this.peer) return;
    let s;
    try {
      s = this.peer.stats();
    } catch (e) {
      return this._fail('peer', String(e && e.message || e));
    }
    if (!s) return;
    this.lastStats = s;
    if (!this._ready && s.peer_id != null) {
      this._ready = true;
      this._emit('ready', { peer_id: s.peer_id, channel: String(this.options.channel), server: this.options.server });
    }
    this._newErrors(s.errors || []);
    if (s.stalls > this._stalls) {
      this._stalls = s.stalls;
      this._emit('stall', {
        stalls: s.stalls,
        current_time: s.current_time,
        buffer_s: s.buffer_s,
        message: this._stallMessage,
      });
    }
    const now = performance.now();
    if (now - this._lastStatsAt >= this.options.stats_interval_ms) {
      const bytes = s.bytes_from_peers + s.bytes_from_origin;
      let bitrate = null;
      if (this._lastBytes) {
        const dt = now - this._lastBytes.at;
        bitrate = dt > 0 ? ((bytes - this._lastBytes.bytes) * 8) / dt : null; // kbit/s
      }
      this._lastBytes = { bytes, at: now };
      this._lastStatsAt = now;
      const detail = {
        peer_id: s.peer_id,
        p2p_share: bytes > 0 ? s.bytes_from_peers / bytes : 0,
        peers: s.connected_peers,
        bitrate_kbps: bitrate,
        stream_kbps: s.stream_kbps,
        buffer_s: s.buffer_s,
        bytes_from_peers: s.bytes_from_peers,
        bytes_from_origin: s.bytes_from_origin,
        bytes_up: s.bytes_up,
        upload_kbps: s.upload_kbps,
        playing: s.playing,
        stalls: s.stalls,
        report: s,
      };
      this.overlay.update(detail);
      this._emit('stats', detail);
    }
  }

  _newErrors(errs) {
    const prev = this._errors;
    let fresh;
    if (errs.length > prev.length) fresh = errs.slice(prev.length);
    else if (errs.length && errs[errs.length - 1] !== prev[prev.length - 1]) {
      const at = errs.lastIndexOf(prev[prev.length - 1]);
      fresh = errs.slice(at + 1);
    } else fresh = [];
    this._errors = errs.slice();
    for (const message of fresh) {
      // The peer logs each stall with the playhead and buffered ranges: that is a `stall`
      // event's detail, not an error.
      if (message.startsWith('stall at')) this._stallMessage = message;
      else this._emit('error', { code: errorCode(message), message });
    }
  }

  _fail(code, message) {
    this.overlay.update(null, `${code}: ${message}`);
    this._emit('error', { code, message });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
    if (this.element !== this) this.element.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** Starts or resumes playback (rejects with the browser's reason, e.g. autoplay policy). */
  play() {
    const p = this.video.play();
    if (p && p.catch) {
      p.catch((e) => this._emit('error', { code: 'autoplay_blocked', message: `video.play(): ${e && e.message || e}` }));
    }
    return p;
  }

  pause() {
    this.video.pause();
  }

  /** Shows or hides the stats overlay. */
  showStats(on = true) {
    this.overlay.show(!!on);
  }

  /** Changes the upload cap at run time (kbit/s). */
  setUploadKbps(kbps) {
    this.options.upload_kbps = kbps;
    if (this.peer) this.peer.setUploadKbps(Math.max(0, Math.round(Number(kbps) || 0)));
  }

  /** The last statistics the peer reported (`null` before the first). */
  stats() {
    return this.lastStats;
  }

  /** Leaves the swarm: closes the WebSocket and every RTCPeerConnection, frees the wasm peer. */
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    clearInterval(this._timer);
    this.video.removeEventListener('playing', this._onPlaying);
    if (this.peer) {
      try {
        this.peer.destroy();
        this.peer.free();
      } catch (e) {
        console.warn('p2p-player: destroying the peer', e);
      }
      this.peer = null;
    }
    this.video.pause();
    this.video.removeAttribute('src');
    this.video.load();
    this.box.remove();
  }
}

function clean(o) {
  const out = {};
  for (const [k, v] of Object.entries(o || {})) if (v !== undefined) out[k] = v;
  return out;
}

/** Mounts a player into `element` (e.g. a `<div>`); returns the {@link Player}. */
export function mount(element, options = {}) {
  if (typeof element === 'string') element = document.querySelector(element);
  return new Player(element, options);
}

function boolAttr(el, name, dflt) {
  if (!el.hasAttribute(name)) return dflt;
  const v = el.getAttribute(name);
  return v !== 'false' && v !== '0' && v !== 'off';
}

/** `<p2p-player server channel upload-kbps autoplay muted controls token public-key stats ice-servers>` */
export class P2pPlayerElement extends HTMLElement {
  static get observedAttributes() { return ['stats']; }

  connectedCallback() {
    if (this.player) return;
    this._cancelled = false;
    // Attributes set by a parser may arrive after the element connects: start next task.
    setTimeout(() => {
      if (!this.isConnected || this.player || this._cancelled) return;
      let ice = null;
      const iceAttr = this.getAttribute('ice-servers');
      if (iceAttr) {
        try { ice = JSON.parse(iceAttr); } catch (e) {
          this.dispatchEvent(new CustomEvent('error', { detail: { code: 'bad_option', message: `ice-servers is not JSON: ${e.message}` } }));
        }
      }
      if (!this.style.display && getComputedStyle(this).display === 'inline') this.style.display = 'block';
      this.player = new Player(this, {
        server: this.getAttribute('server') || undefined,
        channel: this.getAttribute('channel') || undefined,
        upload_kbps: this.hasAttribute('upload-kbps') ? Number(this.getAttribute('upload-kbps')) : undefined,
        autoplay: boolAttr(this, 'autoplay', true),
        muted: boolAttr(this, 'muted', true),
        controls: boolAttr(this, 'controls', true),
        token: this.getAttribute('token') || undefined,
        public_key: this.getAttribute('public-key') || undefined,
        stats: boolAttr(this, 'stats', false),
        ice_servers: ice || undefined,
      });
    });
  }

  disconnectedCallback() {
    this.destroy();
  }

  attributeChangedCallback(name) {
    if (name === 'stats' && this.player) this.player.showStats(boolAttr(this, 'stats', false));
  }

  play() { return this.player ? this.player.play() : Promise.reject(new Error('player not started')); }
  pause() { if (this.player) this.player.pause(); }
  stats() { return this.player ? this.player.stats() : null; }
  showStats(on = true) { if (this.player) this.player.showStats(on); }
  setUploadKbps(kbps) { if (this.player) this.player.setUploadKbps(kbps); }
  destroy() {
    this._cancelled = true; // also stops a start that is still pending
    if (this.player) {
      this.player.destroy();
      this.player = null;
    }
  }
}

if (!customElements.get('p2p-player')) customElements.define('p2p-player', P2pPlayerElement);

window.P2pPlayer = { mount, Player, P2pPlayerElement, VERSION };
