"""This project's MiniLLM step against TRL's `MiniLLMTrainer`, side by side on one machine.

    .venv/bin/pip install -e '.[peers]'    # TRL 1.14.2, the last release with MiniLLMTrainer
    make bench-peers                        # = .venv/bin/python bench/peers.py

Same teacher (SmolLM2-135M-Instruct), same student (10 of its layers, cut evenly), same prompts
(the first `--batch-size` of the builtin demo set, chat template), `--response-tokens` sampled
tokens, one rollout per prompt and one update per step. Each implementation runs in its own process,
one after the other, so that peak memory is its own; the first step of each is a warm-up.

- `project`: this project's full step: teacher-mixed sampling (α 0.2), scoring, one PPO update
  with the single-step term (`bench/minillm_step.py`'s step).
- `project-alpha0`: the same with α = 0, so that sampling does the work TRL's does (the student
  alone); the like-for-like row.
- `trl-minillm`: TRL's `MiniLLMTrainer` (student-only `generate`, reverse-KL advantage and the
  single-step term), fp32 or bf16 as `--precision` says, no gradient checkpointing.
- `trl-gkd`: TRL's maintained on-policy distillation, `GKDTrainer` with λ = 1 (every batch the
  student's own samples) and β = 1 (reverse KL), in the same precision.

Each TRL trainer runs in its fastest configuration on a CPU: the precision this project's `auto`
rule picks (bf16 only where the CPU computes it natively) and no gradient checkpointing (it only
trades time for memory).

The last line printed is `full_ratio=X like_for_like_ratio=Y`: project ÷ TRL and project-alpha0 ÷
TRL, in median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLEMENTATIONS = ["project", "project-alpha0", "trl-minillm", "trl-gkd"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_project(args, alpha: float) -> list[float]:
    from minillm_step import step_spec, time_steps

    spec = step_spec(args.batch_size, args.response_tokens, args.precision, alpha=alpha, steps=args.steps + 1)
    _, rows = time_steps(spec, args.steps)
    return [row["total"] for row in rows]


def run_trl(args) -> list[float]:
    """TRL's `MiniLLMTrainer` (impl trl-minillm) or `GKDTrainer` with λ = 1 (impl trl-gkd) on the same
    models and prompts; seconds per step from a callback around each optimizer step."""
    import torch
    from datasets import Dataset
    from minillm_step import step_spec
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    from worker.engine.data import read_records
    from worker.engine.distributed import choose_precision
    from worker.engine.models import derive_student, load_tokenizer, resolve_model
    from worker.engine.spec import InitFromTeacher

    teacher_dir = resolve_model("builtin:smollm2-135m-instruct")
    records = read_records("builtin:demo")[: args.batch_size]
    prompts = [[{"role": "user", "content": r.instruction + (f"\n\n{r.input}" if r.input else "")}] for r in records]
    # The precision this project's step runs in (engine's own `auto` rule), so the rows compare alike.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = choose_precision(step_spec(args.batch_size, args.response_tokens, args.precision), device) == "bf16"
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        student_dir = derive_student(
            teacher_dir, InitFromTeacher(num_layers=10, strategy="even"), Path(out) / "student"
        )
        common = dict(
            output_dir=str(Path(out) / "trl"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps + 1,
            learning_rate=5e-6,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,
            temperature=1.0,
            disable_tqdm=True,
            seed=10,
        )
        if args.impl == "trl-minillm":
            trainer_class, rows = MiniLLMTrainer, [{"prompt": p} for p in prompts]
            config = MiniLLMConfig(
                **common,
                num_generations=1,
                generation_batch_size=args.batch_size,
                max_completion_length=args.response_tokens,
            )
        else:
            # λ = 1: every batch is the student's own samples (on-policy); β = 1: the divergence is the
            # reverse KL, MiniLLM's. The collator wants a conversation ending in an answer, which the
            # student's sample then replaces.
            trainer_class = GKDTrainer
            rows = [
                {"messages": [*p, {"role": "assistant", "content": r.response or "-"}]}
                for p, r in zip(prompts, records)
            ]
            config = GKDConfig(**common, lmbda=1.0, beta=1.0, max_new_tokens=args.response_tokens, max_length=1024)
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
            teacher_model=AutoModelForCausalLM.from_pretrained(
                teacher_dir, dtype=torch.bfloat16 if bf16 else torch.float32
            ),
            args=config,
            train_dataset=Dataset.from_list(rows * (args.steps + 1)),
            processing_class=load_tokenizer(teacher_dir),
            callbacks=[Clock()],
        )
        trainer.train()
    return times[1:]


def child(args) -> None:
    """Time one implementation in this process and print one JSON line."""
    sys.path.insert(0, str(Path(__file__).parent))
    if args.impl.startswith("trl-"):
        times = run_trl(args)
    else:
        times = run_project(args, alpha=0.0 if args.impl == "project-alpha0" else 0.2)
    print(
        json.dumps(
            {"impl": args.impl, "median_s": statistics.median(times), "steps": times, "peak_rss_gb": peak_rss_gb()}
        )
    )


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "transformers", "deepspeed", "trl"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} missing")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation, after one warm-up")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (one rollout each)")
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.impl:
        return child(args)

    results = {}
    for impl in IMPLEMENTATIONS:
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--response-tokens",
            str(args.response_tokens),
            "--precision",
            args.precision,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    from minillm_step import cpu_name
    from report import write_block

    trl = results["trl-minillm"]["median_s"]
    ratios = (
        f"full_ratio={results['project']['median_s'] / trl:.2f} "
        f"like_for_like_ratio={results['project-alpha0']['median_s'] / trl:.2f}"
    )
    rows = [f"| {impl} | {r['median_s']:.2f} | {r['peak_rss_gb']:.2f} |" for impl, r in results.items()]
    block = "\n".join(
        [
            f"`bench/peers.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}: {cpu_name()}, "
            f"{os.cpu_count()} cores, precision {args.precision}; {versions()}.",
            f"{args.batch_size} prompts × 1 rollout × up to {args.response_tokens} tokens, one update per step; "
            f"median of {args.steps} steps after 1 warm-up, each implementation in its own process.",
            "",
            "| implementation | median s/step | peak RSS (GB) |",
            "|---|---|---|",
            *rows,
            "",
            f"`{ratios}`",
        ]
    )
    write_block(Path(__file__).parents[1] / "docs" / "performance.md", "peers.py", block, "Performance")
    print(block)
    print(ratios)


if __name__ == "__main__":
    main()
