// Compare: choose jobs; the settings in which their specs differ, their curves overlaid per metric, their
// eval scores and sample generations side by side.
import { api } from "../api.js";
import { SERIES, color, lineChart, points, smoothingControl } from "../charts.js";
import { samplesTable } from "../samples.js";
import { badge, h, num } from "../util.js";

export function render(main, { params }) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  let stopped = false;
  const picker = h("fieldset.card", {}, h("legend", {}, "Jobs to compare"), h("p.muted.small", {}, "Loading jobs…"));
  const charts = [...SERIES, ["eval_rouge_l", "Selection-set Rouge-L"]].map(([key, label]) => ({ key,
    ...lineChart(label, { id: `compare-${key}`, smooth: key !== "lr" && key !== "eval_rouge_l" }) }));
  const settings = h("div", { id: "compare-settings" });
  const table = h("div.table-wrap", { id: "compare-evals" });
  const samples = h("div", { id: "compare-samples" });
  main.append(h("h1", {}, "Compare jobs"), picker, h("h2", {}, "Settings that differ"), settings,
    h("div.toolbar", {}, h("h2", {}, "Curves"), smoothingControl()), h("div.grid", {}, charts.map((c) => c.card)),
    h("h2", {}, "Final evaluation scores"), table, h("h2", {}, "Sample generations"), samples);

  api("/jobs?limit=100").then((page) => {
    if (stopped) return;
    const boxes = page.data.map((job) => h("label", {}, h("input", { type: "checkbox", value: job.id, checked: ids.includes(job.id) }), ` ${job.name} `, h("span.muted.small.mono", {}, job.id), " ", badge(job.status)));
    const go = h("button", { type: "button", onclick: () => {
      const chosen = [...picker.querySelectorAll("input:checked")].map((b) => b.value);
      location.hash = `#/compare?ids=${chosen.join(",")}`;
    } }, "Compare");
    picker.replaceChildren(h("legend", {}, "Jobs to compare"),
      page.data.length ? h("div.picker", {}, boxes) : h("p.muted", {}, "No jobs yet."), h("p", {}, go));
  }).catch((err) => picker.append(h("p.error-box", { role: "alert" }, err.message)));

  if (!ids.length) {
    table.replaceChildren(h("p.muted.note", {}, "Choose two or more jobs above."));
    return () => { stopped = true; for (const c of charts) c.destroy(); };
  }

  Promise.all(ids.map((id) => Promise.all([api(`/jobs/${id}`), api(`/jobs/${id}/metrics`), api(`/jobs/${id}/evals`), api(`/jobs/${id}/samples`)])))
    .then((rows) => {
      if (stopped) return;
      const label = (job) => `${job.name} (${job.id.slice(-6)})`;
      settings.replaceChildren(settingsTable(rows.map(([job]) => job), label));
      for (const c of charts) {
        c.update(rows.map(([job, metrics, evals], i) => ({
          label: label(job), color: color(i),
          data: c.key === "eval_rouge_l" ? evals.filter((e) => e.label === "selection").map((e) => ({ x: e.step, y: e.scores.rouge_l })) : points(metrics[c.key]),
        })));
      }
      // Each job's best checkpoint on the test set; while it runs, its latest selection-set evaluation.
      const finals = rows.map(([, , evals]) => evals.find((e) => e.label === "best") ?? [...evals].reverse().find((e) => e.label === "selection"));
      const keys = [...new Set(finals.flatMap((e) => (e ? Object.keys(e.scores) : [])))];
      table.replaceChildren(h("table", {},
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Score"), rows.map(([job]) => h("th.num", { scope: "col" }, h("a", { href: `#/jobs/${job.id}` }, label(job)))))),
        h("tbody", {},
          h("tr", {}, h("th", { scope: "row" }, "status"), rows.map(([job]) => h("td.num", {}, badge(job.status)))),
          h("tr", {}, h("th", { scope: "row" }, "method"), rows.map(([job]) => h("td.num", {}, job.spec.method))),
          h("tr", {}, h("th", { scope: "row" }, "eval step"), finals.map((e) => h("td.num", {}, e ? `${e.step} (${e.label})` : "—"))),
          keys.map((k) => h("tr", {}, h("th", { scope: "row" }, k), finals.map((e) => h("td.num", {}, e ? num(e.scores[k]) : "—")))),
          h("tr", {}, h("th", { scope: "row" }, "best Rouge-L"), rows.map(([job]) => h("td.num", {}, job.best_eval ? `${num(job.best_eval.scores.rouge_l, 3)} @ ${job.best_eval.step}` : "—"))))));
      // Each job's answers in the evaluation scored above; the same prompt is one row (jobs on the same data share them).
      const answers = rows.map(([job, , , kept], i) => ({
        label: `${label(job)}: ${finals[i] ? `${finals[i].label}, step ${finals[i].step}` : "—"}`,
        samples: kept.find((k) => finals[i] && k.label === finals[i].label && k.step === finals[i].step)?.samples ?? [],
      }));
      samples.replaceChildren(answers.some((a) => a.samples.length) ? h("div.table-wrap", {}, samplesTable(answers)) : h("p.muted", {}, "No sample generations yet."));
    })
    .catch((err) => table.replaceChildren(h("p.error-box", { role: "alert" }, err.message)));

  return () => { stopped = true; for (const c of charts) c.destroy(); };
}

/** A spec as {dotted path: value}; a list is one value (its items are not settings of their own). */
function flatten(value, path = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [key, v] of Object.entries(value)) flatten(v, path ? `${path}.${key}` : key, out);
  } else out[path] = value;
  return out;
}

/** A row per spec setting, a column per job: the settings that differ, and those that are the same behind a switch. */
function settingsTable(jobs, label) {
  const specs = jobs.map((job) => flatten(job.spec));
  const paths = [...new Set(specs.flatMap((s) => Object.keys(s)))];
  const same = new Set(paths.filter((path) => new Set(specs.map((s) => JSON.stringify(s[path]))).size === 1));
  const text = (v) => (v === undefined ? "—" : typeof v === "string" ? v : JSON.stringify(v)); // "—": not in that spec
  const rows = paths.map((path) => h("tr", { dataset: { path }, class: same.has(path) ? "same" : "differs", hidden: same.has(path) },
    h("th.mono", { scope: "row" }, path), specs.map((s) => h("td.mono", {}, text(s[path])))));
  const toggle = h("input", { type: "checkbox", id: "show-same-settings", onchange: () => {
    for (const row of rows) if (same.has(row.dataset.path)) row.hidden = !toggle.checked;
  } });
  return h("div", {},
    h("p.small", {}, same.size === paths.length ? "Their specs are the same. " : "",
      h("label", {}, toggle, ` Show the ${same.size} settings that are the same`)),
    h("div.table-wrap", {}, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setting"), jobs.map((job) => h("th", { scope: "col" }, label(job))))),
      h("tbody", {}, rows))));
}
