// Sample generations side by side: a row per prompt, a column per model (the job and compare pages).
import { h } from "./util.js";

/**
 * A table of the answers of several evaluations: `columns` are [{label, samples}], `samples` as the API's
 * /jobs/{id}/samples gives them ({prompt, reference, response}). Rows are the prompts in the order first
 * seen; a column without that prompt shows "—".
 */
export function samplesTable(columns) {
  const rows = new Map(); // prompt -> {reference, answers: one per column}
  columns.forEach(({ samples }, i) => {
    for (const s of samples) {
      if (!rows.has(s.prompt)) rows.set(s.prompt, { reference: s.reference, answers: [] });
      rows.get(s.prompt).answers[i] = s.response;
    }
  });
  const text = (value) => h("td.sample", {}, value ?? "—");
  return h("table.samples", {},
    h("thead", {}, h("tr", {}, ["Prompt", "Reference", ...columns.map((c) => c.label)].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, [...rows].map(([prompt, row]) => h("tr", {},
      text(prompt), text(row.reference), columns.map((_, i) => text(row.answers[i]))))));
}
