"""The quality study: does MiniLLM beat SFT, word-level KD, SeqKD and GKD in the paper's set-up?

    .venv/bin/python bench/quality_study.py --data ../shared/data                 # 2 CPU cores, about 2 h
    .venv/bin/python bench/quality_study.py --data DATA --preset gpu --teacher DIR  # the paper's sizes

`--data` is a folder with the paper's sets in MiniLLM's record layout (`instruction`, `input`,
`output`; `output` may be a list of references): `dolly/dev.jsonl` to train on, and the test sets
`dolly/valid.jsonl`, `self-inst/valid.jsonl`, `vicuna/valid.jsonl`, `sinst/valid.jsonl` and
`uinst/valid.jsonl` (evaluation only). Every run goes through the engine's own `train`. In order:

1. **Teacher.** The teacher is fine-tuned on the training split first (SFT); every arm distils from
   that teacher, and it is scored too.
2. **Starting student.** The student cut from the teacher's (not fine-tuned) layers; scored too.
3. **SFT, KD and SeqKD**, each from the starting student, with the selection set (the last
   `--selection-prompts` training records, never trained on, sampled under `--selection-seeds`)
   scored every `--select-every` steps; each arm's best-scoring checkpoint is the one reported.
4. **MiniLLM and GKD** start from the SFT arm's selected checkpoint, as in the paper: MiniLLM with the
   paper's update recipe (4 PPO epochs, a constant rate after warm-up, teacher mix 0.2), GKD at
   β = 1, λ = 1 (MiniLLM's single-step term alone) and at TRL's defaults β = 0.5, λ = 0.5 (`gkd-jsd`),
   the same number of updates and the same selection. `sft-more` is their control: SFT continued from
   that checkpoint with the same steps, rate and selection, so that a gain over it is the objective's
   and not just more updates.
5. **Test sets.** Every model answers the first `--dolly-prompts` Dolly test records under
   `--dolly-seeds` and the first `--other-prompts` of each other set under `--other-seeds` (the
   records whose prompt fits `--prompt-tokens`), sampled as the paper does (temperature 1, no
   repeated 6-grams), scored by Rouge-L against every reference; each prompt's score under each seed
   is kept.
6. **Comparisons.** MiniLLM minus each other model on every set, with a paired bootstrap 95 %
   interval over prompts (each prompt's mean over seeds; 10,000 resamples).

Compute is measured and charged: each arm's training steps (the engine's timed sections of every step:
sampling, scoring, forwards, backward, optimizer; MiniLLM's rollouts and GKD's on-policy samples
included), SeqKD's one-off teacher sampling, and for the arms that start from SFT's checkpoint the SFT
steps up to it. The teacher's fine-tuning serves every arm and is reported apart.

Each run is kept under `--out` in a folder named by its spec's fingerprint: interrupted, the study
resumes where it stopped, and a changed setting never reuses a run made with another. It writes
`quality.json` (what ran and every score), the tables into `quality.md` (between its markers, keeping
the prose around them) and `quality.png` into `--docs`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from minillm_step import cpu_name
from report import write_block

from worker.engine import checkpoints as ckpt
from worker.engine.batch import collate
from worker.engine.data import Record, tokenize
from worker.engine.distributed import DTYPES, choose_precision, use_gpu
from worker.engine.evaluation import rouge_l
from worker.engine.events import JsonlReporter
from worker.engine.models import derive_student, load_model, load_tokenizer, resolve_model
from worker.engine.paths import PROJECT_ROOT, write_atomically
from worker.engine.sampling import sample
from worker.engine.spec import InitFromTeacher, JobSpec, parse_spec
from worker.engine.trainer import train

SETS = {
    "dolly": "dolly/valid.jsonl",
    "self-inst": "self-inst/valid.jsonl",
    "vicuna": "vicuna/valid.jsonl",
    "sinst": "sinst/valid.jsonl",
    "uinst": "uinst/valid.jsonl",
}
TRAIN = "dolly/dev.jsonl"
# The models scored, in the table's order; MiniLLM is compared with each of the others.
MODELS = ["teacher", "student", "sft", "kd", "seqkd", "sft-more", "gkd", "gkd-jsd", "minillm"]
GKD_SETTINGS = {"gkd": {"beta": 1.0, "lmbda": 1.0}, "gkd-jsd": {"beta": 0.5, "lmbda": 0.5}}

# Sizes. cpu: the floors for the test sets (200 Dolly prompts x 3 seeds, 64 x 2 from each other set,
# 128-token responses) and for MiniLLM (150 updates). Measured on 2 cores (AMD EPYC, bf16) with the SmolLM2-135M
# teacher: 2 h 3 min in all (docs/quality.md); the teacher's SFT about 11 min, each student arm 9 to 18 min with
# its selection (a selection pass about 55 s), every model's test sets 2 to 5 min.
# gpu: the paper's sizes. smoke: tiny random models, every stage in half a minute (the tests).
PRESETS = {
    "cpu": dict(
        teacher="builtin:smollm2-135m-instruct",
        student_layers=10,
        train_records=1000,
        selection_prompts=64,
        selection_seeds=[10, 20],
        dolly_prompts=200,
        dolly_seeds=[10, 20, 30],
        other_prompts=64,
        other_seeds=[10, 20],
        prompt_tokens=256,
        response_tokens=128,
        batch_size=8,
        eval_batch_size=32,
        teacher_steps=80,
        teacher_lr=5e-5,
        baseline_steps=100,
        baseline_lr=1e-4,
        select_every=25,
        rl_steps=150,
        rl_lr=2e-5,
        rl_select_every=50,
        rollouts_per_phase=64,
        warmup_steps=10,
    ),
    "gpu": dict(
        teacher="Qwen/Qwen2.5-1.5B-Instruct",
        student_layers=7,
        train_records=1000,
        selection_prompts=200,
        selection_seeds=[10, 20],
        dolly_prompts=500,
        dolly_seeds=[10, 20, 30, 40, 50],
        other_prompts=256,
        other_seeds=[10, 20, 30],
        prompt_tokens=256,
        response_tokens=256,
        batch_size=64,
        eval_batch_size=64,
        teacher_steps=300,
        teacher_lr=1e-5,
        baseline_steps=300,
        baseline_lr=5e-5,
        select_every=50,
        rl_steps=1000,
        rl_lr=5e-6,
        rl_select_every=100,
        rollouts_per_phase=256,
        warmup_steps=100,
    ),
    "smoke": dict(
        teacher="builtin:tiny-teacher",
        student_layers=1,
        train_records=24,
        selection_prompts=4,
        selection_seeds=[10],
        dolly_prompts=3,
        dolly_seeds=[10, 20],
        other_prompts=2,
        other_seeds=[10],
        prompt_tokens=128,
        response_tokens=8,
        batch_size=2,
        eval_batch_size=4,
        teacher_steps=2,
        teacher_lr=1e-3,
        baseline_steps=4,
        baseline_lr=1e-3,
        select_every=2,
        rl_steps=4,
        rl_lr=1e-3,
        rl_select_every=2,
        rollouts_per_phase=4,
        warmup_steps=1,
    ),
}


# -- data -------------------------------------------------------------------------------------------


@dataclass
class TestRecord:
    record: Record  # what the prompt is made of
    references: list[str]  # every reference answer: Rouge-L takes the best match, as the paper


def read_test_set(path: Path) -> list[TestRecord]:
    """MiniLLM's evaluation layout: `instruction`, `input`, and `output` as one reference or a list of them."""
    found = []
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        output = obj["output"]
        references = [output] if isinstance(output, str) else list(output)
        found.append(TestRecord(Record(obj["instruction"], obj.get("input") or "", references[0]), references))
    return found


