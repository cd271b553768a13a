// Operator dashboard: polls the operator APIs once a second and redraws cards, tables, charts
// (uPlot) and the topology picture (SVG) in place.

import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import './dashboard.css';
import { renderTopology, color } from './topology.js';

const POLL_MS = 1000;
const MAX_POINTS = 900;
const TOKEN_KEY = 'p2p-operator-token';

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const pct = (x) => (x == null ? '–' : `${(100 * x).toFixed(1)} %`);
const mb = (b) => (b == null ? '–' : b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(2)} MB`);
const num = (n) => (n == null ? '–' : Number(n).toLocaleString('en'));

// The token comes from ?token= once, then lives in this tab's session storage (and out of the
// address bar, so it does not end up in screenshots or the history).
const params = new URLSearchParams(location.search);
let token = params.get('token') || sessionStorage.getItem(TOKEN_KEY) || '';
if (params.has('token')) {
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete('token');
  const q = params.toString();
  history.replaceState(null, '', location.pathname + (q ? `?${q}` : '') + location.hash);
}

const state = {
  channel: params.get('channel') || null,
  samples: [],
  lastT: 0,
  charts: {},
  graph: null,
  overview: null,
  updates: 0,
};
window.dashboard = state; // for tests and curious operators

class Unauthorized extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
  if (r.status === 401) throw new Unauthorized('operator token missing or wrong');
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function showLogin(message) {
  $('main').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setStatus('locked', false);
}

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $('login').hidden = true;
  poll();
});

function setStatus(text, ok) {
  const s = $('status');
  s.textContent = text;
  s.className = `status ${ok ? 'ok' : 'bad'}`;
}

function card(k, v, sub = '') {
  return `<div class="card"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div><div class="s">${esc(sub)}</div></div>`;
}

function renderOverview(ov) {
  const sel = $('channel');
  const ids = ov.channels.map((c) => c.id);
  if (sel.dataset.ids !== ids.join(',')) {
    sel.innerHTML = ids.map((id) => `<option>${esc(id)}</option>`).join('');
    sel.dataset.ids = ids.join(',');
  }
  if (!state.channel || !ids.includes(state.channel)) state.channel = ids[0] || null;
  sel.value = state.channel || '';
  const ch = ov.channels.find((c) => c.id === state.channel);
  const t = ch ? ch.totals : null;
  const last = ch ? ch.last_sample : null;
  const dcms = ov.regions.reduce((a, r) => a + r.dcms, 0);
  $('cards').innerHTML = ch ? [
    card('viewers', num(t.viewers), `${ov.channels.length} channel(s)`),
    card('P2P share', pct(last ? last.p2p_share : null), `since start ${pct(ch.p2p_share)}`),
    card('origin egress', last ? `${Math.round(last.egress_kbps)} kbit/s` : '–', `${mb(ch.origin_egress_bytes)} in all`),
    card('from peers', last ? `${Math.round(last.peers_kbps)} kbit/s` : '–', `${mb(t.received.bytes_from_peers)} in all`),
    card('DCMs', num(dcms), ov.regions.map((r) => `${r.id}: ${r.dcms}`).join(', ')),
    card('heartbeats', num(t.heartbeats), 'received'),
    card('congestion events', num(t.congestion_events), `${num(t.lagging_links)} lagging link(s) now`),
    card('repairs', num(t.repairs), 'children moved'),
  ].join('') : card('channels', '0', 'no channel is running');

  // Viewers by region (rows) and tier (columns), for the selected channel.
  const tiers = ov.tiers.map((x) => x.id);
  const regions = ov.regions.map((x) => x.id);
  const count = (r, tier) => (t ? t.viewers_by_placement : []).filter((p) => p.region === r && p.tier === tier)
    .reduce((a, p) => a + p.viewers, 0);
  $('placement').innerHTML =
    `<tr><th>region \\ tier</th>${tiers.map((x) => `<th title="${esc(ov.tiers.find((y) => y.id === x).algorithm)}">${esc(x)}</th>`).join('')}<th>DCMs</th></tr>` +
    regions.map((r) => `<tr><td>${esc(r)}</td>${tiers.map((x) => `<td data-region="${esc(r)}" data-tier="${esc(x)}">${count(r, x)}</td>`).join('')}` +
      `<td>${ov.regions.find((y) => y.id === r).dcms}</td></tr>`).join('');
  $('channels').innerHTML = '<tr><th>channel</th><th>live</th><th>viewers</th><th>p2p share</th><th>origin egress</th><th>stream</th><th>source</th></tr>' +
    ov.channels.map((c) => `<tr><td>${esc(c.id)}</td><td>${c.live ? 'yes' : 'no'}</td><td>${c.totals.viewers}</td>` +
      `<td>${pct(c.p2p_share)}</td><td>${mb(c.origin_egress_bytes)}</td><td>${c.stream_kbps} kbit/s × ${c.substreams}</td>` +
      `<td>${pullCell(c.pull)}${c.pull && c.rtmp ? '<br>' : ''}${rtmpCell(c.rtmp)}</td></tr>`).join('');
  renderRtmp(ov.rtmp);
}

// An HLS pull (`pull` in the overview): its state, segments, retries, and the last error.
function pullCell(p) {
  if (!p) return '';
  const err = p.last_error ? ` title="${esc(p.last_error)}"` : '';
  const warn = p.phase === 'retrying' || p.phase === 'refused' ? ' class="err"' : '';
  return `<span${warn}${err}>HLS pull ${esc(p.phase)}: ${num(p.segments)} segments, ${num(p.retries)} retries` +
    `${p.refused_segments ? `, ${num(p.refused_segments)} refused` : ''}` +
    `${p.last_error ? `<br><small>${esc(p.last_error)}</small>` : ''}</span>`;
}

const clock = (ms) => new Date(ms).toLocaleTimeString('en-GB');

// A channel's RTMP side (`rtmp` in the overview): publishing or not, refusals, the last error.
function rtmpCell(r) {
  if (!r) return '';
  const err = r.last_error ? ` title="${esc(r.last_error)}"` : '';
  const head = r.publishing ? `RTMP live since ${clock(r.since_ms)}` : 'RTMP: no publisher';
  return `<span class="rtmp"${err}>${head}: ${num(r.publishes)} publish(es), ${num(r.refusals)} refused` +
    `${r.last_error ? `<br><small class="err">${clock(r.last_error_ms)} ${esc(r.last_error)}</small>` : ''}</span>`;
}

// The RTMP listener (`rtmp` at the overview's top): refusals by reason (also of channel names
// that do not exist, such as a wrong key for a new channel) and its last error.
function renderRtmp(r) {
  const p = $('rtmp-status');
  p.hidden = !r;
  if (!r) return;
  const refused = Object.entries(r.refusals).filter(([, n]) => n > 0)
    .map(([k, n]) => `${esc(k)} ${num(n)}`).join(', ');
  const last = r.last_error;
  p.innerHTML = `RTMP ingest on ${esc(r.listening)}: ${num(r.publishers)} publisher(s) now, ` +
    `${num(r.publishes)} accepted, refused: ${refused || 'none'}, ${num(r.dropped)} dropped` +
    (last ? `<br><span class="err">last error ${clock(last.at_ms)}${last.channel ? ` (${esc(last.channel)})` : ''}: ` +
      `${esc(last.kind)}: ${esc(last.message)}</span>` : '');
}


function renderCongestion(graph, ch) {
  const t = ch ? ch.totals : { congestion_events: 0, repairs: 0 };
  const lagging = graph.links.filter((l) => l.lagging);
  const parts = [
    `<p>${num(t.congestion_events)} congestion event(s) and ${num(t.repairs)} repair(s) since start; ` +
      `${graph.links.filter((l) => l.congested).length} link(s) found congested in the last 10 s, ` +
      `${lagging.length} lagging now (of ${graph.links.length}).</p>`,
  ];
  if (graph.congestion.length) {
    parts.push('<table id="congestion-log"><tr><th>time</th><th>congested link</th><th>substream</th><th>behind</th><th>bottleneck</th></tr>' +
      graph.congestion.slice(0, 8).map((c) => `<tr><td>${clock(c.at_ms)}</td><td>p${c.parent} → p${c.child}</td><td>${c.substream}</td>` +
        `<td>${c.behind} pkts</td><td>${c.parent_side ? "parent's uplink" : 'link'}</td></tr>`).join('') + '</table>');
  }
  if (graph.repairs.length) {
    parts.push('<table id="repair-log"><tr><th>time</th><th>repair</th><th>peer</th><th>re-instructed</th></tr>' +
      graph.repairs.slice(0, 8).map((r) => `<tr><td>${clock(r.at_ms)}</td><td>${esc(r.reason)}</td><td>p${r.peer}</td><td>${r.affected}</td></tr>`).join('') +
      '</table>');
  }
  if (lagging.length) {
    parts.push('<table id="lagging"><tr><th>lagging link (from heartbeats)</th><th>substream</th><th>state</th></tr>' +
      lagging.map((l) => `<tr><td>${esc(l.from)} → ${esc(l.to)}</td><td>${l.substream}</td>` +
        `<td>${l.silent_ms == null ? 'nothing received yet' : `${(l.silent_ms / 1000).toFixed(1)} s silent`}</td></tr>`).join('') + '</table>');
  }
  if (!graph.congestion.length && !graph.repairs.length && !lagging.length) {
    parts.push('<p class="muted">No congestion, repair or lagging link so far.</p>');
  }
  $('congestion').innerHTML = parts.join('');
}

function makeChart(id, series, yOpts = {}) {
  const box = $(id);
  const opts = {
    width: Math.max(320, box.clientWidth),
    height: 200,
    series: [{}, ...series],
    axes: [
      { stroke: '#8b949e', grid: { stroke: '#2a2f36' } },
      { stroke: '#8b949e', grid: { stroke: '#2a2f36' }, size: 56, ...yOpts.axis },
    ],
    scales: { x: { time: true }, y: yOpts.scale || {} },
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
  };
  return new uPlot(opts, [[], ...series.map(() => [])], box);
}

function ensureCharts() {
  if (state.charts.share) return;
  state.charts.share = makeChart('chart-share', [
    { label: 'P2P share %', stroke: '#4ade80', fill: 'rgba(74,222,128,0.12)', width: 2 },
  ], { scale: { range: [0, 100] } });
  state.charts.rates = makeChart('chart-rates', [
    { label: 'from peers', stroke: '#60a5fa', width: 2 },
    { label: 'from origin (viewers)', stroke: '#f59e0b', width: 1.5 },
    { label: 'origin egress (server)', stroke: '#f87171', width: 2, dash: [6, 4] },
  ]);
  state.charts.viewers = makeChart('chart-viewers', [
    { label: 'viewers', stroke: '#a78bfa', width: 2, paths: uPlot.paths.stepped({ align: 1 }) },
    { label: 'lagging links', stroke: '#f87171', width: 1.5 },
  ]);
  addEventListener('resize', () => {
    for (const [k, c] of Object.entries(state.charts)) {
      c.setSize({ width: Math.max(320, $(`chart-${k}`).clientWidth), height: 200 });
    }
  });
}

function renderCharts() {
  ensureCharts();
  const s = state.samples;
  const x = s.map((p) => p.t_ms / 1000);
  state.charts.share.setData([x, s.map((p) => (p.p2p_share == null ? null : 100 * p.p2p_share))]);
  state.charts.rates.setData([x, s.map((p) => p.peers_kbps), s.map((p) => p.origin_kbps), s.map((p) => p.egress_kbps)]);
  state.charts.viewers.setData([x, s.map((p) => p.viewers), s.map((p) => p.lagging_links)]);
  for (const id of ['chart-share', 'chart-rates', 'chart-viewers']) $(id).dataset.points = String(s.length);
}

function renderLegend(k) {
  $('legend').innerHTML = Array.from({ length: k }, (_, i) =>
    `<span><i style="background:${color(i)}"></i>substream ${i} tree</span>`).join('') +
    '<span><i class="dash"></i>lagging link</span><span><i class="hot"></i>congested (DCM, last 10 s)</span>' +
    '<span><i class="bridge"></i>origin bridge (moved child, new parent connecting)</span>' +
    '<span>node fill: the tree a peer is interior in</span>';
}

async function poll() {
  clearTimeout(state.timer);
  try {
    const ov = await api('/api/operator/overview');
    state.overview = ov;
    $('login').hidden = true;
    $('main').hidden = false;
    const before = state.channel;
    renderOverview(ov);
    if (state.channel !== before) {
      state.samples = [];
      state.lastT = 0;
    }
    if (state.channel) {
      const id = encodeURIComponent(state.channel);
      const [series, graph] = await Promise.all([
        api(`/api/operator/channels/${id}/series?since=${state.lastT}`),
        api(`/api/operator/channels/${id}/graph`),
      ]);
      if (series.samples.length) {
        state.samples.push(...series.samples);
        state.samples.splice(0, Math.max(0, state.samples.length - MAX_POINTS));
        state.lastT = state.samples[state.samples.length - 1].t_ms;
      }
      renderCharts();
      state.graph = graph;
      $('topo-caption').textContent =
        `(channel ${graph.channel}: ${graph.nodes.length - 1} peers, ${graph.substreams} substream trees, depth ${graph.max_depth}, epoch ${graph.epoch})`;
      renderLegend(graph.substreams);
      renderTopology($('topology'), graph);
      renderCongestion(graph, ov.channels.find((c) => c.id === state.channel));
    }
    state.updates += 1;
    document.body.dataset.updates = String(state.updates);
    setStatus(`updated ${new Date().toLocaleTimeString('en-GB')}`, true);
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(token ? 'That token was refused.' : '');
      return; // wait for the form
    }
    setStatus(`update failed: ${e.message}`, false);
  }
  state.timer = setTimeout(poll, POLL_MS);
}

$('channel').addEventListener('change', (e) => {
  state.channel = e.target.value;
  state.samples = [];
  state.lastT = 0;
  poll();
});

poll();
