// The stats overlay drawn over the video: P2P share, peers, bitrate, buffer.

const pct = (x) => (x == null ? '–' : `${(100 * x).toFixed(0)} %`);
const kbps = (x) => (x == null ? '–' : `${Math.round(x)} kbit/s`);

export class StatsOverlay {
  constructor() {
    this.el = document.createElement('div');
    this.el.className = 'p2p-stats';
    this.el.part = 'stats';
    this.el.textContent = 'P2P: connecting…';
  }

  show(on) {
    this.el.hidden = !on;
  }

  /** `s`: the `stats` event detail; `message`: shown instead (errors). */
  update(s, message) {
    if (message) {
      this.el.textContent = message;
      return;
    }
    this.el.textContent = [
      `P2P ${pct(s.p2p_share)}   peers ${s.peers}`,
      `rate ${kbps(s.bitrate_kbps)}   buffer ${s.buffer_s.toFixed(1)} s`,
      `up ${(s.bytes_up / 1e6).toFixed(1)} MB   ${s.playing ? 'playing' : 'waiting'}`,
    ].join('\n');
  }
}