def write_training_split(args, folder: Path) -> tuple[Path, Path]:
    """The training records and the selection slice (the last `selection_prompts`), as files the engine reads."""
    lines = (args.data / TRAIN).read_text().splitlines()[: args.train_records]
    cut = len(lines) - args.selection_prompts
    folder.mkdir(parents=True, exist_ok=True)
    train_file, selection_file = folder / "train.jsonl", folder / "selection.jsonl"
    for path, part in ((train_file, lines[:cut]), (selection_file, lines[cut:])):
        text = "".join(json.dumps(_engine_record(json.loads(line))) + "\n" for line in part)
        if not path.exists() or path.read_text() != text:
            write_atomically(path, text)
    return train_file, selection_file


def _engine_record(obj: dict) -> dict:
    """A Dolly-layout record with only the engine's fields (MiniLLM's files also carry a rendered `prompt`)."""
    return {"instruction": obj["instruction"], "input": obj.get("input") or "", "output": obj["output"]}


# -- runs -------------------------------------------------------------------------------------------


def events_of(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run_dir: Path) -> bool:
    return any(e["type"] == "state" and e["data"].get("state") == "succeeded" for e in events_of(run_dir))


def step_seconds(events: list[dict], up_to: int | None = None) -> float:
    """Training compute of a run: the timed sections of each step (`time_*` metrics), summed over its steps
    (those up to `up_to`); set-up, evaluations and checkpoints are not in them."""
    return sum(
        value
        for e in events
        if e["type"] == "metrics" and (up_to is None or e["data"]["step"] <= up_to)
        for name, value in e["data"]["values"].items()
        if name.startswith("time_")
    )


