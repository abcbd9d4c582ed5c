"""One distillation job from spec to final checkpoint: `train(spec, output_dir, reporter)`.

    resolve models → check vocabularies → load data (training, selection and test sets) → DeepSpeed
    engine → resume if a state exists → teacher (cached) and initial student on the test set → steps
    (recovery stage, then the method), scoring the selection set and checkpointing on schedule,
    stopping early if cancelled → final model and best checkpoint on the test set → final checkpoint

Every rank runs this function; only rank 0 reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from distill_client.status import JobStatus

from . import checkpoints as ckpt
from .corpus import TEACHER_TEXT, chunk, read_texts
from .data import Example, read_records, split_held_out, tokenize
from .distributed import (
    DTYPES,
    all_reduce_sum,
    barrier,
    choose_precision,
    engine_config,
    init_process_group,
    initialize,
    initialize_teacher,
    lost_peer,
    rank,
    rank0_says,
    teacher_config,
    world_size,
)
from .evaluation import evaluate
from .events import Event, Reporter
from .host_memory import keep_freed_memory
from .models import (
    check_compatible,
    content_hash,
    derive_student,
    hidden_size,
    load_model,
    load_tokenizer,
    resolve_model,
)
from .paths import cache_dir, write_atomically
from .spec import JobSpec
from .stages import needs, plan
from .stages.base import Context, TrainingData
from .teacher_data import teacher_responses, teacher_text


def resolve_first_on_rank0(ref: str) -> Path:
    """`resolve_model` on rank 0 while the other ranks wait, then on them (finding it built): a
    builtin model is built once, by the rank that transformers lets write a model (`save_pretrained`
    writes nothing on the other ranks of a process group)."""
    if rank() == 0:
        resolve_model(ref)
    barrier()
    return resolve_model(ref)


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
        self.scores: dict[str, dict[str, float]] = {}  # test-set label -> scores
        self.per_seed: dict[str, dict] = {}  # test-set label -> scores per seed (this process's evaluations)
        self.samples: dict[str, list] = {}  # test-set label -> sample generations (this process's evaluations)
        self.selection: dict[int, dict[str, float]] = {}  # step -> selection-set scores
        # The best checkpoint: the highest selection-set Rouge-L among checkpoints scored there, as (Rouge-L, step).
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
        if self.device.type == "cpu":
            keep_freed_memory()
        self.emit("log", f"{world_size()} process(es) on {self.device.type}, precision {self.precision}")

        self.cancel_check("loading the teacher")()
        teacher_dir = resolve_first_on_rank0(spec.teacher)
        self.cancel_check("building the student")()
        if spec.student.init_from_teacher:
            student_dir = self.output_dir / "initial-student"
            if rank() == 0 and not (student_dir / "config.json").exists():
                derive_student(teacher_dir, spec.student.init_from_teacher, student_dir)
            barrier()
        else:
            student_dir = resolve_first_on_rank0(spec.student.model)
        check_compatible(teacher_dir, student_dir)
        self.tokenizer = load_tokenizer(teacher_dir)
        self.vocab_size = len(self.tokenizer)

        dtype = DTYPES[self.precision]
        self.teacher = self.load_teacher(teacher_dir, dtype)
        # What the teacher computes is cached under its content, not its name: a model replaced in
        # place under the same directory or hub id gets new references and scores.
        self.teacher_key = content_hash(teacher_dir)
        self.load_data()

        self.cancel_check("loading the student")()
        # In the training precision, as the engine would cast it, and at ZeRO-3 partitioned from the start.
        zero3 = engine_config(spec, self.precision) if spec.deepspeed.zero_stage == 3 else None
        student = load_model(student_dir, dtype, self.device, zero3)
        if spec.training.gradient_checkpointing:
            # Non-reentrant: the variant torch recommends, which also recomputes through ZeRO-3's hooks.
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # One schedule per stage; the optimizer's learning rate follows them over the global step.
        self.plan = plan(spec)
        self.schedules = [schedule for _, _, schedule in self.plan]
        self.engine = initialize(student, spec, self.precision, self.lr_at)
        self.ctx = Context(spec, self.engine, self.teacher, self.tokenizer, self.vocab_size, self.device)
        self.stages = [
            method.stage(name, self.ctx, method, self.data, schedule) for name, method, schedule in self.plan
        ]
        for stage in self.stages:
            self.emit("log", stage.describe())

    def load_teacher(self, teacher_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
        """The frozen teacher, in eval mode, in the training precision. Sharded (deepspeed.shard_teacher),
        it is the module of a ZeRO-3 engine without an optimizer, built partitioned: a rank only ever
        holds its shard of each weight, and every rank must run each of its forwards."""
        if not self.spec.deepspeed.shard_teacher:
            return load_model(teacher_dir, dtype, self.device).eval().requires_grad_(False)
        config = teacher_config(self.spec, self.precision, hidden_size(teacher_dir))
        teacher = load_model(teacher_dir, dtype, self.device, zero3=config).requires_grad_(False)
        self.teacher_engine = initialize_teacher(teacher, config)  # kept: it holds the hooks that gather the weights
        # A rank holds its shard of each weight, and the small ones whole (see teacher_config).
        held = torch.zeros(world_size(), dtype=torch.int64)
        held[rank()] = sum(p.ds_numel if p.ds_persist else p.ds_tensor.numel() for p in teacher.parameters())
        held = all_reduce_sum(held).tolist()
        total = sum(p.ds_numel for p in teacher.parameters())
        self.emit(
            "log",
            f"teacher sharded over {world_size()} processes (ZeRO-3): rank 0 holds {held[0]} of {total} "
            "parameters" + "".join(f", rank {r} holds {n}" for r, n in enumerate(held) if r),
        )
        return teacher.eval()

    def load_data(self) -> None:
        spec, d = self.spec, self.spec.data
        counts = {"eval": spec.eval.num_prompts, "selection": spec.eval.selection_num_prompts}
        records, held_out = split_held_out(d, read_records(d.train, d.columns, d.max_train_records), counts)

        def prepare(recs, role: str) -> list[Example]:
            examples, skipped = tokenize(
                recs, self.tokenizer, d.prompt_format, d.max_prompt_tokens, d.max_response_tokens
            )
            if skipped:
                self.emit(
                    "log",
                    f"{role}: skipped {skipped} records whose prompt exceeds {d.max_prompt_tokens} tokens",
                    "warning",
                )
            if not examples:
                raise ValueError(f"data.{role}: no usable records (all prompts exceed data.max_prompt_tokens)")
            return examples

        def with_references(examples: list[Example]) -> list[Example]:
            if all(e.record.response is not None for e in examples):
                return examples
            self.emit(
                "log", f"teacher writes reference responses for {len(examples)} prompts (cached after the first time)"
            )
            return self.teacher_writes(examples, greedy=True, doing="the teacher wrote reference responses")

        def evaluation_set(role: str) -> list[Example]:
            examples = prepare(held_out[role], role)[: counts[role]]
            return with_references(examples[: max(world_size(), len(examples) // world_size() * world_size())])

        train = prepare(records, "train")
        self.test_examples, self.selection_examples = evaluation_set("eval"), evaluation_set("selection")
        wanted = needs(spec)
        self.data = TrainingData(prompts=train, gold=with_references(train) if "gold" in wanted else None)
        if "teacher-samples" in wanted:
            self.emit("log", f"SeqKD: the teacher samples responses for {len(train)} training prompts (cached)")
            self.data.teacher_samples = self.teacher_writes(
                train, greedy=False, doing="the teacher sampled SeqKD responses"
            )
        if "pretrain" in wanted:
            self.data.pretrain = self.pretrain_chunks()
        self.emit(
            "log",
            f"{len(train)} training prompts; selection set {len(self.selection_examples)} prompts "
            f"× seeds {spec.eval.selection_seeds} (chooses the best checkpoint); test set "
            f"{len(self.test_examples)} prompts × seeds {spec.eval.seeds} (reports it)",
        )

    def pretrain_chunks(self) -> list[list[int]]:
        d, size = self.spec.data, self.spec.minillm.lm_chunk_tokens
        if d.pretrain == TEACHER_TEXT:
            self.emit(
                "log",
                f"the teacher writes {d.teacher_text_documents} documents of free text for the LM term "
                "(cached after the first time)",
            )
            texts = teacher_text(
                self.teacher,
                self.teacher_key,
                self.tokenizer,
                documents=d.teacher_text_documents,
                max_new_tokens=size,
                vocab_size=self.vocab_size,
                device=self.device,
                seed=self.spec.training.seed,
                check=self.cancel_check("the teacher wrote free text"),
            )
        else:
            texts = read_texts(d.pretrain)
        chunks = chunk(texts, self.tokenizer, size)
        if not chunks:
            raise ValueError(
                f"data.pretrain: its {len(texts)} document(s) make fewer tokens than one chunk of "
                f"minillm.lm_chunk_tokens ({size})"
            )
        return chunks

    def teacher_writes(self, examples: list[Example], greedy: bool, doing: str) -> list[Example]:
        return teacher_responses(
            self.teacher,
            self.teacher_key,
            examples,
            self.tokenizer,
            max_new_tokens=self.spec.data.max_response_tokens,
            vocab_size=self.vocab_size,
            device=self.device,
            greedy=greedy,
            seed=self.spec.training.seed,
            check=self.cancel_check(doing),
        )

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
    #
    # The paper's protocol: the selection set is scored during training and picks the best checkpoint
    # (highest Rouge-L); the test set scores, once, the teacher and the initial student at the start
    # and the final model and the best checkpoint at the end. Test labels: teacher, initial, final,
    # best; selection evaluations are labelled `selection` at their step.

    def saves_at(self, step: int) -> bool:
        every = self.spec.checkpoints.every_steps
        return step == self.spec.total_steps or (every > 0 and step % every == 0)

    def evaluate_selection(self, step: int) -> None:
        """Score the student on the selection set; a checkpoint saved at this step may become the best."""
        started = time.perf_counter()
        self.emit("log", f"evaluating the selection set at step {step}")
        scores, per_seed, samples = evaluate(
            self.engine.module,
            self.teacher,
            self.selection_examples,
            self.tokenizer,
            self.spec,
            self.vocab_size,
            self.device,
            self.spec.eval.selection_seeds,
            check=self.cancel_check(f"evaluating the selection set at step {step}"),
        )
        self.selection[step] = scores
        best = step > 0 and self.saves_at(step) and (self.best is None or scores["rouge_l"] > self.best[0])
        if best:
            self.best = (scores["rouge_l"], step)
        self.emit(
            "eval",
            f"selection set at step {step}: "
            + _fmt(scores)
            + f" [{time.perf_counter() - started:.0f}s]"
            + (" (best so far)" if best else ""),
            step=step,
            label="selection",
            set="selection",
            scores=scores,
            per_seed=per_seed,
            samples=samples,
            best=best,
        )

    def evaluate_test(self, label: str, step: int, model: torch.nn.Module) -> None:
        started = time.perf_counter()
        self.emit("log", f"evaluating {label} on the test set")
        scores, per_seed, samples = evaluate(
            model,
            self.teacher,
            self.test_examples,
            self.tokenizer,
            self.spec,
            self.vocab_size,
            self.device,
            self.spec.eval.seeds,
            check=self.cancel_check(f"evaluating {label}"),
        )
        self.record_test(label, step, scores, per_seed, samples, f" [{time.perf_counter() - started:.0f}s]")

    def record_test(self, label: str, step: int, scores: dict, per_seed: dict, samples: list, note: str = "") -> None:
        self.scores[label], self.per_seed[label], self.samples[label] = scores, per_seed, samples
        self.emit(
            "eval",
            f"test set, {label} (step {step}): " + _fmt(scores) + note,
            step=step,
            label=label,
            set="test",
            scores=scores,
            per_seed=per_seed,
            samples=samples,
        )

    def teacher_scores(self) -> tuple[dict[str, float], dict, list]:
        """The teacher on the test set, computed once per (teacher, test set, protocol) and cached, with its sample
        generations."""
        e = self.spec.eval
        # The references are in the key as they shape Rouge-L and the samples; eval.samples, as the cache holds that
        # many samples. Both also keep the files written before samples were kept (scores only) from being read.
        key = json.dumps(
            [
                self.teacher_key,
                [x.prompt_ids for x in self.test_examples],
                [x.response_ids for x in self.test_examples],
                e.seeds,
                e.batch_size,
                e.no_repeat_ngram_size,
                self.spec.data.max_response_tokens,
                self.precision,
                world_size(),
                e.samples,
            ]
        )
        path = cache_dir() / "teacher_evals" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if rank0_says(path.exists()):  # alike on every rank: evaluating is collective
            cached = json.loads(path.read_text())
            return cached["scores"], cached["per_seed"], cached["samples"]
        self.emit("log", "evaluating the teacher on the test set (cached after the first time)")
        scores, per_seed, samples = evaluate(
            self.teacher,
            None,
            self.test_examples,
            self.tokenizer,
            self.spec,
            self.vocab_size,
            self.device,
            e.seeds,
            check=self.cancel_check("evaluating the teacher"),
        )
        if rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"scores": scores, "per_seed": per_seed, "samples": samples}))
        return scores, per_seed, samples

    def evaluate_best_on_test(self, step: int) -> None:
        """The best checkpoint on the test set: the final model's scores when it is the final model."""
        best = self.best[1]
        if best == step:
            self.record_test(
                "best", best, self.scores["final"], self.per_seed["final"], self.samples["final"], " (the final model)"
            )
            return
        path = self.output_dir / "checkpoints" / ckpt.step_dir_name(best)
        model = load_model(path, DTYPES[self.precision], self.device)
        self.evaluate_test("best", best, model)

    def save(self, step: int) -> None:
        spec = self.spec
        out = self.output_dir / "checkpoints" / ckpt.step_dir_name(step)
        card = ckpt.model_card(spec, step, self.scores, self.selection.get(step), self.best)
        ckpt.export_model(self.engine, self.tokenizer, out, card, spec.deepspeed.zero_stage)
        state = {
            "step": step,
            "fingerprint": spec.fingerprint(),
            "scores": self.scores,
            "selection": sorted(self.selection.items()),
            "best": self.best,
        }
        rank_state = {"stages": [s.state_dict() for s in self.stages]}
        ckpt.save_resume_state(self.engine, self.output_dir / "resume" / ckpt.step_dir_name(step), state, rank_state)
        ckpt.prune_checkpoints(self.output_dir, spec.checkpoints.keep, {self.best[1]} if self.best else set())
        best = self.best is not None and self.best[1] == step
        self.emit(
            "checkpoint",
            f"checkpoint step {step}: {out}" + (" (best so far)" if best else ""),
            step=step,
            path=str(out),
            scores=self.selection.get(step),
            best=best,
        )

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
        self.selection = {step: scores for step, scores in state["selection"]}
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
            self.record_test("teacher", 0, *self.teacher_scores())
            self.evaluate_test("initial", 0, self.engine.module)
            if spec.eval.every_steps:
                self.evaluate_selection(0)
        self.emit("state", f"training from step {start} of {total}", state=JobStatus.RUNNING)
        self.emit("progress", step=start, total_steps=total)
        step, pace = start, None  # pace: (stage index, when its first step in this attempt began, steps before it)
        for step in range(start + 1, total + 1):
            index, local = self.locate(step - 1)
            stage = self.stages[index]
            if pace is None or pace[0] != index:
                pace = (index, time.perf_counter(), step - 1)
            torch.manual_seed(spec.training.seed * 100_003 + step)  # anything a library draws globally
            lr = self.engine.get_lr()[0]  # what the optimizer uses for this step
            metrics = stage.train_step(local)
            metrics["lr"] = lr
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(
                    f"loss became {metrics['loss']} at step {step} ({stage.name}); try a lower learning rate"
                )
            # The ETA from the stage's average wall time per step so far, evaluations and checkpoints
            # included: one step's time swings (MiniLLM samples its rollouts every few steps) and
            # leaves out the rest, while the stages of a job differ too much in speed to average together.
            eta = (time.perf_counter() - pace[1]) / (step - pace[2]) * (total - step)
            self.emit("metrics", step=step, stage=stage.name, values=metrics)
            self.emit("progress", step=step, total_steps=total, eta_seconds=eta)
            last = step == total
            if last or (spec.eval.every_steps and step % spec.eval.every_steps == 0):
                self.evaluate_selection(step)
            if last:  # before the final save, so that its model card and resume state hold the test scores
                self.evaluate_test("final", step, self.engine.module)
                self.evaluate_best_on_test(step)
            if self.saves_at(step):
                self.save(step)
            if not last and self.cancel_requested():
                raise Cancelled(f"at step {step}", step)
        self.emit(
            "state",
            JobStatus.SUCCEEDED,
            state=JobStatus.SUCCEEDED,
            step=step,
            best_step=self.best[1] if self.best else None,
        )
        return self.scores


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def train(spec: JobSpec, output_dir: Path, reporter: Reporter) -> dict[str, dict[str, float]]:
    """Run a job to the end (or until cancelled: raises `Cancelled`). Failures are reported, then
    raised; a collective broken by another process's death is raised unreported, to be retried."""
    trainer = Trainer(spec, output_dir, reporter)
    try:
        return trainer.run()
    except Cancelled as stop:
        trainer.emit("state", f"cancelled {stop.what}", state=JobStatus.CANCELLED, step=stop.step)
        raise
    except Exception as err:
        if lost_peer(err):  # no outcome reported: the worker retries the attempt (or fails the job on its last)
            trainer.emit("log", f"another process of this job was lost: {type(err).__name__}: {err}", "warning")
        else:
            trainer.emit(
                "state",
                f"failed: {type(err).__name__}: {err}",
                "error",
                state=JobStatus.FAILED,
                error={"code": type(err).__name__, "message": str(err)},
            )
        raise
