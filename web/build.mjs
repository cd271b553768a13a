// Build-time bundling of the web assets into web/dist (run by `cargo xtask`, via `npm run build`):
//   player/player.js        -> dist/player.js (+ .map)   one classic script: <script src=".../player.js">
//   player/player.d.ts      -> dist/player.d.ts          TypeScript definitions, served as /player.d.ts
//   dashboard/dashboard.js  -> dist/dashboard.js + .css  the operator dashboard, with uPlot bundled in
//   compare/p2pml.js        -> dist/compare/p2pml.js     P2P Media Loader's viewer page for
//                                                        `cargo xtask compare` (hls.js + p2p-media-loader)
// Nothing is fetched from a CDN at run time: everything the pages load comes from the server.
import { build } from 'esbuild';
import { copyFile, mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, 'dist');
await mkdir(dist, { recursive: true });

const common = { bundle: true, minify: true, sourcemap: true, target: ['es2020'], logLevel: 'warning', legalComments: 'linked' };

await build({
  ...common,
  entryPoints: [join(here, 'player/player.js')],
  outfile: join(dist, 'player.js'),
  format: 'iife',
  banner: { js: '/* P2P live player: https://HOST/player.js — see /embed for the API. */' },
});
await copyFile(join(here, 'player/player.d.ts'), join(dist, 'player.d.ts'));

await build({
  ...common,
  entryPoints: [join(here, 'dashboard/dashboard.js')],
  outfile: join(dist, 'dashboard.js'),
  format: 'esm',
});
await mkdir(join(dist, 'compare'), { recursive: true });
await build({
  ...common,
  entryPoints: [join(here, 'compare/p2pml.js')],
  outfile: join(dist, 'compare/p2pml.js'),
  // The libraries' own browser bundles (their package.json's export condition for bundlers that
  // do not polyfill Node's modules): bittorrent-tracker's client needs `events` and more.
  conditions: ['p2pml:core-as-bundle'],
  format: 'iife',
});
console.log(`web assets written to ${dist}`);
