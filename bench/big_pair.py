"""A 7B-shaped teacher and a 0.5B-shaped student: seconds per MiniLLM step and peak GPU memory.

    python bench/big_pair.py [--steps 3] [--rollouts 8] [--response-tokens 64] [--tiny]

Random weights, nothing downloaded: Qwen2 configs with the shapes of Qwen2.5-7B (the teacher) and
Qwen2.5-0.5B (the student, on the teacher's vocabulary of 152,064 rows so that the two distil),
built directly on the device in bf16 and written once as model directories into the cache, with
SmolLM2's tokenizer padded with unused tokens to Qwen2.5's length (151,665), so that the losses and
the sampler work over a vocabulary of that size. Then a MiniLLM job on them through the engine's own
code (bench/minillm_step.py's `time_steps`): each step a phase of `--rollouts` teacher-mixed rollouts
up to `--response-tokens` tokens and one PPO update, bf16, ZeRO-0; the first step is a warm-up.
Random models never emit EOS, so every rollout runs to its full length.

`--tiny` takes the same path with 2-layer models on SmolLM2's own vocabulary, for a CPU (`make
gpu-check DRY_RUN=1`). The last line printed is the result.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine, not an installed one

import torch  # noqa: E402
from minillm_step import time_steps  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from worker.engine.models import smollm2_tokenizer_dir  # noqa: E402
from worker.engine.paths import cache_dir  # noqa: E402
from worker.engine.spec import parse_spec  # noqa: E402

# Qwen2.5-7B and Qwen2.5-0.5B as their config.json files give them (the student's own vocabulary,
# 151,936 rows, is replaced by the teacher's: distillation needs one).
QWEN = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
SHAPES = {
    "full": dict(
        names=("random-qwen2.5-7b-shaped", "random-qwen2.5-0.5b-shaped"),
        vocab=152_064,
        tokens=151_665,
        teacher=dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            tie_word_embeddings=False,
        ),
        student=dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            tie_word_embeddings=True,
        ),
    ),
    "tiny": dict(
        names=("random-qwen2-tiny-teacher", "random-qwen2-tiny-student"),
        vocab=49_152,
        tokens=49_152,
        teacher=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=False,
        ),
        student=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
    ),
}


def padded_tokenizer(length: int):
    """SmolLM2's tokenizer with unused tokens added up to `length`: never produced from text, but
    every id below `length` is a token, as in a real tokenizer of that size."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(length - len(tokenizer))])
    return tokenizer


def write_model(out: Path, shape: dict, vocab: int, tokenizer, device: torch.device) -> None:
    """A random Qwen2 model of `shape`, saved with `tokenizer`; built on `device` in bf16, so that a
    7B model is never materialised in fp32 (30 GB) nor initialised by the host's cores."""
    config = Qwen2Config(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN,
        **shape,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_dirs(size: str, device: torch.device) -> tuple[Path, Path]:
    """The teacher's and the student's directories in the cache, written on first use (the 7B-shaped
    teacher takes 15 GB there)."""
    root, shapes = cache_dir() / "models", SHAPES[size]
    dirs = (root / shapes["names"][0], root / shapes["names"][1])
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    tokenizer = padded_tokenizer(shapes["tokens"])
    for role, target in zip(("teacher", "student"), dirs):
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
        try:
            write_model(tmp, shapes[role], shapes["vocab"], tokenizer, device)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dirs


def job(teacher: Path, student: Path, rollouts: int, response_tokens: int, steps: int):
    """A MiniLLM job on the pair: each step one phase of `rollouts` rollouts and one update. The
    evaluation sets are one prompt each: the teacher writes their references in set-up."""
    return parse_spec(
        {
            "name": "big-pair",
            "method": "minillm",
            "teacher": str(teacher),
            "student": {"model": str(student)},
            "data": {
                "train": "builtin:demo",
                "prompt_format": "alpaca",
                "max_prompt_tokens": 128,
                "max_response_tokens": response_tokens,
                "max_train_records": 64,
            },
            "training": {"steps": steps, "batch_size": rollouts, "learning_rate": 5e-6, "warmup_steps": 0},
            "minillm": {"rollouts_per_phase": rollouts, "rollout_batch_size": rollouts, "ppo_epochs": 1},
            "eval": {"num_prompts": 1, "selection_num_prompts": 1, "seeds": [10]},
        }
    )


def billions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per step (one phase, one update)")
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="2-layer models of the same kind, for a CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dir, student_dir = model_dirs("tiny" if args.tiny else "full", device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer, rows = time_steps(
        job(teacher_dir, student_dir, args.rollouts, args.response_tokens, args.steps + 1), args.steps
    )
    step = statistics.mean(r["total"] for r in rows)
    where = (
        f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}"
        if device.type == "cuda"
        else "on the CPU (no GPU memory to report)"
    )
    print(
        f"{'tiny' if args.tiny else '7B'}-shaped teacher ({billions(trainer.teacher):.2f}B parameters) and "
        f"{'tiny' if args.tiny else '0.5B'}-shaped student ({billions(trainer.engine.module):.2f}B), precision "
        f"{trainer.precision}: {step:.2f} s/step (mean of {len(rows)} after 1 warm-up; {args.rollouts} rollouts × "
        f"{statistics.mean(r['response_length'] for r in rows):.0f} tokens), {where}"
    )


if __name__ == "__main__":
    main()
