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
/** Delivery modes (docs/protocol.md "Delivery modes"). */
export type Mode = 'realtime' | 'throttled' | 'batch' | 'smart';
/** A delivered tick. Optional ingest fields are passed through unchanged. */
export interface Tick {
    type?: 'tick';
    symbol: string;
    seq: number;
    ts: number;
    price: number;
    volume: number;
    quality: number;
    t_in: number;
    bid?: number;
    ask?: number;
    open?: number;
    high?: number;
    low?: number;
    close?: number;
    id?: string;
    priority?: 'critical' | 'high' | 'normal' | 'low';
    /** Throttled mode: ticks skipped before this one. */
    conflated?: number;
    [extra: string]: unknown;
}
/** A tick to publish (docs/protocol.md "Tick fields"). `ts` is in milliseconds. */
export interface NewTick {
    symbol: string;
    ts: number;
    price: number;
    volume: number;
    bid?: number;
    ask?: number;
    open?: number;
    high?: number;
    low?: number;
    close?: number;
    id?: string;
    priority?: 'critical' | 'high' | 'normal' | 'low';
}
/** The server's `welcome`. */
export interface Welcome {
    type: 'welcome';
    protocol: number;
    server: string;
    session: string;
    epoch: number;
    heartbeat_ms: number;
    limits?: Record<string, unknown>;
}
/** A subscribe/unsubscribe/configure acknowledgement. */
export interface Ack {
    type: 'ack';
    id?: number;
    op: string;
    symbols?: string[];
    rejected?: {
        symbol: string;
        code: string;
    }[];
    last_seq?: Record<string, number>;
    mode?: Mode;
}
/** `{"type":"error",...}` from the server. */
export interface ServerErrorMessage {
    type: 'error';
    id?: number;
    code: string;
    message?: string;
    retry_after_ms?: number;
}
/** One rejected tick in an ingest ack. */
export interface Rejection {
    index: number;
    code: string;
    message: string;
}
/** The ingest ack; `publish()` merges the acks of every resend into one. */
export interface IngestAck {
    type: 'ingest_ack';
    accepted: number;
    duplicates: number;
    rejected: Rejection[];
    rejected_total?: number;
    rejected_truncated?: boolean;
    /** Ticks that were refused with backpressure and sent again (0 when none were). */
    resent?: number;
    /** Frames sent for this publish (1 when nothing was refused). */
    attempts?: number;
}
/** History no longer reaches back to where we resumed: ticks between were skipped. */
export interface GapEvent {
    symbol: string;
    /** The last seq we had delivered (0: none). */
    lastSeq: number;
    /** The first seq delivered after the hole (null when the snapshot was empty). */
    nextSeq: number | null;
    reason: 'history' | 'seq_hole';
}
/** The server's epoch changed: its store was reset and seqs started over. */
export interface EpochEvent {
    previous: number;
    epoch: number;
}
/** Connection state changes. */
export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'closed';
/** What `for await (const ev of client)` yields. */
export type ClientEvent = {
    type: 'tick';
    tick: Tick;
    snapshot: boolean;
} | {
    type: 'gap';
    gap: GapEvent;
} | {
    type: 'epoch';
    epoch: EpochEvent;
} | {
    type: 'error';
    error: TickfanError;
};
interface Listeners {
    tick: (tick: Tick, snapshot: boolean) => void;
    gap: (gap: GapEvent) => void;
    epoch: (ev: EpochEvent) => void;
    error: (err: TickfanError) => void;
    state: (state: ConnectionState) => void;
    welcome: (w: Welcome) => void;
    ack: (a: Ack) => void;
    mode: (m: {
        mode: Mode;
        reason?: string;
    }) => void;
    message: (m: Record<string, unknown>) => void;
}
/** Every error this library reports. `code` is the server's error code where there is one. */
export declare class TickfanError extends Error {
    readonly code: string;
    readonly retryAfterMs?: number;
    /** Whether the client gave up (no more reconnects). */
    readonly fatal: boolean;
    constructor(code: string, message: string, opts?: {
        retryAfterMs?: number;
        fatal?: boolean;
    });
}
/** The part of the WHATWG WebSocket this library uses (browsers, Node >= 22, `ws`). */
export interface WebSocketLike {
    readonly readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((ev: any) => void) | null;
    onmessage: ((ev: {
        data: any;
    }) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((ev: any) => void) | null;
}
/** A WebSocket constructor: `globalThis.WebSocket`, or `ws`'s `WebSocket` on Node 20. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;
/** Options of `TickfanClient`. */
export interface ClientOptions {
    /** Client token, sent as `?token=` (browsers cannot set headers on WebSocket). */
    token?: string;
    /** WebSocket implementation when there is no global one (Node 20: `ws`). */
    WebSocket?: WebSocketConstructor;
    /** First reconnect delay; doubles per failed attempt, with +-50 % jitter. Default 100 ms. */
    backoffMinMs?: number;
    /** Largest reconnect delay. Default 5000 ms. */
    backoffMaxMs?: number;
    /**
     * Bound of the buffer behind `for await`. When the consumer falls this far behind, the
     * client drops the connection itself (events already buffered stay), stops buffering, and
     * resumes with `since_seq` once the consumer has read half of it: nothing is lost, memory
     * stays bounded. Listeners (`on('tick')`) are not buffered. Default 10000 events.
     */
    maxBuffered?: number;
    /** Buffer events for `for await` from the start (else from the first iterator call). */
    iterate?: boolean;
}
/** Options of `subscribe()` (docs/protocol.md "Requests"). */
export interface SubscribeOptions {
    /** The last N stored ticks per symbol first (0-1000), as a snapshot. Default 0. */
    history?: number;
    mode?: Mode;
    interval_ms?: number;
    min_quality?: number;
    min_volume?: number;
}
/**
 * A self-healing `/ws` connection. Create it, add listeners with `on()`, `await connect()`,
 * `await subscribe(...)`; or iterate it with `for await`.
 */
export declare class TickfanClient {
    readonly url: string;
    /** Last seq delivered per symbol. */
    readonly lastSeq: Map<string, number>;
    /** The server's epoch, from the latest welcome. */
    epoch: number | null;
    state: ConnectionState;
    /** Successful reconnections after the first connection. */
    reconnects: number;
    /** Connection attempts after a disconnect (successful or not). */
    reconnectAttempts: number;
    /** Duplicates dropped at the resume seam. */
    duplicates: number;
    welcome: Welcome | null;
    private readonly opts;
    private readonly Ws;
    private ws;
    private stopped;
    private attempt;
    private timers;
    private lastMessageAt;
    private heartbeatMs;
    private nextId;
    private readonly pending;
    private readonly listeners;
    private symbols;
    private sub;
    private historyFor;
    private baseline;
    private gapArmed;
    private connectWaiters;
    private buffer;
    private overflowed;
    private iterStarted;
    private wake;
    constructor(url: string, opts?: ClientOptions);
    /** Adds a listener; returns a function that removes it. */
    on<K extends keyof Listeners>(event: K, fn: Listeners[K]): () => void;
    private emit;
    /** Opens the connection; resolves at the first welcome, rejects on a fatal error. */
    connect(): Promise<void>;
    /** Closes for good: no more reconnects; the async iterator ends. */
    close(): void;
    /**
     * Subscribes (adds to the subscribed set). Mode and filters are connection-wide on the
     * server: the latest subscribe sets them, and they are sent again after every reconnect.
     */
    subscribe(symbols: string[], opts?: SubscribeOptions): Promise<Ack>;
    /** Unsubscribes; after the ack no message for these symbols arrives. */
    unsubscribe(symbols: string[]): Promise<Ack>;
    /** Changes mode/filters for the whole connection (kept across reconnects). */
    configure(opts: Omit<SubscribeOptions, 'history'>): Promise<Ack>;
    /** Round trip to the server in ms. */
    ping(): Promise<number>;
    /** Drops the socket as if the network cut it (tests, or a user's "reconnect now"). */
    dropConnection(): void;
    /**
     * Yields ticks (snapshot first, then live), gaps, epoch changes and errors, in order.
     * Events are buffered from the first call on (or from construction with `iterate: true`).
     */
    [Symbol.asyncIterator](): AsyncGenerator<ClientEvent>;
    private iterate;
    private push;
    private iterating;
    private setState;
    private open;
    private drop;
    private onClosed;
    private fail;
    private scheduleReconnect;
    private startKeepalive;
    private send;
    private request;
    private handle;
    private onWelcome;
    private resubscribe;
    private resumePoints;
    private onSnapshot;
    /** Delivers one tick unless it is at or below the symbol's last seq. */
    private deliver;
    private onError;
}
/** Options of `Producer`. */
export interface ProducerOptions {
    /** Ingest token, sent as `?token=`. */
    token?: string;
    WebSocket?: WebSocketConstructor;
    /** Resends of refused ticks before `publish()` gives up with `backpressure`. Default 50. */
    maxAttempts?: number;
}
/**
 * A producer on `/ingest`. `publish()` calls are sent one after another (acks come in frame
 * order); each resolves with its merged ack after every tick was placed (accepted, duplicate or
 * rejected), resending exactly the refused ones after the server's `retry_after_ms`.
 */
export declare class Producer {
    readonly url: string;
    private readonly Ws;
    private readonly opts;
    private ws;
    private opening;
    private queue;
    private inbox;
    private waiter;
    private closedWith;
    constructor(url: string, opts?: ProducerOptions);
    /** Publishes ticks; resolves with the ack over all attempts (`resent` counts resends). */
    publish(ticks: NewTick[]): Promise<IngestAck>;
    /** Closes the socket. */
    close(): void;
    private publishNow;
    private socket;
    private next;
}
/** `new TickfanClient(url, opts)` then `connect()`: resolves once the welcome arrived. */
export declare function connect(url: string, opts?: ClientOptions): Promise<TickfanClient>;
export {};
