/**
 * tickfan client for browsers and Node >= 20. No runtime dependencies.
 *
 * `TickfanClient` holds one `/ws` connection that it keeps alive: it remembers the last `seq`
 * of every symbol, and on any disconnect (server restart, another node, a cut socket, a silent
 * connection, `slow_consumer`) it reconnects with jittered exponential backoff and subscribes
 * again with `since_seq`, so `tick` events come exactly once and in seq order per symbol.
 * What it cannot hide it reports: `gap` (history no longer reaches back to the resume point),
 * `epoch` (the server's store was reset: seqs started over), `error` (typed server errors).
 *
 * `Producer` publishes over `/ingest` and resends exactly the ticks the server refused with
 * `backpressure`, then resolves with the merged ack.
 *
 * Data flow: socket message -> JSON -> `handle()` -> de-duplication by seq -> listeners (or the
 * bounded async-iterator buffer). Requests go out through `send()`.
 */
/** Every error this library reports. `code` is the server's error code where there is one. */
export class TickfanError extends Error {
    constructor(code, message, opts = {}) {
        super(message);
        this.name = 'TickfanError';
        this.code = code;
        this.retryAfterMs = opts.retryAfterMs;
        this.fatal = opts.fatal ?? false;
    }
}
const OPEN = 1;
function pickWebSocket(given) {
    const ctor = given ?? globalThis.WebSocket;
    if (!ctor) {
        throw new TickfanError('no_websocket', 'no global WebSocket here (Node 20): pass { WebSocket } from the "ws" package', { fatal: true });
    }
    return ctor;
}
function withToken(url, token) {
    if (!token)
        return url;
    return url + (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
}
/**
 * A self-healing `/ws` connection. Create it, add listeners with `on()`, `await connect()`,
 * `await subscribe(...)`; or iterate it with `for await`.
 */
export class TickfanClient {
    constructor(url, opts = {}) {
        /** Last seq delivered per symbol. */
        this.lastSeq = new Map();
        /** The server's epoch, from the latest welcome. */
        this.epoch = null;
        this.state = 'closed';
        /** Successful reconnections after the first connection. */
        this.reconnects = 0;
        /** Connection attempts after a disconnect (successful or not). */
        this.reconnectAttempts = 0;
        /** Duplicates dropped at the resume seam. */
        this.duplicates = 0;
        this.welcome = null;
        this.ws = null;
        this.stopped = true;
        this.attempt = 0;
        this.timers = {};
        this.lastMessageAt = 0;
        this.heartbeatMs = 15000;
        this.nextId = 1;
        this.pending = new Map();
        this.listeners = {};
        // What to ask for again after a reconnect.
        this.symbols = new Set();
        this.sub = {};
        this.historyFor = new Set(); // symbols whose history snapshot has not come yet
        this.baseline = new Map(); // ack last_seq for symbols with no tick yet
        this.gapArmed = new Set(); // symbols whose next delivered seq ends a known gap
        this.connectWaiters = [];
        // The async iterator's bounded buffer.
        this.buffer = [];
        this.overflowed = false;
        this.wake = null;
        this.url = url;
        this.opts = { backoffMinMs: 100, backoffMaxMs: 5000, maxBuffered: 10000, ...opts };
        this.Ws = pickWebSocket(opts.WebSocket);
        this.iterStarted = opts.iterate ?? false;
    }
    /** Adds a listener; returns a function that removes it. */
    on(event, fn) {
        var _a;
        const set = ((_a = this.listeners)[event] ?? (_a[event] = new Set()));
        set.add(fn);
        return () => {
            set.delete(fn);
        };
    }
    emit(event, ...args) {
        const set = this.listeners[event];
        if (set) {
            for (const fn of set) {
                try {
                    fn(...args);
                }
                catch (err) {
                    // A listener's bug must not stop delivery to the others.
                    setTimeout(() => { throw err; });
                }
            }
        }
    }
    /** Opens the connection; resolves at the first welcome, rejects on a fatal error. */
    connect() {
        this.stopped = false;
        const p = new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
        if (!this.ws && !this.timers.reconnect)
            this.open();
        if (this.state === 'connected')
            return Promise.resolve();
        return p;
    }
    /** Closes for good: no more reconnects; the async iterator ends. */
    close() {
        this.stopped = true;
        clearTimeout(this.timers.reconnect);
        this.timers.reconnect = undefined;
        const ws = this.ws;
        this.drop();
        try {
            ws?.close(1000, 'bye');
        }
        catch { /* already closed */ }
        this.setState('closed');
        this.wake?.();
    }
    /**
     * Subscribes (adds to the subscribed set). Mode and filters are connection-wide on the
     * server: the latest subscribe sets them, and they are sent again after every reconnect.
     */
    subscribe(symbols, opts = {}) {
        const { history = 0, ...rest } = opts;
        this.sub = { ...this.sub, ...rest };
        const fresh = [];
        for (const s of symbols) {
            if (!this.symbols.has(s))
                fresh.push(s);
            this.symbols.add(s);
        }
        const msg = { op: 'subscribe', symbols, ...this.sub };
        const since = this.resumePoints(symbols);
        if (since)
            msg.since_seq = since;
        if (history > 0) {
            msg.history = history;
            for (const s of fresh)
                this.historyFor.add(s);
        }
        return this.request(msg).then((ack) => {
            for (const [sym, seq] of Object.entries(ack.last_seq ?? {})) {
                if (!this.lastSeq.has(sym) && !this.historyFor.has(sym))
                    this.baseline.set(sym, seq);
            }
            for (const r of ack.rejected ?? [])
                this.symbols.delete(r.symbol);
            return ack;
        });
    }
    /** Unsubscribes; after the ack no message for these symbols arrives. */
    unsubscribe(symbols) {
        for (const s of symbols) {
            this.symbols.delete(s);
            this.lastSeq.delete(s);
            this.baseline.delete(s);
        }
        return this.request({ op: 'unsubscribe', symbols });
    }
    /** Changes mode/filters for the whole connection (kept across reconnects). */
    configure(opts) {
        this.sub = { ...this.sub, ...opts };
        return this.request({ op: 'configure', ...opts });
    }
    /** Round trip to the server in ms. */
    async ping() {
        const t0 = Date.now();
        await this.request({ op: 'ping' });
        return Date.now() - t0;
    }
    /** Drops the socket as if the network cut it (tests, or a user's "reconnect now"). */
    dropConnection() {
        if (!this.ws)
            return;
        const ws = this.ws;
        this.drop();
        try {
            ws.close(4000, 'dropped by client');
        }
        catch { /* gone */ }
        this.scheduleReconnect();
    }
    // ------------------------------------------------------------ async iteration
    /**
     * Yields ticks (snapshot first, then live), gaps, epoch changes and errors, in order.
     * Events are buffered from the first call on (or from construction with `iterate: true`).
     */
    [Symbol.asyncIterator]() {
        this.iterStarted = true;
        return this.iterate();
    }
    async *iterate() {
        if (this.stopped && this.state === 'closed' && !this.ws)
            await this.connect();
        while (true) {
            const ev = this.buffer.shift();
            if (ev) {
                if (this.overflowed && this.buffer.length <= this.opts.maxBuffered / 2) {
                    this.overflowed = false;
                    if (!this.stopped)
                        this.open();
                }
                yield ev;
                continue;
            }
            if (this.stopped)
                return;
            await new Promise((r) => (this.wake = r));
            this.wake = null;
        }
    }
    push(ev) {
        if (!this.iterating())
            return true;
        if (this.overflowed)
            return false;
        if (this.buffer.length >= this.opts.maxBuffered) {
            // The consumer is too slow: stop taking ticks and resume from here later.
            this.overflowed = true;
            const ws = this.ws;
            this.drop();
            try {
                ws?.close(4000, 'consumer too slow');
            }
            catch { /* gone */ }
            this.setState('reconnecting');
            return false;
        }
        this.buffer.push(ev);
        this.wake?.();
        return true;
    }
    iterating() {
        return this.iterStarted;
    }
    // ------------------------------------------------------------ connection
    setState(s) {
        if (this.state === s)
            return;
        this.state = s;
        this.emit('state', s);
    }
    open() {
        clearTimeout(this.timers.reconnect);
        this.timers.reconnect = undefined;
        if (this.ws || this.stopped || this.overflowed)
            return;
        this.setState(this.welcome ? 'reconnecting' : 'connecting');
        let ws;
        try {
            ws = new this.Ws(withToken(this.url, this.opts.token));
        }
        catch (err) {
            this.scheduleReconnect();
            return;
        }
        this.ws = ws;
        ws.onmessage = (ev) => {
            if (ws !== this.ws)
                return;
            this.lastMessageAt = Date.now();
            if (typeof ev.data !== 'string')
                return;
            let msg;
            try {
                msg = JSON.parse(ev.data);
            }
            catch {
                return;
            }
            if (msg && typeof msg === 'object')
                this.handle(msg);
        };
        ws.onclose = (ev) => {
            if (ws !== this.ws)
                return;
            this.drop();
            this.onClosed(ev.code, ev.reason);
        };
        ws.onerror = () => { };
    }
    drop() {
        const ws = this.ws;
        if (ws) {
            ws.onmessage = null;
            ws.onclose = null;
            ws.onerror = null;
        }
        this.ws = null;
        clearInterval(this.timers.ping);
        clearInterval(this.timers.watchdog);
        // Requests die with their connection; subscriptions are re-sent after the reconnect.
        for (const p of this.pending.values()) {
            if (p.msg.op === 'subscribe' || p.msg.op === 'configure' || p.msg.op === 'unsubscribe') {
                p.resolve({ type: 'ack', op: p.msg.op, resent: true });
            }
            else {
                p.reject(new TickfanError('disconnected', 'connection lost before the reply'));
            }
        }
        this.pending.clear();
    }
    onClosed(code, reason) {
        if (code === 4001) {
            this.fail(new TickfanError('unauthorized', reason || 'missing or wrong token', { fatal: true }));
            return;
        }
        if (this.stopped) {
            this.setState('closed');
            return;
        }
        this.scheduleReconnect();
    }
    fail(err) {
        this.emit('error', err);
        this.push({ type: 'error', error: err });
        for (const w of this.connectWaiters)
            w.reject(err);
        this.connectWaiters = [];
        this.stopped = true;
        clearTimeout(this.timers.reconnect);
        this.setState('closed');
        this.wake?.();
    }
    scheduleReconnect() {
        if (this.stopped || this.overflowed)
            return;
        this.setState('reconnecting');
        clearTimeout(this.timers.reconnect);
        const base = Math.min(this.opts.backoffMaxMs, this.opts.backoffMinMs * 2 ** this.attempt);
        const delay = Math.round(base * (0.5 + Math.random()));
        this.attempt = Math.min(this.attempt + 1, 20);
        this.reconnectAttempts += 1;
        this.timers.reconnect = setTimeout(() => this.open(), delay);
    }
    // The server closes a client silent for 3 heartbeats, and a half-open TCP connection never
    // fires onclose: ping every heartbeat, and treat 3 silent heartbeats (+1 s) as dead.
    startKeepalive() {
        clearInterval(this.timers.ping);
        clearInterval(this.timers.watchdog);
        this.lastMessageAt = Date.now();
        this.timers.ping = setInterval(() => {
            this.request({ op: 'ping' }).catch(() => { });
        }, this.heartbeatMs);
        this.timers.watchdog = setInterval(() => {
            if (this.ws && Date.now() - this.lastMessageAt > this.heartbeatMs * 3 + 1000) {
                this.emit('error', new TickfanError('heartbeat_timeout', 'the server went silent; reconnecting'));
                this.dropConnection();
            }
        }, Math.min(this.heartbeatMs, 1000));
    }
    send(msg) {
        if (!this.ws || this.ws.readyState !== OPEN)
            return false;
        try {
            this.ws.send(JSON.stringify(msg));
            return true;
        }
        catch {
            return false;
        }
    }
    request(msg) {
        const id = this.nextId++;
        const full = { ...msg, id };
        return new Promise((resolve, reject) => {
            // Bounded: at most 1000 requests in flight; the oldest is failed to make room.
            if (this.pending.size >= 1000) {
                const [oldId, old] = this.pending.entries().next().value;
                this.pending.delete(oldId);
                old.reject(new TickfanError('too_many_requests', 'too many requests in flight'));
            }
            this.pending.set(id, { msg: full, resolve, reject, retries: 0 });
            if (!this.send(full)) {
                // Not connected: subscriptions are sent with the next welcome anyway.
                this.pending.delete(id);
                if (msg.op === 'subscribe' || msg.op === 'configure' || msg.op === 'unsubscribe') {
                    resolve({ type: 'ack', op: msg.op, queued: true });
                }
                else {
                    reject(new TickfanError('disconnected', 'not connected'));
                }
            }
        });
    }
    // ------------------------------------------------------------ messages
    handle(msg) {
        this.emit('message', msg);
        switch (msg.type) {
            case 'welcome': return this.onWelcome(msg);
            case 'ack':
            case 'pong':
            case 'symbols': {
                const p = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
                if (p) {
                    this.pending.delete(msg.id);
                    p.resolve(msg);
                }
                if (msg.type === 'ack')
                    this.emit('ack', msg);
                return;
            }
            case 'snapshot': return this.onSnapshot(msg);
            case 'tick':
                this.deliver(msg, false);
                return;
            case 'batch':
                for (const t of Array.isArray(msg.ticks) ? msg.ticks : [])
                    if (!this.deliver(t, false))
                        return;
                return;
            case 'mode':
                this.emit('mode', { mode: msg.mode, reason: msg.reason });
                return;
            case 'error': return this.onError(msg);
            default: return; // heartbeat and anything newer
        }
    }
    onWelcome(w) {
        if (this.welcome)
            this.reconnects += 1;
        this.welcome = w;
        this.attempt = 0;
        this.heartbeatMs = typeof w.heartbeat_ms === 'number' && w.heartbeat_ms >= 100 ? w.heartbeat_ms : 15000;
        if (this.epoch !== null && w.epoch !== this.epoch) {
            // The store was reset: old seqs mean nothing now. Start each symbol from its history.
            const ev = { previous: this.epoch, epoch: w.epoch };
            this.epoch = w.epoch;
            this.lastSeq.clear();
            this.baseline.clear();
            this.emit('epoch', ev);
            this.push({ type: 'epoch', epoch: ev });
        }
        this.epoch = w.epoch;
        this.setState('connected');
        this.emit('welcome', w);
        this.startKeepalive();
        if (this.symbols.size)
            this.resubscribe();
        for (const c of this.connectWaiters)
            c.resolve();
        this.connectWaiters = [];
    }
    resubscribe() {
        const symbols = [...this.symbols];
        const msg = { op: 'subscribe', symbols, ...this.sub };
        const since = this.resumePoints(symbols) ?? {};
        // A symbol with no seq at all (nothing delivered, no baseline, e.g. after an epoch change)
        // resumes from 0: everything the new store holds for it.
        for (const s of symbols)
            if (s !== '*' && !(s in since))
                since[s] = 0;
        if (Object.keys(since).length)
            msg.since_seq = since;
        this.request(msg).catch(() => { });
    }
    resumePoints(symbols) {
        const wildcard = symbols.includes('*');
        const since = {};
        let any = false;
        const consider = (sym) => {
            const seq = this.lastSeq.get(sym) ?? this.baseline.get(sym);
            if (seq !== undefined) {
                since[sym] = seq;
                any = true;
            }
        };
        if (wildcard) {
            for (const sym of new Set([...this.lastSeq.keys(), ...this.baseline.keys()]))
                consider(sym);
        }
        else {
            for (const sym of symbols)
                consider(sym);
        }
        return any ? since : null;
    }
    onSnapshot(msg) {
        const symbol = msg.symbol;
        const ticks = Array.isArray(msg.ticks) ? msg.ticks : [];
        this.historyFor.delete(symbol);
        if (msg.gap === true) {
            const gap = {
                symbol,
                lastSeq: this.lastSeq.get(symbol) ?? this.baseline.get(symbol) ?? 0,
                nextSeq: ticks.length ? ticks[0].seq : null,
                reason: 'history',
            };
            this.gapArmed.add(symbol);
            this.emit('gap', gap);
            if (!this.push({ type: 'gap', gap }))
                return;
        }
        for (const t of ticks) {
            if (t.symbol === undefined)
                t.symbol = symbol;
            if (!this.deliver(t, true))
                return;
        }
    }
    /** Delivers one tick unless it is at or below the symbol's last seq. */
    deliver(t, snapshot) {
        if (!t || typeof t.symbol !== 'string' || typeof t.seq !== 'number')
            return true;
        const last = this.lastSeq.get(t.symbol);
        if (last !== undefined && t.seq <= last) {
            this.duplicates += 1;
            return true;
        }
        const before = last ?? this.baseline.get(t.symbol);
        const filtered = (this.sub.min_quality ?? 0) > 0 || (this.sub.min_volume ?? 0) > 0;
        const holeExplained = this.gapArmed.delete(t.symbol) || filtered || this.sub.mode === 'throttled' || this.sub.mode === 'smart';
        if (!holeExplained && before !== undefined && t.seq > before + 1 + (t.conflated ?? 0)) {
            const gap = { symbol: t.symbol, lastSeq: before, nextSeq: t.seq, reason: 'seq_hole' };
            this.emit('gap', gap);
            if (!this.push({ type: 'gap', gap }))
                return false;
        }
        if (!this.push({ type: 'tick', tick: t, snapshot }))
            return false;
        this.lastSeq.set(t.symbol, t.seq);
        this.baseline.delete(t.symbol);
        this.emit('tick', t, snapshot);
        return true;
    }
    onError(msg) {
        const p = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
        if (msg.code === 'rate_limited' && p && p.retries < 5) {
            // Our own request was refused for speed: send it again once allowed (same connection).
            p.retries += 1;
            const ws = this.ws;
            setTimeout(() => { if (this.ws === ws)
                this.send(p.msg); }, Math.min(msg.retry_after_ms ?? 1000, 10000));
            return;
        }
        const fatal = msg.code === 'unauthorized' || msg.code === 'token_expired' || msg.code === 'forbidden';
        const err = new TickfanError(msg.code, msg.message ?? msg.code, { retryAfterMs: msg.retry_after_ms, fatal: false });
        if (p) {
            this.pending.delete(msg.id);
            p.reject(err);
        }
        // slow_consumer is followed by close 4008: we resume from there by ourselves.
        this.emit('error', err);
        if (!fatal)
            this.push({ type: 'error', error: err });
    }
}
/**
 * A producer on `/ingest`. `publish()` calls are sent one after another (acks come in frame
 * order); each resolves with its merged ack after every tick was placed (accepted, duplicate or
 * rejected), resending exactly the refused ones after the server's `retry_after_ms`.
 */
export class Producer {
    constructor(url, opts = {}) {
        this.ws = null;
        this.opening = null;
        this.queue = Promise.resolve();
        this.inbox = [];
        this.waiter = null;
        this.closedWith = null;
        this.url = url;
        this.opts = opts;
        this.Ws = pickWebSocket(opts.WebSocket);
    }
    /** Publishes ticks; resolves with the ack over all attempts (`resent` counts resends). */
    publish(ticks) {
        const run = this.queue.then(() => this.publishNow(ticks));
        this.queue = run.catch(() => undefined);
        return run;
    }
    /** Closes the socket. */
    close() {
        try {
            this.ws?.close(1000, 'bye');
        }
        catch { /* gone */ }
        this.ws = null;
    }
    async publishNow(ticks) {
        const total = { type: 'ingest_ack', accepted: 0, duplicates: 0, rejected: [], resent: 0, attempts: 0 };
        let indices = ticks.map((_, i) => i);
        let delay = 0;
        const maxAttempts = this.opts.maxAttempts ?? 50;
        while (indices.length) {
            if (total.attempts >= maxAttempts) {
                throw new TickfanError('backpressure', `${indices.length} tick(s) still refused after ${maxAttempts} attempts`);
            }
            if (delay)
                await new Promise((r) => setTimeout(r, delay));
            const ws = await this.socket();
            total.attempts += 1;
            if (total.attempts > 1)
                total.resent += indices.length;
            ws.send(JSON.stringify(indices.map((i) => ticks[i])));
            const ack = await this.next();
            if (ack.type !== 'ingest_ack')
                throw new TickfanError(ack.code ?? 'protocol', ack.message ?? 'expected an ingest_ack');
            total.accepted += ack.accepted;
            total.duplicates += ack.duplicates;
            for (const r of ack.rejected)
                total.rejected.push({ ...r, index: indices[r.index] });
            const rejectedCount = ack.rejected_total ?? ack.rejected.length;
            if (ack.rejected_truncated) {
                total.rejected_truncated = true;
            }
            total.rejected_total = (total.rejected_total ?? 0) + rejectedCount;
            const placed = ack.accepted + ack.duplicates + rejectedCount;
            if (placed >= indices.length)
                break;
            // Some were refused: the backpressure error follows this ack and lists exactly which.
            const bp = await this.next();
            if (bp.type !== 'error' || bp.code !== 'backpressure' || !Array.isArray(bp.refused_indices)) {
                throw new TickfanError(bp.code ?? 'protocol', bp.message ?? 'expected a backpressure error');
            }
            indices = bp.refused_indices.map((i) => indices[i]);
            // The server's delay while ticks get through; doubling while none does.
            const retry = bp.retry_after_ms ?? 100;
            delay = placed > 0 ? retry : Math.min(Math.max(retry, delay * 2), 5000);
        }
        total.rejected.sort((a, b) => a.index - b.index);
        if (!total.rejected_truncated)
            delete total.rejected_truncated;
        return total;
    }
    socket() {
        if (this.ws && this.ws.readyState === OPEN)
            return Promise.resolve(this.ws);
        if (this.opening)
            return this.opening;
        this.closedWith = null;
        this.inbox = [];
        this.opening = new Promise((resolve, reject) => {
            const ws = new this.Ws(withToken(this.url, this.opts.token));
            ws.onopen = () => {
                this.ws = ws;
                this.opening = null;
                resolve(ws);
            };
            ws.onmessage = (ev) => {
                if (typeof ev.data !== 'string')
                    return;
                let m;
                try {
                    m = JSON.parse(ev.data);
                }
                catch {
                    return;
                }
                if (this.waiter) {
                    const w = this.waiter;
                    this.waiter = null;
                    w(m);
                }
                else if (this.inbox.length < 1024) {
                    this.inbox.push(m);
                }
            };
            ws.onclose = (ev) => {
                const err = new TickfanError(ev.code === 4001 ? 'unauthorized' : 'disconnected', `ingest connection closed (${ev.code})`);
                this.closedWith = err;
                if (this.ws === ws)
                    this.ws = null;
                if (this.opening) {
                    this.opening = null;
                    reject(err);
                }
                if (this.waiter) {
                    const w = this.waiter;
                    this.waiter = null;
                    w({ type: 'error', code: err.code, message: err.message });
                }
            };
            ws.onerror = () => { };
        });
        return this.opening;
    }
    next() {
        const m = this.inbox.shift();
        if (m)
            return Promise.resolve(m);
        if (this.closedWith)
            return Promise.resolve({ type: 'error', code: this.closedWith.code, message: this.closedWith.message });
        return new Promise((r) => (this.waiter = r));
    }
}
/** `new TickfanClient(url, opts)` then `connect()`: resolves once the welcome arrived. */
export async function connect(url, opts = {}) {
    const c = new TickfanClient(url, opts);
    await c.connect();
    return c;
}
