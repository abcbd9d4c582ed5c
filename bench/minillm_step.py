"""Measure one MiniLLM step on the demo models, with its breakdown, and print a markdown table.

    .venv/bin/python bench/minillm_step.py [--steps 5] [--batch-size 8] [--response-tokens 64]

Teacher: SmolLM2-135M-Instruct (builtin); student: the demo's 10 layers cut from it; prompts: the
builtin demo set. Each measured step is a whole MiniLLM phase of one PPO epoch over `batch-size`
rollouts: teacher-mixed sampling, scoring the samples (student + teacher forward), one update
(teacher forward, student forward and losses, backward, optimizer step). The first step is a
warm-up and is not counted. It goes through the engine's own code (Trainer.setup, MiniLLMStage).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from worker.engine.events import Event
from worker.engine.paths import PROJECT_ROOT
from worker.engine.spec import JobSpec, load_spec
from worker.engine.trainer import Trainer

SECTIONS = ["sample", "score", "teacher_forward", "student_forward", "backward", "optimizer"]


class Quiet:
    def emit(self, event: Event) -> None:
        pass

    def should_cancel(self) -> bool:
        return False


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def step_spec(batch_size: int, response_tokens: int, precision: str = "auto", zero_stage: int = 0,
              alpha: float | None = None, steps: int = 6) -> JobSpec:
    """The demo's models and prompts, each step a whole phase of `batch_size` rollouts and one PPO update."""
    base = load_spec(PROJECT_ROOT / "examples" / "smollm2-minillm.yaml")
    minillm = {"rollouts_per_phase": batch_size, "rollout_batch_size": batch_size, "ppo_epochs": 1}
    if alpha is not None:
        minillm["teacher_mix_alpha"] = alpha
    return base.model_copy(
        update={
            "recovery": None,
            "training": base.training.model_copy(update={"steps": steps, "batch_size": batch_size}),
            "data": base.data.model_copy(update={"max_response_tokens": response_tokens}),
            "minillm": base.minillm.model_copy(update=minillm),
            "deepspeed": base.deepspeed.model_copy(update={"precision": precision, "zero_stage": zero_stage}),
        }
    )


def time_steps(spec: JobSpec, steps: int) -> tuple[Trainer, list[dict]]:
    """Run `steps` + 1 MiniLLM steps through the engine's own code; the metrics of each after the first
    (a warm-up), with its wall time as `total`."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(spec, Path(out), Quiet())
        trainer.setup()
        stage = trainer.stages[-1]
        rows = []
        for step in range(steps + 1):
            started = time.perf_counter()
            metrics = stage.train_step(step)
            metrics["total"] = time.perf_counter() - started
            if step > 0:
                rows.append(metrics)
    return trainer, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--zero-stage", type=int, default=0)
    args = parser.parse_args()

    spec = step_spec(args.batch_size, args.response_tokens, args.precision, args.zero_stage, steps=args.steps + 1)
    trainer, rows = time_steps(spec, args.steps)
    lm = "with an LM batch" if trainer.stages[-1].lm else "no LM term (the demo has no data.pretrain)"

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in rows)

    total = mean("total")
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"precision {trainer.precision}, ZeRO {args.zero_stage}")  # fmt: skip
    print(f"Step: {args.batch_size} rollouts x up to {args.response_tokens} tokens, teacher-mixed (alpha "
          f"{spec.minillm.teacher_mix_alpha}), one PPO update, {lm}; "
          f"mean of {len(rows)} steps after 1 warm-up")  # fmt: skip
    print()
    print("| part | seconds | share |")
    print("|---|---|---|")
    for section in SECTIONS:
        print(f"| {section.replace('_', ' ')} | {mean('time_' + section):.2f} | {100 * mean('time_' + section) / total:.0f}% |")
    print(f"| **step** | **{total:.2f}** | |")
    print()
    print(f"Trained tokens/s (sampled + LM response tokens, per step wall time): {mean('tokens_per_s'):.0f}; "
          f"mean sampled response length {mean('response_length'):.1f} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
