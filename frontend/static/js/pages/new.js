// New job: a form for the main fields (defaults and help from the API's own schema) or the full
// spec as YAML; the API validates it, and each 422 error appears beside the field its `loc` names.
// #/new?clone=JOB_ID starts from that job's spec.
import { api } from "../api.js";
import { dump, load } from "/vendor/js-yaml.mjs";
import { apiSchemas, h, toast } from "../util.js";

// [path, label, kind]; kind: text, int, float, select (options from the schema's enum), bool (false or true), data
const SECTIONS = [
  ["Job", [["name", "Name", "text"], ["method", "Method", "select"], ["teacher", "Teacher", "text"]]],
  ["Data", [["data.train", "Training set", "data"], ["data.selection", "Selection set", "data"], ["data.eval", "Test set", "data"],
    ["data.pretrain", "Pretraining corpus (MiniLLM's LM term)", "data"],
    ["data.prompt_format", "Prompt format", "select"], ["data.max_train_records", "Max training records", "int"],
    ["data.max_prompt_tokens", "Max prompt tokens", "int"], ["data.max_response_tokens", "Max response tokens", "int"]]],
  ["Training", [["training.steps", "Steps", "int"], ["training.batch_size", "Batch size", "int"],
    ["training.gradient_accumulation", "Gradient accumulation", "int"], ["training.learning_rate", "Learning rate", "float"],
    ["training.lr_schedule", "LR schedule", "select"], ["training.warmup_steps", "Warmup steps", "int"],
    ["training.seed", "Seed", "int"]]],
  ["MiniLLM", [["minillm.rollouts_per_phase", "Rollouts per phase", "int"], ["minillm.rollout_batch_size", "Rollout batch size", "int"],
    ["minillm.ppo_epochs", "PPO epochs", "int"], ["minillm.teacher_mix_alpha", "Teacher mix α", "float"]]],
  ["GKD", [["gkd.beta", "β of the divergence", "float"], ["gkd.lmbda", "On-policy share λ", "float"],
    ["gkd.seq_kd", "Teacher's samples off-policy (seq_kd)", "bool"], ["gkd.temperature", "Temperature", "float"]]],
  ["Evaluation and checkpoints", [["eval.every_steps", "Score the selection set every N steps", "int"], ["eval.num_prompts", "Test prompts", "int"],
    ["eval.selection_num_prompts", "Selection prompts", "int"],
    ["eval.batch_size", "Eval batch size", "int"], ["checkpoints.every_steps", "Checkpoint every N steps", "int"],
    ["checkpoints.keep", "Checkpoints kept", "int"]]],
  ["Resources", [["resources.devices", "Devices", "int"], ["resources.accelerator", "Accelerator", "select"],
    ["deepspeed.precision", "Precision", "select"]]],
];
const BUILTINS = ["builtin:smollm2-135m-instruct", "builtin:tiny-teacher", "builtin:tiny-student"];
const fieldId = (path) => "f-" + path.replace(/\./g, "-");

/** The JSON schema of a spec field, following $ref and optional (anyOf with null). */
function schemaOf(all, path) {
  let node = all.JobRequest;
  for (const key of path.split(".")) {
    let prop = node && node.properties && node.properties[key];
    if (!prop) return null;
    const ref = prop.$ref || (prop.anyOf || []).map((a) => a.$ref).find(Boolean);
    node = ref ? { ...all[ref.split("/").pop()], description: prop.description ?? all[ref.split("/").pop()].description, default: prop.default } : prop;
  }
  if (node && node.anyOf && !node.enum) {
    const inner = node.anyOf.find((a) => a.type !== "null");
    node = { ...inner, ...node, type: inner && inner.type, enum: inner && inner.enum };
  }
  return node;
}

function setPath(obj, path, value) {
  const keys = path.split(".");
  let node = obj;
  for (const key of keys.slice(0, -1)) node = node[key] ??= {};
  node[keys.at(-1)] = value;
}

