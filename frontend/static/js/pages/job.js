// Job detail: live status from the SSE stream, progress and ETA, its spec (and a clone of it), metric
// charts, evals, events, the training process's log, checkpoints. The event stream (from the job's
// first event) carries every step's metrics and every evaluation: the page appends them as they come,
// and fetches again only the job's row and, after a checkpoint event, its checkpoints.
import { api, download, followEvents, saveAnswer } from "../api.js";
import { SERIES, lineChart, smoothingControl } from "../charts.js";
import { dump } from "/vendor/js-yaml.mjs";
import { samplesTable } from "../samples.js";
import { TERMINAL, badge, bytes, duration, h, num, progressCell, studentLabel, toast, when } from "../util.js";

// Where a job runs: its worker and the devices it leased there (none for ranks spread over a hostfile).
function placementLabel(p) {
  if (!p) return "—";
  const here = p.devices ? `${p.worker}, ${p.kind} ${p.devices.join(",")}` : p.worker;
  return p.hosts ? `${here}, across ${p.hosts.join(", ")}` : here;
}

/** `fn` run at most once a second however often this is called; calls during a run ask for one more. */
function coalesced(fn, signal) {
  let timer = null, running = false, again = false;
  const run = async () => {
    timer = null;
    if (signal.aborted) return;
    if (running) { again = true; return; }
    running = true;
    try { await fn(); } finally {
      running = false;
      if (again) { again = false; soon(); }
    }
  };
  const soon = () => { if (!timer) timer = setTimeout(run, 1000); };
  soon.now = () => { clearTimeout(timer); return run(); };
  soon.cancel = () => clearTimeout(timer);
  return soon;
}

// What POST /jobs/{id}/resume continues: a job that ended without succeeding.
const RESUMABLE = new Set(["failed", "cancelled"]);

