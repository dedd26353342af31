// Browser client of the connection tracker's WebSocket
// (`GET /v1/sessions/{session_id}/ws`, see docs/api.md and docs/clients.md).
//
// A plain ES module, no dependencies, no build step. `TrackerSocket` opens
// the socket with a one-time ticket it asks the page for (the page gets it
// from its backend, or from `POST /v1/sessions/{id}/ws-ticket` with its
// token), tells the page what happens through DOM events, reconnects with
// exponential backoff and full jitter, and follows the page's lifecycle: it
// closes on `pagehide` (so the tracker removes the connection at once and the
// page may enter the back/forward cache) and reconnects on `pageshow` or when
// the page becomes visible again.

/**
 * What each close code means to a client: `retry` says whether opening the
 * socket again (with a new ticket) can help. The 44xx codes are refusals:
 * 4000 + the HTTP status of the same refusal.
 */
export const CLOSE_REASONS = Object.freeze({
  1000: Object.freeze({ name: "normal", retry: true, text: "closed by the server (no heartbeat within the window, or no longer tracked)" }),
  1001: Object.freeze({ name: "going_away", retry: true, text: "the server is shutting down" }),
  1006: Object.freeze({ name: "abnormal", retry: true, text: "the connection broke" }),
  1011: Object.freeze({ name: "internal", retry: true, text: "internal error of the server" }),
  1013: Object.freeze({ name: "try_again_later", retry: true, text: "the tracker's store is unavailable" }),
  4401: Object.freeze({ name: "unauthenticated", retry: false, text: "no valid credentials, or the ticket is used, expired or for another session" }),
  4403: Object.freeze({ name: "forbidden", retry: false, text: "not allowed on this session" }),
  4404: Object.freeze({ name: "session_not_found", retry: false, text: "the tracker does not know this session" }),
  4408: Object.freeze({ name: "max_duration", retry: false, text: "the session reached its maximum duration and is hibernated; connecting again wakes it" }),
  4409: Object.freeze({ name: "conflict", retry: false, text: "the session is terminated" }),
  4429: Object.freeze({ name: "limit", retry: true, text: "a connection limit was reached" }),
});

/** Codes that mean "the server refused this socket" rather than "it ended". */
const REFUSALS = new Set([4401, 4403, 4404, 4409, 4429, 1013, 1011]);

const DEFAULTS = Object.freeze({
  /** Base of the tracker's URL (http(s) or ws(s)); default: this page's origin. */
  url: undefined,
  /** First reconnection delay bound, ms; doubled per failed attempt. */
  initialDelayMs: 500,
  /** Largest reconnection delay bound, ms. */
  maxDelayMs: 30000,
  /** Close the socket on `pagehide` (the tracker removes the connection at once). */
  closeOnPageHide: true,
  /** Reconnect on `pageshow` after a `pagehide` (back/forward cache restore). */
  reconnectOnPageShow: true,
  /** Reconnect at once (no backoff wait) when the page becomes visible. */
  reconnectOnVisible: true,
});

/**
 * One tracked WebSocket of a page for one session.
 *
 * Events (all `CustomEvent`s, the data in `detail`):
 * - `registered` `{connection, session}`: the tracker registered the socket;
 * - `session` `{session, state}`: the session's state changed (`running`,
 *   `idle`, `hibernating`, `hibernated`, `waking`, `terminated`, ...);
 * - `hibernation_warning` `{at, reason}`: the session will be hibernated at `at`;
 * - `refused` `{code, reason, retry}`: the server refused the socket;
 * - `closed` `{code, reason, willReconnect, delayMs}`: the socket ended (also
 *   after `refused`); `code` 0 when no socket could be opened (ticket failure).
 */
