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
import resource
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


def step_spec(
    batch_size: int,
    response_tokens: int,
    precision: str = "auto",
    zero_stage: int = 0,
    alpha: float | None = None,
    steps: int = 6,
    teacher: str | None = None,
    student_layers: int | None = None,
) -> JobSpec:
    """The demo's models and prompts, each step a whole phase of `batch_size` rollouts and one PPO update.
    `teacher` (any model reference) and `student_layers` (cut from it) scale the models."""
    base = load_spec(PROJECT_ROOT / "examples" / "smollm2-minillm.yaml")
    if teacher or student_layers:
        init = base.student.init_from_teacher.model_copy(
            update={"num_layers": student_layers} if student_layers else {}
        )
        base = base.model_copy(
            update={
                "teacher": teacher or base.teacher,
                "student": base.student.model_copy(update={"init_from_teacher": init}),
            }
        )
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
    parser.add_argument("--alpha", type=float, default=None, help="teacher-mix α (default: the demo's)")
    parser.add_argument("--teacher", help="another teacher (a local model directory or hub id) for a larger step")
    parser.add_argument(
        "--student-layers", type=int, help="layers of the teacher the student keeps (default: the demo's 10)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the accelerator's dense bf16 peak, for MFU (default: looked up for H100/H200/A100 on CUDA)",
    )
    args = parser.parse_args()

    spec = step_spec(
        args.batch_size,
        args.response_tokens,
        args.precision,
        args.zero_stage,
        args.alpha,
        steps=args.steps + 1,
        teacher=args.teacher,
        student_layers=args.student_layers,
    )
    trainer, rows = time_steps(spec, args.steps)
    lm = "with an LM batch" if trainer.stages[-1].lm else "no LM term (the demo has no data.pretrain)"

    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in rows)

    total = mean("total")
    print(
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"precision {trainer.precision}, ZeRO {args.zero_stage}"
    )
    print(
        f"Step: {args.batch_size} rollouts x up to {args.response_tokens} tokens, teacher-mixed (alpha "
        f"{spec.minillm.teacher_mix_alpha}), one PPO update, {lm}; "
        f"mean of {len(rows)} steps after 1 warm-up"
    )
    print()
    print("| part | seconds | share |")
    print("|---|---|---|")
    for section in SECTIONS:
        seconds = mean("time_" + section)
        print(f"| {section.replace('_', ' ')} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print(f"| **step** | **{total:.2f}** | |")
    print()
    print(
        f"Trained tokens/s (sampled + LM response tokens, per step wall time): {mean('tokens_per_s'):.0f}; "
        f"mean sampled response length {mean('response_length'):.1f} tokens; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"
    )
    if trainer.device.type == "cuda":
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        flops = step_flops(trainer, args.batch_size, mean("response_length"), spec.minillm.teacher_mix_alpha)
        print(
            f"GPU {torch.cuda.get_device_name()}: {flops / total / 1e12:.1f} TFLOP/s model FLOPs, "
            + (
                f"MFU {100 * flops / total / (peak * 1e12):.1f}% of {peak:g} TFLOP/s"
                if peak
                else "MFU: pass --peak-tflops"
            )
            + f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )


# Dense bf16 tensor-core peaks (TFLOP/s) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def step_flops(trainer: Trainer, rollouts: int, response_length: float, alpha: float) -> float:
    """Model FLOPs of one step, 2 per parameter per token forward and 4 more backward: both models
    decode every response token (the teacher only when mixing) or read it once (without), the student
    scores it once and trains on it once. Prompts count once per model forward."""
    params = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("student", trainer.engine.module), ("teacher", trainer.teacher))
    }
    tokens = rollouts * response_length
    prompt = rollouts * statistics.mean(len(e.prompt_ids) for e in trainer.stages[-1].prompts)
    decode = 2 * params["student"] * (tokens + prompt) + (2 * params["teacher"] * (tokens + prompt) if alpha else 0)
    score = 2 * params["student"] * (tokens + prompt) + (0 if alpha else 2 * params["teacher"] * (tokens + prompt))
    update = 6 * params["student"] * (tokens + prompt)
    return decode + score + update


if __name__ == "__main__":
    main()
