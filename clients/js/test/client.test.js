// The TypeScript client against the real tickfan binary (target/debug/tickfan): history,
// resume across a SIGTERM restart, across a cut socket, `gap` when history no longer reaches
// back, `epoch` when the store is new, and publish that resends exactly the refused ticks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { TickfanClient, Producer } from '../dist/tickfan.js';
import {
  startServer, startProxy, waitFor, getJson, metric, tempDir, cleanup, ticks,
} from './harness.js';

const FAST = { WebSocket, backoffMinMs: 20, backoffMaxMs: 200 };

/** Collects what a client delivers: ticks per symbol (seqs), gaps, epochs, errors. */
function recorder(client) {
  const r = { seqs: {}, snapshot: 0, gaps: [], epochs: [], errors: [] };
  client.on('tick', (t, snap) => {
    (r.seqs[t.symbol] ??= []).push(t.seq);
    if (snap) r.snapshot += 1;
  });
  client.on('gap', (g) => r.gaps.push(g));
  client.on('epoch', (e) => r.epochs.push(e));
  client.on('error', (e) => r.errors.push(e.code));
  return r;
}

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

async function publishAll(server, list) {
  const p = new Producer(server.ws('/ingest'), { WebSocket });
  const ack = await p.publish(list);
  p.close();
  assert.equal(ack.accepted, list.length, JSON.stringify(ack));
  return ack;
}

