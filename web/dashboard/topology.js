// The live topology picture: the origin on top, peers in layers by their distance from it,
// grouped by region and tier, one coloured link per substream (parent → child), lagging links
// dashed. Plain SVG: the graph is small (tens of peers) and layered, so a force-layout library
// would add weight without making it clearer.

const NS = 'http://www.w3.org/2000/svg';
export const SUBSTREAM_COLORS = ['#60a5fa', '#f59e0b', '#34d399', '#f472b6', '#a78bfa', '#22d3ee', '#fb923c', '#a3e635',
  '#e879f9', '#facc15', '#2dd4bf', '#f87171', '#818cf8', '#4ade80', '#fbbf24', '#c084fc'];

export const color = (i) => SUBSTREAM_COLORS[i % SUBSTREAM_COLORS.length];

/** Short labels of the NAT classes peers report (an open peer needs none). */
const NAT_TAGS = { endpoint_independent: 'EIM NAT', endpoint_dependent: 'EDM NAT', udp_blocked: 'no UDP' };

function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

/** Depth of every node: breadth-first from the origin over all links. */
function depths(graph) {
  const out = new Map([['origin', 0]]);
  const children = new Map();
  // Bridges are temporary: a bridged peer keeps its place in the trees.
  for (const l of graph.links) {
    if (l.kind === 'bridge') continue;
    if (!children.has(l.from)) children.set(l.from, []);
    children.get(l.from).push(l.to);
  }
  const queue = ['origin'];
  while (queue.length) {
    const n = queue.shift();
    for (const c of children.get(n) || []) {
      if (!out.has(c)) {
        out.set(c, out.get(n) + 1);
        queue.push(c);
      }
    }
  }
  // Peers not (yet) reachable from the origin sit in the last layer.
  const deepest = Math.max(1, ...out.values());
  for (const n of graph.nodes) if (!out.has(n.id)) out.set(n.id, deepest + 1);
  return out;
}

