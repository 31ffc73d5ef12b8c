// The dashboard's and the self-service page's only script (same origin, no library, no network beyond
// the relay). It asks for a key, keeps it in this tab's sessionStorage at most, sends it as
// `Authorization: Bearer` to the page's JSON endpoint, and renders with textContent; the SVG charts
// come drawn (and escaped) by the relay. Without the right key nothing is shown.
"use strict";
(function () {
  const body = document.body;
  const source = body.dataset.source;
  const storage = body.dataset.storage;
  const page = body.dataset.page;
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let memoryKey = "";  // when the browser refuses sessionStorage, the key lives only in this page

  function storedKey() {
    try { return sessionStorage.getItem(storage) || memoryKey; } catch (e) { return memoryKey; }
  }
  function setStatus(text) { $("status").textContent = text; }
  function showKeybox(show) {
    $("keybox").hidden = !show;
    $("forget").hidden = show || !storedKey();
  }
  function clear() {
    $("content").hidden = true;
    document.querySelectorAll("#content tbody, #charts, #accounts, #relay-quota, #slots, #key-meters, #today-meter")
      .forEach((el) => el.replaceChildren());
    document.querySelectorAll("#content .big, #warm").forEach((el) => { el.textContent = ""; });
  }
  function text(id, value) { const el = $(id); if (el) el.textContent = value === null || value === undefined ? "" : String(value); }
  function svg(container, markup) {
    const doc = new DOMParser().parseFromString(markup, "image/svg+xml");
    const el = doc.documentElement;
    if (el && el.nodeName === "svg") container.appendChild(document.importNode(el, true));
  }
  function row(tbody, cells, attrs) {
    const tr = document.createElement("tr");
    for (const [name, value] of Object.entries(attrs || {})) tr.setAttribute(name, value);
    for (const c of cells) {
      const td = document.createElement("td");
      const isNum = typeof c === "number";
      td.textContent = c === null || c === undefined ? "–" : String(c);
      if (isNum) td.className = "num";
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
    return tr;
  }
  const tbody = (id) => $(id).querySelector("tbody");
  const ms = (v) => (v === null || v === undefined ? null : v + " ms");
  // request records carry ISO-8601 strings (the original relay's stats schema); account resets are epoch seconds
  const utc = (ts) => new Date(typeof ts === "string" ? ts : ts * 1000).toISOString().replace("T", " ").slice(0, 19);

  function recent(rows) {
    const tb = tbody("recent");
    for (const r of rows) {
      row(tb, [utc(r.timestamp), r.key || "–", r.endpoint || "–", r.model, r.status, r.error, ms(r.ttft_ms),
        ms(r.response_time_ms), r.input_tokens, r.output_tokens], r.status === 200 ? {} : { class: "err" });
    }
  }
  function charts(all) {
    for (const c of all) svg($("charts"), c.svg);
  }

  function renderDashboard(d) {
    const t = d.usage.total;
    text("total-requests", t.requests);
    text("total-successful", t.successful);
    text("total-errors", t.errors);
    text("error-rate", (d.errors.error_rate * 100).toFixed(1) + " %");
    text("total-tokens", t.total_tokens);
    text("total-io", t.input_tokens + " / " + t.output_tokens);
    text("active-runs", d.live.active_runs + " / " + d.live.max_concurrent_runs);
    text("queued", d.live.queued + " (" + d.live.oldest_wait_s + " s)");
    charts(d.charts);
    for (const a of d.accounts) {
      svg($("accounts"), a.meter);
      for (const m of a.window_meters || []) svg($("accounts"), m);
      if (a.limited) {
        const p = document.createElement("p");
        p.textContent = a.name + ": limited until " + (a.resets_at ? utc(a.resets_at) : "?") + " UTC · " + a.reason;
        $("accounts").appendChild(p);
      }
    }
    svg($("relay-quota"), d.relay_quota.meter);
    svg($("slots"), d.live.meter);
    const w = d.live.warm;
    text("warm", "Warm CLI pool: " + w.processes + " processes, " + w.spares + " spare, " + w.hits + " hits, " +
      w.misses + " misses");
    const configured = {};
    for (const k of d.keys) { configured[k.name] = k; svg($("key-meters"), k.meter); }
    const names = Array.from(new Set([...d.keys.map((k) => k.name), ...Object.keys(d.usage.keys)]));
    for (const name of names) {
      const u = d.usage.keys[name] || { requests: 0, successful: 0, errors: 0, total_tokens: 0 };
      const k = configured[name] || {};
      row(tbody("per-key"), [name, u.requests, u.successful, u.errors, u.total_tokens, k.tokens_today, k.rpm,
        k.tokens_per_day, k.max_concurrent, k.running], { "data-key": name });
    }
    for (const [model, m] of Object.entries(d.usage.models)) {
      row(tbody("per-model"), [model, m.requests, m.input_tokens, m.output_tokens, m.cache_read_tokens,
        m.cache_creation_tokens, m.estimated_cost_usd], { "data-model": model });
    }
    const now = Date.now() / 1000;
    for (const r of d.live.runs) {
      row(tbody("runs"), [r.id, r.key || "–", r.model, r.endpoint, r.stream ? "yes" : "no",
        Math.round(now - r.started) + " s"]);
    }
    for (const [ep, e] of Object.entries(d.errors.by_endpoint)) {
      row(tbody("err-endpoint"), [ep, e.requests, e.errors, (e.error_rate * 100).toFixed(1) + " %"]);
    }
    for (const [status, n] of Object.entries(d.errors.by_status)) row(tbody("err-status"), [status, n]);
    for (const [what, n] of Object.entries(d.errors.rejections)) row(tbody("err-other"), ["refused: " + what, n]);
    for (const [what, n] of Object.entries(d.errors.cli_failures)) row(tbody("err-other"), ["CLI: " + what, n]);
    recent(d.recent);
  }

  function renderOwn(d) {
    const t = d.usage.total;
    text("key-name", d.key);
    text("total-requests", t.requests);
    text("total-successful", t.successful);
    text("total-errors", t.errors);
    text("total-tokens", t.total_tokens);
    text("tokens-today", d.today.tokens_used);
    text("tokens-left", d.today.tokens_left === null ? "unlimited" : d.today.tokens_left);
    text("running", d.today.running + (d.limits.max_concurrent ? " / " + d.limits.max_concurrent : ""));
    const lim = tbody("limits");
    row(lim, ["requests per minute", d.limits.rpm === null ? "no limit" : d.limits.rpm]);
    row(lim, ["tokens per day", d.limits.tokens_per_day === null ? "no limit" : d.limits.tokens_per_day]);
    row(lim, ["requests at once", d.limits.max_concurrent === null ? "no limit" : d.limits.max_concurrent]);
    row(lim, ["models", d.limits.models === null ? "all" : d.limits.models.join(", ")]);
    row(lim, ["tightest budget today", d.today.limited_by === null ? "none" : d.today.limited_by]);
    row(lim, ["resets in", d.today.resets_in_s === null ? "–" : Math.round(d.today.resets_in_s / 60) + " min"]);
    const ws = d.window_shares || { limit: null, windows: [] };  // api_keys[].window_share (pipeline/receipts.py)
    row(lim, ["share of each window", ws.limit === null ? "no limit" : ws.limit]);
    for (const w of ws.windows) {
      row(tbody("window-shares"), [w.account, w.window, w.share, w.limit === null ? "no limit" : w.left,
                                   w.window_utilization, w.resets_at || "–"]);
    }
    svg($("today-meter"), d.today.meter);
    charts(d.charts);
    for (const [day, u] of Object.entries(d.usage.days)) {
      row(tbody("per-day"), [day, u.requests, u.successful, u.errors, u.total_tokens], { "data-day": day });
    }
    recent(d.recent);
  }

  async function load() {
    const key = storedKey();
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    let resp;
    try {
      resp = await fetch(source, { headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
    } catch (e) {
      clear();
      setStatus("Cannot reach the relay.");
      return;
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    clear();
    if (!resp.ok || !data) {
      const msg = data && data.error ? data.error.message : "HTTP " + resp.status;
      setStatus((resp.status === 401 || resp.status === 403 ? "Not allowed (" + resp.status + "). " : "Error. ") + msg);
      body.dataset.state = "denied";
      showKeybox(true);
      return;
    }
    (page === "dashboard" ? renderDashboard : renderOwn)(data);
    $("content").hidden = false;
    body.dataset.state = "loaded";
    setStatus("Updated " + new Date().toISOString().slice(11, 19) + " UTC" +
      (page === "dashboard" ? " · refreshes every 15 s" : ""));
    showKeybox(false);
    if (page === "dashboard" && timer === null) timer = setInterval(load, 15000);
  }

  $("use-key").addEventListener("click", () => {
    const input = $("key");
    memoryKey = input.value.trim();
    try { sessionStorage.setItem(storage, memoryKey); memoryKey = ""; } catch (e) { /* kept in memoryKey */ }
    input.value = "";
    load();
  });
  $("key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("use-key").click(); });
  $("forget").addEventListener("click", () => {
    memoryKey = "";
    try { sessionStorage.removeItem(storage); } catch (e) { /* nothing kept */ }
    if (timer !== null) { clearInterval(timer); timer = null; }
    clear();
    setStatus("Key forgotten.");
    showKeybox(true);
  });
  load();
})();