def one_off_seconds(events: list[dict], marker: str) -> float:
    """Seconds from the log line that starts with `marker` to the next event (data written once), else 0."""
    for before, after in zip(events, events[1:]):
        if before["type"] == "log" and before["message"].startswith(marker):
            return after["time"] - before["time"]
    return 0.0


def selection_scores(events: list[dict]) -> dict[int, dict]:
    """step -> the selection set's scores at that step (mean Rouge-L and the per-seed values)."""
    return {
        e["data"]["step"]: {"rouge_l": e["data"]["scores"]["rouge_l"], "per_seed": e["data"].get("per_seed")}
        for e in events
        if e["type"] == "eval" and e["data"].get("set") == "selection"
    }


@dataclass
class Run:
    """A finished run: where it is, its events, and its selected checkpoint."""

    folder: Path
    events: list[dict]

    @property
    def selected_step(self) -> int:
        """The step of the checkpoint the engine chose on the selection set (its `best` test evaluation)."""
        return next(e["data"]["step"] for e in self.events if e["type"] == "eval" and e["data"]["label"] == "best")

    @property
    def selected(self) -> Path:
        return self.folder / "checkpoints" / ckpt.step_dir_name(self.selected_step)


def short_hash(value: object) -> str:
    """A short stable name for `value` (JSON-serialisable): what a cache entry or folder is keyed by."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


# -- the study --------------------------------------------------------------------------------------


class Study:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.state_path = self.out / "study.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        # Wall time adds up over invocations, saved with every run and score so a stopped one is counted.
        self.wall_before, self.started = self.state.get("wall_seconds", 0.0), time.perf_counter()
        self.train_file, self.selection_file = write_training_split(args, self.out / "data")

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.state["wall_seconds"] = self.wall_before + time.perf_counter() - self.started
        write_atomically(self.state_path, json.dumps(self.state, indent=2))

    # -- training runs --

    def spec(self, name: str, method: str, teacher: str, student: dict, steps: int, lr: float, **sections) -> JobSpec:
        """A run's spec: the study's data, lengths and batch, the selection set scored every so often and
        its best checkpoint kept; the engine's own test-set scoring cut to one prompt (the study scores)."""
        a = self.args
        spec = {
            "name": f"quality-{name}",
            "method": method,
            "teacher": teacher,
            "student": student,
            "data": {
                "train": str(self.train_file),
                "selection": str(self.selection_file),
                "eval": str(self.selection_file),
                "prompt_format": "chat",
                "max_prompt_tokens": a.prompt_tokens,
                "max_response_tokens": a.response_tokens,
            },
            "training": {
                "steps": steps,
                "learning_rate": lr,
                "batch_size": a.batch_size,
                "warmup_steps": min(a.warmup_steps, steps - 1),
                "lr_schedule": "constant",
            },
            "eval": {
                "every_steps": a.select_every,
                "num_prompts": 1,
                "seeds": [10],
                "selection_num_prompts": a.selection_prompts,
                "selection_seeds": a.selection_seeds,
                "batch_size": a.eval_batch_size,
                "samples": 0,
            },
            "checkpoints": {"every_steps": a.select_every, "keep": 1},
            "deepspeed": {"precision": a.precision},
            "resources": {"devices": a.devices, "accelerator": a.accelerator},
        }
        for section, values in sections.items():
            spec[section] = {**spec.get(section, {}), **values}
        return parse_spec(spec)

    def run(self, name: str, spec: JobSpec) -> Run:
        """Train `spec` into OUT/NAME-FINGERPRINT unless a finished run is there: a changed setting is a new run."""
        folder = self.out / "runs" / f"{name}-{spec.fingerprint()}"
        if not finished(folder):
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished run starts again
            folder.mkdir(parents=True)
            (folder / "spec.json").write_text(spec.model_dump_json(indent=2))
            print(f"[study] {name}: {spec.method}, {spec.training.steps} steps, lr {spec.training.learning_rate:g}")
            train(spec, folder, JsonlReporter(folder / "events.jsonl"))
            gc.collect()
            self.save()
        return Run(folder, events_of(folder))

    def minillm_recipe(self) -> dict:
        """MiniLLM's section: the paper's recipe; rollouts at the study's response length, no L_PT corpus."""
        a = self.args
        return {
            "rollouts_per_phase": a.rollouts_per_phase,
            "rollout_batch_size": a.eval_batch_size,
            "ppo_epochs": 4,
            "teacher_mix_alpha": 0.2,
        }

    def teacher(self) -> Run:
        a = self.args
        every = max(1, a.teacher_steps // 2)  # the teacher answers slowly: its selection at half and at the end
        spec = self.spec(
            "teacher",
            "sft",
            a.teacher,
            {"model": a.teacher},
            a.teacher_steps,
            a.teacher_lr,
            eval={"every_steps": every},
            checkpoints={"every_steps": every},
        )
        return self.run("teacher", spec)

    def student(self) -> Path:
        """The starting student: `student_layers` of the pretrained teacher's layers, evenly spaced."""
        folder = self.out / "student" / f"{short_hash(self.args.teacher)}-{self.args.student_layers}"
        if not (folder / "config.json").exists():
            init = InitFromTeacher(num_layers=self.args.student_layers)
            derive_student(resolve_model(self.args.teacher), init, folder)
        return folder

    def arms(self, teacher: str, student: Path) -> dict[str, tuple[Run, dict]]:
        """Every trained arm: its run and what it is (method, start, rate, steps, compute)."""
        a = self.args
        start = {"model": str(student)}
        arms = {}
        for method in ("sft", "kd", "seqkd"):
            run = self.run(method, self.spec(method, method, teacher, start, a.baseline_steps, a.baseline_lr))
            compute = {"steps": step_seconds(run.events)}
            if method == "seqkd":
                compute["teacher_samples"] = one_off_seconds(run.events, "SeqKD: the teacher samples")
            arms[method] = (run, {"start": "student", "learning_rate": a.baseline_lr, "compute": compute})
        sft = arms["sft"][0]
        inherited = {"sft_steps": step_seconds(sft.events, up_to=sft.selected_step)}
        from_sft = {"model": str(sft.selected)}
        rl = dict(
            method="minillm",
            teacher=teacher,
            student=from_sft,
            steps=a.rl_steps,
            lr=a.rl_lr,
            eval={"every_steps": a.rl_select_every},
            checkpoints={"every_steps": a.rl_select_every},
        )
        run = self.run("minillm", self.spec(name="minillm", minillm=self.minillm_recipe(), **rl))
        arms["minillm"] = (run, {"start": f"sft@{sft.selected_step}", "learning_rate": a.rl_lr})
        for name, setting in GKD_SETTINGS.items():
            run = self.run(name, self.spec(name=name, gkd=setting, **{**rl, "method": "gkd"}))
            arms[name] = (run, {"start": f"sft@{sft.selected_step}", "learning_rate": a.rl_lr, "gkd": setting})
        # The control for the extra updates MiniLLM and GKD get: SFT itself, continued from the same start
        # with the same steps, rate and selection, so a gain over it is the objective's, not more training.
        run = self.run("sft-more", self.spec(name="sft-more", **{**rl, "method": "sft"}))
        arms["sft-more"] = (run, {"start": f"sft@{sft.selected_step}", "learning_rate": a.rl_lr})
        for name in ("minillm", *GKD_SETTINGS, "sft-more"):
            arms[name][1]["compute"] = {"steps": step_seconds(arms[name][0].events), **inherited}
        return arms

    # -- test sets --

    @cached_property
    def test_sets(self) -> dict[str, tuple[list[TestRecord], list[int]]]:
        """Each test set's records and seeds, read once for all the models."""
        a = self.args
        return {
            name: (read_test_set(a.data / path), a.dolly_seeds if name == "dolly" else a.other_seeds)
            for name, path in SETS.items()
        }

    def score(self, label: str, model_dir: Path, tokenizer, device, dtype) -> dict[str, dict]:
        """`label`'s Rouge-L on every test set, per prompt and seed (cached by model, set and settings)."""
        a = self.args
        found, model = {}, None
        for set_name, (records, seeds) in self.test_sets.items():
            limit = a.dolly_prompts if set_name == "dolly" else a.other_prompts
            key = short_hash([str(model_dir), set_name, limit, seeds, a.prompt_tokens, a.response_tokens])
            cached = self.state.setdefault("scores", {}).get(key)
            if cached is None:
                if model is None:
                    print(f"[study] test sets: {label}", flush=True)
                    model = load_model(model_dir, dtype, device).eval()
                cached = score_set(model, tokenizer, records, limit, seeds, a, device)
                self.state["scores"][key] = cached
                self.save()
            found[set_name] = cached
        del model
        gc.collect()
        return found

    def run_all(self) -> dict:
        a = self.args
        teacher_run, student = self.teacher(), self.student()
        teacher = str(teacher_run.selected)
        arms = self.arms(teacher, student)
        probe = self.spec("probe", "sft", teacher, {"model": teacher}, 1, 1e-5)
        device = torch.device("cuda" if use_gpu(probe) else "cpu")
        dtype = DTYPES[choose_precision(probe, device)]
        tokenizer = load_tokenizer(resolve_model(a.teacher))
        models = {"teacher": teacher_run.selected, "student": student} | {n: r.selected for n, (r, _) in arms.items()}
        scores = {label: self.score(label, path, tokenizer, device, dtype) for label, path in models.items()}
        self.save()
        return results(a, teacher_run, arms, scores, self.state["wall_seconds"])


@torch.no_grad()
def score_set(model, tokenizer, records: list[TestRecord], limit: int, seeds: list[int], a, device) -> dict:
    """The first `limit` records whose prompt fits, each answered once per seed: Rouge-L and length per prompt."""
    examples, _ = tokenize([r.record for r in records], tokenizer, "chat", a.prompt_tokens, a.response_tokens)
    by_record = {id(r.record): r for r in records}
    examples = examples[:limit]
    out = {"prompts": len(examples), "rouge_l": {}, "length": {}}
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed * 7919)
        rouge, length = [], []
        for start in range(0, len(examples), a.eval_batch_size):
            chunk = examples[start : start + a.eval_batch_size]
            prompts = collate([(e.prompt_ids, []) for e in chunk], tokenizer.pad_token_id).to(device)
            batch = sample(
                model,
                prompts.prompt_ids,
                prompts.prompt_mask,
                max_new_tokens=a.response_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                vocab_size=len(tokenizer),
                generator=generator,
                no_repeat_ngram_size=6,
            ).batch
            for example, response, valid in zip(chunk, batch.response_ids.cpu(), batch.response_mask.cpu()):
                text = tokenizer.decode(response[valid.bool()], skip_special_tokens=True).strip()
                rouge.append(rouge_l(text, by_record[id(example.record)].references))
                length.append(int(valid.sum()))
        out["rouge_l"][str(seed)], out["length"][str(seed)] = rouge, length
    return out


