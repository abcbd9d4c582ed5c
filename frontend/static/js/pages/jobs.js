// Jobs list: newest first, filter by status, cursor pagination, refreshed every 3 s; pick jobs to compare.
import { api } from "../api.js";
import { STATUSES, badge, h, num, progressCell, studentLabel, when } from "../util.js";

const PAGE = 20;

export function render(main, { params }) {
  const status = params.get("status") || "";
  const cursors = [null]; // cursors[i]: the `after` of page i
  let page = 0, timer = null, stopped = false;
  const chosen = new Set();

  const filter = h("select", { id: "status-filter", onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs"; } },
    h("option", { value: "" }, "All"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const compareButton = h("button.secondary", { type: "button", disabled: true, onclick: () => { location.hash = `#/compare?ids=${[...chosen].join(",")}`; } }, "Compare selected");
  const body = h("tbody");
  const prev = h("button.secondary", { type: "button", onclick: () => { page--; load(); } }, "← Newer");
  const next = h("button.secondary", { type: "button", onclick: () => { page++; load(); } }, "Older →");
  const pageLabel = h("span.muted.small");
  const error = h("p.error-box", { role: "alert", hidden: true });

  main.append(
    h("h1", {}, "Jobs"),
    h("div.toolbar", {},
      h("label", { for: "status-filter" }, "Status", filter),
      h("a.button", { href: "#/new" }, "New job"),
      compareButton),
    error,
    h("div.table-wrap", {}, h("table", { id: "jobs" },
      h("caption.muted.small.note", {}, "Newest first; updates live."),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Compare")),
        h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Method"),
        h("th", { scope: "col", class: "hide-sm" }, "Teacher → student"), h("th", { scope: "col" }, "Status"),
        h("th", { scope: "col" }, "Progress"), h("th", { scope: "col", class: "num" }, "Best Rouge-L"),
        h("th", { scope: "col", class: "hide-sm" }, "Created"))),
      body)),
    h("nav.pager", { "aria-label": "Pages" }, prev, pageLabel, next));

  function row(job) {
    const box = h("input", { type: "checkbox", checked: chosen.has(job.id), "aria-label": `Compare ${job.name}`,
      onchange: () => { box.checked ? chosen.add(job.id) : chosen.delete(job.id); compareButton.disabled = chosen.size < 2; } });
    const best = job.best_eval ? job.best_eval.scores.rouge_l : null;
    return h("tr", { dataset: { id: job.id, status: job.status } },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name), h("div.small.muted.mono", {}, job.id)),
      h("td", {}, job.spec.method),
      h("td.small.hide-sm", {}, `${job.spec.teacher} → ${studentLabel(job.spec)}`),
      h("td", {}, badge(job.status)),
      h("td", {}, progressCell(job)),
      h("td.num", {}, best == null ? "—" : num(best, 3)),
      h("td.small.hide-sm", {}, when(job.created_at)));
  }

  async function load() {
    clearTimeout(timer);
    const query = new URLSearchParams({ limit: PAGE });
    if (status) query.set("status", status);
    if (cursors[page]) query.set("after", cursors[page]);
    try {
      const result = await api(`/jobs?${query}`);
      if (stopped) return;
      error.hidden = true;
      cursors[page + 1] = result.data.length ? result.data[result.data.length - 1].id : null;
      body.replaceChildren(...(result.data.length ? result.data.map(row)
        : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, status ? `No ${status} jobs.` : "No jobs yet. ", !status && h("a", { href: "#/new" }, "Submit one")))]));
      prev.disabled = page === 0;
      next.disabled = !result.has_more;
      pageLabel.textContent = `Page ${page + 1}`;
    } catch (err) {
      if (stopped) return;
      error.textContent = `Could not load jobs: ${err.message}`;
      error.hidden = false;
    }
    if (!stopped) timer = setTimeout(load, 3000);
  }
  load();
  return () => { stopped = true; clearTimeout(timer); };
}