export function render(main, { params }) {
  const inputs = new Map(); // path -> input element
  const errors = new Map(); // path -> error element
  const summary = h("div.error-box", { role: "alert", hidden: true, id: "form-errors", tabindex: -1 });
  const yaml = h("textarea", { id: "f-yaml", rows: 24, spellcheck: "false", "aria-describedby": "yaml-help err-yaml" });
  const yamlError = h("p.field-error", { id: "err-yaml", hidden: true });
  const advanced = h("details", { id: "advanced", ontoggle: () => { if (advanced.open) yaml.value = dump(fromForm(), { lineWidth: 120 }); } },
    h("summary", {}, "Advanced: edit the full YAML spec"),
    h("p.help.small.muted", { id: "yaml-help" }, "While this section is open, the job is submitted from this YAML (JSON works too) instead of the form above. Every field of the spec is accepted; see the README's “The job spec”."),
    yaml, yamlError);
  const submit = h("button", { type: "submit" }, "Submit job");
  const form = h("form.spec", { novalidate: true, onsubmit: onSubmit });

  main.append(h("h1", {}, "New job"), summary, form);

  function field(path, label, kind, schema) {
    const id = fieldId(path);
    const help = schema && schema.description;
    const def = schema && schema.default;
    let input;
    if (kind === "select" || kind === "bool") {
      const options = kind === "bool" ? [false, true] : (schema && schema.enum) || [];
      input = h("select", { id }, options.map((o) => h("option", { value: String(o), selected: o === def }, String(o))));
    } else {
      input = h("input", { id, type: kind === "int" || kind === "float" ? "number" : "text", step: kind === "float" ? "any" : kind === "int" ? "1" : undefined,
        value: def == null ? "" : String(def), inputmode: kind === "float" ? "decimal" : undefined, list: path === "teacher" ? "builtins" : undefined,
        placeholder: def == null && kind !== "text" && kind !== "data" ? "none" : undefined });
    }
    input.dataset.kind = kind;
    inputs.set(path, input);
    const error = h("p.field-error", { id: `err-${id}`, hidden: true });
    errors.set(path, error);
    input.setAttribute("aria-describedby", `help-${id} err-${id}`);
    const parts = [h("label", { for: id }, label), input];
    if (kind === "data") {
      const file = h("input", { type: "file", accept: ".jsonl,.json,application/x-ndjson", id: `${id}-file`, class: "small",
        onchange: () => upload(file, input) });
      parts.push(h("label.small.muted", { for: `${id}-file` }, "or upload a JSONL file:"), file);
    }
    parts.push(error, h("p.help", { id: `help-${id}` }, help || ""));
    return h("div.field", { dataset: { path } }, ...parts);
  }

  async function upload(file, input) {
    const f = file.files[0];
    if (!f) return;
    try {
      const ds = await api(`/datasets?name=${encodeURIComponent(f.name)}`, { method: "POST", raw: f, headers: { "Content-Type": "application/x-ndjson" } });
      input.value = `dataset:${ds.id}`;
      toast(`Uploaded ${ds.name}: ${ds.num_records} records`);
    } catch (err) {
      const e = errors.get([...inputs].find(([, i]) => i === input)[0]);
      e.textContent = err.message;
      e.hidden = false;
    }
  }

  function studentFieldset(all) {
    const source = (value, label) => h("label", {}, h("input", { type: "radio", name: "student-source", value, checked: value === "model", onchange: sync }), " ", label);
    const model = field("student.model", "Student model", "text", schemaOf(all, "student.model"));
    const layers = field("student.init_from_teacher.num_layers", "Layers kept", "int", schemaOf(all, "student.init_from_teacher.num_layers"));
    const strategy = field("student.init_from_teacher.strategy", "Which layers", "select", schemaOf(all, "student.init_from_teacher.strategy"));
    inputs.get("student.model").setAttribute("list", "builtins");
    const studentError = h("p.field-error", { id: "err-student", hidden: true });
    errors.set("student", studentError);
    function sync() {
      const derive = form.querySelector('input[name="student-source"]:checked').value === "derive";
      model.hidden = derive; layers.hidden = !derive; strategy.hidden = !derive;
    }
    queueMicrotask(sync);
    return h("fieldset", { dataset: { path: "student" } }, h("legend", {}, "Student"),
      h("fieldset.radios", {}, h("legend.small.muted", {}, "Source"), source("model", "A model (builtin, local path or hub id)"), source("derive", "Derived from the teacher")),
      studentError,
      h("div.fields", {}, model, layers, strategy));
  }

  function fromForm() {
    const spec = {};
    const derive = form.querySelector('input[name="student-source"]:checked')?.value === "derive";
    for (const [path, input] of inputs) {
      if (path.startsWith("student.") && (derive ? path === "student.model" : path !== "student.model")) continue;
      const raw = input.value.trim();
      if (raw === "") continue;
      const kind = input.dataset.kind;
      const value = kind === "int" || kind === "float" ? (isNaN(Number(raw)) ? raw : Number(raw)) : kind === "bool" ? raw === "true" : raw;
      setPath(spec, path, value);
    }
    return spec;
  }

  function clearErrors() {
    summary.hidden = true;
    for (const [path, e] of errors) { e.hidden = true; e.textContent = ""; inputs.get(path)?.removeAttribute("aria-invalid"); }
    yamlError.hidden = true;
    yaml.removeAttribute("aria-invalid");
  }

  function showErrors(detail) {
    const unplaced = [];
    let first = null;
    for (const d of detail) {
      const loc = (d.loc || []).slice(d.loc[0] === "body" ? 1 : 0).map(String);
      const where = loc.join(".") || "spec";
      if (advanced.open) { unplaced.push(`${where}: ${d.msg}`); continue; }
      let path = null;
      for (let n = loc.length; n > 0 && !path; n--) if (errors.has(loc.slice(0, n).join("."))) path = loc.slice(0, n).join(".");
      const target = path && errors.get(path);
      const input = path && inputs.get(path);
      if (!target || (input && input.closest("[hidden]"))) { unplaced.push(`${where}: ${d.msg}`); continue; }
      target.textContent = [target.textContent, d.msg].filter(Boolean).join("; ");
      target.hidden = false;
      if (input) { input.setAttribute("aria-invalid", "true"); first ??= input; }
    }
    if (advanced.open && unplaced.length) {
      yamlError.textContent = unplaced.join("\n");
      yamlError.style.whiteSpace = "pre-line";
      yamlError.hidden = false;
      yaml.setAttribute("aria-invalid", "true");
      first = yaml;
    }
    const others = !advanced.open && unplaced.length ? [h("ul", {}, unplaced.map((u) => h("li", {}, u)))] : [];
    summary.replaceChildren(h("p.flush", {}, `The API refused this spec (${detail.length} problem${detail.length > 1 ? "s" : ""}); each is shown beside its field.`),
      ...others);
    summary.hidden = false;
    (first || summary).focus();
  }

  /**
   * Start from another job's whole spec: its main fields in the form, and all of it in the YAML
   * editor, opened (the form holds only the main fields, and a clone should lose nothing).
   */
  function fill(spec) {
    const source = form.querySelector(`input[name="student-source"][value="${spec.student?.init_from_teacher ? "derive" : "model"}"]`);
    source.checked = true;
    source.dispatchEvent(new Event("change"));
    for (const [path, input] of inputs) {
      const value = path.split(".").reduce((node, key) => node?.[key], spec);
      input.value = value == null ? "" : String(value);
    }
    // Registered after the editor's own toggle handler, which writes the form's fields into it.
    advanced.addEventListener("toggle", () => { yaml.value = dump(spec, { lineWidth: 120 }); }, { once: true });
    advanced.open = true;
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearErrors();
    let spec;
    if (advanced.open) {
      try {
        spec = load(yaml.value);
        if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw new Error("a spec is a mapping of fields");
      } catch (err) {
        yamlError.textContent = `Not valid YAML: ${err.message}`;
        yamlError.hidden = false;
        yaml.setAttribute("aria-invalid", "true");
        yaml.focus();
        return;
      }
    } else spec = fromForm();
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", body: spec, headers: { "Idempotency-Key": crypto.randomUUID() } });
      toast(`Submitted ${job.name}`);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (err.status === 422 && err.body && Array.isArray(err.body.detail)) showErrors(err.body.detail);
      else { summary.replaceChildren(`Could not submit: ${err.message}`); summary.hidden = false; summary.focus(); }
    } finally {
      submit.disabled = false;
    }
  }

  apiSchemas().then((all) => {
    const sections = SECTIONS.map(([legend, fields], i) => h("fieldset", {}, h("legend", {}, legend),
      h("div.fields", {}, fields.map(([path, label, kind]) => field(path, label, kind, schemaOf(all, path))))));
    form.append(
      h("datalist", { id: "builtins" }, BUILTINS.map((b) => h("option", { value: b }))),
      sections[0], studentFieldset(all), ...sections.slice(1),
      advanced,
      h("p", {}, submit));
    const cloned = params.get("clone");
    if (cloned) api(`/jobs/${encodeURIComponent(cloned)}`).then((job) => {
      fill({ ...job.spec, name: `${job.name}-copy` });
      form.prepend(h("p.muted", { id: "clone-note" }, "A copy of job ", h("a", { href: `#/jobs/${job.id}` }, job.name), "'s spec: edit it, then submit."));
    }).catch((err) => { summary.textContent = `Could not load job ${cloned} to clone: ${err.message}`; summary.hidden = false; });
  }).catch((err) => { summary.textContent = `Could not load the spec schema: ${err.message}`; summary.hidden = false; });
}
