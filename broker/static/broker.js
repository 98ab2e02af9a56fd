// broker.js: the browser client of broker. An ES module with no dependencies and no build step.
//
//   import { subscribe, publish } from "/static/broker.js";
//   const sub = subscribe("chat.*", {
//     transport: "sse",                       // "sse" (EventSource) | "ws" (WebSocket) | "ndjson" (fetch)
//     onEvent: (e) => console.log(e.seq, e.topic, e.data),
//     onGap: (g) => console.warn("missed", g.from_seq, g.to_seq, g.topic),
//     onStatus: (status) => console.log(status), // connecting | open | reconnecting | failed | closed
//   });
//   await sub.ready;                            // the broker holds it: what follows arrives
//   await publish("chat.lobby", { text: "hi" }); // -> { seq: 42, duplicate: false }
//   sub.close();
//
// Every event is handed over once, in seq order: a reconnect resumes from the last seq seen (on any
// transport, to any node), and anything at or below that seq is dropped as a duplicate. What the
// broker no longer holds is reported through onGap, never silently skipped. The wire protocol is
// docs/protocol.md.

const DEFAULTS = {
  transport: "sse",
  initialDelayMs: 250, // reconnect backoff: a random delay in [0, min(maxDelayMs, initial * 2^n)]
  maxDelayMs: 15000,
  idleTimeoutMs: 45000, // a connection attempt, or a WebSocket or NDJSON stream, silent this long
  //                       is replaced (the broker's heartbeat comes after 15 s of silence)
};
const TRANSPORTS = new Set(["sse", "ws", "ndjson"]);
const WS_FATAL_CLOSE_CODES = new Set([1002, 1003]); // no usable subprotocol, wrong frame type
const TOPIC_GAPS_KEPT = 64;

/** An error answer of the broker: `problem` is its RFC 9457 document (`problem.type` ends with the
 * slug, e.g. `bad-topic`), `status` the HTTP status (0 for a WebSocket error frame). */
export class BrokerError extends Error {
  constructor(problem, status = 0) {
    super(problem?.detail ?? problem?.message ?? problem?.title ?? `HTTP ${status}`);
    this.name = "BrokerError";
    this.problem = problem ?? {};
    this.status = status;
    this.code = slug(this.problem) ?? (status ? `http-${status}` : "error");
  }
}

function slug(problem) {
  if (typeof problem?.code === "string") return problem.code; // a WebSocket error frame
  const type = problem?.type;
  return typeof type === "string" ? type.slice(type.lastIndexOf(":") + 1) : undefined;
}

/** The broker's base URL, ending with "/": `url` (absolute, or relative to the page) or the page's
 * own origin. */
function baseUrl(url) {
  const base = new URL(url ?? "/", globalThis.location?.href);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  base.search = "";
  base.hash = "";
  return base;
}