test('subscribe with history: snapshot first, then live, in seq order', async () => {
  const server = await startServer();
  try {
    await publishAll(server, ticks('AAPL', 5));
    const client = new TickfanClient(server.ws('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    const ack = await client.subscribe(['AAPL'], { history: 3 });
    assert.equal(ack.last_seq.AAPL, 5);
    await waitFor('snapshot', () => r.seqs.AAPL?.length === 3);
    assert.deepEqual(r.seqs.AAPL, [3, 4, 5]);
    assert.equal(r.snapshot, 3);
    await publishAll(server, ticks('AAPL', 2, 5));
    await waitFor('live ticks', () => r.seqs.AAPL.length === 5);
    assert.deepEqual(r.seqs.AAPL, [3, 4, 5, 6, 7]);
    assert.equal(client.lastSeq.get('AAPL'), 7);
    client.close();
  } finally {
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('async iteration yields the same ticks in order', async () => {
  const server = await startServer();
  try {
    await publishAll(server, ticks('MSFT', 4));
    const client = new TickfanClient(server.ws('/ws'), { ...FAST, iterate: true });
    await client.connect();
    await client.subscribe(['MSFT'], { history: 4 });
    const seen = [];
    for await (const ev of client) {
      if (ev.type === 'tick') seen.push(ev.tick.seq);
      if (seen.length === 4) break;
    }
    assert.deepEqual(seen, [1, 2, 3, 4]);
    client.close();
  } finally {
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('a consumer that falls behind the bounded buffer loses nothing', async () => {
  const server = await startServer();
  try {
    // maxBuffered 50: the client drops its connection when the loop falls 50 events behind,
    // and resumes with since_seq once the loop has read half of them.
    const client = new TickfanClient(server.ws('/ws'), { ...FAST, iterate: true, maxBuffered: 50 });
    await client.connect();
    await client.subscribe(['BUF']);
    await publishAll(server, ticks('BUF', 500));
    const seen = [];
    for await (const ev of client) {
      if (ev.type === 'tick') seen.push(ev.tick.seq);
      if (seen.length % 25 === 0) await new Promise((r) => setTimeout(r, 5)); // a slow loop
      if (seen.length === 500) break;
    }
    assert.deepEqual(seen, range(1, 500));
    assert.ok(client.reconnects >= 1, 'the buffer never overflowed; the test proves nothing');
    client.close();
  } finally {
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('resume after a SIGTERM restart on the same data dir: no gap, no duplicate', async () => {
  const dataDir = tempDir();
  let server = await startServer({ dataDir });
  const proxy = await startProxy(server.port);
  try {
    const client = new TickfanClient(proxy.url('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    await client.subscribe(['BTC-USD']);
    await publishAll(server, ticks('BTC-USD', 20));
    await waitFor('first 20', () => r.seqs['BTC-USD']?.length === 20);
    const epoch = client.epoch;
    // Down: the client's retries are refused until the new process is up.
    proxy.hold();
    assert.equal(await server.stop(), 0);
    await waitFor('client retrying', () => client.reconnectAttempts >= 2);
    server = await startServer({ dataDir });
    proxy.setUpstream(server.port);
    // Published while the client is away: these come back through the since_seq replay.
    await publishAll(server, ticks('BTC-USD', 10, 20));
    proxy.release();
    await waitFor('reconnected', () => client.reconnects >= 1 && client.state === 'connected');
    await publishAll(server, ticks('BTC-USD', 10, 30));
    await waitFor('all 40', () => r.seqs['BTC-USD'].length >= 40);
    assert.deepEqual(r.seqs['BTC-USD'], range(1, 40));
    assert.equal(client.epoch, epoch, 'the epoch survives a clean restart');
    assert.deepEqual(r.gaps, []);
    assert.deepEqual(r.epochs, []);
    client.close();
  } finally {
    proxy.close();
    await server.stop();
    cleanup(dataDir);
  }
});

test('resume after the connection is cut: no gap, no duplicate', async () => {
  const server = await startServer();
  const proxy = await startProxy(server.port);
  try {
    const client = new TickfanClient(proxy.url('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    await client.subscribe(['ETH-USD', 'SOL-USD']);
    await publishAll(server, [...ticks('ETH-USD', 5), ...ticks('SOL-USD', 5)]);
    await waitFor('first ticks', () => r.seqs['ETH-USD']?.length === 5 && r.seqs['SOL-USD']?.length === 5);
    proxy.hold();
    proxy.cut();
    await waitFor('client noticed', () => client.state === 'reconnecting');
    await publishAll(server, [...ticks('ETH-USD', 7, 5), ...ticks('SOL-USD', 3, 5)]);
    proxy.release();
    await waitFor('resumed', () => r.seqs['ETH-USD'].length >= 12 && r.seqs['SOL-USD'].length >= 8);
    assert.deepEqual(r.seqs['ETH-USD'], range(1, 12));
    assert.deepEqual(r.seqs['SOL-USD'], range(1, 8));
    assert.ok(client.reconnects >= 1);
    assert.deepEqual(r.gaps, []);
    client.close();
  } finally {
    proxy.close();
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('a silent connection is treated as dead: reconnect and resume', async () => {
  const server = await startServer({ toml: '[server]\nheartbeat_ms = 200\n' });
  const proxy = await startProxy(server.port);
  try {
    const client = new TickfanClient(proxy.url('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    await client.subscribe(['HB']);
    await publishAll(server, ticks('HB', 3));
    await waitFor('first 3', () => r.seqs.HB?.length === 3);
    proxy.freeze();
    await publishAll(server, ticks('HB', 4, 3));
    await waitFor('resumed', () => r.seqs.HB.length >= 7);
    assert.deepEqual(r.seqs.HB, range(1, 7));
    assert.ok(r.errors.includes('heartbeat_timeout'), JSON.stringify(r.errors));
    assert.ok(client.reconnects >= 1);
    client.close();
  } finally {
    proxy.close();
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('gap is reported when history no longer reaches back', async () => {
  const server = await startServer({
    toml: '[store]\nmax_ticks_per_symbol = 10\nretention_interval_ms = 50\n[dispatch]\nrecent_ticks = 10\n',
  });
  const proxy = await startProxy(server.port);
  try {
    const client = new TickfanClient(proxy.url('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    await client.subscribe(['GAP']);
    await publishAll(server, ticks('GAP', 3));
    await waitFor('first 3', () => r.seqs.GAP?.length === 3);
    proxy.hold();
    proxy.cut();
    await publishAll(server, ticks('GAP', 60, 3));
    await waitFor('retention trimmed the history', async () => {
      const h = await getJson(server.http('/api/history/GAP?limit=1'));
      return h.first_seq > 10;
    });
    proxy.release();
    await waitFor('caught up', () => client.lastSeq.get('GAP') === 63);
    assert.equal(r.gaps.length, 1, JSON.stringify(r.gaps));
    assert.equal(r.gaps[0].symbol, 'GAP');
    assert.equal(r.gaps[0].lastSeq, 3);
    assert.ok(r.gaps[0].nextSeq > 4, JSON.stringify(r.gaps));
    const seqs = r.seqs.GAP;
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], 'in order, no duplicate');
    client.close();
  } finally {
    proxy.close();
    await server.stop();
    cleanup(server.dataDir);
  }
});

test('an epoch change (a new store) is reported and seqs start over', async () => {
  let server = await startServer();
  const proxy = await startProxy(server.port);
  const dirs = [server.dataDir];
  try {
    const client = new TickfanClient(proxy.url('/ws'), FAST);
    const r = recorder(client);
    await client.connect();
    await client.subscribe(['EPO']);
    await publishAll(server, ticks('EPO', 5));
    await waitFor('first 5', () => r.seqs.EPO?.length === 5);
    const before = client.epoch;
    proxy.hold();
    await server.stop();
    server = await startServer(); // another data dir: another store, another epoch
    dirs.push(server.dataDir);
    proxy.setUpstream(server.port);
    await publishAll(server, ticks('EPO', 3, 100));
    proxy.release();
    await waitFor('epoch event', () => r.epochs.length === 1);
    assert.equal(r.epochs[0].previous, before);
    assert.notEqual(r.epochs[0].epoch, before);
    await waitFor('new ticks', () => r.seqs.EPO.length === 8);
    assert.deepEqual(r.seqs.EPO, [1, 2, 3, 4, 5, 1, 2, 3]);
    client.close();
  } finally {
    proxy.close();
    await server.stop();
    dirs.forEach(cleanup);
  }
});

test('publish resends exactly the refused ticks on backpressure', async () => {
  const server = await startServer({ toml: '[queue]\ncapacity = 64\nretry_after_ms = 20\n' });
  try {
    const producer = new Producer(server.ws('/ingest'), { WebSocket });
    const list = ticks('BP', 300);
    const ack = await producer.publish(list);
    producer.close();
    assert.equal(ack.accepted, 300, JSON.stringify(ack));
    assert.equal(ack.duplicates, 0);
    assert.deepEqual(ack.rejected, []);
    assert.ok(ack.resent > 0, 'the tiny queue refused some: ' + JSON.stringify(ack));
    // Exactly the refused ones went again: every resend was refused before, none was a
    // duplicate, and the server saw 300 + resent ticks in all.
    assert.equal(await metric(server, 'tickfan_queue_refused_total'), ack.resent);
    assert.equal(await metric(server, 'tickfan_ticks_received_total'), 300 + ack.resent);
    assert.equal(await metric(server, 'tickfan_ticks_duplicate_total'), 0);
    const h = await getJson(server.http('/api/history/BP?limit=1000'));
    assert.deepEqual(h.ticks.map((t) => t.id).sort(), list.map((t) => t.id).sort());
  } finally {
    await server.stop();
    cleanup(server.dataDir);
  }
});
