// Line charts drawn as plain SVG: one polyline per deployment, x = time, y = one figure of /v1/series.
import { el, plain, svg } from "./util.js";

export const COLOURS = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2"];
const PAD = { left: 44, right: 8, top: 8, bottom: 20 };

function extent(series, key) {
  let t0 = Infinity, t1 = -Infinity, top = 0;
  for (const s of series) {
    for (const p of s.points) {
      t0 = Math.min(t0, p.t);
      t1 = Math.max(t1, p.t);
      if (p[key] !== null) top = Math.max(top, p[key]);
    }
  }
  return { t0, t1, top };
}

// Draw `key` of every deployment's points into `node` (an <svg>); gaps where the figure is null.
export function lineChart(node, series, key, digits) {
  const width = Math.max(node.clientWidth || 300, 200);
  const height = Math.max(node.clientHeight || 150, 100);
  node.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const { t0, t1, top } = extent(series, key);
  const children = [];
  const x0 = PAD.left, x1 = width - PAD.right, y0 = height - PAD.bottom, y1 = PAD.top;
  children.push(svg("line", { x1: x0, y1: y0, x2: x1, y2: y0, class: "axis" }));
  children.push(svg("line", { x1: x0, y1: y0, x2: x0, y2: y1, class: "axis" }));
  const label = (x, y, text, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor, class: "tick" });
    t.textContent = text;
    return t;
  };
  if (!Number.isFinite(t0) || top <= 0) {
    children.push(label((x0 + x1) / 2, (y0 + y1) / 2, "no requests yet", "middle"));
    node.replaceChildren(...children);
    return;
  }
  // The axis is labelled with the largest value the API returned; the scale is only drawing.
  children.push(label(x0 - 4, y1 + 10, plain(top, digits), "end"), label(x0 - 4, y0, "0", "end"));
  children.push(label(x0, height - 4, new Date(t0 * 1000).toLocaleTimeString("en-GB"), "start"));
  children.push(label(x1, height - 4, new Date(t1 * 1000).toLocaleTimeString("en-GB"), "end"));
  const span = Math.max(t1 - t0, 1e-9);
  series.forEach((s, i) => {
    let run = [];
    const flush = () => {
      if (run.length) children.push(svg("polyline", { points: run.join(" "), class: "line", stroke: COLOURS[i % COLOURS.length], "data-deployment": s.deployment }));
      run = [];
    };
    for (const p of s.points) {
      if (p[key] === null) { flush(); continue; }
      const x = x0 + ((p.t - t0) / span) * (x1 - x0);
      const y = y0 - (p[key] / top) * (y0 - y1);
      run.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    }
    flush();
  });
  node.replaceChildren(...children);
}

export function legend(box, series) {
  box.replaceChildren(...series.map((s, i) => {
    const last = s.points[s.points.length - 1];
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = COLOURS[i % COLOURS.length];
    return el("li", { "data-deployment": s.deployment }, swatch, `${s.deployment}: `,
      last ? `${plain(last.tokens_per_s, 1)} tokens/s, ${last.requests} requests in the last window` : "no data");
  }));
}