export function render(main, { id }) {
  const control = new AbortController();
  let job = null, queuedTimer = null, lastEvent = 0;

  const title = h("h1", {}, "Job ", h("span.mono", {}, id));
  const status = h("span", { id: "job-status", role: "status" });
  const cancel = h("button.danger", { type: "button", id: "cancel", hidden: true, onclick: onCancel }, "Cancel job");
  const resume = h("button.secondary", { type: "button", id: "resume", hidden: true, onclick: onResume }, "Resume");
  const remove = h("button.danger", { type: "button", id: "delete", hidden: true, onclick: onDelete }, "Delete job");
  const clone = h("a.button.secondary", { id: "clone", href: `#/new?clone=${encodeURIComponent(id)}` }, "Clone");
  const saveLog = h("button.secondary", { type: "button", id: "download-log", hidden: true, onclick: onSaveLog }, "Download log");
  const specText = h("pre.spec-text", {});
  const summary = h("dl.summary.card", { id: "summary" });
  const error = h("p.error-box", { role: "alert", hidden: true });
  const waiting = h("p.warning-box", { id: "waiting-for", role: "status", hidden: true });
  const charts = SERIES.map(([key, label]) => ({ key, ...lineChart(label, { id: `chart-${key}`, smooth: key !== "lr" }) }));
  const evalChart = lineChart("Evaluation Rouge-L", { id: "chart-eval", smooth: false });
  // What the event stream carried: each step's metrics event ({stage, values}; a resumed attempt's repeat
  // of a step replaces it) and each evaluation (by step and label, in the order recorded).
  const steps = new Map(), evals = new Map();
  const stageNote = h("p.small.muted", { id: "stages", hidden: true });
  const evalTable = h("div.table-wrap", { id: "evals" });
  const samples = h("div", { id: "samples" });
  const checkpoints = h("div.table-wrap", { id: "checkpoints" });
  const log = h("ol.log", { id: "events", "aria-live": "off", tabindex: 0, "aria-label": "Event log" });

  main.append(
    h("p.small", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    title,
    h("div.toolbar", {}, status, cancel, resume, remove, clone, saveLog),
    error,
    waiting,
    summary,
    h("details.card", { id: "spec" }, h("summary", {}, "Spec"), specText),
    h("div.toolbar", {}, h("h2", {}, "Training curves"), smoothingControl()),
    stageNote,
    h("div.grid", {}, charts.map((c) => c.card)),
    h("h2", {}, "Evaluations"),
    h("div.grid", {}, evalChart.card, h("div", {}, evalTable)),
    h("h2", {}, "Sample generations"),
    h("p.small.muted", {}, "The first prompts of each set, answered under the first sampling seed: the same prompts for every model and step."),
    samples,
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

  async function onResume() {
    resume.disabled = true;
    try {
      job = await api(`/jobs/${id}/resume`, { method: "POST" });
      toast(`Resuming ${job.name} from its newest checkpoint`);
      showJob();
      // The stream ended with the job; the resumed job's events follow the last one shown.
      followEvents(id, { after: lastEvent, signal: control.signal, onEvent }).catch((err) => toast(err.message));
    } catch (err) {
      toast(err.message);
    } finally {
      resume.disabled = false;
    }
  }

  async function onDelete() {
    if (!window.confirm(`Delete ${job.name} with its checkpoints, evaluations and log? This cannot be undone.`)) return;
    remove.disabled = true;
    try {
      await api(`/jobs/${id}`, { method: "DELETE" });
      toast(`Deleted ${job.name}`);
      location.hash = "#/jobs";
    } catch (err) {
      remove.disabled = false;
      toast(err.message);
    }
  }

  function onSaveLog() {
    saveAnswer(`/jobs/${id}/logs`, `${id}-attempt-${job.attempts}.log`).catch((err) => toast(`Download failed: ${err.message}`));
  }

  /** The first step of each stage, from `ordered` ([step, {stage}] in step order). */
  function stageStarts(ordered) {
    const starts = [];
    for (const [step, { stage }] of ordered) if (starts.at(-1)?.name !== stage) starts.push({ step, name: stage });
    return starts;
  }

  function showJob() {
    title.replaceChildren(job.name, " ", h("span.small.muted.mono", {}, job.id));
    document.title = `${job.name} · distill`;
    status.replaceChildren(badge(job.status));
    status.dataset.status = job.status;
    cancel.hidden = TERMINAL.has(job.status) || job.status === "cancelling";
    cancel.disabled = false;
    remove.hidden = !TERMINAL.has(job.status);
    resume.hidden = !RESUMABLE.has(job.status);
    saveLog.hidden = !job.attempts;
    if (!specText.textContent) specText.textContent = dump(job.spec, { lineWidth: 120 }); // a job's spec never changes
    const s = job.spec, best = job.best_eval;
    const item = (label, ...value) => [h("div", {}, h("dt", {}, label), h("dd", {}, ...value))];
    summary.replaceChildren(
      ...item("Method", s.method),
      ...item("Teacher → student", `${s.teacher} → ${studentLabel(s)}`),
      ...item("Training data", h("span.mono", {}, s.data.train)),
      ...item("Queue", h("span", { id: "queue-position" }, job.status === "queued"
        ? `${job.queue}: ${job.queue_position} job${job.queue_position === 1 ? "" : "s"} ahead` : job.queue)),
      ...item("Progress", progressCell(job)),
      ...item("ETA", job.status === "running" ? duration(job.progress.eta_seconds) : "—"),
      ...item("Best checkpoint Rouge-L", best ? `${num(best.scores.rouge_l, 3)} (step ${best.step}, ${best.set === "test" ? "test" : "selection"} set)` : "—"),
      ...item("Created", when(job.created_at)),
      ...item("Finished", when(job.finished_at)),
      ...item("Attempts", `${job.attempts} of ${job.max_attempts}`),
      ...item("Runs on", h("span", { id: "placement" }, placementLabel(job.placement))),
      ...item("Metadata", h("span.mono", { id: "metadata" },
        Object.entries(job.metadata).map(([k, v]) => `${k}=${v}`).join(", ") || "—")));
    if (job.error) {
      error.textContent = `${job.error.code}: ${job.error.message}`;
      error.hidden = false;
    } else error.hidden = true;
    waiting.textContent = job.waiting_for || "";
    waiting.hidden = !job.waiting_for;
    // A queued job's place and the workers that serve its queue change without an event on this
    // job: look again every few seconds until it leaves the queue.
    clearTimeout(queuedTimer);
    if (job.status === "queued") queuedTimer = setTimeout(jobSoon, 5000);
  }

  function showEvals(evals) {
    const keys = [...new Set(evals.flatMap((e) => Object.keys(e.scores)))];
    evalTable.replaceChildren(evals.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Step"), h("th", { scope: "col" }, "Label"), keys.map((k) => h("th.num", { scope: "col" }, k)))),
      h("tbody", {}, evals.map((e) => h("tr", {}, h("td", {}, e.step), h("td", {}, e.label), keys.map((k) => h("td.num", {}, num(e.scores[k]))))))
    ) : h("p.muted.note", {}, "No evaluations yet."));
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

  // Test set: the teacher, the initial student, the final model and the best checkpoint. Selection set: the
  // student at its first evaluation, at the best checkpoint's step and at the latest.
  function showSamples() {
    const kept = [...evals.values()].filter((e) => e.samples?.length);
    const test = kept.filter((e) => e.label !== "selection"), selection = kept.filter((e) => e.label === "selection");
    const final = test.find((e) => e.label === "final"), bestStep = job?.best_eval?.step, latest = selection.at(-1);
    const isFinal = (e) => e.label === "best" && e.step === final?.step; // the best checkpoint is the final model
    const testLabel = (e) => {
      if (e.label === "teacher") return "Teacher";
      if (e.label === "initial") return "Initial student";
      if (e.label === "best") return `Best (step ${e.step})`;
      return `Final${test.some(isFinal) ? " = best" : ""} (step ${e.step})`;
    };
    const testColumns = test.filter((e) => !isFinal(e)).map((e) => ({ label: testLabel(e), samples: e.samples }));
    const selectionColumns = selection.filter((e) => e === selection[0] || e === latest || e.step === bestStep).map((e) => ({
      label: `Step ${e.step}` + (e.step === bestStep ? " (best)" : "") + (e === latest && e !== selection[0] ? " (latest)" : ""), samples: e.samples }));
    const part = (title, partId, columns) => columns.length ? [h("h3", {}, title), h("div.table-wrap", { id: partId }, samplesTable(columns))] : [];
    samples.replaceChildren(...(kept.length
      ? [...part("Test set", "samples-test", testColumns), ...part("Selection set", "samples-selection", selectionColumns)]
      : [h("p.muted", {}, "No sample generations yet.")]));
  }

  function showCheckpoints(rows) {
    if (!rows.length) return checkpoints.replaceChildren(h("p.muted.note", {}, "No checkpoints yet."));
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

  function draw() {
    const ordered = [...steps].sort((a, b) => a[0] - b[0]);
    const stages = stageStarts(ordered);
    stageNote.textContent = `Stages: ${stages.map((s) => `${s.name} from step ${s.step}`).join(", ")}.`;
    stageNote.hidden = stages.length < 2;
    for (const c of charts) {
      const data = ordered.filter(([, m]) => m.values[c.key] != null).map(([step, m]) => ({ x: step, y: m.values[c.key] }));
      c.update([{ label: c.key, data }], { stages });
    }
    showEvals([...evals.values()]);
    showSamples();
  }

  // Each shows what it fetched, or the error; none runs more than once a second.
  const failed = (err) => { if (!control.signal.aborted) { error.textContent = err.message; error.hidden = false; } };
  const jobSoon = coalesced(() => api(`/jobs/${id}`).then((j) => { if (!control.signal.aborted) { job = j; showJob(); } }, failed), control.signal);
  const checkpointsSoon = coalesced(() => api(`/jobs/${id}/checkpoints`).then((rows) => { if (!control.signal.aborted) showCheckpoints(rows); }, failed), control.signal);
  const drawSoon = coalesced(async () => draw(), control.signal);

  function onEvent(e) {
    lastEvent = e.id;
    if (e.type === "metrics") steps.set(e.data.step, { stage: e.data.stage, values: e.data.values });
    if (e.type === "eval") evals.set(`${e.data.step} ${e.data.label}`, { ...e.data, created_at: e.created_at });
    if (e.type === "metrics" || e.type === "eval") drawSoon();
    if (e.type === "checkpoint") checkpointsSoon();
    jobSoon(); // its status, progress, ETA and best checkpoint move with its events
    addEvent(e);
  }

  function addEvent(e) {
    if (!e.message) return;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(h(`li.${e.level}`, {}, `${new Date(e.created_at).toLocaleTimeString()}  ${e.type.padEnd(10)} ${e.message}`));
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  Promise.all([jobSoon.now(), checkpointsSoon.now()]).then(() => {
    draw(); // the empty charts and tables, until the stream fills them
    return followEvents(id, { signal: control.signal, onEvent });
  }).then(() => { if (!control.signal.aborted) return Promise.all([jobSoon.now(), checkpointsSoon.now(), drawSoon.now()]); })
    .catch((err) => { if (!control.signal.aborted) toast(err.message); });

  return () => {
    control.abort();
    for (const soon of [jobSoon, checkpointsSoon, drawSoon]) soon.cancel();
    clearTimeout(queuedTimer);
    for (const c of [...charts, evalChart]) c.destroy();
  };
}