export class TrackerSocket extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.sessionId the session's id
   * @param {(sessionId: string) => Promise<string | {ticket: string}>} options.getTicket
   *   asked for a fresh ticket before every attempt
   */
  constructor(options) {
    super();
    if (!options || typeof options.sessionId !== "string" || !options.sessionId) {
      throw new TypeError("TrackerSocket needs a sessionId");
    }
    if (typeof options.getTicket !== "function") {
      throw new TypeError("TrackerSocket needs a getTicket function");
    }
    this.options = { ...DEFAULTS, ...options };
    this.sessionId = options.sessionId;
    /** @type {"idle" | "connecting" | "open" | "waiting" | "hidden" | "refused" | "stopped"} */
    this.status = "idle";
    this.connection = null;
    this.session = null;
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    // Bumped on every open and stop: events of an older socket are ignored.
    this._generation = 0;
    this._onPageHide = () => this._pageHidden();
    this._onPageShow = () => this._pageShown();
    this._onVisibility = () => this._visibilityChanged();
  }

  /** Starts (or restarts after `stop` or a refusal). */
  start() {
    this._listen(true);
    this._attempt = 0;
    this._connect();
  }

  /** Closes the socket for good and stops listening to the page. */
  stop() {
    this._listen(false);
    this._closeSocket(1000, "stopped by the page");
    this.status = "stopped";
  }

  /** Whether a socket is open and registered. */
  get isOpen() {
    return this.status === "open";
  }

  _listen(on) {
    const target = globalThis;
    const method = on ? "addEventListener" : "removeEventListener";
    if (typeof target[method] !== "function") return;
    target[method]("pagehide", this._onPageHide);
    target[method]("pageshow", this._onPageShow);
    if (globalThis.document) {
      globalThis.document[method]("visibilitychange", this._onVisibility);
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _wsUrl(ticket) {
    const base = new URL(this.options.url ?? globalThis.location.origin, globalThis.location?.href);
    if (base.protocol === "http:") base.protocol = "ws:";
    if (base.protocol === "https:") base.protocol = "wss:";
    const prefix = base.pathname.replace(/\/+$/, "");
    base.pathname = `${prefix}/v1/sessions/${encodeURIComponent(this.sessionId)}/ws`;
    base.search = `?ticket=${encodeURIComponent(ticket)}`;
    return base.toString();
  }

  async _connect() {
    clearTimeout(this._timer);
    this._timer = null;
    this._closeSocket(1000, "reconnecting");
    const generation = ++this._generation;
    this.status = "connecting";
    let ticket;
    try {
      const got = await this.options.getTicket(this.sessionId);
      ticket = typeof got === "string" ? got : got?.ticket;
      if (!ticket) throw new Error("getTicket gave no ticket");
    } catch (e) {
      if (generation !== this._generation) return;
      this._ended(0, `could not get a ticket: ${e?.message ?? e}`, true);
      return;
    }
    if (generation !== this._generation) return;
    const ws = new WebSocket(this._wsUrl(ticket));
    this._ws = ws;
    let registered = false;
    ws.onmessage = (msg) => {
      if (generation !== this._generation) return;
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return;
      }
      switch (frame.type) {
        case "registered":
          registered = true;
          this._attempt = 0;
          this.status = "open";
          this.connection = frame.connection;
          this.session = frame.session;
          this._emit("registered", { connection: frame.connection, session: frame.session });
          break;
        case "session":
          this.session = frame.session;
          this._emit("session", { session: frame.session, state: frame.session?.state });
          break;
        case "hibernation_warning":
          this._emit("hibernation_warning", { at: frame.at, reason: frame.reason });
          break;
        default:
          break;
      }
    };
    ws.onclose = (ev) => {
      if (generation !== this._generation) return;
      this._ws = null;
      const known = CLOSE_REASONS[ev.code];
      const retry = known ? known.retry : true;
      if (!registered && REFUSALS.has(ev.code)) {
        this._emit("refused", { code: ev.code, reason: ev.reason || known?.text || "", retry });
      }
      this._ended(ev.code, ev.reason || known?.text || "", retry);
    };
  }

  /** After a socket (or an attempt) ended: reconnect later, or stop. */
  _ended(code, reason, retry) {
    this.connection = null;
    if (this.status === "hidden" || this.status === "stopped") {
      this._emit("closed", { code, reason, willReconnect: false, delayMs: null });
      return;
    }
    if (!retry) {
      this.status = "refused";
      this._emit("closed", { code, reason, willReconnect: false, delayMs: null });
      return;
    }
    const delayMs = this._nextDelay();
    this.status = "waiting";
    this._emit("closed", { code, reason, willReconnect: true, delayMs });
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  /** Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^n)). */
  _nextDelay() {
    const { initialDelayMs, maxDelayMs } = this.options;
    const bound = Math.min(maxDelayMs, initialDelayMs * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    return Math.floor(Math.random() * bound);
  }

  _closeSocket(code, reason) {
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    this._generation++;
    if (ws && ws.readyState <= 1) {
      try {
        ws.close(code, reason);
      } catch {
        // Already closing: nothing left to do.
      }
    }
  }

  _pageHidden() {
    if (!this.options.closeOnPageHide || this.status === "stopped") return;
    const wasOpen = this._ws !== null;
    this._closeSocket(1000, "page hidden");
    this.status = "hidden";
    this.connection = null;
    if (wasOpen) {
      this._emit("closed", { code: 1000, reason: "page hidden", willReconnect: false, delayMs: null });
    }
  }

  _pageShown() {
    if (this.status !== "hidden" || !this.options.reconnectOnPageShow) return;
    this._attempt = 0;
    this._connect();
  }

  _visibilityChanged() {
    if (!this.options.reconnectOnVisible || globalThis.document?.visibilityState !== "visible") {
      return;
    }
    // Waiting out a backoff while the user looks at the page helps nobody.
    if (this.status === "waiting" || this.status === "hidden") {
      this._attempt = 0;
      this._connect();
    }
  }
}
