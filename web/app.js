// Viewer page: loads the wasm peer, plays the channel and shows live statistics.
// Query options: channel (default "demo"), upload (kbit/s, default 2000), decode (1/0),
// region (a region hint, honoured only by servers allowing it) and network (declared access
// network: dsl, cable, fiber, mobile, satellite, other) and ice (the RTCPeerConnection
// iceServers as JSON, e.g. [{"urls":"turn:host:3478?transport=tcp","username":"u","credential":"p"}]).
import init, { P2pPeer } from './pkg/peer.js';

const params = new URLSearchParams(location.search);
const channel = params.get('channel') || 'demo';
const upload = Number(params.get('upload') || 2000);
const decode = params.get('decode') !== '0';
const region = params.get('region') || undefined;
const network = params.get('network') || undefined;
const ice_servers = params.get('ice') ? JSON.parse(params.get('ice')) : undefined;
document.getElementById('channel').textContent = channel;

const fmtBytes = (n) => n > 1e6 ? (n / 1e6).toFixed(2) + ' MB' : (n / 1e3).toFixed(1) + ' kB';
const src = (p) => p.kind === 'origin' ? 'origin' : 'p' + p.id;

function render(s) {
  const total = s.bytes_from_peers + s.bytes_from_origin;
  const rows = [
    ['peer', s.peer_id == null ? '…' : 'p' + s.peer_id],
    ['from peers', fmtBytes(s.bytes_from_peers)],
    ['from origin', fmtBytes(s.bytes_from_origin)],
    ['P2P share', total ? (100 * s.bytes_from_peers / total).toFixed(1) + ' %' : '–'],
    ['uploaded', fmtBytes(s.bytes_up) + ' (cap ' + s.upload_kbps + ' kbit/s)'],
    ['connected peers', s.connected_peers],
    ['NAT', (s.nat_class ?? '…') + (s.turn ? ', TURN' + (s.turn_used ? ' (in use)' : '') : '')],
    ['origin fallbacks', s.origin_fallbacks],
    ['tier', s.tier == null ? 'flat' : s.tier + (s.region ? ' (' + s.region + ')' : '')
      + (s.plays === false ? ', relay only' : '')],
    ['mesh neighbours', s.mesh_neighbours ?? 0],
    ['parity frames / recovered', (s.parity_frames_received ?? 0) + ' / ' + (s.packets_recovered ?? 0)],
    ['buffer', s.buffer_s.toFixed(2) + ' s'],
    ['playing', s.decoding ? (s.playing ? 'yes' : 'no') : 'verify only'],
    ['stalls', s.stalls],
    ['startup', s.startup_ms == null ? '–' : Math.round(s.startup_ms) + ' ms'],
  ];
  document.querySelector('#stats tbody').innerHTML =
    rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join('');
  document.querySelector('#plan tbody').innerHTML = s.plan.map((p) =>
    `<tr><td>${p.index}</td><td>${src(p.parent)}</td><td>${p.children.map((c) => 'p' + c).join(' ') || '–'}</td></tr>`).join('');
  document.getElementById('errors').textContent = s.errors.slice(-3).join(' · ');
}

// Downloads (a file channel received beside the live one, through the same swarm). Offered only
// when the server lists a file channel.
let saved = false;

async function offerDownloads(peer) {
  let list;
  try {
    list = (await (await fetch('/api/channels')).json()).channels.filter((c) => c.file);
  } catch (e) {
    return; // no list, no downloads: the live channel is unaffected
  }
  if (!list.length) return;
  document.getElementById('downloads').hidden = false;
  const box = document.getElementById('download-buttons');
  for (const c of list) {
    const b = document.createElement('button');
    b.textContent = `Download ${c.file.name} (${fmtBytes(c.file.size)})`;
    b.dataset.channel = c.id;
    b.onclick = () => {
      try {
        saved = false;
        peer.download(c.id);
        document.getElementById('download-progress').hidden = false;
      } catch (e) {
        document.getElementById('download-status').textContent = String(e);
      }
    };
    box.appendChild(b);
  }
}

function renderDownload(peer, d) {
  if (!d) return;
  const bar = document.getElementById('download-progress');
  bar.max = d.pieces || 1;
  bar.value = d.pieces_have;
  const total = d.bytes_from_peers + d.bytes_from_origin;
  document.getElementById('download-status').textContent = d.done
    ? `${d.name}: done in ${(d.elapsed_ms / 1000).toFixed(1)} s, digest ${d.digest} verified, `
      + `${total ? (100 * d.bytes_from_peers / total).toFixed(0) : 0} % from peers`
    : `${d.name || d.channel}: ${d.pieces_have}/${d.pieces} pieces, upload share ${d.upload_kbps} kbit/s`
      + (d.errors.length ? ' · ' + d.errors[d.errors.length - 1] : '');
  if (d.done && !saved) {
    saved = true;
    // A normal browser download of the verified bytes; the object URL is revoked once the
    // click has handed it to the browser.
    const blob = peer.downloadBlob();
    if (!blob) return;
    const url = URL.createObjectURL(blob);
    const a = document.createElement('a');
    a.href = url;
    a.download = d.name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
}

async function main() {
  await init();
  const peer = new P2pPeer({ channel, upload_kbps: upload, decode, region, network, ice_servers },
    decode ? document.getElementById('video') : undefined);
  peer.start();
  // Exposed for tests and benchmarks, which read statistics out of the page.
  window.p2p = peer;
  setInterval(() => {
    const s = peer.stats();
    render(s);
    renderDownload(peer, s.download);
  }, 500);
  offerDownloads(peer);
  addEventListener('pagehide', () => peer.destroy());
}

main().catch((e) => {
  document.getElementById('errors').textContent = String(e);
  console.error(e);
});
