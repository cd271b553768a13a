// The local WebTorrent tracker of `cargo xtask compare` (P2P Media Loader's side): bittorrent-tracker's
// server, WebSocket only, on 127.0.0.1. Imported from `bittorrent-tracker/server` rather than run
// with its `bin/cmd.js`, whose `index.js` loads the WebRTC client (a native addon the server does
// not use). Prints `listening PORT` once it accepts connections; `node tracker.mjs [PORT]`.
import Server from 'bittorrent-tracker/server';

const port = Number(process.argv[2] || 0);
const server = new Server({ http: false, udp: false, ws: true, stats: false, trustProxy: false });
server.on('error', (err) => {
  console.error(`tracker error: ${err.message}`);
  process.exit(1);
});
server.on('warning', (err) => console.error(`tracker warning: ${err.message}`));
server.on('listening', () => {
  console.log(`listening ${server.ws.address().port}`);
});
server.listen(port, '127.0.0.1');
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close(() => process.exit(0)));