# -- report -----------------------------------------------------------------------------------------


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(a − b) over prompts resampled with replacement (a, b: per-prompt scores, paired)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def per_prompt(scored: dict) -> list[float]:
    """Each prompt's Rouge-L averaged over the seeds."""
    seeds = list(scored["rouge_l"].values())
    return [sum(values) / len(values) for values in zip(*seeds)]


def set_summary(scored: dict) -> dict:
    per_seed = {seed: statistics.fmean(values) for seed, values in scored["rouge_l"].items()}
    return {
        "rouge_l": {"mean": statistics.fmean(per_seed.values()), "per_seed": per_seed},
        "response_length": statistics.fmean(v for values in scored["length"].values() for v in values),
        "prompts": scored["prompts"],
    }


def selection_of(run: Run) -> dict:
    """How the checkpoint was chosen, in numbers: the selection score at every scored step (0: the model it
    started from), the chosen step, its margin over the runner-up checkpoint, and the seed-to-seed spread of
    the chosen score."""
    scores = selection_scores(run.events)
    ranked = sorted((s for step, s in scores.items() if step > 0), key=lambda s: s["rouge_l"], reverse=True)
    chosen = scores[run.selected_step]
    seeds = list((chosen["per_seed"] or {}).values())
    return {
        "step": run.selected_step,
        "rouge_l_by_step": {str(step): s["rouge_l"] for step, s in sorted(scores.items())},
        "margin_over_runner_up": ranked[0]["rouge_l"] - ranked[1]["rouge_l"] if len(ranked) > 1 else None,
        "seed_sd": statistics.stdev(s["rouge_l"] for s in seeds) if len(seeds) > 1 else None,
    }


