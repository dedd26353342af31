// The operator page: reads the tracker's JSON API with a bearer token the
// operator pastes, and redraws a few tables and one chart. No framework, no
// third-party code; every value reaches the DOM through textContent or an
// attribute, never as HTML. See docs/ui.md.
"use strict";

(function () {
  // The token lives in this tab only: sessionStorage dies with the tab and is
  // never sent anywhere by the browser on its own (a cookie would be).
  const TOKEN_KEY = "tracker.ui.token";
  const REFRESH_MS = 5000;
  const USAGE_REFRESH_MS = 60000;
  const USAGE_DAYS = 14;
  const PAGE_SIZE = 500;
  // Enough for an operator's overview; the API pages beyond it.
  const MAX_SESSIONS = 2000;
  const EVENTS_SHOWN = 25;
  const DAY_MS = 86400000;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let selected = null;
  let timer = null;
  let usageLoadedAt = 0;
  let generation = 0;

  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // Relative URLs: the page also works behind a proxy that adds a path prefix.
  async function api(path) {
    let response;
    try {
      response = await fetch(path, {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new ApiFailure(0, "network", "the tracker does not answer (" + e.message + ")");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const err = (body && body.error) || {};
      throw new ApiFailure(response.status, err.code || "http_" + response.status,
        err.message || "HTTP " + response.status);
    }
    return body;
  }

  function text(tag, value, className) {
    const el = document.createElement(tag);
    el.textContent = value === undefined || value === null ? "" : String(value);
    if (className) el.className = className;
    return el;
  }

  function fmtTime(iso) {
    if (!iso) return "";
    return iso.replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/Z$/, " UTC");
  }

  function timeCell(iso) {
    const td = text("td", fmtTime(iso));
    if (iso) td.title = iso;
    return td;
  }

  function setStatus(message, isError) {
    const el = $("status");
    el.textContent = message;
    el.classList.toggle("error", !!isError);
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // --- the token --------------------------------------------------------

  function useToken(value) {
    token = value.trim();
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
    }
    $("token").value = "";
    $("token").placeholder = token ? "token set (kept in this tab)" : "paste a service or admin token";
    usageLoadedAt = 0;
    restart();
  }

  function forget() {
    useToken("");
    selected = null;
    $("main").hidden = true;
    setStatus("Token forgotten. Paste a token to start.", false);
  }

  // --- refresh loop -----------------------------------------------------

  function restart() {
    clearTimeout(timer);
    timer = null;
    generation += 1;
    if (token) refresh(generation);
  }

  function schedule(gen) {
    if (gen !== generation || !token) return;
    clearTimeout(timer);
    timer = setTimeout(() => refresh(gen), REFRESH_MS);
  }

  async function refresh(gen) {
    if (document.hidden) return; // resumed by visibilitychange
    try {
      const [stats, sessions] = await Promise.all([api("v1/stats"), loadSessions()]);
      if (gen !== generation) return;
      $("main").hidden = false;
      renderStats(stats);
      renderSessions(sessions);
      await Promise.all([loadDetail(), loadEvents(), maybeLoadUsage()]);
      if (gen !== generation) return;
      setStatus("Updated " + new Date().toISOString().slice(11, 19) + " UTC; refreshes every "
        + REFRESH_MS / 1000 + " s.", false);
      schedule(gen);
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 401) {
        // A refused token will not get better by asking again.
        setStatus("The token was refused (" + e.message + "). Paste a valid one.", true);
        return;
      }
      if (e.status === 403) {
        setStatus("This token may not read the overview: it needs the service or admin role.", true);
        return;
      }
      setStatus("Could not refresh: " + e.message + ". Retrying.", true);
      schedule(gen);
    }
  }

  // --- totals and sessions ----------------------------------------------

  function renderStats(stats) {
    $("total-connections").textContent = stats.total_connections;
    $("total-sessions").textContent = stats.sessions_with_connections;
    $("total-shared").textContent = stats.shared_sessions;
    const states = Object.entries(stats.sessions_by_state || {})
      .filter(([, n]) => n > 0)
      .map(([state, n]) => state + " " + n);
    $("total-states").textContent = states.length ? states.join(", ") : "none";
  }

  async function loadSessions() {
    const all = [];
    let cursor = null;
    let truncated = false;
    do {
      const query = "v1/sessions?limit=" + PAGE_SIZE
        + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
      const page = await api(query);
      all.push(...page.sessions);
      cursor = page.next_cursor;
      if (cursor && all.length >= MAX_SESSIONS) {
        truncated = true;
        break;
      }
    } while (cursor);
    all.sort((a, b) => (a.session_id < b.session_id ? -1 : a.session_id > b.session_id ? 1 : 0));
    return { sessions: all.slice(0, MAX_SESSIONS), truncated };
  }

  function renderSessions({ sessions, truncated }) {
    $("sessions-count").textContent = "(" + sessions.length + (truncated ? "+, first " + MAX_SESSIONS + " shown" : "") + ")";
    $("sessions-empty").hidden = sessions.length > 0;
    if (selected && !sessions.some((s) => s.session_id === selected)) selected = null;
    replaceRows($("sessions").tBodies[0], sessions.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.session = s.session_id;
      if (s.session_id === selected) tr.classList.add("selected");
      tr.append(
        text("td", s.session_id, "id"),
        text("td", s.state, "state state-" + s.state),
        text("td", s.owner || "", "owner"),
        text("td", s.active_connections, "num connections"),
        text("td", s.distinct_users, "num"),
        timeCell(s.idle_since),
        timeCell(s.hibernates_at),
      );
      tr.addEventListener("click", () => select(s.session_id));
      return tr;
    }));
  }

  function select(id) {
    selected = selected === id ? null : id;
    for (const tr of $("sessions").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.dataset.session === selected);
    }
    loadDetail().catch((e) => setStatus("Could not read the session: " + e.message, true));
  }

  async function loadDetail() {
    if (!selected) {
      $("detail").hidden = true;
      return;
    }
    const id = selected;
    const path = "v1/sessions/" + encodeURIComponent(id);
    const [body, why] = await Promise.all([api(path + "/connections"), api(path + "/explain")]);
    if (id !== selected) return;
    replaceRows($("reasons"), why.reasons.map((r) => text("li", r.message, "reason reason-" + r.code)));
    $("detail").hidden = false;
    $("detail-id").textContent = id;
    $("connections-empty").hidden = body.connections.length > 0;
    const connections = body.connections.slice().sort((a, b) =>
      (a.connected_at + a.user_id < b.connected_at + b.user_id ? -1 : 1));
    replaceRows($("connections").tBodies[0], connections.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.connection = c.connection_id;
      tr.append(text("td", c.user_id), text("td", c.protocol), text("td", c.client_ip || ""),
        timeCell(c.connected_at), timeCell(c.last_heartbeat));
      return tr;
    }));
  }

  // --- events -----------------------------------------------------------

  async function loadEvents() {
    const note = $("events-note");
    let body;
    try {
      body = await api("v1/events?limit=" + EVENTS_SHOWN);
    } catch (e) {
      if (e.status === 404 || e.status === 503) {
        note.textContent = "Events not available: " + e.message + ".";
        note.hidden = false;
        replaceRows($("events").tBodies[0], []);
        return;
      }
      throw e;
    }
    note.textContent = "No hibernation or wake recorded yet.";
    note.hidden = body.events.length > 0;
    replaceRows($("events").tBodies[0], body.events.map((ev) => {
      const tr = document.createElement("tr");
      tr.dataset.event = ev.event_type || "";
      tr.append(timeCell(ev.occurred_at), text("td", ev.session_id), text("td", ev.event_type, "event"),
        text("td", ev.reason));
      return tr;
    }));
  }

  // --- usage chart ------------------------------------------------------

  async function maybeLoadUsage() {
    if (Date.now() - usageLoadedAt < USAGE_REFRESH_MS) return;
    const note = $("usage-note");
    // One request per UTC day: connected time is clipped to each range.
    const today = Math.floor(Date.now() / DAY_MS) * DAY_MS;
    const days = [];
    for (let i = USAGE_DAYS - 1; i >= 0; i--) days.push(today - i * DAY_MS);
    let totals;
    try {
      totals = await Promise.all(days.map(async (start) => {
        const from = new Date(start).toISOString();
        const to = new Date(start + DAY_MS).toISOString();
        const body = await api("v1/usage?group_by=user&from=" + encodeURIComponent(from)
          + "&to=" + encodeURIComponent(to));
        const seconds = (body.rows || []).reduce((sum, r) => sum + (Number(r.connected_seconds) || 0), 0);
        return { day: from.slice(0, 10), hours: seconds / 3600, users: (body.rows || []).length };
      }));
    } catch (e) {
      $("usage").replaceChildren();
      if (e.status === 404 || e.status === 503 || e.status === 0) {
        note.textContent = "Usage not available: " + e.message + ".";
      } else if (e.status === 403) {
        note.textContent = "Usage not available to this token: " + e.message + ".";
      } else {
        note.textContent = "Usage could not be read: " + e.message + ".";
      }
      note.hidden = false;
      usageLoadedAt = Date.now();
      return;
    }
    note.hidden = true;
    drawUsage(totals);
    usageLoadedAt = Date.now();
  }

  function svg(tag, attrs, content) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (content !== undefined) el.textContent = content;
    return el;
  }

  function fmtHours(h) {
    return h >= 10 ? h.toFixed(0) : h >= 1 ? h.toFixed(1) : h > 0 ? h.toFixed(2) : "0";
  }

  function drawUsage(totals) {
    const width = 960, height = 240, left = 8, right = 8, top = 18, bottom = 34;
    const plotH = height - top - bottom;
    const slot = (width - left - right) / totals.length;
    const max = Math.max(...totals.map((t) => t.hours), 0);
    const chart = svg("svg", {
      viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": "Connected hours per day over the last " + totals.length + " days",
    });
    chart.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
    totals.forEach((t, i) => {
      const h = max > 0 ? (t.hours / max) * plotH : 0;
      const x = left + i * slot + slot * 0.15;
      const w = slot * 0.7;
      const bar = svg("rect", { class: "bar", x, y: top + plotH - h, width: w, height: h, "data-day": t.day,
        "data-hours": t.hours.toFixed(3) });
      bar.append(svg("title", {}, t.day + ": " + fmtHours(t.hours) + " h connected, " + t.users + " users"));
      chart.append(bar);
      if (t.hours > 0) {
        chart.append(svg("text", { class: "value", x: x + w / 2, y: top + plotH - h - 4, "text-anchor": "middle" },
          fmtHours(t.hours)));
      }
      chart.append(svg("text", { x: x + w / 2, y: height - bottom + 14, "text-anchor": "middle" }, t.day.slice(5)));
    });
    chart.append(svg("text", { x: left, y: height - 4 }, "hours connected, all users; peak day " + fmtHours(max) + " h"));
    $("usage").replaceChildren(chart);
  }

  // --- wiring -----------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      useToken($("token").value);
    });
    $("token-forget").addEventListener("click", forget);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) restart();
    });
    if (token) {
      $("token").placeholder = "token set (kept in this tab)";
      setStatus("Loading…", false);
      restart();
    }
  });
})();
