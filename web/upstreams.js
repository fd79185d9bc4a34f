// Upstream feeds panel (docs/feeds.md): polls /health every 2 s and shows each configured
// upstream (state, ticks received, last message, breaker trips, failovers) and the symbols
// that have no live source. Self-contained: it builds its own <section> inside <main> and
// stays hidden while the server has no [[feed.upstream]] blocks. Text only (textContent),
// never HTML from the server.
(function () {
  "use strict";
  const POLL_MS = 2000;
  const STATE_COLOURS = {
    connected: "#3fb950",
    connecting: "#d29922",
    half_open: "#d29922",
    open: "#f85149",
  };

  function el(tag, text, style) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = String(text);
    if (style) e.style.cssText = style;
    return e;
  }

  function ago(ms) {
    if (!ms) return "never";
    const s = Math.max(0, (Date.now() - ms) / 1000);
    return s < 60 ? s.toFixed(1) + " s ago" : Math.round(s / 60) + " min ago";
  }

  function build() {
    const section = el("section");
    section.className = "panel upstreams-panel";
    section.id = "upstreams";
    section.hidden = true;
    section.setAttribute("aria-labelledby", "upstreams-title");
    const title = el("h2", "Upstreams");
    title.id = "upstreams-title";
    section.appendChild(title);
    const missing = el("p", "", "margin:0.25rem 0;color:#f85149");
    missing.id = "upstreams-missing";
    section.appendChild(missing);
    const table = el("table", undefined, "width:100%;border-collapse:collapse;font-size:0.85em");
    const head = el("tr");
    for (const h of ["name", "kind", "state", "ticks", "last message", "trips", "failovers", "symbols"]) {
      head.appendChild(el("th", h, "text-align:left;padding:2px 6px"));
    }
    const thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    const body = el("tbody");
    body.id = "upstreams-rows";
    table.appendChild(body);
    section.appendChild(table);
    (document.querySelector("main") || document.body).appendChild(section);
    return { section, missing, body };
  }

  function render(ui, health) {
    const list = Array.isArray(health.upstreams) ? health.upstreams : [];
    ui.section.hidden = list.length === 0;
    if (list.length === 0) return;
    const without = health.symbols_without_source || [];
    ui.missing.textContent = without.length ? "no live source: " + without.join(", ") : "";
    ui.body.replaceChildren();
    for (const u of list) {
      const row = el("tr");
      row.dataset.upstream = u.name;
      row.dataset.state = u.state;
      row.appendChild(el("td", u.name + (u.backup_for ? " (backup for " + u.backup_for + ")" : ""), "padding:2px 6px"));
      row.appendChild(el("td", u.kind, "padding:2px 6px"));
      const state = el("td", u.state, "padding:2px 6px;font-weight:600;color:" + (STATE_COLOURS[u.state] || "inherit"));
      state.className = "upstream-state";
      row.appendChild(state);
      row.appendChild(el("td", u.ticks_received, "padding:2px 6px"));
      const last = el("td", ago(u.last_message_ms), "padding:2px 6px");
      if (u.last_error) last.title = u.last_error;
      row.appendChild(last);
      row.appendChild(el("td", u.breaker_trips, "padding:2px 6px"));
      row.appendChild(el("td", u.failovers, "padding:2px 6px"));
      row.appendChild(el("td", (u.symbols || []).join(", "), "padding:2px 6px"));
      ui.body.appendChild(row);
    }
  }

  function start() {
    const ui = build();
    async function poll() {
      try {
        // /health answers 503 (with the same body) while a symbol has no live source.
        const resp = await fetch("health", { cache: "no-store" });
        render(ui, await resp.json());
      } catch (_) {
        // The server is away; the main status badge says so. Try again next round.
      }
      setTimeout(poll, POLL_MS);
    }
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
