"""Checkpoints: a Hugging Face directory per saved step, plus the state to resume exactly.

    OUTPUT/checkpoints/step-000100/   config, model.safetensors, tokenizer, generation config, README.md
    OUTPUT/resume/step-000100/        DeepSpeed engine state (optimizer, scheduler, fp32 master weights),
                                      rank-N.pt (each rank's trainer state), trainer_state.json

The Hugging Face directory is what people download; the resume state is large (optimizer moments)
and only the newest one is kept. `trainer_state.json` is written last, by rank 0, after every rank
has finished: a resume directory without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .distributed import barrier, rank
from .data import held_out_source
from .spec import JobSpec

STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _steps(root: Path, marker: str | None = None) -> list[int]:
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("step-*"):
        if d.is_dir() and d.name[5:].isdigit() and (marker is None or (d / marker).exists()):
            found.append(int(d.name[5:]))
    return sorted(found)


def saved_steps(output_dir: Path) -> list[int]:
    return _steps(output_dir / "checkpoints", "config.json")


def latest_resume_state(output_dir: Path) -> tuple[Path, dict] | None:
    steps = _steps(output_dir / "resume", STATE_FILE)
    if not steps:
        return None
    path = output_dir / "resume" / step_dir_name(steps[-1])
    return path, json.loads((path / STATE_FILE).read_text())


def best_step(output_dir: Path) -> int | None:
    """The step of the run's best checkpoint, as the trainer recorded it (None before any is evaluated)."""
    found = latest_resume_state(output_dir)
    return found[1]["best"][1] if found and found[1]["best"] else None


def model_card(
    spec: JobSpec, step: int, scores: dict[str, dict[str, float]], selection: dict[str, float] | None,
    best: tuple[float, int] | None,
) -> str:
    """README.md for the Hugging Face directory: what this model is and how it scored.

    `scores`: test-set scores by label (teacher, initial, final, best); `selection`: this checkpoint's
    selection-set scores, if they were taken; `best`: (selection Rouge-L, step) of the best checkpoint.
    """
    student = spec.student.model or (
        f"{spec.student.init_from_teacher.num_layers} layers of the teacher ({spec.student.init_from_teacher.strategy})"
    )
    stages = (f"{spec.recovery.method} for {spec.recovery.steps} steps, then " if spec.recovery else "") + (
        f"{spec.method} for {spec.training.steps} steps"
    )
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [distillation, {spec.method}]",
        "---",
        f"# {spec.name} (step {step})",
        "",
        f"Distilled with `{spec.method}` by the distill service.",
        "",
        f"- Teacher: `{spec.teacher}`",
        f"- Student initialisation: `{student}`",
        f"- Training data: `{spec.data.train}` (prompt format `{spec.data.prompt_format}`)",
        f"- Schedule: {stages}; this checkpoint is after step {step} of {spec.total_steps}",
        f"- Precision `{spec.deepspeed.precision}`, ZeRO stage {spec.deepspeed.zero_stage}, seed {spec.training.seed}",
        "",
    ]
    held_out = "held out from the training set"
    if scores:
        metrics = sorted({k for s in scores.values() for k in s})
        lines += [
            "## Evaluation",
            "",
            f"Test set `{held_out_source(spec.data.train, spec.data.eval, 'eval') or held_out}`, up to "
            f"{spec.eval.num_prompts} prompts, sampled at temperature 1 once per seed {spec.eval.seeds} (no repeated "
            f"{spec.eval.no_repeat_ngram_size}-grams); each score is the mean over the seeds. `best` is the checkpoint "
            "with the highest selection-set Rouge-L.",
            "",
            "| model | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for label, values in scores.items():
            lines.append(f"| {label} | " + " | ".join(f"{values[m]:.3f}" if m in values else "" for m in metrics) + " |")
        lines.append("")
    if selection:
        source = held_out_source(spec.data.train, spec.data.selection, "selection") or held_out
        lines += [f"Selection set `{source}`: Rouge-L {selection['rouge_l']:.3f} at this step"
                  + (f"; the best so far is step {best[1]} ({best[0]:.3f})." if best else "."), ""]  # fmt: skip
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]  # fmt: skip
    return "\n".join(lines)


def export_model(engine, tokenizer, out: Path, card: str, zero_stage: int) -> None:
    """Write the student as a Hugging Face directory (rank 0 writes; under ZeRO-3 all ranks gather)."""
    partial = out.with_name("." + out.name + ".partial")

    def write() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        engine.module.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "README.md").write_text(card)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank() == 0:
                write()
    elif rank() == 0:
        write()
    barrier()


def save_resume_state(engine, out: Path, trainer_state: dict, rank_state: dict) -> None:
    """All ranks call this. Older resume states are removed once the new one is complete."""
    engine.save_checkpoint(str(out), tag="engine")
    torch.save(rank_state, out / f"rank-{rank()}.pt")
    barrier()
    if rank() == 0:
        (out / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        for old in out.parent.glob("step-*"):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_resume_state(engine, path: Path) -> dict:
    engine.load_checkpoint(str(path), tag="engine")
    return torch.load(path / f"rank-{rank()}.pt", weights_only=False)


def prune_checkpoints(output_dir: Path, keep: int, protect: set[int]) -> None:
    if rank() != 0:
        return
    steps = saved_steps(output_dir)
    for step in steps[:-keep]:
        if step not in protect:
            shutil.rmtree(output_dir / "checkpoints" / step_dir_name(step), ignore_errors=True)
