// Nodes, links and plans: each drawn from one API answer, replaced whole on every refresh.
import { bytes, el, flops, plain, range, rate, seconds } from "./util.js";

function speedLine(s) {
  const ratio = s.ratio === null ? "not measured yet" : `${plain(s.ratio)}× its calibration`;
  return el("li", {}, el("span", { class: "model", text: s.model }), ` ${ratio} `,
    el("span", { class: "muted", text: `(${flops(s.measured_flops_per_s)} of ${flops(s.calibrated_flops_per_s)})` }));
}

function nodeCard(n) {
  const emu = n.emulation;
  const facts = [n.trusted ? "trusted" : "untrusted", `${plain(n.watts, 1)} W`, `${n.cores} cores`];
  if (n.cpu_percent !== null) facts.push(`cpu ${plain(n.cpu_percent, 0)} %`);
  if (n.queue_depth !== null) facts.push(`queue ${n.queue_depth}`);
  const memory = el("div", { class: "memory" },
    el("label", { for: `mem-${n.node_id}`, text: `memory ${bytes(n.memory_planned_bytes)} planned of ${bytes(n.memory_offered_bytes)} offered` }),
    el("meter", { id: `mem-${n.node_id}`, min: 0, max: Math.max(n.memory_offered_bytes, 1), value: n.memory_planned_bytes }));
  return el("article", { class: `card node ${n.state}`, "data-node": n.node_id },
    el("h3", {}, el("span", { class: "node-id", text: n.node_id }), " ",
      el("span", { class: `badge ${n.state}`, text: n.state })),
    n.why ? el("p", { class: "why", text: n.why }) : null,
    el("p", { class: "facts", text: facts.join(" · ") }),
    memory,
    el("ul", { class: "speeds" }, n.speeds.map(speedLine)),
    emu ? el("p", { class: "emulation", "data-slowdown": emu.slowdown,
      text: `emulated: ${plain(emu.slowdown)}× slower` + (emu.bandwidth_mbps ? `, ${plain(emu.bandwidth_mbps)} Mbit/s` : "")
        + (emu.rtt_ms ? `, +${plain(emu.rtt_ms)} ms RTT` : "") }) : null,
    n.stages.length ? el("p", { class: "stages", text: `stages: ${n.stages.join(", ")}` }) : null);
}

export function renderNodes(box, cluster) {
  if (!cluster.nodes.length) {
    box.replaceChildren(el("p", { class: "muted", text: "no node has registered with the monitor" }));
    return;
  }
  box.replaceChildren(...cluster.nodes.map(nodeCard));
}

export function renderLinks(table, cluster) {
  const ids = cluster.nodes.filter((n) => n.state !== "lost").map((n) => n.node_id);
  const cell = new Map(cluster.links.map((l) => [`${l.src}\u0000${l.dst}`, l]));
  const head = el("tr", {}, el("th", { scope: "col", text: "from \\ to" }), ids.map((id) => el("th", { scope: "col", text: id })));
  const rows = ids.map((src) => el("tr", {}, el("th", { scope: "row", text: src }), ids.map((dst) => {
    if (src === dst) return el("td", { class: "self", text: "·" });
    const l = cell.get(`${src}\u0000${dst}`);
    if (!l) return el("td", { class: "muted", text: "not measured" });
    return el("td", { "data-link": `${src}>${dst}` }, rate(l.bandwidth_bytes_per_s), el("br"), seconds(l.rtt_s));
  })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

// Stages grouped by node, in chain order: one bar row per node, one segment per stage.
function bars(d) {
  const total = d.stages.length ? d.stages[d.stages.length - 1].end : 1;
  const byNode = new Map();
  d.stages.forEach((s, i) => {
    if (!byNode.has(s.node)) byNode.set(s.node, []);
    byNode.get(s.node).push({ ...s, index: i });
  });
  const rows = [...byNode.entries()].map(([node, stages]) => {
    const track = el("div", { class: "track" });
    for (const s of stages) {
      const seg = el("span", { class: `seg c${s.index % 6}`, "data-range": range(s.start, s.end),
        title: `${node}: units ${range(s.start, s.end)}`, text: range(s.start, s.end) });
      seg.style.left = `${(100 * s.start) / total}%`;
      seg.style.width = `${(100 * (s.end - s.start)) / total}%`;
      track.append(seg);
    }
    return el("div", { class: "bar", "data-node": node }, el("span", { class: "bar-node", text: node }), track);
  });
  const axis = el("div", { class: "bar axis" }, el("span", { class: "bar-node", text: "units" }),
    el("div", { class: "track scale" }, el("span", { text: "0" }), el("span", { text: String(total) })));
  return el("div", { class: "bars", role: "group", "aria-label": `plan of ${d.name}` }, rows, axis);
}

function figures(d, last) {
  const p = d.predicted || {};
  const m = d.measured || {};
  const w = d.policy.workload;
  const row = (what, note, predicted, measured) => el("tr", {},
    el("th", { scope: "row" }, what, note ? el("small", { text: ` ${note}` }) : null),
    el("td", { text: predicted }), el("td", { text: measured }));
  return el("table", { class: "figures" },
    el("thead", {}, el("tr", {}, el("th", { text: "" }), el("th", { scope: "col", text: "predicted" }),
      el("th", { scope: "col", text: "measured" }))),
    el("tbody", {},
      row("time per token", "(median decode step)", seconds(p.step_s), seconds(m.step_s)),
      row("tokens/s", "(predicted: pipelined; measured: last window)", plain(p.throughput_tokens_per_s, 1),
        last ? plain(last.tokens_per_s, 1) : "–"),
      row("request latency", `(predicted for ${w.prompt_tokens}+${w.generated_tokens} tokens; measured: mean)`,
        seconds(p.latency_s), last ? seconds(last.request_latency_s) : "–"),
      row("energy per request", null, p.energy_j === undefined ? "–" : `${plain(p.energy_j, 1)} J`, "–"),
      row("requests (failed)", null, "", `${m.requests ?? 0} (${m.failed_requests ?? 0})`)));
}

export function renderPlans(box, deployments, series) {
  if (!deployments.length) {
    box.replaceChildren(el("p", { class: "muted", text: "no deployment yet" }));
    return;
  }
  const lastPoint = new Map(series.series.map((s) => [s.deployment, s.points[s.points.length - 1]]));
  box.replaceChildren(...deployments.map((d) => el("article", { class: "card plan", "data-deployment": d.name },
    el("h3", {}, el("span", { text: d.name }), " ", el("span", { class: `badge ${d.state}`, text: d.state })),
    el("p", { class: "facts" }, `${d.model} · `, el("span", { class: "version", text: d.version === null ? "no plan yet" : `v${d.version}` }),
      ` · objective ${d.policy.objective} · ${d.kind}`),
    d.reason ? el("p", { class: "why", text: d.reason }) : null,
    d.stages.length ? bars(d) : null,
    figures(d, lastPoint.get(d.name)))));
}
