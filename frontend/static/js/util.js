// Small DOM and formatting helpers.

/** h("tag.class", {attrs}, ...children): build an element. Strings become text nodes. */
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined && child !== false) el.append(child);
  return el;
}

let schemaCache = null;
/** The API's schemas (components of /openapi.json), fetched once: the spec form and the job statuses come from there. */
export function apiSchemas() {
  if (!schemaCache) schemaCache = fetch("/openapi.json").then((r) => r.json()).then((o) => o.components.schemas);
  return schemaCache;
}

// The job statuses as the API defines them (its JobStatus schema), filled by loadStatuses() before the first render.
export const STATUSES = [];
export const TERMINAL = new Set();
export async function loadStatuses() {
  const { JobStatus } = await apiSchemas();
  STATUSES.push(...JobStatus.enum);
  for (const status of JobStatus["x-terminal"]) TERMINAL.add(status);
}

export function badge(status) {
  return h("span.badge." + status, {}, status);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  const hours = Math.floor(seconds / 3600), minutes = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (hours) return `${hours}h ${minutes}m`;
  if (minutes) return `${minutes}m ${s}s`;
  return `${s}s`;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function num(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

export function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function studentLabel(spec) {
  const s = spec.student || {};
  if (s.model) return s.model;
  if (s.init_from_teacher) return `${s.init_from_teacher.num_layers} layers of the teacher`;
  return "—";
}

export function progressCell(job) {
  const { step, total_steps: total, eta_seconds: eta } = job.progress;
  const running = job.status === "running";
  return h("div.progress", {},
    h("progress", { max: total || 1, value: step, "aria-label": `step ${step} of ${total}` }),
    h("span.small.muted", {}, `${step}/${total}` + (running && eta != null ? ` · ETA ${duration(eta)}` : "")));
}

export function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (el.textContent = ""), 5000);
}