/** Lays the graph out and renders it into `container` (replacing what was there). */
export function renderTopology(container, graph) {
  const width = Math.max(480, container.clientWidth || 900);
  const depth = depths(graph);
  const layers = [];
  for (const n of graph.nodes) {
    const d = depth.get(n.id);
    (layers[d] ||= []).push(n);
  }
  const layerH = 110;
  const top = 40;
  const pos = new Map();
  const parentsOf = new Map();
  for (const l of graph.links) {
    if (l.kind === 'bridge') continue;
    if (!parentsOf.has(l.to)) parentsOf.set(l.to, []);
    parentsOf.get(l.to).push(l.from);
  }
  layers.forEach((nodes, d) => {
    if (!nodes) return;
    // Order a layer by the mean position of its parents (fewer crossings), then by id.
    const key = (n) => {
      const ps = (parentsOf.get(n.id) || []).map((p) => pos.get(p)?.x).filter((x) => x != null);
      return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : width / 2;
    };
    nodes.sort((a, b) => key(a) - key(b) || a.id.localeCompare(b.id, 'en', { numeric: true }));
    const step = width / (nodes.length + 1);
    nodes.forEach((n, i) => pos.set(n.id, { x: step * (i + 1), y: top + d * layerH }));
  });
  const height = top + (layers.length - 1) * layerH + 90;

  const svg = el('svg', { viewBox: `0 0 ${width} ${height}`, height, role: 'img',
    'aria-label': `topology of channel ${graph.channel}: ${graph.nodes.length - 1} peers` });
  const defs = el('defs', {}, svg);
  // Coded middle-tier trees go up to k + n - 1.
  for (let i = 0; i < graph.substreams + 16; i++) {
    const m = el('marker', { id: `arrow-${i}`, viewBox: '0 0 10 10', refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' }, defs);
    el('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: color(i) }, m);
  }

  // Region/tier groups: a box around their peers.
  for (const g of graph.groups) {
    const members = graph.nodes.filter((n) => n.region === g.region && n.tier === g.tier).map((n) => pos.get(n.id));
    if (!members.length) continue;
    const xs = members.map((p) => p.x);
    const ys = members.map((p) => p.y);
    const x0 = Math.max(4, Math.min(...xs) - 40);
    const y0 = Math.min(...ys) - 46;
    const x1 = Math.min(width - 4, Math.max(...xs) + 40);
    const y1 = Math.max(...ys) + 40;
    const grp = el('g', { class: 'group', 'data-region': g.region, 'data-tier': g.tier }, svg);
    el('rect', { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 10 }, grp);
    el('text', { x: x0 + 8, y: y0 + 14 }, grp).textContent = `region ${g.region} · tier ${g.tier}`;
  }

  const r = 15;
  for (const l of graph.links) {
    const a = pos.get(l.from);
    const b = pos.get(l.to);
    if (!a || !b) continue;
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    // Parallel links of different substreams bow apart; links within a layer arc away from
    // it (rightwards above, leftwards below), so they do not run through the nodes between.
    const sameLayer = Math.abs(dy) < 1;
    const bow = sameLayer
      ? -(Math.min(len * 0.22, 70) + l.substream * 7)
      : (l.substream - (graph.substreams - 1) / 2) * 14;
    const sx = a.x + (dx / len) * r;
    const sy = a.y + (dy / len) * r;
    const ex = b.x - (dx / len) * (r + 2);
    const ey = b.y - (dy / len) * (r + 2);
    const cx = (sx + ex) / 2 - (dy / len) * bow;
    const cy = (sy + ey) / 2 + (dx / len) * bow;
    const path = el('path', {
      d: `M ${sx} ${sy} Q ${cx} ${cy} ${ex} ${ey}`,
      class: `link ${l.kind}${l.lagging ? ' lagging' : ''}${l.congested ? ' congested' : ''}`,
      // Mesh links flood every packet both ways: grey, no arrow.
      stroke: l.kind === 'mesh' ? '#e5e7eb' : color(l.substream),
      ...(l.kind === 'mesh' ? {} : { 'marker-end': `url(#arrow-${l.substream})` }),
      'data-from': l.from, 'data-to': l.to, 'data-substream': l.substream,
    }, svg);
    el('title', {}, path).textContent = `${l.from} → ${l.to}, substream ${l.substream}, ${l.kind} (${l.algorithm})` +
      (l.silent_ms != null ? `, last packet ${l.silent_ms} ms before the child's heartbeat` : '') +
      (l.lagging ? ' — LAGGING' : '') + (l.congested ? ' — CONGESTED' : '');
  }

  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const g = el('g', { class: `node ${n.kind}`, transform: `translate(${p.x} ${p.y})`, 'data-node': n.id, 'data-kind': n.kind }, svg);
    if (n.kind === 'origin') {
      el('rect', { x: -30, y: -15, width: 60, height: 30, rx: 6, fill: '#374151', stroke: '#e5e7eb', 'stroke-width': 2 }, g);
      el('text', {}, g).textContent = 'origin';
    } else {
      const fill = n.interior_tree == null ? '#1f2937' : color(n.interior_tree);
      const stroke = n.interior_tree == null ? '#9ca3af' : color(n.interior_tree);
      if (n.kind === 'waypoint') {
        // A server the operator runs: a square, as the origin is a box.
        el('rect', { x: -r, y: -r, width: 2 * r, height: 2 * r, rx: 3, fill, 'fill-opacity': 0.35, stroke }, g);
      } else {
        el('circle', { r, fill, 'fill-opacity': 0.35, stroke }, g);
      }
      el('text', {}, g).textContent = n.label;
      const share = n.p2p_share == null ? '' : `${Math.round(100 * n.p2p_share)}% p2p`;
      const tag = n.kind === 'waypoint' ? 'waypoint' : NAT_TAGS[n.nat_class] ?? '';
      el('text', { class: 'sub', y: r + 10 }, g).textContent = [share, tag].filter(Boolean).join(' · ');
    }
    el('title', {}, g).textContent = n.kind === 'origin' ? 'origin' :
      `${n.label}${n.kind === 'waypoint' ? ' (waypoint server)' : ''}: region ${n.region}, tier ${n.tier}, ` +
      `NAT ${n.nat_class ? n.nat_class.replaceAll('_', '-') : 'not reported'}${n.turn ? ' + TURN' : ''}, ` +
      `upload cap ${n.upload_kbps} kbit/s ` +
      `(placed with ${n.effective_upload_kbps ?? '–'}, measured ${n.measured_upload_kbps == null ? '–' : Math.round(n.measured_upload_kbps)}), ` +
      `${n.congestion_events ?? 0} congestion event(s), up ${n.uptime_s == null ? '–' : Math.round(n.uptime_s)} s, ` +
      `interior in tree ${n.interior_tree ?? '–'}, ` +
      `p2p share ${n.p2p_share == null ? '–' : (100 * n.p2p_share).toFixed(1) + ' %'}, ` +
      `uploaded ${n.bytes_up == null ? '–' : (n.bytes_up / 1e6).toFixed(2) + ' MB'}`;
  }
  container.replaceChildren(svg);
  return svg;
}
