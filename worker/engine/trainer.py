"""One distillation job from spec to final checkpoint: `train(spec, output_dir, reporter)`.

    resolve models → check vocabularies → load data → DeepSpeed engine → resume if a state exists
    → evaluate teacher (cached) and initial student → steps (recovery stage, then the method),
      evaluating and checkpointing on schedule, stopping early if cancelled → final eval and checkpoint

Every rank runs this function; only rank 0 reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from . import checkpoints as ckpt
from .data import Example, read_records, tokenize
from .distributed import DTYPES, all_reduce_sum, barrier, choose_precision, init_process_group, initialize, rank, world_size
from .evaluation import evaluate
from .events import Event, Reporter
from .models import check_compatible, derive_student, load_tokenizer, resolve_model
from .paths import cache_dir, write_atomically
from .spec import JobSpec
from .stages import needs, plan
from .stages.base import Context, TrainingData
from .teacher_data import teacher_responses


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class Cancelled(Exception):
    """The job was cancelled; `what` says what was interrupted ("at step 12", "while evaluating initial")."""

    def __init__(self, what: str, step: int | None = None):
        super().__init__(what)
        self.what, self.step = what, step


class Trainer:
    def __init__(self, spec: JobSpec, output_dir: Path, reporter: Reporter):
        self.spec, self.output_dir, self.reporter = spec, Path(output_dir), reporter
        self.scores: dict[str, dict[str, float]] = {}  # eval label -> scores, for the model card
        self.checkpoint_scores: dict[int, dict[str, float]] = {}  # step -> scores of the checkpoint saved there
        # The best checkpoint: the highest Rouge-L among checkpoints that were evaluated, as (Rouge-L, step).
        self.best: tuple[float, int] | None = None

    # -- reporting ------------------------------------------------------------------------------

    def emit(self, type_: str, message: str = "", level: str = "info", **data) -> None:
        if rank() == 0:
            self.reporter.emit(Event(type_, message, level, data))

    def cancel_requested(self) -> bool:
        flag = torch.tensor([1.0 if rank() == 0 and self.reporter.should_cancel() else 0.0])
        return bool(all_reduce_sum(flag).item())

    def cancel_check(self, doing: str):
        """A check to call between small units of preparation or evaluation work (each generated
        token, each batch, each model load): raises `Cancelled` if the job was cancelled.

        It asks the reporter at most once a second (a database query in the service). It is local
        to rank 0, unlike `cancel_requested` between steps: when rank 0 stops, the other ranks wait
        at their next collective until the supervisor stops the whole process group.
        """
        last = 0.0

        def check() -> None:
            nonlocal last
            now = time.monotonic()
            if rank() != 0 or now - last < 1.0:
                return
            last = now
            if self.reporter.should_cancel():
                raise Cancelled(f"while {doing}")

        return check

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        hf_logging.disable_progress_bar()
        self.device = init_process_group(spec)
        self.precision = choose_precision(spec, self.device)
        self.emit("log", f"{world_size()} process(es) on {self.device.type}, precision {self.precision}")

        self.cancel_check("loading the teacher")()
        teacher_dir = resolve_model(spec.teacher)
        self.cancel_check("building the student")()
        if spec.student.init_from_teacher:
            student_dir = self.output_dir / "initial-student"
            if rank() == 0 and not (student_dir / "config.json").exists():
                derive_student(teacher_dir, spec.student.init_from_teacher, student_dir)
            barrier()
        else:
            student_dir = resolve_model(spec.student.model)
        check_compatible(teacher_dir, student_dir)
        self.tokenizer = load_tokenizer(teacher_dir)
        self.vocab_size = len(self.tokenizer)

        dtype = DTYPES[self.precision]
        # The teacher is frozen, in eval mode, in the training precision, and not wrapped by DeepSpeed.
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.load_data()

        self.cancel_check("loading the student")()
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        # One schedule per stage; the optimizer's learning rate follows them over the global step.
        self.plan = plan(spec)
        self.schedules = [schedule for _, _, schedule in self.plan]
        self.engine = initialize(student, spec, self.precision, self.lr_at)
        self.ctx = Context(spec, self.engine, self.teacher, self.tokenizer, self.vocab_size, self.device)
        self.stages = [method.stage(name, self.ctx, method, self.data, schedule) for name, method, schedule in self.plan]

    def load_data(self) -> None:
        spec, d = self.spec, self.spec.data
        records = read_records(d.train)[: d.max_train_records]
        if d.eval:
            eval_records = read_records(d.eval)
        elif d.train == "builtin:demo":
            eval_records = read_records("builtin:demo-eval")
        else:  # hold out the tail of the training set
            if len(records) <= spec.eval.num_prompts:
                raise ValueError(f"data.train has {len(records)} records: too few to hold out eval.num_prompts for evaluation")
            records, eval_records = records[: -spec.eval.num_prompts], records[-spec.eval.num_prompts :]

        def prepare(recs, role: str) -> list[Example]:
            examples, skipped = tokenize(recs, self.tokenizer, d.prompt_format, d.max_prompt_tokens, d.max_response_tokens)
            if skipped:
                self.emit("log", f"{role}: skipped {skipped} records whose prompt exceeds {d.max_prompt_tokens} tokens", "warning")
            if not examples:
                raise ValueError(f"data.{role}: no usable records (all prompts exceed data.max_prompt_tokens)")
            return examples

        train = prepare(records, "train")
        evals = prepare(eval_records, "eval")[: spec.eval.num_prompts]
        evals = evals[: max(world_size(), len(evals) // world_size() * world_size())]

        def with_references(examples: list[Example]) -> list[Example]:
            if all(e.record.response is not None for e in examples):
                return examples
            self.emit("log", f"teacher writes reference responses for {len(examples)} prompts (cached after the first time)")
            return self.teacher_writes(examples, greedy=True, doing="the teacher wrote reference responses")

        self.eval_examples = with_references(evals)
        wanted = needs(spec)
        self.data = TrainingData(prompts=train, gold=with_references(train) if "gold" in wanted else None)
        if "teacher-samples" in wanted:
            self.emit("log", f"SeqKD: the teacher samples responses for {len(train)} training prompts (cached)")
            self.data.teacher_samples = self.teacher_writes(train, greedy=False, doing="the teacher sampled SeqKD responses")

    def teacher_writes(self, examples: list[Example], greedy: bool, doing: str) -> list[Example]:
        return teacher_responses(
            self.teacher, self.spec.teacher, examples, self.tokenizer, max_new_tokens=self.spec.data.max_response_tokens,
            vocab_size=self.vocab_size, device=self.device, greedy=greedy, seed=self.spec.training.seed,
            check=self.cancel_check(doing),
        )  # fmt: skip

    def locate(self, step: int) -> tuple[int, int]:
        """(stage index, step within that stage) of 0-based global step `step`."""
        for index, schedule in enumerate(self.schedules):
            if step < schedule.steps:
                return index, step
            step -= schedule.steps
        return len(self.schedules) - 1, self.schedules[-1].steps - 1  # past the end: hold the last value

    def lr_at(self, step: int) -> float:
        index, local = self.locate(step)
        return self.schedules[index].lr(local)

    # -- evaluation and checkpoints ---------------------------------------------------------------

    def saves_at(self, step: int) -> bool:
        every = self.spec.checkpoints.every_steps
        return step == self.spec.total_steps or (every > 0 and step % every == 0)

    def run_eval(self, step: int, label: str) -> None:
        """Evaluate the student; at a step that is saved, its checkpoint may become the best."""
        started = time.perf_counter()
        self.emit("log", f"evaluating {label} on {len(self.eval_examples)} prompts")
        scores = evaluate(self.engine.module, self.teacher, self.eval_examples, self.tokenizer, self.spec, self.vocab_size,
                          self.device, check=self.cancel_check(f"evaluating {label}"))  # fmt: skip
        self.scores[label] = scores
        if step > 0 and self.saves_at(step):
            self.checkpoint_scores[step] = scores
            if self.best is None or scores["rouge_l"] > self.best[0]:
                self.best = (scores["rouge_l"], step)
        self.emit("eval", f"eval at step {step} ({label}): " + _fmt(scores) + f" [{time.perf_counter() - started:.0f}s]",
                  step=step, label=label, scores=scores)  # fmt: skip

    def teacher_scores(self) -> dict[str, float]:
        """Teacher evaluation, computed once per (teacher, eval set, protocol) and cached."""
        key = json.dumps([self.spec.teacher, [e.prompt_ids for e in self.eval_examples], self.spec.eval.model_dump(),
                          self.spec.data.max_response_tokens, self.precision, world_size()])  # fmt: skip
        path = cache_dir() / "teacher_evals" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if path.exists():
            return json.loads(path.read_text())
        self.emit("log", f"evaluating the teacher on {len(self.eval_examples)} prompts (cached after the first time)")
        scores = evaluate(self.teacher, None, self.eval_examples, self.tokenizer, self.spec, self.vocab_size, self.device,
                          check=self.cancel_check("evaluating the teacher"))  # fmt: skip
        if rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(scores))
        return scores

    def save(self, step: int) -> None:
        spec = self.spec
        out = self.output_dir / "checkpoints" / ckpt.step_dir_name(step)
        ckpt.export_model(self.engine, self.tokenizer, out, ckpt.model_card(spec, step, self.scores), spec.deepspeed.zero_stage)
        state = {"step": step, "fingerprint": spec.fingerprint(), "scores": self.scores,
                 "checkpoint_scores": sorted(self.checkpoint_scores.items()), "best": self.best}  # fmt: skip
        rank_state = {"stages": [s.state_dict() for s in self.stages]}
        ckpt.save_resume_state(self.engine, self.output_dir / "resume" / ckpt.step_dir_name(step), state, rank_state)
        ckpt.prune_checkpoints(self.output_dir, spec.checkpoints.keep, {self.best[1]} if self.best else set())
        best = self.best is not None and self.best[1] == step
        self.emit("checkpoint", f"checkpoint step {step}: {out}" + (" (best so far)" if best else ""), step=step,
                  path=str(out), scores=self.checkpoint_scores.get(step), best=best)  # fmt: skip

    def resume(self) -> int:
        found = ckpt.latest_resume_state(self.output_dir)
        if found is None:
            return 0
        path, state = found
        if state["fingerprint"] != self.spec.fingerprint():
            raise ValueError(f"{self.output_dir} holds a run of a different spec; use another output directory")
        rank_state = ckpt.load_resume_state(self.engine, path)
        for stage, s in zip(self.stages, rank_state["stages"]):
            stage.load_state_dict(s)
        self.scores, self.best = state["scores"], tuple(state["best"]) if state["best"] else None
        self.checkpoint_scores = {step: scores for step, scores in state["checkpoint_scores"]}
        self.emit("log", f"resumed from step {state['step']} ({path})")
        return state["step"]

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, float]]:
        spec = self.spec
        self.emit("state", "preparing", state="preparing")
        self.setup()
        start = self.resume()
        total = spec.total_steps
        if start == 0:
            self.scores["teacher"] = teacher = self.teacher_scores()
            self.emit("eval", "eval teacher: " + _fmt(teacher), step=0, label="teacher", scores=teacher)
            self.run_eval(0, "initial")
        self.emit("state", f"training from step {start} of {total}", state="running")
        self.emit("progress", step=start, total_steps=total)
        step = start
        for step in range(start + 1, total + 1):
            index, local = self.locate(step - 1)
            stage = self.stages[index]
            torch.manual_seed(spec.training.seed * 100_003 + step)  # anything a library draws globally
            started = time.perf_counter()
            lr = self.engine.get_lr()[0]  # what the optimizer uses for this step
            metrics = stage.train_step(local)
            metrics["lr"] = lr
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(f"loss became {metrics['loss']} at step {step} ({stage.name}); try a lower learning rate")
            eta = (time.perf_counter() - started) * (total - step)
            self.emit("metrics", step=step, stage=stage.name, values=metrics)
            self.emit("progress", step=step, total_steps=total, eta_seconds=eta)
            last = step == total
            if last or (spec.eval.every_steps and step % spec.eval.every_steps == 0):
                self.run_eval(step, "final" if last else f"step {step}")
            if last or (spec.checkpoints.every_steps and step % spec.checkpoints.every_steps == 0):
                self.save(step)
            if not last and self.cancel_requested():
                raise Cancelled(f"at step {step}", step)
        self.emit("state", "succeeded", state="succeeded", step=step, best_step=self.best[1] if self.best else None)
        return self.scores


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def train(spec: JobSpec, output_dir: Path, reporter: Reporter) -> dict[str, dict[str, float]]:
    """Run a job to the end (or until cancelled: raises `Cancelled`). Failures are reported, then raised."""
    trainer = Trainer(spec, output_dir, reporter)
    try:
        return trainer.run()
    except Cancelled as stop:
        trainer.emit("state", f"cancelled {stop.what}", state="cancelled", step=stop.step)
        raise
    except Exception as err:
        trainer.emit("state", f"failed: {type(err).__name__}: {err}", "error", state="failed",
                     error={"code": type(err).__name__, "message": str(err)})  # fmt: skip
        raise
