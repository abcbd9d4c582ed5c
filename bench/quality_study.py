"""The quality study: does MiniLLM beat SFT, word-level KD and SeqKD at equal compute?

    .venv/bin/python bench/quality_study.py --train DOLLY/dev.jsonl --test DOLLY/valid.jsonl

What it does, in order (every run goes through the engine's own `train`):

1. **One shared student.** The student cut from the teacher's layers is recovered once by
   word-level KD on the training set; every arm starts from that same checkpoint.
2. **Calibration.** Each method trains a few steps from the shared student; its wall-clock seconds
   per optimizer step (MiniLLM's rollout sampling and scoring included, amortised over the updates
   of a phase) fix how many steps it gets.
3. **Equal compute.** The unit is training wall-clock on this machine: every arm gets
   `--budget-seconds` of training, i.e. budget ÷ its own seconds per step, steps. Set-up, evaluation
   and one-off data generation (SeqKD's teacher samples, written once before training) are not
   counted; SeqKD's generation time is reported beside it.
4. **Learning rate per arm**, from a small sweep (`--lrs`): each arm trains once per rate and the
   rate with the best Rouge-L on the selection set (the last `--selection-prompts` of the training
   records, never trained on) is kept.
5. **Ablations** of MiniLLM at its chosen rate and step count: no teacher-mixed sampling (α = 0),
   no length normalisation.
6. **Test set**, with the paper's protocol (`--seeds`, 5 by default): the teacher, the shared
   student and each arm's chosen model are scored on the first `--test-prompts` records of
   `--test`: Rouge-L, response length, distinct-4 and the reverse KL to the teacher on the model's
   own samples (what MiniLLM minimises) per seed; reverse and forward KL to the teacher on the gold
   responses (teacher-forced, so the same under every seed).

It writes `quality.json` (per arm: method, learning rate, steps, compute, and each metric's mean
and per-seed values), the tables into `quality.md` (between its markers, keeping the prose around
them) and `quality.png` (the plot) into `--docs`.
Interrupted, it resumes: finished runs are kept under `--out` and skipped; an unfinished run
starts again. `--devices`, `--accelerator`, `--precision` and the model flags scale it to GPUs and
bigger models.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from minillm_step import cpu_name
from report import write_block

from worker.engine.distributed import DTYPES
from worker.engine.events import JsonlReporter
from worker.engine.models import load_model
from worker.engine.paths import PROJECT_ROOT, write_atomically
from worker.engine.spec import JobSpec, parse_spec
from worker.engine.trainer import Trainer, train

METHODS = ["sft", "kd", "seqkd", "minillm"]
ABLATIONS = {
    "minillm-no-teacher-mix": {"teacher_mix_alpha": 0.0},
    "minillm-no-length-norm": {"length_normalization": False},
}
METRICS = ["rouge_l", "reverse_kl_samples", "reverse_kl", "forward_kl", "response_length", "distinct_4"]
DEFAULT_LRS = {"sft": [1e-4, 3e-4], "kd": [1e-4, 3e-4], "seqkd": [1e-4, 3e-4], "minillm": [2e-5, 1e-4]}


# -- specs ------------------------------------------------------------------------------------------


def base_spec(args, student: dict) -> dict:
    """The fields every run shares: teacher, data, lengths, batch, schedule, evaluation, hardware."""
    return {
        "teacher": args.teacher,
        "student": student,
        "data": {
            "train": str(args.train),
            "eval": str(args.test),
            "prompt_format": "chat",
            "max_prompt_tokens": args.prompt_tokens,
            "max_response_tokens": args.response_tokens,
            # The training records, the last `selection_prompts` of which are held out as the selection set.
            "max_train_records": args.train_records + args.selection_prompts,
        },
        "training": {"batch_size": args.batch_size, "warmup_steps": 0, "lr_schedule": "cosine"},
        # Runs score only the selection set (at their end); the test set is scored once, at the end
        # of the study, so each run's own test evaluation is cut to one prompt and one seed.
        "eval": {
            "every_steps": 0,
            "num_prompts": 1,
            "seeds": [10],
            "selection_num_prompts": args.selection_prompts,
            "selection_seeds": [10],
            "batch_size": args.eval_batch_size,
        },
        "checkpoints": {"every_steps": 0, "keep": 1},
        "minillm": {
            # 8 updates per phase at batch 8 (the demo's ratio), no L_PT: the study compares the
            # objectives on the task, and the paper's L_PT needs a pretraining corpus to sample.
            "rollouts_per_phase": 4 * args.batch_size,
            "rollout_batch_size": args.eval_batch_size,
            "ppo_epochs": 2,
        },
        "deepspeed": {"precision": args.precision},
        "resources": {"devices": args.devices, "accelerator": args.accelerator},
    }


def arm_spec(
    args, shared_student: Path, name: str, method: str, steps: int, lr: float, minillm: dict | None = None
) -> JobSpec:
    spec = base_spec(args, {"model": str(shared_student)})
    spec.update(name=f"quality-{name}", method=method)
    spec["training"].update(steps=steps, learning_rate=lr)
    spec["minillm"].update(minillm or {})
    return parse_spec(spec)


# -- runs -------------------------------------------------------------------------------------------


def events_of(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run_dir: Path) -> bool:
    return any(e["type"] == "state" and e["data"].get("state") == "succeeded" for e in events_of(run_dir))


def run(spec: JobSpec, run_dir: Path) -> list[dict]:
    """Train `spec` into `run_dir` unless a finished run is there already; its events."""
    if not finished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
        run_dir.mkdir(parents=True)
        (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
        print(
            f"[study] {run_dir.name}: {spec.method}, {spec.training.steps} steps, lr {spec.training.learning_rate:g}",
            flush=True,
        )
        train(spec, run_dir, JsonlReporter(run_dir / "events.jsonl"))
        gc.collect()
    return events_of(run_dir)


def final_model(events: list[dict]) -> Path:
    return Path([e for e in events if e["type"] == "checkpoint"][-1]["data"]["path"])


def seconds_per_step(events: list[dict]) -> float:
    """Mean wall-clock seconds per optimizer step, from the start of training to the last step."""
    start = next(e["time"] for e in events if e["type"] == "state" and e["data"].get("state") == "running")
    steps = [e for e in events if e["type"] == "metrics"]
    return (steps[-1]["time"] - start) / len(steps)


def one_off_seconds(events: list[dict], marker: str) -> float | None:
    """Seconds from the log line that starts with `marker` to the next event (data written once)."""
    for before, after in zip(events, events[1:]):
        if before["type"] == "log" and before["message"].startswith(marker):
            return after["time"] - before["time"]
    return None


def selection_rouge(events: list[dict]) -> float:
    return [e for e in events if e["type"] == "eval" and e["data"].get("set") == "selection"][-1]["data"]["scores"][
        "rouge_l"
    ]


# -- the study --------------------------------------------------------------------------------------


class Study:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.state_path = self.out / "study.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_path, json.dumps(self.state, indent=2))

    def shared_student(self) -> Path:
        a = self.args
        student = {"model": a.student} if a.student else {"init_from_teacher": {"num_layers": a.student_layers}}
        spec = base_spec(a, student)
        spec.update(name="quality-shared-student", method="kd")
        spec["training"].update(steps=a.recovery_steps, learning_rate=a.recovery_lr)
        events = run(parse_spec(spec), self.out / "shared-student")
        self.state["shared_student"] = {
            "steps": a.recovery_steps,
            "learning_rate": a.recovery_lr,
            "method": "kd",
            "selection_rouge_l": selection_rouge(events),
        }
        return final_model(events)

    def calibrate(self, shared: Path, method: str) -> float:
        """Seconds per step of `method`, from a short run (MiniLLM: two whole phases)."""
        probe = arm_spec(self.args, shared, f"calibrate-{method}", method, 1, 1e-5)
        steps = 2 * probe.updates_per_phase if method == "minillm" else self.args.calibration_steps
        events = run(
            arm_spec(self.args, shared, f"calibrate-{method}", method, steps, 1e-5), self.out / f"calibrate-{method}"
        )
        seconds = seconds_per_step(events)
        entry = {"seconds_per_step": seconds, "calibration_steps": steps}
        if method == "seqkd":
            entry["teacher_samples_seconds"] = one_off_seconds(events, "SeqKD: the teacher samples")
        self.state.setdefault("calibration", {})[method] = entry
        self.save()
        return seconds

    def sweep(self, shared: Path, method: str, steps: int) -> dict:
        """Train `method` once per learning rate; the rate with the best selection-set Rouge-L wins."""
        tried = {}
        for lr in self.args.lrs[method]:
            events = run(
                arm_spec(self.args, shared, f"{method}-lr{lr:g}", method, steps, lr), self.out / f"{method}-lr{lr:g}"
            )
            tried[f"{lr:g}"] = {"selection_rouge_l": selection_rouge(events), "model": str(final_model(events))}
        best = max(tried, key=lambda lr: tried[lr]["selection_rouge_l"])
        return {
            "method": method,
            "steps": steps,
            "learning_rate": float(best),
            "sweep": tried,
            "model": tried[best]["model"],
        }

    def train_arms(self, shared: Path) -> None:
        a = self.args
        arms = self.state.setdefault("arms", {})
        for method in METHODS:
            per_step = self.calibrate(shared, method)
            steps = max(1, round(a.budget_seconds / per_step))
            arms[method] = self.sweep(shared, method, steps) | {
                "seconds_per_step": per_step,
                "compute_seconds": steps * per_step,
            }
            self.save()
        if a.ablations:
            chosen = arms["minillm"]
            for name, change in ABLATIONS.items():
                lr = chosen["learning_rate"]
                events = run(arm_spec(a, shared, name, "minillm", chosen["steps"], lr, change), self.out / name)
                per_step = seconds_per_step(events)
                arms[name] = {
                    "method": "minillm",
                    "minillm": change,
                    "steps": chosen["steps"],
                    "learning_rate": lr,
                    "selection_rouge_l": selection_rouge(events),
                    "model": str(final_model(events)),
                    "seconds_per_step": per_step,
                    "compute_seconds": per_step * chosen["steps"],
                }
                self.save()

    def test(self, shared: Path) -> None:
        """Score the teacher, the shared student and every arm on the test set, in one process."""
        a = self.args
        spec = base_spec(a, {"model": str(shared)})
        spec.update(name="quality-test", method="sft")
        spec["eval"].update(num_prompts=a.test_prompts, seeds=a.seeds, sample_kl=True)
        trainer = Trainer(parse_spec(spec), self.out / "test", JsonlReporter(self.out / "test" / "events.jsonl"))
        (self.out / "test").mkdir(parents=True, exist_ok=True)
        trainer.setup()
        scores = self.state.setdefault("test", {})
        if "teacher" not in scores:
            means, per_seed = trainer.teacher_scores()
            scores["teacher"] = {"means": means, "per_seed": per_seed}
            self.save()
        models = {"shared student": str(shared)} | {name: arm["model"] for name, arm in self.state["arms"].items()}
        for label, path in models.items():
            if label in scores:
                continue
            print(f"[study] test set: {label}", flush=True)
            model = load_model(path, DTYPES[trainer.precision], trainer.device)
            trainer.evaluate_test(label, 0, model)
            scores[label] = {"means": trainer.scores[label], "per_seed": trainer.per_seed[label]}
            self.save()
            del model
            gc.collect()
        self.state["test_prompts"] = len(trainer.test_examples)

    def run(self) -> None:
        started = time.perf_counter()
        shared = self.shared_student()
        self.save()
        self.train_arms(shared)
        self.test(shared)
        self.state["machine"] = machine()
        self.state["command"] = command(self.args)
        self.state.setdefault("wall_seconds", 0.0)
        self.state["wall_seconds"] += time.perf_counter() - started
        self.save()


# -- report -----------------------------------------------------------------------------------------


def results(state: dict, args) -> dict:
    """quality.json: per arm its method, compute and each metric's mean and per-seed values."""
    arms = {}
    for label, scored in state["test"].items():
        arm = state["arms"].get(label, {})
        per_seed = {m: [v[m] for v in scored["per_seed"].values() if m in v] for m in METRICS}
        arms[label] = {
            "method": arm.get("method", "teacher" if label == "teacher" else "kd (shared start)"),
            **{
                k: arm[k]
                for k in ("minillm", "learning_rate", "steps", "seconds_per_step", "compute_seconds")
                if k in arm
            },
            **(
                {"sweep": {lr: {"selection_rouge_l": v["selection_rouge_l"]} for lr, v in arm["sweep"].items()}}
                if "sweep" in arm
                else {}
            ),
            "metrics": {m: {"mean": scored["means"].get(m), "per_seed": per_seed[m] or None} for m in METRICS},
        }
    return {
        "compute_unit": "training wall-clock seconds on one machine (set-up, evaluation and one-off data generation "
        "excluded); every main arm gets the same budget",
        "budget_seconds": args.budget_seconds,
        "seeds": args.seeds,
        "test_prompts": state["test_prompts"],
        "machine": state["machine"],
        "command": state["command"],
        "wall_seconds": state["wall_seconds"],
        "shared_student": state["shared_student"],
        "calibration": state["calibration"],
        "arms": arms,
    }


