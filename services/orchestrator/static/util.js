// Small helpers shared by the dashboard's modules: DOM building, number formatting, API calls.
// Text from the API is only ever set as textContent, never parsed as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

const num = (x, digits) => Number(x).toLocaleString("en-US", { maximumFractionDigits: digits });

export function bytes(b) {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${num(b, i === 0 ? 0 : 1)} ${units[i]}`;
}

export function rate(bytesPerS) {
  if (bytesPerS === null || bytesPerS === undefined) return "–";
  return `${bytes(bytesPerS)}/s`;
}

export function flops(f) {
  if (!f) return "–";
  if (f >= 1e9) return `${num(f / 1e9, 2)} GFLOP/s`;
  return `${num(f / 1e6, 1)} MFLOP/s`;
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${num(s * 1000, s < 0.01 ? 2 : 1)} ms`;
  return `${num(s, 2)} s`;
}

export function plain(x, digits = 2) {
  return x === null || x === undefined ? "–" : num(x, digits);
}

export function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

export const range = (start, end) => `${start}:${end}`;

// The admin token and the gateway key live in this tab's sessionStorage only.
export const TOKEN_KEY = "edgeorch.adminToken";
export const API_KEY = "edgeorch.apiKey";
export const stored = (key) => sessionStorage.getItem(key) || "";

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

function detailOf(body, fallback) {
  if (body && body.error && body.error.message) return body.error.message;  // OpenAI-style errors
  if (!body || body.detail === undefined) return fallback;
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
}

// A JSON call to this origin; admin calls carry the kept token. Throws ApiError with the API's detail.
export async function api(path, { method = "GET", body, admin = false, bearer } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  const token = admin ? stored(TOKEN_KEY) : bearer;
  if (token) headers.authorization = `Bearer ${token}`;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 204) return null;
  const text = await resp.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch { parsed = null; }
  if (!resp.ok) throw new ApiError(resp.status, detailOf(parsed, text.slice(0, 300)));
  return parsed;
}

// Replace a <select>'s options, keeping the chosen value when it is still offered.
export function setOptions(select, values, labels = values) {
  const keep = select.value;
  const same = select.options.length === values.length
    && values.every((v, i) => select.options[i].value === v && select.options[i].textContent === labels[i]);
  if (same) return;
  select.replaceChildren(...values.map((v, i) => el("option", { value: v, text: labels[i] })));
  if (values.includes(keep)) select.value = keep;
}
