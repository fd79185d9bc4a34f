// Test harness: the real tickfan binary on 127.0.0.1:0 with a temp data dir, and a TCP proxy
// in front of it so a test can cut the client's connection, hold it off, or point it at
// another server process (restart, new node) while the client keeps one URL.
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import readline from 'node:readline';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.TICKFAN_BIN || resolve(here, '../../../target/debug/tickfan');
export const DEADLINE_MS = 20000;

export function tempDir(prefix = 'tickfan-js-') {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Starts `tickfan serve` on port 0; `toml` is extra config. Resolves once it listens. */
export async function startServer({ dataDir = tempDir(), toml = '' } = {}) {
  const args = ['serve', '--listen', '127.0.0.1:0', '--no-simulator', '--data-dir', dataDir];
  if (toml) {
    const cfg = join(tempDir('tickfan-cfg-'), 'config.toml');
    writeFileSync(cfg, toml);
    args.push('--config', cfg);
  }
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-20000); });
  const lines = readline.createInterface({ input: child.stdout });
  const addr = await new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error('server did not print its address: ' + stderr)), DEADLINE_MS);
    lines.once('line', (l) => { clearTimeout(t); res(l.replace('listening on http://', '').trim()); });
    child.once('exit', (code) => rej(new Error(`server exited ${code}: ${stderr}`)));
  });
  const exited = new Promise((res) => child.once('exit', (code, sig) => res(code ?? sig)));
  return {
    addr,
    port: Number(addr.split(':').pop()),
    dataDir,
    http: (p) => `http://${addr}${p}`,
    ws: (p) => `ws://${addr}${p}`,
    /** SIGTERM and wait for the exit code (0 expected). */
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
    kill() { child.kill('SIGKILL'); },
    get stderr() { return stderr; },
  };
}

/** A TCP proxy on 127.0.0.1:0 to `upstream` (a port), with cut/hold controls. */
export async function startProxy(upstreamPort) {
  const pairs = new Set();
  const state = { upstream: upstreamPort, held: false };
  const server = net.createServer((c) => {
    if (state.held || !state.upstream) { c.destroy(); return; }
    const u = net.connect(state.upstream, '127.0.0.1');
    const pair = [c, u];
    pairs.add(pair);
    // A frozen path does not pass the server's close on either: only the watchdog can tell.
    const end = () => { u.destroy(); if (!pair.frozen) { c.destroy(); pairs.delete(pair); } };
    c.on('error', end); u.on('error', end); c.on('close', end); u.on('close', end);
    // Not pipe(): freeze() must be able to swallow data while the sockets stay open.
    c.on('data', (d) => { if (!pair.frozen) u.write(d); });
    u.on('data', (d) => { if (!pair.frozen) c.write(d); });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  return {
    url: (p) => `ws://127.0.0.1:${port}${p}`,
    /** Live connections stay open but carry nothing more (a half-dead network path). */
    freeze() { for (const pair of pairs) pair.frozen = true; },
    /** Kills every live connection at the TCP level (no close frame). */
    cut() { for (const [c, u] of pairs) { c.destroy(); u.destroy(); } pairs.clear(); },
    /** Refuses new connections until release(). */
    hold() { state.held = true; },
    release() { state.held = false; },
    setUpstream(p) { state.upstream = p; },
    close() { for (const [c, u] of pairs) { c.destroy(); u.destroy(); } pairs.clear(); server.close(); },
  };
}

/** Polls `pred` until true, or fails with `what` after the deadline. */
export async function waitFor(what, pred, ms = DEADLINE_MS) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function getJson(url) {
  const r = await fetch(url);
  return r.json();
}

/** One sample of a Prometheus series (sum over label sets when `series` has no labels). */
export async function metric(server, name) {
  const text = await (await fetch(server.http('/metrics'))).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const [key, val] = line.split(' ');
    if (key === name || key.startsWith(name + '{')) sum += Number(val);
  }
  return sum;
}

export function cleanup(dir) {
  try { rmSync(dir, { recursive: true, force: true }); } catch { /* best effort */ }
}

/** `n` ticks for `symbol` at the current time, each with its own id. */
export function ticks(symbol, n, from = 0) {
  const now = Date.now();
  return Array.from({ length: n }, (_, i) => ({
    symbol, ts: now, price: 100 + ((from + i) % 50) / 10, volume: 1, id: `${symbol}-${from + i}`,
  }));
}
