// The page's only script: polls /api/state once a second and fills the page in with
// textContent (never innerHTML: every value is shown as text); posts the controls with the
// session's CSRF token. Nothing is fetched from anywhere but this gateway.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  let days = 1;
  let limitsFilled = false;

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 90) return Math.max(0, Math.round(seconds)) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function text(el, value) { if (el) el.textContent = value; }

  async function post(url, body) {
    const resp = await fetch(url, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body || {})});
    let data = {};
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) throw new Error(data.error || ("HTTP " + resp.status));
    return data;
  }

  function render(s) {
    // the state may have been computed a few seconds before it was served: age from then
    const late = Math.max(0, (Date.parse(s.served) - Date.parse(s.now)) / 1000) || 0;
    text($("#connection"), "live · " + s.served.replace("T", " ").slice(0, 19) + " UTC");
    for (const room of Object.keys(s.rooms)) {
      const card = $('[data-room="' + room + '"]');
      const r = s.rooms[room];
      if (!card) continue;
      if (r) {
        text($('[data-field="temperature"]', card), r.temperature.toFixed(1));
        text($('[data-field="humidity"]', card), r.humidity.toFixed(1));
        text($('[data-field="co2"]', card), String(r.co2));
        text($('[data-field="age"]', card), ago(r.age_s + late) + (r.clock_held ? " (clock not synchronized yet)" : ""));
      }
      text($('[data-field="mode"]', card), s.mode[room] || "–");
    }
    const c = s.cloud;
    for (const sink of ["backend", "mqtt", "firebase"]) {
      const cell = $('[data-sink="' + sink + '"]');
      text(cell, {off: "off (not configured)", unknown: "unknown (worker not running)"}[c.sinks[sink]] || c.sinks[sink]);
      cell.className = "sink-" + c.sinks[sink];
    }
    text($("#last-sync"), c.last_sync ? c.last_sync.replace("T", " ").slice(0, 19) + " UTC" : "never");
    text($("#pending"), String(c.pending) + (c.clock_held ? " (" + c.clock_held + " held until the clock is synchronized)" : ""));
    text($("#oldest"), c.pending ? ago(c.oldest_pending_age_s + late).replace(" ago", " old") : "–");
    const lag = [];
    if (c.lag.backend !== null) lag.push("backend " + c.lag.backend);
    if (c.lag.firebase !== null) lag.push("Firebase " + c.lag.firebase);
    text($("#lag"), lag.length ? lag.join(", ") + " readings" : "–");
    const board = c.board ? (c.board.connected ? "board connected" : "board not connected") : "board unknown";
    text($("#processes"), "reader " + (c.reader_alive ? "running" : "not running") + ", worker " +
         (c.worker_alive ? "running" : "not running") + ", " + board);
    const h = s.health || {};
    const fig = [h.version ? "version " + h.version : null,
                 h.uptime_s !== null && h.uptime_s !== undefined ? "up " + ago(h.uptime_s).replace(" ago", "") : null,
                 h.cpu_temp_c !== null && h.cpu_temp_c !== undefined ? "CPU " + h.cpu_temp_c.toFixed(1) + " °C" : null,
                 h.cpu_pct !== null && h.cpu_pct !== undefined ? "load " + Math.round(h.cpu_pct) + " %" : null,
                 h.memory_used_pct !== null && h.memory_used_pct !== undefined ? "memory " + Math.round(h.memory_used_pct) + " %" : null,
                 h.disk_used_pct !== null && h.disk_used_pct !== undefined ? "disk " + Math.round(h.disk_used_pct) + " %" : null,
                 h.under_voltage ? "UNDER-VOLTAGE (check the power supply)" : null].filter(Boolean);
    text($("#health"), fig.length ? fig.join(", ") : "–");
    const d = c.drain;
    text($("#drain"), d.running ? "draining: " + d.rate + " readings/s, about " + d.eta_s + " s left"
         : (c.pending === 0 ? "all synced" : ""));

    for (const li of $$("[data-actuator]")) {
      const name = li.dataset.actuator;
      const a = s.actuators[name];
      const on = a && a.state === "ON";
      const btn = $("[data-switch]", li);
      btn.setAttribute("aria-checked", on ? "true" : "false");
      text($('[data-field="state"]', li), a ? a.state : "OFF");
      text($('[data-field="who"]', li), a ? "set by " + a.source + " " + a.since.replace("T", " ").slice(0, 19)
           : "not switched since the store began (the board starts with every relay off)");
      const cmd = s.commands.find(x => x.command === "set_actuator" && x.parameters.actuator === name);
      text($('[data-field="command"]', li), cmd ? cmd.parameters.state + ": " + cmd.status + (cmd.reason ? " (" + cmd.reason + ")" : "") : "");
    }

    fillAlerts($("#alerts-active"), s.alerts.active, "none");
    fillAlerts($("#alerts-cleared"), s.alerts.cleared, "none yet");
    if (!limitsFilled) {
      for (const input of $$("[data-limit]")) {
        const [room, key] = input.dataset.limit.split(".");
        const v = (s.thresholds[room] || {})[key];
        input.value = v === null || v === undefined ? "" : v;
      }
      limitsFilled = true;
    }
  }

  function fillAlerts(ul, alerts, empty) {
    ul.replaceChildren();
    if (!alerts.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = empty;
      ul.appendChild(li);
    }
    for (const a of alerts) {
      const li = document.createElement("li");
      li.className = "alert severity-" + String(a.severity).toLowerCase();
      const sev = document.createElement("strong");
      sev.textContent = a.severity;
      const msg = document.createElement("span");
      msg.textContent = " " + (a.room ? a.room + ": " : "") + a.message + " ";
      const when = document.createElement("span");
      when.className = "muted";
      when.textContent = a.at ? a.at.replace("T", " ").slice(0, 19) : "";
      li.append(sev, msg, when);
      ul.appendChild(li);
    }
  }

  async function poll() {
    try {
      const resp = await fetch("/api/state", {credentials: "same-origin", cache: "no-store"});
      if (resp.status === 403) { window.location = "/login"; return; }
      render(await resp.json());
    } catch (e) {
      text($("#connection"), "cannot reach the gateway: retrying");
    }
  }

  function refreshCharts() {
    const stamp = Date.now();
    for (const img of $$("img[data-chart]")) img.src = img.dataset.chart + "?days=" + days + "&t=" + stamp;
  }

  $("#sync-now").addEventListener("click", async () => {
    try {
      const r = await post("/api/sync");
      text($("#drain"), "sync enqueued (" + r.pending + " pending)");
    } catch (e) { text($("#drain"), "sync refused: " + e.message); }
  });
  $("#notify-test").addEventListener("click", async () => {
    try {
      const r = await post("/api/notify-test");
      text($("#notify-result"), "sent to the worker for " + r.urls + " URL(s): check your phone");
    } catch (e) { text($("#notify-result"), "not sent: " + e.message); }
  });
  for (const btn of $$("[data-switch]")) {
    btn.addEventListener("click", async () => {
      const li = btn.closest("[data-actuator]");
      const want = btn.getAttribute("aria-checked") === "true" ? "OFF" : "ON";
      text($('[data-field="command"]', li), want + ": sending…");
      try {
        const r = await post("/api/actuator", {actuator: btn.dataset.switch, state: want});
        text($('[data-field="command"]', li), want + ": " + r.status);
      } catch (e) { text($('[data-field="command"]', li), "refused: " + e.message); }
    });
  }
  for (const btn of $$("[data-set-mode]")) {
    btn.addEventListener("click", async () => {
      const room = btn.dataset.setMode;
      const mode = $('[data-mode-room="' + room + '"]').value;
      try { await post("/api/mode", {room: room, mode: mode}); poll(); }
      catch (e) { alert("mode refused: " + e.message); }
    });
  }
  $("#limits").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const thresholds = {};
    for (const input of $$("[data-limit]")) {
      if (input.value === "") continue;
      const [room, key] = input.dataset.limit.split(".");
      (thresholds[room] = thresholds[room] || {})[key] = Number(input.value);
    }
    try {
      await post("/api/thresholds", {thresholds: thresholds});
      text($("#limits-result"), "saved");
      refreshCharts();
    } catch (e) { text($("#limits-result"), e.message); }
  });
  for (const btn of $$("[data-days]")) {
    btn.addEventListener("click", () => {
      days = Number(btn.dataset.days);
      for (const b of $$("[data-days]")) b.setAttribute("aria-pressed", b === btn ? "true" : "false");
      refreshCharts();
    });
  }
  poll();
  setInterval(poll, 1000);
  setInterval(refreshCharts, 60000);
})();
