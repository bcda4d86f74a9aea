// The dashboard's entry point: polls the cluster, the deployments and the live series every 2 s,
// follows the decision log over SSE, and wires the chat and admin forms.
import { setupAdmin, updateAdmin } from "./admin.js";
import { legend, lineChart } from "./charts.js";
import { setupChat } from "./chat.js";
import { renderLinks, renderNodes, renderPlans } from "./cluster.js";
import { api, bytes, clock, el, range, seconds, setOptions } from "./util.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const MAX_EVENTS = 300;
// Decisions about a plan: the changes, and the refusals with their reasons.
const CHANGES = new Set(["deploy", "remap", "resplit", "recover", "keep", "rollout_aborted", "rollout_refused", "infeasible"]);
const REPLANNED = new Set(["deploy", "remap", "resplit", "recover", "rollout_aborted", "state"]);

let cluster = { nodes: [], links: [], models: [], ts: null };
let firstServerTs = null;
let streamState = "connecting";
let updated = null;
let refreshing = false;
let again = false;

function showStatus(problem) {
  const parts = [`events ${streamState}`];
  if (updated) parts.push(`updated ${clock(updated)}`);
  if (problem) parts.push(problem);
  $("status").textContent = parts.join(" · ");
  $("status").dataset.ok = problem ? "no" : "yes";
}

async function refresh() {
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    const [c, deployments, series] = await Promise.all([
      api("/v1/cluster"), api("/v1/deployments"), api("/v1/series?last_s=300")]);
    cluster = c;
    updated = c.ts;
    firstServerTs = firstServerTs ?? c.ts;
    renderNodes($("nodes"), c);
    renderLinks($("links"), c);
    renderPlans($("plans"), deployments, series);
    lineChart($("chart-latency"), series.series, "request_latency_s", 2);
    lineChart($("chart-tokens"), series.series, "tokens_per_s", 1);
    legend($("chart-legend"), series.series);
    $("charts-window").textContent = `each point covers the last ${series.window_s} s; one every ${series.sample_s} s`;
    updateAdmin(c, deployments);
    setOptions($("chat-model"), deployments.filter((d) => d.kind === "decoder").map((d) => d.name));
    showStatus(null);
  } catch (err) {
    showStatus(`API: ${err.message}`);
  } finally {
    refreshing = false;
    if (again) { again = false; refresh(); }
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

function phaseText(r) {
  const acks = r.acks.map((a) => `${a.node_id} ${a.ok ? "ok" : "FAILED"} ${seconds(a.prepare_s)}, ${bytes(a.bytes_read)} read`);
  const parts = [`PREPARE ${seconds(r.prepare_s)}${acks.length ? ` (${acks.join("; ")})` : ""}`];
  if (r.committed_at) parts.push(`COMMIT ${seconds(r.commit_s)}`);
  parts.push(r.phase === "completed" ? "RELEASE done" : r.phase);
  return `v${r.version}${r.from_version ? ` from v${r.from_version}` : ""}: ${parts.join(" → ")}${r.reason ? ` (${r.reason})` : ""}`;
}

async function loadPhases(box, id, tries = 0) {
  try {
    const r = await api(`/v1/rollouts/${encodeURIComponent(id)}`);
    box.textContent = phaseText(r);
    if (!["completed", "aborted"].includes(r.phase) && tries < 5) setTimeout(() => loadPhases(box, id, tries + 1), 3000);
  } catch (err) {
    box.textContent = `rollout ${id}: ${err.message}`;
  }
}

function phases(e) {
  const box = el("p", { class: "phases", text: "…" });
  const details = el("details", {}, el("summary", { text: "rollout phases" }), box);
  let loaded = false;
  details.addEventListener("toggle", () => {
    if (details.open && !loaded) { loaded = true; loadPhases(box, e.data.rollout_id); }
  });
  // Decisions taken while the page is open show their phases at once.
  if (firstServerTs !== null && e.ts >= firstServerTs) details.open = true;
  return details;
}

function eventItem(e) {
  const d = e.data || {};
  const stages = Array.isArray(d.stages)
    ? d.stages.map((s) => `${s.node ?? s.node_id} ${range(s.start, s.end)}`).join(" → ") : null;
  return el("li", { class: `event ${CHANGES.has(e.kind) ? "change" : ""}`, "data-kind": e.kind, "data-id": e.id },
    el("time", { datetime: new Date(e.ts * 1000).toISOString(), text: clock(e.ts) }), " ",
    el("span", { class: `badge ${e.kind}`, text: e.kind }), " ",
    e.deployment ? el("strong", { text: e.deployment }) : null, " ",
    el("span", { class: "message", text: e.message }),
    stages ? el("p", { class: "stages", text: stages }) : null,
    d.rollout_id ? phases(e) : null);
}

function follow() {
  const list = $("timeline");
  let last = 0;
  const source = new EventSource("/v1/events/stream?tail=200");
  source.onopen = () => { streamState = "live"; showStatus(null); };
  source.onerror = () => { streamState = "reconnecting"; showStatus(null); };
  source.onmessage = (msg) => {
    const e = JSON.parse(msg.data);
    if (e.id <= last) return;
    last = e.id;
    list.prepend(eventItem(e));
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    if (REPLANNED.has(e.kind)) refresh();
  };
}

function start() {
  $("timeline-filter").addEventListener("change", (ev) => {
    $("timeline").classList.toggle("changes-only", ev.target.value === "changes");
  });
  setupAdmin(refresh, () => cluster);
  setupChat();
  follow();
  poll();
  window.addEventListener("resize", () => refresh());
}

start();
