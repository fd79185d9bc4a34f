// tickfan live dashboard. An ES module with no build step of its own: the server embeds this
// file as is, and serves the JS client's committed build (clients/js/dist/tickfan.js) next to
// it as tickfan.js.
//
// Data flow: one TickfanClient (the same client library users get) owns the /ws connection:
// it resumes with since_seq after any disconnect, drops duplicates at the seam, reports
// history gaps and epoch changes, and watches heartbeats. Its `tick` events go through
// applyTick(). The DOM is updated once per animation frame from a set of dirty rows, so a fast
// feed costs one layout per frame, not one per tick.
import { TickfanClient } from './tickfan.js';

(function tickfanDashboard() {
  // ---------------------------------------------------------------- constants and options

  const TF_MS = {
    '1m': 60e3, '5m': 300e3, '15m': 900e3, '1h': 3600e3, '4h': 14400e3, '1d': 86400e3,
  };
  const MODES = ['realtime', 'throttled', 'batch', 'smart'];
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 10000;
  const DEFAULT_SELECT_MS = 300;  // wait for the first snapshots before picking a chart symbol
  const SELECTED_KEY = 'tickfan.selected';
  const LATENCY_WINDOW_MS = 5000;
  const LATENCY_MAX_SAMPLES = 8192;
  const POLL_MS = 2000;
  const BARS_LIMIT = 500;
  const FLASH_MS = 250;
  const CONFIGURE_DEBOUNCE_MS = 300;
  const DEFAULT_HEARTBEAT_MS = 15000;

  const params = new URLSearchParams(location.search);
  const token = params.get('token') || '';
  const subscribeSymbols = parseSymbolList(params.get('symbols'));
  const freshHistory = clampInt(params.get('history'), 0, 1000, 1);

  // ---------------------------------------------------------------- state (exposed for tests)

  const state = {
    connected: false,
    status: 'disconnected',     // connected | reconnecting | disconnected
    epoch: null,
    session: null,
    server: null,
    heartbeatMs: DEFAULT_HEARTBEAT_MS,
    mode: null,                 // server-side mode, as last acked or announced
    modeReason: null,
    requested: {                // what this page asks for (connection-wide on the server)
      mode: pickMode(params.get('mode')) || 'realtime',
      interval_ms: clampInt(params.get('interval_ms'), 1, 60000, 100),
      min_quality: clampNum(params.get('min_quality'), 0, 100, 0),
      min_volume: clampNum(params.get('min_volume'), 0, Infinity, 0),
    },
    subscribed: subscribeSymbols,
    lastSeq: {},                // symbol -> last seq applied
    messages: 0,                // WebSocket messages received (all types)
    ticks: 0,                   // ticks applied (live + snapshot)
    duplicates: 0,              // ticks ignored because seq <= lastSeq
    gaps: 0,                    // seq holes in live ticks that filters/conflation do not explain
    snapshotGaps: 0,            // snapshots the server marked gap:true
    reconnects: 0,              // successful re-connections after the first
    reconnectAttempts: 0,
    selected: null,             // symbol shown in the chart
    tf: TF_MS[params.get('tf')] ? params.get('tf') : '1m',
    barsDrawn: 0,
    latency: { p50: null, p99: null, samples: 0 },
    rttMs: null,
    lastError: null,
    stats: null,
    dlq: [],
  };

  // The client's counters, read live (tests and the panel see them without a state change).
  for (const [key, of] of [['reconnects', 'reconnects'], ['reconnectAttempts', 'reconnectAttempts'], ['duplicates', 'duplicates']]) {
    Object.defineProperty(state, key, { enumerable: true, get: () => (client ? client[of] : 0) });
  }

  // Per-symbol view model: symbol -> { row, cells, first, last tick fields, counters }.
  const symbols = new Map();
  // Symbols whose row needs repainting at the next frame.
  const dirty = new Set();
  // Latency samples: parallel ring of [arrival ms, latency ms].
  const latency = { at: new Float64Array(LATENCY_MAX_SAMPLES), ms: new Float64Array(LATENCY_MAX_SAMPLES), head: 0, size: 0 };

  let client = null;            // the TickfanClient
  let configureTimer = 0;
  let flushScheduled = false;
  let pollTimer = 0;
  let polling = false;
  let statsRoute = 'api/stats'; // falls back to health when the server has no stats route
  let dlqAvailable = true;

  const el = {};

  // ---------------------------------------------------------------- small helpers

  function parseSymbolList(raw) {
    if (!raw) return ['*'];
    const list = raw.split(',').map((s) => s.trim()).filter(Boolean);
    return list.length ? list : ['*'];
  }

  function pickMode(m) {
    return MODES.includes(m) ? m : null;
  }

  function clampInt(raw, lo, hi, dflt) {
    const n = Number.parseInt(raw, 10);
    return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : dflt;
  }

  function clampNum(raw, lo, hi, dflt) {
    if (raw === null || raw === undefined || raw === '') return dflt;
    const n = Number(raw);
    return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : dflt;
  }

  function isNum(v) {
    return typeof v === 'number' && Number.isFinite(v);
  }

  // Adds ?token= to a relative URL: browsers cannot set Authorization on WebSocket, and using
  // the same mechanism for fetch keeps one code path.
  function withToken(url) {
    if (!token) return url;
    return url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
  }

  // Shows the price exactly as sent, padded to at least 2 decimals so columns line up.
  function fmtPrice(p) {
    if (!isNum(p)) return '–';
    let s = String(p);
    if (s.includes('e')) s = p.toFixed(p < 1 ? 10 : 2).replace(/0+$/, '');
    const dot = s.indexOf('.');
    const decimals = dot < 0 ? 0 : s.length - dot - 1;
    return decimals >= 2 ? s : p.toFixed(2);
  }

  function fmtNum(v, maxFrac) {
    if (!isNum(v)) return '–';
    return v.toLocaleString('en-US', { maximumFractionDigits: maxFrac });
  }

  function fmtPct(v) {
    if (!isNum(v)) return '–';
    return (v > 0 ? '+' : '') + v.toFixed(2) + '%';
  }

  function fmtMs(v) {
    if (!isNum(v)) return '–';
    return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : Math.round(v).toString();
  }

  function fmtDuration(s) {
    if (!isNum(s)) return '–';
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = Math.floor(s % 60);
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m ${sec}s`;
    return m ? `${m}m ${sec}s` : `${sec}s`;
  }

  // received_at may be ms, µs, seconds or an ISO string depending on the server version.
  function fmtTime(v) {
    let d = null;
    if (isNum(v)) {
      const ms = v > 1e14 ? v / 1000 : v < 1e11 ? v * 1000 : v;
      d = new Date(ms);
    } else if (typeof v === 'string' && v) {
      d = new Date(v);
      if (Number.isNaN(d.getTime())) return v;
    }
    if (!d || Number.isNaN(d.getTime())) return '–';
    return d.toLocaleTimeString('en-GB', { hour12: false });
  }

  function setText(node, text) {
    if (node && node.textContent !== text) node.textContent = text;
  }

  function showNotice(text, kind) {
    if (!el.notice) return;
    el.notice.hidden = !text;
    el.notice.textContent = text || '';
    el.notice.className = 'notice' + (kind ? ' notice-' + kind : '');
  }

  // ---------------------------------------------------------------- connection status

  function setStatus(status) {
    state.status = status;
    state.connected = status === 'connected';
    setText(el.status, status);
    el.status.dataset.status = status;
    el.status.className = 'status status-' + status;
    el.reconnect.hidden = status !== 'disconnected';
  }

  // ---------------------------------------------------------------- the client

  // Fresh start: `history` ticks per symbol; after that the client resumes by itself.
  function connect() {
    if (client) {
      client.connect().catch(() => { /* reported through the error event */ });
      return;
    }
    client = new TickfanClient(wsUrl(), { token, backoffMinMs: BACKOFF_MIN_MS, backoffMaxMs: BACKOFF_MAX_MS });
    client.on('state', onClientState);
    client.on('message', () => { state.messages += 1; });
    client.on('welcome', onWelcome);
    client.on('epoch', onEpoch);
    client.on('tick', (t, snapshot) => applyTick(t, !snapshot));
    client.on('gap', onGap);
    client.on('ack', onAck);
    client.on('mode', (m) => setMode(m.mode, typeof m.reason === 'string' ? m.reason : null));
    client.on('error', onClientError);
    client.connect().then(subscribe, () => { /* reported through the error event */ });
  }

  function disconnect() {
    if (client) client.close();
    setStatus('disconnected');
  }

  function onClientState(s) {
    setStatus(s === 'connected' ? 'connected' : s === 'closed' ? 'disconnected' : 'reconnecting');
  }

  // The token goes in ?token= (browsers cannot set headers); the client adds it.
  function wsUrl() {
    const u = new URL('ws', location.href);
    u.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    u.search = '';
    u.hash = '';
    return u.toString();
  }

  function onWelcome(msg) {
    state.session = msg.session ?? null;
    state.server = msg.server ?? null;
    state.heartbeatMs = isNum(msg.heartbeat_ms) ? msg.heartbeat_ms : DEFAULT_HEARTBEAT_MS;
    state.epoch = msg.epoch ?? null;
    setText(el.epoch, state.epoch === null ? '–' : String(state.epoch));
    setText(el.server, state.server || '');
    if (msg.protocol !== undefined && msg.protocol !== 1) {
      showNotice(`server speaks protocol ${msg.protocol}; this page expects 1`, 'warn');
    } else if (!epochNotice) {
      showNotice('');
    }
    epochNotice = false;
    // No bars reload after a reconnect: the client's since_seq replay brings every tick we
    // missed through applyTick() into the chart, once (a reload raced with that replay and
    // could count ticks twice).
    pollNow();
  }

  let epochNotice = false;

  // A new epoch means the server's seqs started over: the client forgot its seqs; so do we.
  function onEpoch() {
    forgetSeqs();
    epochNotice = true;
    if (state.selected) loadBars();
    showNotice('server epoch changed: history reloaded', 'warn');
  }

  function forgetSeqs() {
    state.lastSeq = {};
    symbols.clear();
    dirty.clear();
    if (el.tbody) el.tbody.textContent = '';
    updateSymbolCount();
  }

  function subscribe() {
    const r = state.requested;
    const opts = {
      mode: r.mode, interval_ms: r.interval_ms, min_quality: r.min_quality, min_volume: r.min_volume,
    };
    if (freshHistory > 0) opts.history = freshHistory;
    client.subscribe(state.subscribed, opts).catch((e) => onClientError(e));
  }

  function onAck(msg) {
    if (msg.op === 'subscribe' || msg.op === 'configure') {
      const acked = pickMode(msg.mode);
      if (acked) setMode(acked, null);
    }
    if (Array.isArray(msg.rejected) && msg.rejected.length) {
      const list = msg.rejected.map((r) => `${r.symbol}: ${r.code}`).join(', ');
      showNotice('rejected: ' + list, 'warn');
    }
  }

  function setMode(mode, reason) {
    state.mode = mode;
    state.modeReason = reason;
    setText(el.mode, mode);
    setText(el.modeReason, reason ? ` (${reason})` : '');
    el.mode.title = `requested: ${state.requested.mode}`;
  }

  function onClientError(err) {
    state.lastError = { code: err.code, message: err.message };
    if (err.code === 'unauthorized' || err.code === 'token_expired') {
      showNotice('unauthorized: add a valid ?token= to the page URL', 'error');
    } else if (err.code === 'slow_consumer') {
      showNotice('server closed us as a slow consumer; resuming', 'warn');
    } else if (err.code !== 'heartbeat_timeout' && err.code !== 'disconnected') {
      showNotice(`server: ${err.code}${err.message ? ' – ' + err.message : ''}`, 'warn');
    }
  }

  function onGap(g) {
    if (g.reason === 'history') {
      // The store no longer reaches back to our since_seq: the hole is known and reported.
      state.snapshotGaps += 1;
      showNotice(`${g.symbol}: history no longer reaches the last seen seq; some ticks were skipped`, 'warn');
    } else {
      state.gaps += 1;
    }
  }

  // ---------------------------------------------------------------- ticks

  // Applies one tick (live or replayed); the client already dropped duplicates and keeps
  // seq order per symbol.
  function applyTick(t, live) {
    if (!t || typeof t.symbol !== 'string' || !isNum(t.seq) || !isNum(t.price)) return false;
    const sym = t.symbol;
    state.lastSeq[sym] = t.seq;
    state.ticks += 1;
    if (live && isNum(t.t_in)) recordLatency(nowMs() - t.t_in / 1000);
    updateSymbol(sym, t);
    if (sym === state.selected) chartOnTick(t);
    return true;
  }

  // Sub-millisecond wall clock: Date.now() has 1 ms steps, which made the latency of a fast
  // server read negative (t_in is in µs).
  function nowMs() {
    return performance.timeOrigin + performance.now();
  }

  function recordLatency(ms) {
    if (!isNum(ms)) return;
    // Clocks of different resolution (and a server clock a hair ahead) can still make it a
    // little negative; a delivery cannot take less than nothing.
    ms = Math.max(0, ms);
    const i = latency.head;
    latency.at[i] = Date.now();
    latency.ms[i] = ms;
    latency.head = (i + 1) % LATENCY_MAX_SAMPLES;
    latency.size = Math.min(latency.size + 1, LATENCY_MAX_SAMPLES);
  }

  function latencyPercentiles() {
    const cutoff = Date.now() - LATENCY_WINDOW_MS;
    const vals = [];
    for (let k = 0; k < latency.size; k++) {
      const i = (latency.head - 1 - k + LATENCY_MAX_SAMPLES) % LATENCY_MAX_SAMPLES;
      if (latency.at[i] < cutoff) break; // the ring is in arrival order: the rest is older
      vals.push(latency.ms[i]);
    }
    if (!vals.length) return { p50: null, p99: null, samples: 0 };
    vals.sort((a, b) => a - b);
    const pick = (q) => vals[Math.min(vals.length - 1, Math.floor(q * vals.length))];
    return { p50: pick(0.5), p99: pick(0.99), samples: vals.length };
  }

  // ---------------------------------------------------------------- watchlist

  function updateSymbol(sym, t) {
    let s = symbols.get(sym);
    if (!s) s = addSymbol(sym);
    if (s.first === null) s.first = t.price;
    s.dir = s.price === null ? 0 : Math.sign(t.price - s.price);
    s.price = t.price;
    if (isNum(t.bid)) s.bid = t.bid;
    if (isNum(t.ask)) s.ask = t.ask;
    if (isNum(t.volume)) {
      s.volume = t.volume;
      s.totalVolume += t.volume;
    }
    if (isNum(t.quality)) s.quality = t.quality;
    s.seq = t.seq;
    s.count += 1 + (isNum(t.conflated) ? t.conflated : 0);
    s.updatedAt = Date.now();
    markDirty(sym);
    if (state.selected === null) scheduleDefaultSelection();
  }

  function addSymbol(sym) {
    const row = document.createElement('tr');
    row.dataset.symbol = sym;
    row.tabIndex = 0;
    const cells = {};
    const head = document.createElement('th');
    head.scope = 'row';
    head.className = 'symbol';
    head.textContent = sym;
    row.appendChild(head);
    for (const name of ['price', 'change', 'bid', 'ask', 'volume', 'quality', 'seq', 'rate']) {
      const td = document.createElement('td');
      td.className = name + ' num';
      td.textContent = '–';
      row.appendChild(td);
      cells[name] = td;
    }
    const s = {
      sym, row, cells, first: null, price: null, bid: null, ask: null, volume: null,
      totalVolume: 0, quality: null, seq: null, dir: 0, count: 0, rateCount: 0, rate: 0,
      updatedAt: 0, flashUntil: 0,
    };
    symbols.set(sym, s);
    insertSorted(row, sym);
    if (sym === state.selected) row.classList.add('selected');
    updateSymbolCount();
    return s;
  }

  // Keeps the table alphabetical so rows do not jump around as new symbols appear.
  function insertSorted(row, sym) {
    const rows = el.tbody.rows;
    let lo = 0;
    let hi = rows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (rows[mid].dataset.symbol < sym) lo = mid + 1; else hi = mid;
    }
    el.tbody.insertBefore(row, rows[lo] || null);
  }

  function updateSymbolCount() {
    setText(el.symbolCount, String(symbols.size));
    el.watchEmpty.hidden = symbols.size > 0;
  }

  function markDirty(sym) {
    dirty.add(sym);
    scheduleFlush();
  }

  // requestAnimationFrame does not run in background tabs; the timeout keeps the state in the
  // DOM fresh there too (tests often run hidden).
  function scheduleFlush() {
    if (flushScheduled) return;
    flushScheduled = true;
    const timer = setTimeout(flush, 250);
    requestAnimationFrame(() => { clearTimeout(timer); flush(); });
  }

  function flush() {
    if (!flushScheduled) return;
    flushScheduled = false;
    const now = Date.now();
    for (const sym of dirty) {
      const s = symbols.get(sym);
      if (s) paintRow(s, now);
    }
    dirty.clear();
  }

  function cellValue(td, text, value) {
    setText(td, text);
    const v = value === null || value === undefined ? '' : String(value);
    if (td.dataset.value !== v) td.dataset.value = v;
  }

  function paintRow(s, now) {
    const c = s.cells;
    cellValue(c.price, fmtPrice(s.price), s.price);
    const chg = s.first ? ((s.price - s.first) / s.first) * 100 : null;
    cellValue(c.change, fmtPct(chg), isNum(chg) ? chg.toFixed(4) : null);
    c.change.classList.toggle('up', chg > 0);
    c.change.classList.toggle('down', chg < 0);
    cellValue(c.bid, fmtPrice(s.bid), s.bid);
    cellValue(c.ask, fmtPrice(s.ask), s.ask);
    cellValue(c.volume, fmtNum(s.volume, 4), s.volume);
    c.volume.title = 'seen since page load: ' + fmtNum(s.totalVolume, 4);
    cellValue(c.quality, isNum(s.quality) ? String(s.quality) : '–', s.quality);
    c.quality.classList.toggle('q-low', s.quality !== null && s.quality < 70);
    c.quality.classList.toggle('q-mid', s.quality !== null && s.quality >= 70 && s.quality < 90);
    cellValue(c.seq, s.seq === null ? '–' : String(s.seq), s.seq);
    flashRow(s, now);
  }

  // The flash class is removed by the periodic sweep; a CSS transition fades it out.
  function flashRow(s, now) {
    const cls = s.dir < 0 ? 'flash-down' : 'flash-up';
    s.row.classList.remove(cls === 'flash-up' ? 'flash-down' : 'flash-up');
    s.row.classList.add(cls);
    s.flashUntil = now + FLASH_MS;
  }

  function sweepFlashes() {
    const now = Date.now();
    for (const s of symbols.values()) {
      if (s.flashUntil && s.flashUntil <= now) {
        s.row.classList.remove('flash-up', 'flash-down');
        s.flashUntil = 0;
      }
    }
  }

  let lastRateAt = Date.now();
  let lastMsgCount = 0;
  let msgRate = 0;

  // Per-symbol ticks/s over the last second (conflated ticks included: it is the symbol's rate).
  function updateRates() {
    const now = Date.now();
    const secs = Math.max(0.001, (now - lastRateAt) / 1000);
    lastRateAt = now;
    for (const s of symbols.values()) {
      const rate = (s.count - s.rateCount) / secs;
      s.rateCount = s.count;
      if (rate !== s.rate || s.cells.rate.dataset.value === undefined) {
        s.rate = rate;
        cellValue(s.cells.rate, rate >= 10 ? Math.round(rate).toString() : rate.toFixed(1), rate.toFixed(2));
      }
    }
    msgRate = (state.messages - lastMsgCount) / secs;
    lastMsgCount = state.messages;
    renderClientStats();
  }

  function renderLatency() {
    state.latency = latencyPercentiles();
    const l = state.latency;
    setText(el.latency, l.samples ? `p50 ${fmtMs(l.p50)} ms · p99 ${fmtMs(l.p99)} ms` : '–');
  }

  function onRowActivate(ev) {
    if (ev.type === 'keydown' && ev.key !== 'Enter' && ev.key !== ' ') return;
    const row = ev.target.closest('tr[data-symbol]');
    if (!row) return;
    if (ev.type === 'keydown') ev.preventDefault();
    selectSymbol(row.dataset.symbol);
  }

  // ---------------------------------------------------------------- chart

  const chart = {
    api: null,
    candles: null,
    volumes: null,
    bars: [],          // our copy: { t (ms), open, high, low, close, volume, lastTs }
    loading: false,
    buffered: [],      // ticks that arrived while bars were loading
    loadToken: 0,
  };

  function createChart() {
    const LWC = window.LightweightCharts;
    if (!LWC || typeof LWC.createChart !== 'function') {
      console.error('tickfan: charting library did not load (vendor/lightweight-charts.js)');
      setText(el.chartInfo, 'chart library unavailable');
      return;
    }
    chart.api = LWC.createChart(el.chart, {
      autoSize: true,
      layout: { background: { type: 'solid', color: '#11151c' }, textColor: '#aeb6c2', fontSize: 11 },
      grid: { vertLines: { color: '#1c222c' }, horzLines: { color: '#1c222c' } },
      rightPriceScale: { borderColor: '#2a313d' },
      timeScale: { borderColor: '#2a313d', timeVisible: true, secondsVisible: false },
      crosshair: { mode: 0 },
    });
    chart.candles = chart.api.addCandlestickSeries({
      upColor: '#26a69a', downColor: '#ef5350', borderVisible: false,
      wickUpColor: '#26a69a', wickDownColor: '#ef5350',
    });
    chart.volumes = chart.api.addHistogramSeries({
      priceFormat: { type: 'volume' }, priceScaleId: 'vol', color: '#3a4556',
    });
    chart.api.priceScale('vol').applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
    chart.candles.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.25 } });
  }

  let defaultSelectTimer = 0;

  // The chart opens on ?symbol=, else on the symbol picked last time (kept in localStorage)
  // when the server has it, else on the watchlist's first row, chosen once the first snapshots
  // are in (not on whichever symbol happened to tick first).
  function scheduleDefaultSelection() {
    if (defaultSelectTimer) return;
    defaultSelectTimer = setTimeout(() => {
      defaultSelectTimer = 0;
      if (state.selected !== null) return;
      const saved = readSaved();
      const first = el.tbody.rows[0] ? el.tbody.rows[0].dataset.symbol : null;
      const pick = saved && symbols.has(saved) ? saved : first;
      if (pick) selectSymbol(pick, false);
    }, DEFAULT_SELECT_MS);
  }

  function readSaved() {
    try { return localStorage.getItem(SELECTED_KEY); } catch (_) { return null; }
  }

  function selectSymbol(sym, remember = true) {
    if (typeof sym !== 'string' || !sym) return;
    if (remember) {
      try { localStorage.setItem(SELECTED_KEY, sym); } catch (_) { /* private mode */ }
    }
    const prev = state.selected && symbols.get(state.selected);
    if (prev) prev.row.classList.remove('selected');
    state.selected = sym;
    const cur = symbols.get(sym);
    if (cur) cur.row.classList.add('selected');
    setText(el.chartSymbol, sym);
    loadBars();
  }

  function setTimeframe(tf) {
    if (!TF_MS[tf]) return;
    state.tf = tf;
    if (el.tf.value !== tf) el.tf.value = tf;
    loadBars();
  }

  // Loads history bars; live ticks that arrive meanwhile are kept and applied afterwards so the
  // current bar is not left behind.
  async function loadBars() {
    const sym = state.selected;
    if (!sym) return;
    const myLoad = ++chart.loadToken;
    chart.loading = true;
    chart.buffered = [];
    setText(el.chartInfo, 'loading…');
    const url = withToken(`api/bars/${encodeURIComponent(sym)}?tf=${state.tf}&limit=${BARS_LIMIT}`);
    let bars = [];
    let info = '';
    try {
      const res = await fetch(url, { cache: 'no-store' });
      if (res.ok) {
        const body = await res.json().catch(() => null);
        bars = sanitizeBars(body && body.bars);
      } else {
        info = `bars: HTTP ${res.status}`;
      }
    } catch (_) {
      info = 'bars: server unreachable';
    }
    if (myLoad !== chart.loadToken) return; // a newer selection or timeframe won
    chart.bars = bars;
    drawAllBars();
    chart.loading = false;
    const buffered = chart.buffered;
    chart.buffered = [];
    for (const t of buffered) chartOnTick(t);
    setText(el.chartInfo, info || `${state.tf} · ${chart.bars.length} bars`);
  }

  // Sorted, de-duplicated, finite bars: lightweight-charts throws on unordered times.
  function sanitizeBars(raw) {
    if (!Array.isArray(raw)) return [];
    const out = [];
    for (const b of raw) {
      if (!b || !isNum(b.t) || !isNum(b.open) || !isNum(b.high) || !isNum(b.low) || !isNum(b.close)) continue;
      out.push({
        t: b.t, open: b.open, high: b.high, low: b.low, close: b.close,
        volume: isNum(b.volume) ? b.volume : 0, lastTs: b.t,
      });
    }
    out.sort((a, b) => a.t - b.t);
    return out.filter((b, i) => i === 0 || Math.floor(b.t / 1000) !== Math.floor(out[i - 1].t / 1000));
  }

  function candleOf(b) {
    return { time: Math.floor(b.t / 1000), open: b.open, high: b.high, low: b.low, close: b.close };
  }

  function volumeOf(b) {
    return {
      time: Math.floor(b.t / 1000), value: b.volume,
      color: b.close >= b.open ? 'rgba(38,166,154,0.45)' : 'rgba(239,83,80,0.45)',
    };
  }

  function drawAllBars() {
    state.barsDrawn = chart.bars.length;
    if (!chart.candles) return;
    try {
      chart.candles.setData(chart.bars.map(candleOf));
      chart.volumes.setData(chart.bars.map(volumeOf));
      // A short history fills the width instead of hugging the right edge; a long one
      // opens at the latest bars.
      if (chart.bars.length && chart.bars.length < 120) chart.api.timeScale().fitContent();
      else if (chart.bars.length) chart.api.timeScale().scrollToRealTime();
    } catch (err) {
      console.error('tickfan: chart setData failed', err);
    }
  }

  // Folds a tick into the current bar, or starts a new bar when its bucket begins.
  function chartOnTick(t) {
    if (chart.loading) {
      // Bounded: a bars request that never answers must not grow memory without limit.
      if (chart.buffered.length < 20000) chart.buffered.push(t);
      return;
    }
    if (!isNum(t.ts)) return;
    const tfMs = TF_MS[state.tf];
    const bucket = Math.floor(t.ts / tfMs) * tfMs;
    const bars = chart.bars;
    let bar = bars[bars.length - 1];
    if (bar && bucket < bar.t) return; // older than the last bar: the chart cannot go back
    if (bar && bucket === bar.t) {
      bar.high = Math.max(bar.high, t.price);
      bar.low = Math.min(bar.low, t.price);
      if (t.ts >= bar.lastTs) {
        bar.close = t.price;
        bar.lastTs = t.ts;
      }
      if (isNum(t.volume)) bar.volume += t.volume;
    } else {
      bar = {
        t: bucket, open: t.price, high: t.price, low: t.price, close: t.price,
        volume: isNum(t.volume) ? t.volume : 0, lastTs: t.ts,
      };
      bars.push(bar);
      state.barsDrawn = bars.length;
      setText(el.chartInfo, `${state.tf} · ${bars.length} bars`);
    }
    if (!chart.candles) return;
    try {
      chart.candles.update(candleOf(bar));
      chart.volumes.update(volumeOf(bar));
    } catch (err) {
      console.error('tickfan: chart update failed', err);
    }
  }

  // ---------------------------------------------------------------- controls

  function readControls() {
    const r = state.requested;
    r.mode = pickMode(el.modeSelect.value) || r.mode;
    r.interval_ms = clampInt(el.interval.value, 1, 60000, r.interval_ms);
    r.min_quality = clampNum(el.minQuality.value, 0, 100, 0);
    r.min_volume = clampNum(el.minVolume.value, 0, Infinity, 0);
  }

  function writeControls() {
    const r = state.requested;
    el.modeSelect.value = r.mode;
    el.interval.value = String(r.interval_ms);
    el.minQuality.value = String(r.min_quality);
    el.minVolume.value = String(r.min_volume);
    el.tf.value = state.tf;
  }

  // Debounced so typing "80" in a number box sends one configure, not two (rate limits).
  function onControlsChanged() {
    clearTimeout(configureTimer);
    configureTimer = setTimeout(() => {
      readControls();
      configure();
    }, CONFIGURE_DEBOUNCE_MS);
  }

  function configure(overrides) {
    if (overrides && typeof overrides === 'object') {
      Object.assign(state.requested, overrides);
      writeControls();
    }
    const r = state.requested;
    if (!client) return Promise.resolve(null);
    return client.configure({
      mode: r.mode, interval_ms: r.interval_ms,
      min_quality: r.min_quality, min_volume: r.min_volume,
    }).catch((e) => onClientError(e));
  }

  // ---------------------------------------------------------------- HTTP polling

  async function getJson(path) {
    try {
      const res = await fetch(withToken(path), { cache: 'no-store' });
      if (!res.ok) return { status: res.status, body: null };
      const body = await res.json().catch(() => null);
      return { status: res.status, body };
    } catch (_) {
      return { status: 0, body: null };
    }
  }

  function pollNow() {
    clearTimeout(pollTimer);
    poll();
  }

  // Polls only while connected: a down server would just fill the console with refused fetches.
  async function poll() {
    clearTimeout(pollTimer);
    if (polling) return; // the running round schedules the next one
    polling = true;
    try {
      if (state.connected) await Promise.all([pollStats(), dlqAvailable ? pollDlq() : null, pollRtt()]);
    } finally {
      polling = false;
      pollTimer = setTimeout(poll, POLL_MS);
    }
  }

  async function pollRtt() {
    try {
      state.rttMs = await client.ping();
    } catch (_) {
      state.rttMs = null;
    }
  }

  async function pollStats() {
    let r = await getJson(statsRoute);
    if (r.status === 404 && statsRoute === 'api/stats') {
      // Older servers have no /api/stats: /health still says something useful.
      statsRoute = 'health';
      r = await getJson(statsRoute);
    }
    if (r.body && typeof r.body === 'object') {
      state.stats = r.body;
      renderStats(r.body);
      setText(el.statsAge, new Date().toLocaleTimeString('en-GB', { hour12: false }));
    }
  }

  async function pollDlq() {
    const r = await getJson('api/dlq?limit=20');
    if (r.status === 404) {
      dlqAvailable = false;
      return;
    }
    if (r.body && Array.isArray(r.body.entries)) {
      state.dlq = r.body.entries;
      renderDlq(r.body.entries);
    }
  }

  // The Server panel: a fixed list of what a person wants to know, with short labels that fit
  // (a raw dump of /api/stats cut "dispatch latency p50..p999" to six identical stubs).
  // Fields an older server lacks show "–".
  function count(v) {
    return fmtNum(v, 0);
  }

  function micros(v) {
    if (!isNum(v)) return '–';
    return v >= 1000 ? fmtMs(v / 1000) + ' ms' : Math.round(v) + ' µs';
  }

  function queueText(b) {
    const d = b.queue_depth;
    const depth = isNum(d) ? d : d && typeof d === 'object'
      ? Object.values(d).reduce((a, v) => a + (isNum(v) ? v : 0), 0) : null;
    if (!isNum(depth)) return '–';
    return isNum(b.queue_capacity) ? `${count(depth)} / ${count(b.queue_capacity)}` : count(depth);
  }

  const STAT_ROWS = [
    ['uptime', 'how long the server has run', (b) => fmtDuration(b.uptime_s)],
    ['connections', 'open /ws connections', (b) => count(b.connections)],
    ['ingest', 'ticks received per second', (b) => (isNum(b.ingest_rate) ? fmtNum(b.ingest_rate, 1) + '/s' : '–')],
    ['accepted', 'ticks accepted since start', (b) => count(b.ticks_accepted)],
    ['rejected', 'ticks rejected (see Dead letters)', (b) => count(b.ticks_rejected)],
    ['duplicates', 'duplicate ticks dropped', (b) => count(b.ticks_duplicate)],
    ['refused', 'ticks refused with backpressure (producers resend them)', (b) => count(b.ticks_refused)],
    ['queue', 'ticks waiting / queue capacity', queueText],
    ['latency p50', 'ingest to dispatch, median', (b) => micros(b.latency_us?.ingest_to_dispatch?.p50)],
    ['latency p99', 'ingest to dispatch, 99th percentile', (b) => micros(b.latency_us?.ingest_to_dispatch?.p99)],
    ['latency max', 'ingest to dispatch, slowest', (b) => micros(b.latency_us?.ingest_to_dispatch?.max)],
    ['sent', 'messages sent to clients', (b) => count(b.messages_sent)],
    ['slow closes', 'clients closed as slow consumers', (b) => count(b.dropped?.slow_consumer_closes)],
    ['conflated', 'ticks skipped by throttled/smart delivery', (b) => count(b.dropped?.conflated)],
  ];

  function renderStats(body) {
    renderKv(el.stats, STAT_ROWS.map(([label, title, f]) => [label, f(body), title]));
  }

  function renderClientStats() {
    renderKv(el.clientStats, [
      ['page messages', fmtNum(state.messages, 0), 'WebSocket messages this page received'],
      ['page msg rate', fmtNum(msgRate, 1) + '/s', 'messages per second'],
      ['page ticks', fmtNum(state.ticks, 0), 'ticks applied (history and live)'],
      ['page dupes', fmtNum(state.duplicates, 0), 'ticks ignored at a resume seam (already shown)'],
      ['page gaps', String(state.gaps + state.snapshotGaps), 'seq holes the server could not fill'],
      ['reconnects', String(state.reconnects), 'times the page reconnected and resumed'],
      ['rtt', state.rttMs === null ? '–' : state.rttMs + ' ms', 'ping round trip'],
    ]);
  }

  // Reuses nodes keyed by data-key so polling does not rebuild the panel every 2 s.
  function renderKv(container, rows) {
    const seen = new Set();
    for (const [key, text, title] of rows) {
      seen.add(key);
      let item = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (!item) {
        item = document.createElement('div');
        item.className = 'stat';
        item.dataset.key = key;
        const k = document.createElement('span');
        k.className = 'k';
        k.textContent = key;
        if (title) k.title = title;
        const v = document.createElement('span');
        v.className = 'v';
        item.append(k, v);
        container.appendChild(item);
      }
      setText(item.lastChild, text);
    }
    for (const item of Array.from(container.children)) {
      if (!seen.has(item.dataset.key)) item.remove();
    }
  }

  function renderDlq(entries) {
    const frag = document.createDocumentFragment();
    for (const e of entries.slice(0, 20)) {
      if (!e || typeof e !== 'object') continue;
      const tr = document.createElement('tr');
      const raw = typeof e.raw === 'string' ? e.raw : JSON.stringify(e.raw ?? '');
      for (const [cls, text, title] of [
        ['time', fmtTime(e.received_at), String(e.received_at ?? '')],
        ['code', String(e.code ?? ''), ''],
        ['message', String(e.message ?? ''), String(e.message ?? '')],
        ['raw', raw.length > 80 ? raw.slice(0, 80) + '…' : raw, raw],
      ]) {
        const td = document.createElement('td');
        td.className = cls;
        td.textContent = text;
        if (title) td.title = title;
        tr.appendChild(td);
      }
      frag.appendChild(tr);
    }
    el.dlqBody.textContent = '';
    el.dlqBody.appendChild(frag);
    el.dlqEmpty.hidden = el.dlqBody.rows.length > 0;
  }

  // ---------------------------------------------------------------- startup

  function bindElements() {
    const ids = {
      status: 'status', reconnect: 'reconnect', epoch: 'epoch', latency: 'latency', mode: 'mode',
      modeReason: 'mode-reason', server: 'server', modeSelect: 'mode-select', interval: 'interval',
      minQuality: 'min-quality', minVolume: 'min-volume', notice: 'notice', tbody: 'watchlist-body',
      symbolCount: 'symbol-count', watchEmpty: 'watch-empty', chart: 'chart', chartSymbol: 'chart-symbol',
      chartInfo: 'chart-info', tf: 'tf', stats: 'stats', clientStats: 'client-stats',
      statsAge: 'stats-age', dlqBody: 'dlq-body', dlqEmpty: 'dlq-empty', controls: 'controls',
    };
    for (const [key, id] of Object.entries(ids)) {
      el[key] = document.getElementById(id);
      if (!el[key]) throw new Error(`tickfan: #${id} missing from index.html`);
    }
  }

  function bindEvents() {
    el.tbody.addEventListener('click', onRowActivate);
    el.tbody.addEventListener('keydown', onRowActivate);
    el.tf.addEventListener('change', () => setTimeframe(el.tf.value));
    el.controls.addEventListener('submit', (ev) => ev.preventDefault());
    el.controls.addEventListener('change', onControlsChanged);
    el.controls.addEventListener('input', onControlsChanged);
    el.reconnect.addEventListener('click', () => connect());
    // Close cleanly so the server logs a normal close instead of a dropped connection.
    window.addEventListener('pagehide', () => { if (client) client.close(); });
  }

  function start() {
    bindElements();
    writeControls();
    bindEvents();
    createChart();
    const wanted = params.get('symbol');
    if (wanted) selectSymbol(wanted, false);
    setInterval(updateRates, 1000);
    setInterval(renderLatency, 500);
    setInterval(sweepFlashes, 150);
    renderClientStats();
    poll();
    connect();
  }

  window.tickfan = {
    state,
    connect,
    disconnect,
    selectSymbol,
    setTimeframe,
    configure,
    reloadBars: loadBars,
    client: () => client,
    chart,
    symbols,
  };

  try {
    start();
  } catch (err) {
    console.error('tickfan: dashboard failed to start', err);
  }
})();
