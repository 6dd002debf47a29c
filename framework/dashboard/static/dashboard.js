// The vmsdb dashboard: polls the JSON API every two seconds and renders it.
// Text from the core (names, errors, keys) is only ever set as textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150; // chart points kept (five minutes at one per poll)
const state = { cy: null, chart: null, series: [[], [], []], actions: false, pendingAction: null };
window.vmsdb = state; // for people poking at the page, and for the browser tests

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.json();
}

function seconds(value) {
  if (!value) return "0 s";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(1)} s`;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function toast(text) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.classList.remove("hidden");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.add("hidden"), 3000);
}

function fill(tableId, rows, emptyId) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
  if (emptyId) document.getElementById(emptyId).classList.toggle("hidden", rows.length > 0);
  document.getElementById(tableId).classList.toggle("hidden", rows.length === 0 && Boolean(emptyId));
}

// -- the dataflow graph -------------------------------------------------------------------------

function nodeLabel(n) {
  if (n.outside) return "(outside)";
  const lines = [n.id, `lag ${seconds(n.lag_seconds)}`];
  if (n.dead_letters) lines.push(`${n.dead_letters} dead letter(s)`);
  if (n.recovering) lines.push(`recovering (${n.recovering})`);
  return lines.join("\n");
}

// One edge per (producer, consumer) pair, one label line per event type that flows along it.
function pairEdges(flows) {
  const pairs = new Map();
  for (const f of flows) {
    const id = `${f.source}->${f.target}`;
    if (!pairs.has(id)) pairs.set(id, { id, source: f.source, target: f.target, flows: [], pending: 0, ordered: false });
    const pair = pairs.get(id);
    pair.flows.push(f);
    pair.pending += f.pending;
    pair.ordered = pair.ordered || f.precedence.length > 0;
  }
  for (const pair of pairs.values()) {
    pair.label = pair.flows.map((f) =>
      `${f.event}  ${f.rate.toFixed(2)}/s${f.pending ? ` · ${f.pending} pending` : ""}`).join("\n");
  }
  return [...pairs.values()];
}

function nodeClass(n) {
  if (n.outside) return "outside";
  if (n.recovering || n.dead_letters) return "bad";
  if (n.lag_seconds > 1) return "slow";
  return "";
}

function renderGraph(data) {
  const elements = [
    ...data.nodes.map((n) => ({ group: "nodes", data: { ...n, label: nodeLabel(n) }, classes: nodeClass(n) })),
    ...pairEdges(data.edges).map((e) => ({
      group: "edges",
      data: e,
      classes: [e.pending ? "busy" : "", e.ordered ? "ordered" : ""].join(" "),
    })),
  ];
  if (state.cy === null) {
    state.cy = cytoscape({
      container: document.getElementById("graph"),
      elements,
      wheelSensitivity: 0.2,
      style: [
        { selector: "node", style: {
          shape: "round-rectangle", width: 150, height: 58, "background-color": "#eef3fb",
          "border-width": 1.5, "border-color": "#7d9fd8", label: "data(label)", "text-wrap": "wrap",
          "text-valign": "center", "font-size": 13, color: "#1d2433",
        } },
        { selector: "node.outside", style: { shape: "ellipse", "border-style": "dashed", "background-color": "#fff", width: 110, height: 44 } },
        { selector: "node.slow", style: { "border-color": "#d98a00", "border-width": 3 } },
        { selector: "node.bad", style: { "border-color": "#d64545", "border-width": 3, "background-color": "#fdf1f1" } },
        { selector: "edge", style: {
          width: 1.5, "line-color": "#9aa6bd", "target-arrow-color": "#9aa6bd", "target-arrow-shape": "triangle",
          "curve-style": "bezier", label: "data(label)", "font-size": 10, "text-rotation": "autorotate", "text-wrap": "wrap", color: "#4b5466",
          "text-background-color": "#fbfcfe", "text-background-opacity": 0.85, "text-background-padding": 1,
        } },
        { selector: "edge.ordered", style: { "line-style": "dashed" } },
        { selector: "edge.busy", style: { "line-color": "#d98a00", "target-arrow-color": "#d98a00", width: 3, color: "#8a5a00" } },
      ],
      // Breadth-first from the outside world, turned to run left to right (the page is wide).
      layout: { name: "breadthfirst", directed: true, spacingFactor: 1.05, padding: 16,
        roots: data.nodes.filter((n) => n.outside).map((n) => n.id),
        transform: (_node, p) => ({ x: p.y * 1.5, y: p.x * 1.8 }) },
    });
  } else {
    state.cy.batch(() => {
      for (const item of elements) {
        const existing = state.cy.getElementById(item.data.id);
        if (existing.nonempty()) {
          existing.data(item.data);
          existing.classes(item.classes);
        }
      }
    });
  }
}

// -- throughput chart and the services table ----------------------------------------------------

function renderChart(totals) {
  const [xs, rates, pending] = state.series;
  xs.push(totals.at); rates.push(totals.rate); pending.push(totals.pending);
  if (xs.length > HISTORY) { xs.shift(); rates.shift(); pending.shift(); }
  if (state.chart === null) {
    const box = document.getElementById("chart");
    state.chart = new uPlot({
      width: box.clientWidth || 360, height: 180,
      series: [{}, { label: "events/s", stroke: "#2f6fde", width: 2 },
        { label: "pending", stroke: "#d98a00", width: 2, scale: "n" }],
      axes: [{}, { label: "ev/s", size: 50 }, { side: 1, scale: "n", label: "pending", size: 50, grid: { show: false } }],
      scales: { x: { time: true } },
    }, state.series, box);
  } else {
    state.chart.setData(state.series);
  }
}

function renderServices(data) {
  const pending = {};
  for (const e of data.edges) pending[e.target] = (pending[e.target] || 0) + e.pending;
  const rows = data.nodes.filter((n) => !n.outside).map((n) => el("tr", { dataset: { service: n.id } },
    el("td", {}, n.id), el("td", {}, n.handlers), el("td", {}, seconds(n.lag_seconds)),
    el("td", {}, pending[n.id] || 0),
    el("td", {}, n.dead_letters ? el("span", { class: "badge bad" }, n.dead_letters) : "0"),
    el("td", { class: "muted" }, Object.entries(n.limits || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–")));
  fill("services", rows);
  const t = data.totals;
  document.getElementById("totals-rate").textContent = `${t.rate.toFixed(2)} ev/s`;
  document.getElementById("totals-pending").textContent = `${t.pending} pending`;
  const dead = document.getElementById("totals-dead");
  dead.textContent = `${t.dead_letters} dead letters`;
  dead.classList.toggle("bad", t.dead_letters > 0);
}

// -- correlation --------------------------------------------------------------------------------

const OUTCOME_CLASS = { handled: "ok", pending: "warn", retrying: "warn", "dead-letter": "bad", parked: "bad" };

async function showChain(id) {
  const data = await api(`api/correlation?id=${encodeURIComponent(id)}`);
  const summary = document.getElementById("correlation-summary");
  const table = document.getElementById("chain");
  if (data.events.length === 0) {
    summary.textContent = `no events for "${id}" (unknown, or pruned from the log)`;
    table.classList.add("hidden");
    return;
  }
  const last = data.events[data.events.length - 1];
  summary.replaceChildren(`${data.events.length} events · ${last.offset_ms} ms · `,
    el("span", { class: `badge ${data.outcome === "done" ? "ok" : data.outcome === "failed" ? "bad" : "warn"}` }, data.outcome));
  const rows = data.events.map((e, i) => el("tr", { dataset: { event: e.type, eventId: e.id, cause: e.causation_id || "" } },
    el("td", {}, i + 1),
    el("td", {}, `+${e.offset_ms} ms`),
    el("td", { class: "muted" }, e.hop_ms === null ? "" : `${e.hop_ms} ms`),
    el("td", {}, el("span", { class: "indent" }, "↳ ".repeat(e.depth)), el("span", { class: "event" }, e.type)),
    el("td", {}, e.producer + (e.origin ? ` (${e.origin})` : "")),
    el("td", {}, e.deliveries.length === 0 ? el("span", { class: "muted" }, "no subscriber (to the outside)") : null,
      ...e.deliveries.map((d) => el("span", {
      class: `badge ${OUTCOME_CLASS[d.state] || ""}`,
      title: d.error || "",
    }, `${d.subscriber}: ${d.state}${d.attempts ? ` (attempt ${d.attempts})` : ""}`, " ")))));
  fill("chain", rows);
  table.classList.remove("hidden");
}

// -- dead letters, with confirmation ------------------------------------------------------------

function confirmAction(text, onConfirm) {
  state.pendingAction = onConfirm;
  document.getElementById("modal-text").textContent = text;
  document.getElementById("modal").classList.remove("hidden");
}

function closeModal() {
  state.pendingAction = null;
  document.getElementById("modal").classList.add("hidden");
}

async function settle(letter, action) {
  await api(`api/dead-letters/${letter.id}/${action}`, { method: "POST", headers: { "X-Vmsdb-Action": "1" } });
  toast(`dead letter ${letter.id}: ${action === "replay" ? "delivered again" : "discarded"}`);
  await poll(); // the list, the counts in the header and the graph's nodes, all at once
}

function shortError(error) {
  const first = error.split("\n")[0];
  return first.length > 160 ? `${first.slice(0, 160)}…` : first;
}

function renderDeadLetters(letters) {
  // Unchanged: keep the rows, so an opened traceback stays open across polls.
  const key = JSON.stringify(letters);
  if (key === state.lastLetters) return;
  state.lastLetters = key;
  const rows = letters.map((l) => {
    const buttons = state.actions ? [
      el("button", { class: "small", type: "button", dataset: { action: "replay" }, onclick: () => confirmAction(
        `Replay dead letter ${l.id} (${l.event_type} to ${l.subscriber})? The event is delivered again, with a fresh budget of attempts.`,
        () => settle(l, "replay")) }, "Replay"),
      // Discarding is for blocking letters (as ``vmsdb dead-letters discard``): it frees their key.
      l.blocking ? " " : null,
      l.blocking ? el("button", { class: "small danger", type: "button", dataset: { action: "discard" }, onclick: () => confirmAction(
        `Discard dead letter ${l.id} (${l.event_type} to ${l.subscriber}) for good? It will never be handled, and the later events of its key flow on.`,
        () => settle(l, "discard")) }, "Discard") : null,
    ] : [];
    return el("tr", { dataset: { letter: l.id } },
      el("td", {}, l.id), el("td", {}, l.subscriber), el("td", { class: "event" }, l.event_type),
      el("td", {}, l.key || ""), el("td", {}, l.attempts), el("td", {}, time(l.failed_at)),
      el("td", { class: "error" }, shortError(l.error),
        l.blocking ? el("span", { class: "badge warn" }, " blocks its key") : null,
        el("details", {}, el("summary", {}, l.traceback ? "full error and traceback" : "full error"),
          el("pre", {}, l.traceback ? `${l.error}\n\n${l.traceback}` : l.error))),
      el("td", {}, ...buttons));
  });
  fill("dead-letters", rows, "dead-letters-empty");
}

// -- leases, recovery, integrity ----------------------------------------------------------------

function renderLeases(leases) {
  fill("leases", leases.map((l) => el("tr", {},
    el("td", {}, l.service), el("td", {}, l.entity), el("td", {}, l.key_text), el("td", {}, l.quantity),
    el("td", {}, l.holder || ""),
    el("td", {}, time(l.expires_at), l.expired ? el("span", { class: "badge warn" }, " expired") : null))), "leases-empty");
}

function renderRecovery(data) {
  const v = data.integrity;
  const badge = document.getElementById("verdict");
  badge.textContent = v.verdict;
  badge.className = `badge ${v.verdict === "globally consistent" ? "ok" : v.verdict === "weakly consistent" ? "warn" : "bad"}`;
  document.getElementById("verdict-detail").textContent =
    `Definitions 1 and 3 · ${v.violations} invalid reference(s), ${v.uncovered} outside amnesia · checked ${time(v.checked_at)}`;
  const recovering = data.services.filter((s) => s.mode);
  const box = document.getElementById("recovering");
  box.replaceChildren(recovering.length
    ? el("p", {}, "Recovering: ", ...recovering.map((s) => el("span", { class: "badge bad" }, `${s.service} (${s.mode})`, " ")))
    : el("p", { class: "muted" }, "No service is recovering."));
  fill("amnesia", data.amnesia.map((a) => el("tr", {},
    el("td", {}, a.service), el("td", {}, a.uri || "(entities unknown to the backup)"),
    el("td", {}, `]${a.lo}, ${a.hi === null ? "∞" : a.hi}]`), el("td", {}, `${a.from_epoch} → ${a.to_epoch}`))), "amnesia-empty");
}

// -- polling ------------------------------------------------------------------------------------

async function poll() {
  try {
    const [graph, letters, leases, recovery] = await Promise.all([
      api("api/graph"), api("api/dead-letters"), api("api/leases"), api("api/recovery"),
    ]);
    renderGraph(graph);
    renderServices(graph);
    renderChart(graph.totals);
    renderDeadLetters(letters);
    renderLeases(leases);
    renderRecovery(recovery);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "true";
  } catch (err) {
    document.getElementById("updated").textContent = `update failed: ${err.message}`;
  }
}

async function start() {
  const overview = await api("api/overview");
  state.actions = overview.actions;
  document.getElementById("services-summary").textContent = `${overview.services.length} services: ${overview.services.join(", ")}`;
  document.getElementById("actions-note").textContent = overview.actions
    ? "replay and discard ask for confirmation first"
    : "read-only: actions are turned off";
  document.getElementById("correlation-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("correlation-input").value.trim();
    if (id) showChain(id).catch((err) => toast(err.message));
  });
  document.getElementById("modal-cancel").addEventListener("click", closeModal);
  document.getElementById("modal-ok").addEventListener("click", () => {
    const action = state.pendingAction;
    closeModal();
    if (action) action().catch((err) => toast(err.message));
  });
  document.getElementById("verdict-again").addEventListener("click", async () => {
    try {
      await api("api/integrity", { method: "POST" });
      renderRecovery(await api("api/recovery"));
    } catch (err) { toast(err.message); }
  });
  await poll();
  setInterval(poll, POLL_MS);
}

start();