def results(a, teacher: Run, arms: dict[str, tuple[Run, dict]], scores: dict[str, dict], wall: float) -> dict:
    out_arms = {
        "teacher": {
            "method": "sft (the teacher, fine-tuned on the training split)",
            "steps": a.teacher_steps,
            "learning_rate": a.teacher_lr,
            "selection": selection_of(teacher),
            "compute": {"steps": step_seconds(teacher.events)},
            "compute_seconds": step_seconds(teacher.events),  # serves every arm; charged to none
        },
        "student": {"method": f"the starting student: {a.student_layers} of the teacher's layers, not trained"},
    }
    for name, (run, about) in arms.items():
        spec = json.loads((run.folder / "spec.json").read_text())
        out_arms[name] = {
            "method": spec["method"],
            **about,
            "steps": spec["training"]["steps"],
            "selection": selection_of(run),
            "compute_seconds": sum(about["compute"].values()),
        }
    for name in out_arms:
        out_arms[name]["sets"] = {s: set_summary(scored) for s, scored in scores[name].items()}
    comparisons = {}
    for set_name in SETS:
        ours = per_prompt(scores["minillm"][set_name])
        comparisons[set_name] = {}
        for name in MODELS:
            if name == "minillm":
                continue
            theirs = per_prompt(scores[name][set_name])
            low, high = paired_bootstrap(ours, theirs)
            comparisons[set_name][name] = {
                "minillm_minus_arm": statistics.fmean(ours) - statistics.fmean(theirs),
                "ci95": [low, high],
            }
    return {
        "study": {
            "preset": a.preset,
            "command": command(a),
            "machine": machine(),
            "wall_seconds": wall,
            "teacher": a.teacher,
            "train": {"file": TRAIN, "records": a.train_records - a.selection_prompts},
            "selection": {"prompts": a.selection_prompts, "seeds": a.selection_seeds},
            "sets": {
                name: {
                    "file": path,
                    "prompts": scores["minillm"][name]["prompts"],
                    "seeds": a.dolly_seeds if name == "dolly" else a.other_seeds,
                }
                for name, path in SETS.items()
            },
            "response_tokens": a.response_tokens,
            "compute_unit": "seconds of training steps on this machine (see the docstring of bench/quality_study.py)",
        },
        "arms": out_arms,
        "comparisons": comparisons,
    }


