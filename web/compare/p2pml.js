// P2P Media Loader's viewer for `cargo xtask compare`: hls.js + p2p-media-loader-hlsjs as their
// documentation sets them up for a live stream (HlsJsP2PEngine.injectMixin, the engine's own live
// defaults: it sets liveSyncDurationCount and maxBufferLength from the playlist), pointed at the
// local tracker. Nothing in the libraries is changed. Query: `src` (the live playlist), `tracker`
// (ws:// URL of the local tracker), `swarm` (swarm id), `sync` (hls.js liveSyncDurationCount; 0 or
// absent: left to hls.js and the engine).
//
// Why `sync`: the engine's live-delay autodetection sets hls.js's liveSyncDurationCount to the
// playlist's segment count minus one (at most 120 s) on a playlist update, so that the player
// plays far enough behind live for the segments ahead of it to come from peers. By then hls.js
// 1.6 has chosen its start position with its default count of 3, and it does not move a playing
// stream back to a larger delay: the player stays about 3 segments behind live, every segment
// falls in the engine's high-demand window and is fetched over HTTP at once (P2P share 0 in
// `cargo xtask compare --hls-sync 0`). Passing the engine's own value as user config gives the
// behaviour the engine intends.
//
// What the harness reads, `window.cmp.stats()`: bytes by source from the library's own
// `onChunkDownloaded` counter, and start-up and stalls by the rule our player uses
// (peer-wasm/src/web/media.rs): start-up is performance.now() at the first `playing` event;
// a stall is a `waiting` event after playback started, not while seeking, and not in the first
// second of playback.
import Hls from 'hls.js';
import { HlsJsP2PEngine } from 'p2p-media-loader-hlsjs';

const STARTUP_GRACE_S = 1.0;
const q = new URLSearchParams(location.search);
const video = document.getElementById('video');
const s = {
  bytes_http: 0,
  bytes_p2p: 0,
  bytes_up: 0,
  segments_http: 0,
  segments_p2p: 0,
  segment_errors: 0,
  peers: 0,
  peers_max: 0,
  startup_ms: null,
  stalls: 0,
  errors: [],
};
let firstPlayingAt = null;
let playingSince = null;

video.addEventListener('playing', () => {
  const now = performance.now();
  if (s.startup_ms === null) s.startup_ms = now;
  if (firstPlayingAt === null) firstPlayingAt = video.currentTime;
  playingSince = now;
});
video.addEventListener('waiting', () => {
  const past = firstPlayingAt !== null && video.currentTime - firstPlayingAt >= STARTUP_GRACE_S;
  if (playingSince !== null && !video.seeking && past) {
    s.stalls += 1;
    const b = video.buffered;
    const ranges = [];
    for (let i = 0; i < b.length; i++) ranges.push(`${b.start(i).toFixed(2)}-${b.end(i).toFixed(2)}`);
    s.errors.push(`stall at ${video.currentTime.toFixed(2)} s (buffered ${ranges.join(', ')})`);
  }
  playingSince = null;
});

if (!Hls.isSupported()) {
  console.error('hls.js: MediaSource is not supported here');
} else {
  const HlsWithP2P = HlsJsP2PEngine.injectMixin(Hls);
  const sync = Number(q.get('sync') || 0);
  const hls = new HlsWithP2P({
    ...(sync > 0 ? { liveSyncDurationCount: sync } : {}),
    p2p: {
      core: {
        announceTrackers: [q.get('tracker')],
        swarmId: q.get('swarm') || 'compare',
        // Local run: no STUN server to ask (our peer is given none either).
        rtcConfig: { iceServers: [] },
      },
      onHlsJsCreated(h) {
        const p2p = h.p2pEngine;
        p2p.addEventListener('onChunkDownloaded', (bytes, source) => {
          if (source === 'p2p') s.bytes_p2p += bytes;
          else s.bytes_http += bytes;
        });
        p2p.addEventListener('onChunkUploaded', (bytes) => { s.bytes_up += bytes; });
        p2p.addEventListener('onSegmentLoaded', (d) => {
          if (d.downloadSource === 'p2p') s.segments_p2p += 1;
          else s.segments_http += 1;
        });
        p2p.addEventListener('onSegmentError', () => { s.segment_errors += 1; });
        p2p.addEventListener('onPeerConnect', () => {
          s.peers += 1;
          s.peers_max = Math.max(s.peers_max, s.peers);
        });
        p2p.addEventListener('onPeerClose', () => { s.peers -= 1; });
        p2p.addEventListener('onTrackerError', (d) => console.error(`tracker error: ${d.error}`));
      },
    },
  });
  hls.on(Hls.Events.ERROR, (_e, d) => {
    if (d.fatal) console.error(`hls.js fatal error: ${d.type} ${d.details}`);
  });
  hls.attachMedia(video);
  hls.loadSource(q.get('src'));
  window.cmp = {
    hls,
    stats: () => ({
      ...s,
      playing: !video.paused && firstPlayingAt !== null,
      live_sync_count: hls.config.liveSyncDurationCount,
      target_latency_s: hls.targetLatency,
      hls_latency_s: hls.latency,
    }),
  };
  video.play().catch(() => {});
}
