// Compare: choose jobs; their curves overlaid per metric and their eval scores side by side.
import { api } from "../api.js";
import { SERIES, color, lineChart, points } from "../charts.js";
import { badge, h, num } from "../util.js";

export function render(main, { params }) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  let stopped = false;
  const picker = h("fieldset.card", {}, h("legend", {}, "Jobs to compare"), h("p.muted.small", {}, "Loading jobs…"));
  const charts = [...SERIES, ["eval_rouge_l", "Selection-set Rouge-L"]].map(([key, label]) => ({ key, ...lineChart(label, { id: `compare-${key}` }) }));
  const table = h("div.table-wrap", { id: "compare-evals" });
  main.append(h("h1", {}, "Compare jobs"), picker, h("h2", {}, "Curves"), h("div.grid", {}, charts.map((c) => c.card)),
    h("h2", {}, "Final evaluation scores"), table);

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
    table.replaceChildren(h("p.muted", { style: "padding:8px 12px" }, "Choose two or more jobs above."));
    return () => { stopped = true; };
  }

  Promise.all(ids.map((id) => Promise.all([api(`/jobs/${id}`), api(`/jobs/${id}/metrics`), api(`/jobs/${id}/evals`)])))
    .then((rows) => {
      if (stopped) return;
      const label = (job) => `${job.name} (${job.id.slice(-6)})`;
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
    })
    .catch((err) => table.replaceChildren(h("p.error-box", { role: "alert" }, err.message)));

  return () => { stopped = true; for (const c of charts) c.destroy(); };
}
