// Job detail: live status from the SSE stream, progress and ETA, metric charts, evals, events, checkpoints.
import { api, download, followEvents } from "../api.js";
import { SERIES, lineChart, points } from "../charts.js";
import { TERMINAL, badge, bytes, duration, h, num, progressCell, studentLabel, toast, when } from "../util.js";

export function render(main, { id }) {
  const control = new AbortController();
  let job = null, refreshTimer = null, refreshing = false, again = false;

  const title = h("h1", {}, "Job ", h("span.mono", {}, id));
  const status = h("span", { id: "job-status", role: "status" });
  const cancel = h("button.danger", { type: "button", id: "cancel", hidden: true, onclick: onCancel }, "Cancel job");
  const summary = h("dl.summary.card", { id: "summary" });
  const error = h("p.error-box", { role: "alert", hidden: true });
  const charts = SERIES.map(([key, label]) => ({ key, ...lineChart(label, { id: `chart-${key}` }) }));
  const evalChart = lineChart("Evaluation Rouge-L", { id: "chart-eval" });
  const evalTable = h("div.table-wrap", { id: "evals" });
  const checkpoints = h("div.table-wrap", { id: "checkpoints" });
  const log = h("ol.log", { id: "events", "aria-live": "off", tabindex: 0, "aria-label": "Event log" });

  main.append(
    h("p.small", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    title,
    h("div.toolbar", {}, status, cancel),
    error,
    summary,
    h("h2", {}, "Training curves"),
    h("div.grid", {}, charts.map((c) => c.card)),
    h("h2", {}, "Evaluations"),
    h("div.grid", {}, evalChart.card, h("div", {}, evalTable)),
    h("h2", {}, "Checkpoints"),
    checkpoints,
    h("h2", {}, "Events"),
    log);

  async function onCancel() {
    cancel.disabled = true;
    try {
      job = await api(`/jobs/${id}/cancel`, { method: "POST" });
      toast(`Cancelling ${job.name}`);
      showJob();
    } catch (err) {
      toast(err.message);
    }
  }

  function showJob() {
    title.replaceChildren(job.name, " ", h("span.small.muted.mono", {}, job.id));
    document.title = `${job.name} · distill`;
    status.replaceChildren(badge(job.status));
    status.dataset.status = job.status;
    cancel.hidden = TERMINAL.has(job.status) || job.status === "cancelling";
    cancel.disabled = false;
    const s = job.spec, best = job.best_eval;
    const item = (label, ...value) => [h("div", {}, h("dt", {}, label), h("dd", {}, ...value))];
    summary.replaceChildren(
      ...item("Method", s.method),
      ...item("Teacher → student", `${s.teacher} → ${studentLabel(s)}`),
      ...item("Training data", h("span.mono", {}, s.data.train)),
      ...item("Progress", progressCell(job)),
      ...item("ETA", job.status === "running" ? duration(job.progress.eta_seconds) : "—"),
      ...item("Best checkpoint Rouge-L", best ? `${num(best.scores.rouge_l, 3)} (step ${best.step}, ${best.set === "test" ? "test" : "selection"} set)` : "—"),
      ...item("Created", when(job.created_at)),
      ...item("Finished", when(job.finished_at)),
      ...item("Attempts", `${job.attempts} of ${job.max_attempts}`));
    if (job.error) {
      error.textContent = `${job.error.code}: ${job.error.message}`;
      error.hidden = false;
    } else error.hidden = true;
  }

  function showEvals(evals) {
    const keys = [...new Set(evals.flatMap((e) => Object.keys(e.scores)))];
    evalTable.replaceChildren(evals.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Step"), h("th", { scope: "col" }, "Label"), keys.map((k) => h("th.num", { scope: "col" }, k)))),
      h("tbody", {}, evals.map((e) => h("tr", {}, h("td", {}, e.step), h("td", {}, e.label), keys.map((k) => h("td.num", {}, num(e.scores[k]))))))
    ) : h("p.muted", { style: "padding:8px 12px" }, "No evaluations yet."));
    // The student during training is scored on the selection set; the teacher only on the test set.
    const model = evals.filter((e) => e.label === "selection").map((e) => ({ x: e.step, y: e.scores.rouge_l }));
    const teacher = evals.find((e) => e.label === "teacher");
    const sets = [{ label: "student (selection set)", data: model }];
    if (teacher && model.length) {
      const xs = model.map((p) => p.x);
      sets.push({ label: "teacher (test set)", dashed: true, data: [{ x: Math.min(...xs), y: teacher.scores.rouge_l }, { x: Math.max(...xs), y: teacher.scores.rouge_l }] });
    }
    evalChart.update(sets);
  }

  function showCheckpoints(rows) {
    if (!rows.length) return checkpoints.replaceChildren(h("p.muted", { style: "padding:8px 12px" }, "No checkpoints yet."));
    const link = (label, path, filename, extra = {}) => h("button.link", { type: "button", ...extra, dataset: { path },
      onclick: () => download(path, filename).catch((err) => toast(`Download failed: ${err.message}`)) }, label);
    const files = (c) => h("details", {}, h("summary", {}, `${c.files.length} files`),
      h("ul", {}, c.files.map((f) => h("li", {},
        link(f.name, `/jobs/${id}/checkpoints/${c.step}/files/${encodeURIComponent(f.name)}`, f.name),
        ` ${bytes(f.size)} `, h("span.mono", { title: f.sha256 }, f.sha256.slice(0, 12) + "…")))));
    const row = (c) => h("tr", { dataset: { step: c.step } },
      h("td", {}, String(c.step), c.best && h("span.tag", {}, "best"), c.latest && h("span.tag", {}, "latest")),
      h("td.small", {}, when(c.created_at)),
      h("td.num", {}, c.scores ? num(c.scores.rouge_l, 3) : "—"),
      h("td", {}, link(`archive (${bytes(c.archive_size)})`, `/jobs/${id}/checkpoints/${c.step}/archive`, `${id}-step-${c.step}.tar`, { class: "link archive" })),
      h("td.mono.small", { title: c.archive_sha256 }, c.archive_sha256.slice(0, 16) + "…"),
      h("td.small", {}, files(c)));
    checkpoints.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Step", "Saved", "Selection Rouge-L", "Archive", "SHA-256", "Files"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map(row))));
  }

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const [j, metrics, evals, cps] = await Promise.all([
        api(`/jobs/${id}`), api(`/jobs/${id}/metrics`), api(`/jobs/${id}/evals`), api(`/jobs/${id}/checkpoints`)]);
      if (control.signal.aborted) return;
      job = j;
      showJob();
      for (const c of charts) c.update([{ label: c.key, data: points(metrics[c.key]) }]);
      showEvals(evals);
      showCheckpoints(cps);
    } catch (err) {
      if (!control.signal.aborted) { error.textContent = err.message; error.hidden = false; }
    } finally {
      refreshing = false;
      if (again) { again = false; schedule(); }
    }
  }

  function schedule() { // coalesce bursts of events into one refresh per second
    if (!refreshTimer) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 1000);
  }

  function addEvent(e) {
    if (!e.message) return;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(h(`li.${e.level}`, {}, `${new Date(e.created_at).toLocaleTimeString()}  ${e.type.padEnd(10)} ${e.message}`));
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  refresh().then(() => followEvents(id, {
    signal: control.signal,
    onEvent: (e) => { addEvent(e); schedule(); },
  })).then(() => { if (!control.signal.aborted) { clearTimeout(refreshTimer); refreshTimer = null; refresh(); } })
    .catch((err) => { if (!control.signal.aborted) toast(err.message); });

  return () => {
    control.abort();
    clearTimeout(refreshTimer);
    for (const c of [...charts, evalChart]) c.destroy();
  };
}