def markdown(res: dict) -> str:
    """Table 1 of the paper's shape (models × sets, Rouge-L), then MiniLLM minus each model with its interval."""
    sets = list(SETS)
    rows = ["| model | " + " | ".join(sets) + " | compute (s) |", "|---" * (len(sets) + 2) + "|"]
    for name, arm in res["arms"].items():
        cells = [f"{arm['sets'][s]['rouge_l']['mean']:.2f}" for s in sets]
        compute = f"{arm['compute_seconds']:.0f}" if "compute_seconds" in arm else "–"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {compute} |")
    diffs = ["| MiniLLM minus | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name in res["comparisons"][sets[0]]:
        cells = []
        for s in sets:
            c = res["comparisons"][s][name]
            cells.append(f"{c['minillm_minus_arm']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]")
        diffs.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(diffs) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets, names = list(SETS), list(res["arms"])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [res["arms"][name]["sets"][s]["rouge_l"]["mean"] for s in sets]
        ax.bar([x + i * width for x in range(len(sets))], means, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sets))], sets)
    ax.set_ylabel("Rouge-L")
    ax.legend(ncol=4, fontsize="small")
    ax.set_title("Rouge-L on the five test sets (each model at its selected checkpoint)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, {gpu}; torch {torch.__version__}"


def command(args, script: str = "bench/quality_study.py") -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{script} {' '.join(args.argv)} (commit {git('rev-parse', '--short', 'HEAD')}{dirty})"


def write_report(res: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    study = res["study"]
    block = (
        f"`{study['command']}`; machine: {study['machine']}; {study['wall_seconds'] / 60:.0f} min in all.\n\n"
        f"{markdown(res)}\n![Rouge-L per model and test set](quality.png)"
    )
    write_block(docs / "quality.md", "quality_study.py", block, "Quality study")


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the folder of the paper's sets (see above)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes; each flag below overrides one")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "quality-study", help="runs and resume state")
    p.add_argument("--docs", type=Path, default=PROJECT_ROOT / "docs", help="where quality.json, .md and .png go")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    for name, value in PRESETS["cpu"].items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            p.add_argument(flag, type=int, nargs="+", default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.data, args.out, args.docs = args.data.resolve(), args.out.resolve(), args.docs.resolve()
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = Study(args).run_all()
    write_report(res, args.docs)
    plot(res, args.docs / "quality.png")  # matplotlib: the [bench] extra
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
