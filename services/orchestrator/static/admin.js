// Admin actions: the token (kept in this tab's sessionStorage only), deployments, emulation.
import { api, setOptions, stored, TOKEN_KEY } from "./util.js";

const $ = (id) => document.getElementById(id);

function say(text, ok = true) {
  const box = $("admin-result");
  box.textContent = text;
  box.dataset.ok = ok ? "yes" : "no";
}

function needToken() {
  if (stored(TOKEN_KEY)) return false;
  say("type the admin token at the top first", false);
  $("admin-token").focus();
  return true;
}

function setupToken() {
  const input = $("admin-token");
  const show = () => { $("token-state").textContent = stored(TOKEN_KEY) ? "token kept for this tab" : "no token"; };
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    input.value = "";
    show();
  });
  $("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); show(); });
  show();
}

async function act(what, call, refresh) {
  if (needToken()) return;
  say(`${what}…`);
  try {
    const answer = await call();
    say(`${what}: done${answer && answer.state ? ` (state ${answer.state})` : ""}`);
  } catch (err) {
    say(`${what} failed: ${err.message}`, false);
  }
  refresh();
}

// Prefill the emulation fields with what the chosen node's worker reports now.
function prefill(cluster) {
  const node = (cluster.nodes || []).find((n) => n.node_id === $("emulation-node").value);
  if (!node || !node.emulation) return;
  $("emulation-slowdown").value = node.emulation.slowdown;
  $("emulation-bandwidth").value = node.emulation.bandwidth_mbps ?? "";
  $("emulation-rtt").value = node.emulation.rtt_ms;
}

export function setupAdmin(refresh, latest) {
  setupToken();
  $("deploy-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = { name: $("deploy-name").value, model: $("deploy-model").value,
      policy: { objective: $("deploy-objective").value } };
    act(`create ${body.name}`, () => api("/v1/deployments", { method: "POST", body, admin: true }), refresh);
  });
  $("delete-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("delete-name").value;
    act(`delete ${name}`, () => api(`/v1/deployments/${encodeURIComponent(name)}`, { method: "DELETE", admin: true }), refresh);
  });
  $("emulation-node").addEventListener("change", () => prefill(latest()));
  $("emulation-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const node = $("emulation-node").value;
    const bandwidth = $("emulation-bandwidth").value;
    const body = { slowdown: Number($("emulation-slowdown").value), rtt_ms: Number($("emulation-rtt").value),
      bandwidth_mbps: bandwidth === "" ? null : Number(bandwidth) };
    act(`emulation of ${node}`, () => api(`/v1/nodes/${encodeURIComponent(node)}/emulation`, { method: "POST", body, admin: true }), refresh);
  });
}

// Keep the pickers in step with the cluster and the deployments.
export function updateAdmin(cluster, deployments) {
  const first = !$("emulation-node").options.length;
  setOptions($("emulation-node"), cluster.nodes.filter((n) => n.state !== "lost").map((n) => n.node_id));
  if (first) prefill(cluster);
  setOptions($("deploy-model"), cluster.models);
  setOptions($("delete-name"), deployments.map((d) => d.name));
}