function parsePosition(position) {
  // "<epoch>:<seq>" or "<seq>" -> {epoch, seq}
  const text = String(position);
  const colon = text.lastIndexOf(":");
  return colon < 0
    ? { epoch: null, seq: Number(text) }
    : { epoch: text.slice(0, colon), seq: Number(text.slice(colon + 1)) };
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/**
 * Publish one event over HTTP. `data`: a string (stored as text/plain), bytes (an ArrayBuffer, a
 * typed array or a Blob: application/octet-stream) or any other JSON value (application/json).
 * Options: url (the broker; default: this page's origin), event (the SSE event name),
 * contentType, idempotencyKey, headers, signal. Resolves to {seq, duplicate}; rejects with a
 * BrokerError carrying the broker's problem document.
 */
export async function publish(topic, data, options = {}) {
  const target = new URL(`v1/topics/${encodeURIComponent(topic)}`, baseUrl(options.url));
  if (options.event !== undefined) target.searchParams.set("event", options.event);
  let body = data;
  let contentType = "application/json";
  if (typeof data === "string") contentType = "text/plain; charset=utf-8";
  else if (data instanceof Blob) contentType = data.type || "application/octet-stream";
  else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
    contentType = "application/octet-stream";
  } else body = JSON.stringify(data);
  const headers = { "Content-Type": options.contentType ?? contentType, ...options.headers };
  if (options.idempotencyKey !== undefined) headers["Idempotency-Key"] = options.idempotencyKey;
  const response = await fetch(target, {
    method: "POST",
    body,
    headers,
    signal: options.signal,
    credentials: options.credentials,
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) throw new BrokerError(answer, response.status);
  return { seq: answer.seq, duplicate: answer.duplicate === true };
}

/**
 * Subscribe to topics or patterns (a string or an array of them). Options:
 * - transport: "sse" (default), "ws" or "ndjson"
 * - url: the broker (default: this page's origin)
 * - fromSeq: where to start: "latest" (default), "earliest", a seq, or "<epoch>:<seq>"
 * - onEvent(event): {seq, epoch, topic, time, event, data, id}; see docs/protocol.md for data
 * - onGap(gap): {from_seq, to_seq, topic?}: events in that range may be missing (only of `topic`
 *   when it is set)
 * - onReset({epoch}): the broker's log was replaced; events start again from seq 1
 * - onStatus(status, detail): connecting, open, reconnecting (detail.delayMs, detail.error),
 *   failed (detail.error: a BrokerError; no retry), closed
 * - onError(error): a BrokerError that ends the subscription (also given to onStatus "failed")
 * - events: SSE only: event names published with ?event= to listen for (EventSource hands over
 *   only the names it is told)
 * - headers, credentials: NDJSON only (fetch): e.g. {Authorization: "Bearer ..."}
 * - initialDelayMs, maxDelayMs, idleTimeoutMs: reconnect tuning
 * Returns a Subscription: close(), ready (a promise), position, status, stats.
 */
export function subscribe(topics, options = {}) {
  return new Subscription(typeof topics === "string" ? [topics] : [...topics], options);
}

export class Subscription {
  constructor(topics, options) {
    this.options = { ...DEFAULTS, ...options };
    this.topics = topics;
    this.transport = this.options.transport;
    if (!TRANSPORTS.has(this.transport)) {
      throw new TypeError(`transport must be sse, ws or ndjson, not ${this.transport}`);
    }
    if (topics.length === 0) throw new TypeError("subscribe to at least one topic or pattern");
    this.base = baseUrl(this.options.url);
    this.status = "idle";
    this.stats = { events: 0, duplicates: 0, gaps: 0, resets: 0, reconnects: 0 };
    this.epoch = null; // the log's incarnation, once known
    this.seq = null; // the last seq handed over (or the start position), once known
    this._start = undefined; // "earliest" | "latest", used until a position is known
    const from = this.options.fromSeq;
    if (from === "earliest" || from === "latest") this._start = from;
    else if (from !== undefined && from !== null) {
      ({ epoch: this.epoch, seq: this.seq } = parsePosition(from));
    }
    // events carry their topic on WS and NDJSON; on SSE only when there is one plain topic
    this._soleTopic = topics.length === 1 && !/[*>]/.test(topics[0]) ? topics[0] : undefined;
    this._closed = false;
    this._attempt = 0;
    this._everOpened = false;
    this._timer = null; // a pending reconnect
    this._idle = null;
    this._topicGaps = [];
    /** Resolves once the broker holds the subscription (its start position is fixed): whatever
     * is published from then on arrives. Rejects if it fails or is closed before that. */
    this.ready = new Promise((resolve, reject) => {
      this._ready = { resolve, reject };
    });
    this.ready.catch(() => {}); // awaiting it is optional: no unhandled rejection
    this._onOnline = () => this._retryNow();
    globalThis.addEventListener?.("online", this._onOnline);
    // handlers may refer to the returned subscription: start after subscribe() has returned
    queueMicrotask(() => this._connect());
  }

  /** "<epoch>:<seq>" of the last event (or gap) handed over: where a reconnect resumes. */
  get position() {
    if (this.seq === null) return null;
    return this.epoch ? `${this.epoch}:${this.seq}` : String(this.seq);
  }

  close() {
    if (this._closed) return;
    this._closed = true;
    this._teardown();
    globalThis.removeEventListener?.("online", this._onOnline);
    this._ready.reject(new Error("closed before it was open"));
    this._setStatus("closed");
  }

  // -- connection lifecycle (one connection at a time) --

  _connect() {
    if (this._closed) return;
    this._timer = null;
    this._setStatus(this._everOpened ? "reconnecting" : "connecting");
    if (this.transport === "sse") this._openSse();
    else if (this.transport === "ws") this._openWs();
    else this._openNdjson();
  }

  _opened() {
    this._attempt = 0;
    if (this._everOpened) this.stats.reconnects++;
    this._everOpened = true;
    this._ready.resolve();
    this._setStatus("open");
  }

  _teardown() {
    clearTimeout(this._timer);
    clearTimeout(this._idle);
    this._timer = this._idle = null;
    if (this._es) this._es.close();
    if (this._ws) {
      const ws = this._ws;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState <= WebSocket.OPEN) ws.close(1000);
    }
    if (this._abort) this._abort.abort();
    this._es = this._ws = this._abort = null;
  }

  /** Full-jitter exponential backoff, capped. */
  _retry(error) {
    if (this._closed) return;
    this._teardown();
    const ceiling = Math.min(this.options.maxDelayMs, this.options.initialDelayMs * 2 ** this._attempt);
    const delayMs = Math.round(Math.random() * ceiling);
    this._attempt++;
    this._setStatus("reconnecting", { delayMs, attempt: this._attempt, error });
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  _retryNow() {
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._connect();
    }
  }

  _fail(error) {
    if (this._closed) return;
    this._teardown();
    this._closed = true;
    globalThis.removeEventListener?.("online", this._onOnline);
    this._ready.reject(error);
    this._setStatus("failed", { error });
    this.options.onError?.(error);
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this.options.onStatus?.(status, { ...detail, reconnects: this.stats.reconnects });
  }

  /** A connection attempt that has not answered, or (WebSocket, NDJSON) a connection that has
   * said nothing, for idleTimeoutMs is presumed dead: a laptop that slept, a NAT that forgot us,
   * a pooled keep-alive connection that died with them. The broker's heartbeats keep a live one
   * talking. (An open EventSource cannot be watched: heartbeats are comments, which it hides.) */
  _alive() {
    clearTimeout(this._idle);
    this._idle = setTimeout(() => this._retry(new Error("no data or heartbeat")), this.options.idleTimeoutMs);
  }

  _query() {
    const query = new URLSearchParams();
    for (const topic of this.topics) query.append("topic", topic);
    if (this.seq !== null) query.set("from_seq", this.position);
    else if (this._start) query.set("from", this._start);
    return query;
  }

  // -- what arrives, on every transport --

  _event(event) {
    if (event.epoch !== null && this.epoch !== null && event.epoch !== this.epoch) {
      this._reset({ epoch: event.epoch }); // a new log, and its reset was not seen
    }
    if (this.seq !== null && event.seq <= this.seq) {
      this.stats.duplicates++;
      return;
    }
    this.seq = event.seq;
    if (event.epoch !== null) this.epoch = event.epoch;
    this.stats.events++;
    this.options.onEvent?.(event);
  }

  _gap(gap) {
    if (gap.topic === undefined) {
      if (this.seq !== null && gap.to_seq <= this.seq) return; // heard already
      this.seq = gap.to_seq;
    } else {
      // a per-topic gap does not move the position, so a resume may repeat it
      const seen = this._topicGaps.some(
        (g) => g.topic === gap.topic && g.from_seq <= gap.from_seq && gap.to_seq <= g.to_seq,
      );
      if (seen) return;
      this._topicGaps.push(gap);
      if (this._topicGaps.length > TOPIC_GAPS_KEPT) this._topicGaps.shift();
    }
    this.stats.gaps++;
    this.options.onGap?.(gap);
  }

  _reset({ epoch }) {
    if (epoch === this.epoch) return; // on it already
    this.epoch = epoch;
    this.seq = 0;
    this._topicGaps = [];
    this.stats.resets++;
    this.options.onReset?.({ epoch });
  }

  _hello(position) {
    // where the broker starts this stream: adopted when we had no position yet
    const { epoch, seq } = parsePosition(position);
    if (this.seq === null) {
      this.seq = seq;
      this.epoch = epoch;
    } else if (this.epoch === null) this.epoch = epoch;
  }

  _frame(frame) {
    // an NDJSON line or a WebSocket frame (they share their shapes)
    switch (frame.type) {
      case undefined:
      case "event":
        this._event({
          seq: frame.seq,
          epoch: null,
          id: this.epoch ? `${this.epoch}:${frame.seq}` : String(frame.seq),
          topic: frame.topic,
          time: frame.time,
          event: frame.event,
          data: "data_b64" in frame ? fromBase64(frame.data_b64) : frame.data,
        });
        break;
      case "gap": {
        const { from_seq, to_seq, topic } = frame;
        this._gap(topic === undefined ? { from_seq, to_seq } : { from_seq, to_seq, topic });
        break;
      }
      case "reset":
        this._reset({ epoch: frame.epoch });
        break;
      case "hello":
        this._hello(frame.position);
        this._opened();
        break;
      case "subscribed":
        this._hello(frame.position);
        this._opened();
        break;
      case "error":
        // only our subscribe can fail, and what it asks for is not going to change
        this._fail(new BrokerError(frame));
        break;
      default: // heartbeat, and whatever a newer broker adds
    }
  }

  // -- EventSource: the browser reconnects by itself and sends Last-Event-ID --

  _openSse() {
    const es = new EventSource(new URL(`v1/sse?${this._query()}`, this.base), {
      withCredentials: this.options.credentials === "include",
    });
    this._es = es;
    this._alive();
    const onEvent = (message) => {
      const { epoch, seq } = parsePosition(message.lastEventId);
      this._event({
        seq,
        epoch,
        id: message.lastEventId,
        topic: this._soleTopic,
        time: undefined,
        event: message.type === "message" ? undefined : message.type,
        data: message.data,
      });
    };
    let failedBefore = false;
    es.onopen = () => {
      failedBefore = false;
      clearTimeout(this._idle);
      this._opened();
    };
    es.onmessage = onEvent;
    for (const name of this.options.events ?? []) es.addEventListener(name, onEvent);
    es.addEventListener("gap", (message) => this._gap(JSON.parse(message.data)));
    es.addEventListener("reset", (message) => this._reset(JSON.parse(message.data)));
    es.onerror = () => {
      if (this._closed || this._es !== es) return;
      if (es.readyState === EventSource.CONNECTING && !failedBefore) {
        // the browser's own retry, with Last-Event-ID, after the broker's `retry:` (500 ms when
        // a node drains): one, and if that fails too, our backoff takes over (EventSource's
        // fixed interval would have every tab of a busy site knock at once, forever)
        failedBefore = true;
        this._alive();
        this._setStatus("reconnecting");
        return;
      }
      if (es.readyState === EventSource.CONNECTING) {
        this._retry(new Error("the event stream could not reconnect"));
        return;
      }
      // CLOSED: the browser gave up (an HTTP error status, or not an event stream). Ask the
      // broker why: a 4xx other than 408/429 is an answer that will not change.
      es.close();
      this._diagnose(es.url).then((error) => (error ? this._fail(error) : this._retry()));
    };
  }

  async _diagnose(url) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 10000);
    try {
      const response = await fetch(url, {
        headers: { Accept: "text/event-stream" },
        signal: abort.signal,
        credentials: this.options.credentials,
      });
      const fatal = response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status);
      if (!fatal) return null;
      return new BrokerError(await response.json().catch(() => null), response.status);
    } catch {
      return null; // unreachable: retry
    } finally {
      clearTimeout(timer);
      abort.abort(); // a 200 is a live stream: end it
    }
  }

  // -- WebSocket (broker.v1.json): our own reconnect --

  _openWs() {
    const url = new URL("v1/ws", this.base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, "broker.v1.json");
    this._ws = ws;
    this._alive();
    ws.onopen = () => {
      const op = { op: "subscribe", id: "s1", topics: this.topics };
      if (this.seq !== null) op.from_seq = this.position;
      else if (this._start) op.from = this._start;
      ws.send(JSON.stringify(op));
      this._alive();
    };
    ws.onmessage = (message) => {
      this._alive();
      this._frame(JSON.parse(message.data));
    };
    ws.onclose = (close) => {
      if (this._ws !== ws) return;
      if (WS_FATAL_CLOSE_CODES.has(close.code)) {
        this._fail(new BrokerError({ code: `ws-close-${close.code}`, message: close.reason }));
      } else {
        this._retry(new Error(`WebSocket closed: ${close.code} ${close.reason}`.trim()));
      }
    };
  }

  // -- fetch + NDJSON: headers of our own (a bearer token), our own reconnect --

  async _openNdjson() {
    const abort = new AbortController();
    this._abort = abort;
    const url = new URL(`v1/ndjson?${this._query()}`, this.base);
    let reader;
    this._alive();
    try {
      const response = await fetch(url, {
        headers: { Accept: "application/x-ndjson", ...this.options.headers },
        signal: abort.signal,
        credentials: this.options.credentials,
        cache: "no-store",
      });
      if (!response.ok) {
        const error = new BrokerError(await response.json().catch(() => null), response.status);
        const retry = response.status >= 500 || [408, 429].includes(response.status);
        return retry ? this._retry(error) : this._fail(error);
      }
      this._alive();
      reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this._alive();
        buffered += value;
        let end;
        while ((end = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, end).trim();
          buffered = buffered.slice(end + 1);
          if (line) this._frame(JSON.parse(line)); // an empty line is a heartbeat
          if (this._abort !== abort) return; // closed, failed or reconnecting meanwhile
        }
      }
      if (this._abort === abort) this._retry(new Error("the stream ended"));
    } catch (error) {
      if (this._abort === abort) this._retry(error);
    }
  }
}
