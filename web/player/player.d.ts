// Type definitions for the P2P live player served at `/player.js`.
//
//   <script src="https://HOST/player.js"></script>
//   <p2p-player server="https://HOST" channel="demo"></p2p-player>
//
// or `const player = P2pPlayer.mount(document.querySelector('#video'), { channel: 'demo' });`

export interface IceServer {
  urls: string | string[];
  username?: string;
  credential?: string;
}

export interface P2pPlayerOptions {
  /** Control center base URL, e.g. `https://live.example`. Default: where player.js came from. */
  server?: string;
  /** Channel to watch. Default `"demo"`. */
  channel?: string;
  /** Upload cap for relaying to other viewers, kbit/s. Default 2000; 0 relays nothing. */
  upload_kbps?: number;
  /** Start playing as soon as there is media. Default true. */
  autoplay?: boolean;
  /** Start muted (browsers refuse autoplay with sound without a user gesture). Default true. */
  muted?: boolean;
  /** Show the video element's native controls. Default true. */
  controls?: boolean;
  /** Access token, for servers started with `--viewer-token`, or a signed token (an HS256 JWT
   *  for this channel minted by your backend) for servers started with `--token-secret`. */
  token?: string | null;
  /** The origin's ed25519 public key (64 hex digits, from `/api/channels/{id}/key`): the player
   * then refuses a stream signed with another key, or unsigned. Without it the player trusts the
   * key the server announces (every packet from other viewers is still checked against it). */
  public_key?: string | null;
  /** Show the stats overlay (P2P share, peers, bitrate, buffer). Default false. */
  stats?: boolean;
  /** STUN/TURN servers, passed to RTCPeerConnection as `iceServers`. */
  ice_servers?: IceServer[] | null;
  /** How often `stats` events fire, ms. Default 1000. */
  stats_interval_ms?: number;
}

export interface ReadyDetail {
  peer_id: number;
  channel: string;
  server: string;
}

export interface PlayingDetail {
  current_time: number;
  startup_ms: number | null;
}

export interface StallDetail {
  /** Stalls so far (the playhead starved after playback had started). */
  stalls: number;
  current_time: number;
  buffer_s: number;
  /** What the peer logged about it (playhead and buffered ranges), when available. */
  message?: string;
}

export interface StatsDetail {
  peer_id: number | null;
  /** Share of received bytes that came from other viewers, 0..1. */
  p2p_share: number;
  /** Open data-channel links to other viewers. */
  peers: number;
  /** Receive rate over the last interval, kbit/s (null on the first event). */
  bitrate_kbps: number | null;
  /** Nominal stream rate, kbit/s. */
  stream_kbps: number;
  /** Seconds buffered ahead of the playhead. */
  buffer_s: number;
  bytes_from_peers: number;
  bytes_from_origin: number;
  bytes_up: number;
  upload_kbps: number;
  playing: boolean;
  stalls: number;
  /** The peer's full report (see protocol::report::PeerReport). */
  report: Record<string, unknown>;
}

export type ErrorCode =
  | 'unsupported'
  | 'load_failed'
  | 'start_failed'
  | 'bad_option'
  | 'disconnected'
  | 'server'
  /** The `token` has expired (servers with `--token-secret`); the session is closed. */
  | 'token_expired'
  /** The `token` was minted for another channel; the session is closed. */
  | 'token_wrong_channel'
  /** The `token` is missing, malformed or badly signed; the session is closed. */
  | 'token_invalid'
  /** The viewer's network address has as many sessions open as the server allows
   * (`--max-sessions-per-address`); the session is closed. */
  | 'too_many_sessions'
  | 'autoplay_blocked'
  | 'media'
  | 'peer';

export interface ErrorDetail {
  code: ErrorCode;
  message: string;
}

export interface P2pPlayerEventMap {
  ready: CustomEvent<ReadyDetail>;
  playing: CustomEvent<PlayingDetail>;
  stall: CustomEvent<StallDetail>;
  stats: CustomEvent<StatsDetail>;
  error: CustomEvent<ErrorDetail>;
}

export declare class Player extends EventTarget {
  constructor(element: HTMLElement, options?: P2pPlayerOptions);
  readonly element: HTMLElement;
  readonly video: HTMLVideoElement;
  readonly options: Required<P2pPlayerOptions>;
  readonly destroyed: boolean;
  play(): Promise<void>;
  pause(): void;
  /** Leaves the swarm: closes the WebSocket and every RTCPeerConnection, frees the wasm peer. */
  destroy(): void;
  showStats(on?: boolean): void;
  setUploadKbps(kbps: number): void;
  /** The last report of the peer, or null. */
  stats(): Record<string, unknown> | null;
  addEventListener<K extends keyof P2pPlayerEventMap>(
    type: K,
    listener: (ev: P2pPlayerEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

/** Mounts a player into `element` (or the first element matching a selector). */
export declare function mount(element: HTMLElement | string, options?: P2pPlayerOptions): Player;

/** `<p2p-player>`: attributes server, channel, upload-kbps, autoplay, muted, controls, token,
 *  public-key, stats, ice-servers (JSON). Events as for {@link Player}. */
export declare class P2pPlayerElement extends HTMLElement {
  readonly player: Player | null;
  play(): Promise<void>;
  pause(): void;
  destroy(): void;
  showStats(on?: boolean): void;
  setUploadKbps(kbps: number): void;
  stats(): Record<string, unknown> | null;
  addEventListener<K extends keyof P2pPlayerEventMap>(
    type: K,
    listener: (ev: P2pPlayerEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

export declare const VERSION: string;

declare global {
  interface Window {
    P2pPlayer: {
      mount: typeof mount;
      Player: typeof Player;
      P2pPlayerElement: typeof P2pPlayerElement;
      VERSION: string;
    };
  }
  interface HTMLElementTagNameMap {
    'p2p-player': P2pPlayerElement;
  }
}