def markdown(res: dict) -> str:
    def cell(arm: dict, metric: str) -> str:
        m = arm["metrics"][metric]
        if m["mean"] is None:
            return "–"
        spread = f" ± {statistics.stdev(m['per_seed']):.2f}" if m["per_seed"] and len(m["per_seed"]) > 1 else ""
        return f"{m['mean']:.2f}{spread}"

    rows = [
        "| model | method | lr | steps | compute (s) | Rouge-L | reverse KL, own samples | reverse KL, gold | "
        "forward KL, gold | length | distinct-4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, arm in res["arms"].items():
        lr = f"{arm['learning_rate']:g}" if "learning_rate" in arm else "–"
        compute = f"{arm['compute_seconds']:.0f}" if "compute_seconds" in arm else "–"
        rows.append(
            f"| {label} | {arm['method']} | {lr} | {arm.get('steps', '–')} | {compute} | "
            + " | ".join(cell(arm, m) for m in METRICS)
            + " |"
        )
    sweep = ["| arm | " + "learning rate → selection Rouge-L |", "|---|---|"]
    for label, arm in res["arms"].items():
        if "sweep" in arm:
            sweep.append(
                f"| {label} | "
                + ", ".join(f"{lr}: {v['selection_rouge_l']:.2f}" for lr, v in arm["sweep"].items())
                + " |"
            )
    return "\n".join(rows) + "\n\n" + "\n".join(sweep) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in res["arms"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(
        axes,
        ["rouge_l", "reverse_kl_samples"],
        ["Rouge-L on the test set (higher is better)", "reverse KL to the teacher on own samples (lower is better)"],
    ):
        present = [label for label in labels if res["arms"][label]["metrics"][metric]["mean"] is not None]
        means = [res["arms"][label]["metrics"][metric]["mean"] for label in present]
        ax.bar(
            present, means, color=["#888" if label in ("teacher", "shared student") else "#3a7" for label in present]
        )
        for x, label in enumerate(present):
            seeds = res["arms"][label]["metrics"][metric]["per_seed"] or []
            ax.scatter([x] * len(seeds), seeds, color="black", s=8, zorder=3)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    fig.suptitle(f"{res['test_prompts']} test prompts × seeds {res['seeds']}; dots: one seed each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}; torch {torch.__version__}"


def command(args) -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"bench/quality_study.py {' '.join(args.argv)} (commit {git('rev-parse', '--short', 'HEAD')}{dirty})"


def tables(res: dict) -> str:
    """The block quality.md shows between its markers."""
    return (
        f"{res['test_prompts']} test prompts × seeds {res['seeds']}; machine: {res['machine']}; "
        f"`{res['command']}`; {res['wall_seconds'] / 60:.0f} min in all.\n\n{markdown(res)}\n"
        "![Rouge-L and reverse KL per arm](quality.png)"
    )


def write_report(state: dict, args) -> None:
    res = results(state, args)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    write_block(args.docs / "quality.md", "quality_study.py", tables(res), "Quality study")
    plot(res, args.docs / "quality.png")
    print(markdown(res))


def parse_lrs(values: list[str]) -> dict[str, list[float]]:
    lrs = {method: list(rates) for method, rates in DEFAULT_LRS.items()}
    for value in values:
        method, _, rates = value.partition("=")
        if method not in lrs or not rates:
            raise SystemExit(f"--lrs: expected METHOD=LR[,LR...] with METHOD one of {', '.join(lrs)}, got {value!r}")
        lrs[method] = [float(r) for r in rates.split(",")]
    return lrs


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--train",
        type=Path,
        required=True,
        help="training records (Dolly layout JSONL); the selection set is cut from them",
    )
    p.add_argument("--test", type=Path, required=True, help="test records (Dolly layout JSONL)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "quality-study", help="runs and resume state")
    p.add_argument(
        "--docs", type=Path, default=PROJECT_ROOT / "docs", help="where quality.json, quality.md and quality.png go"
    )
    p.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    p.add_argument("--student", default=None, help="a student model to recover from (default: cut from the teacher)")
    p.add_argument("--student-layers", type=int, default=10, help="teacher layers the student keeps (evenly spaced)")
    p.add_argument("--train-records", type=int, default=400, help="training records used (before the selection slice)")
    p.add_argument("--selection-prompts", type=int, default=32)
    p.add_argument("--test-prompts", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    p.add_argument("--prompt-tokens", type=int, default=192)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--recovery-steps", type=int, default=60, help="word-level KD steps that make the shared student")
    p.add_argument("--recovery-lr", type=float, default=5e-4)
    p.add_argument("--calibration-steps", type=int, default=6, help="steps timed per method (MiniLLM: two phases)")
    p.add_argument("--budget-seconds", type=float, default=300, help="training wall-clock of each arm")
    p.add_argument(
        "--lrs", nargs="*", default=[], metavar="METHOD=LR,LR", help=f"learning rates swept (default {DEFAULT_LRS})"
    )
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--report-only", action="store_true", help="redraw the report from --out's study.json")
    args = p.parse_args(argv)
    args.lrs = parse_lrs(args.lrs)
    args.train, args.test = args.train.resolve(), args.test.resolve()
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main() -> None:
    args = parse_args()
    study = Study(args)
    if not args.report_only:
        study.run()
    write_report(study.state, args)


if __name__ == "__main__":
    main()
