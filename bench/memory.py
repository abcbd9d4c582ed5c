"""Peak memory of one MiniLLM phase as the phase grows: 64, 128 and 256 rollouts.

    .venv/bin/python bench/memory.py [--quick]

Teacher and student are random Qwen2 models with Qwen2.5-0.5B's shapes (hidden 896, 14 heads, 2 KV
heads, vocabulary 151,936) but few layers (teacher 4, student 2), built in the process: nothing is
downloaded. Each setting runs in a fresh process (peak memory only ever grows): one phase through
the engine's own MiniLLMStage and DeepSpeed engine (ZeRO-0, the precision `auto` picks, one process),
that is teacher-mixed sampling of the phase's rollouts up to 64 tokens (random models never stop
early), scoring, and one update on a micro-batch of 8. The peak is the process's peak resident
memory on a CPU and the peak allocated GPU memory on a GPU.

It prints one line per setting (minillm.teacher_logits keep, recompute and auto at each size), checks
the memory model (bench/memory_model.py) against the growth it measured, and ends with the line
`peak_gb rollouts=64:A rollouts=128:B rollouts=256:C` for the default setting, auto.
`--quick` does the same with 16, 32 and 64 rollouts of 16 tokens and 1-layer models of hidden size 64
(for `make gpu-check DRY_RUN=1`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_model

from memory_model import GIB, Settings, kept_teacher_logits  # noqa: E402

VOCAB = 151_936
SHAPES = {  # Qwen2.5-0.5B's layer shape, and a small one for --quick (the vocabulary is the same)
    "0.5b": dict(
        hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True
    ),
    "small": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True
    ),
}
MODES = ("keep", "recompute", "auto")


def one_phase(rollouts: int, mode: str, tokens: int, layers: tuple[int, int], shape: str) -> dict:
    """Run one phase in this process; its peak memory in bytes and what the stage decided."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worker.engine.data import Example, Record
    from worker.engine.distributed import DTYPES, choose_precision, init_process_group, initialize
    from worker.engine.host_memory import keep_freed_memory
    from worker.engine.spec import parse_spec
    from worker.engine.stages import METHODS
    from worker.engine.stages.base import Context, Schedule, TrainingData
    from worker.engine.stages.minillm import MiniLLMStage

    spec = parse_spec(
        {
            "student": {"model": "random"},
            "data": {"max_response_tokens": tokens},
            "training": {"batch_size": 8, "steps": 1, "warmup_steps": 0},
            "minillm": {"rollouts_per_phase": rollouts, "ppo_epochs": 1, "teacher_logits": mode},
        }
    )
    device = init_process_group(spec)
    precision = choose_precision(spec, device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)

    def model(n_layers: int) -> torch.nn.Module:
        with torch.device(device):
            return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, num_hidden_layers=n_layers, **SHAPES[shape])).to(
                DTYPES[precision]
            )

    teacher = model(layers[0]).eval().requires_grad_(False)
    engine = initialize(model(layers[1]), spec, precision, lambda step: 1e-5)
    # A token id past the vocabulary as EOS: responses run to their full length, the most memory.
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=VOCAB)
    ctx = Context(spec, engine, teacher, tokenizer, VOCAB, device)
    generator = torch.Generator().manual_seed(1)
    prompts = [
        Example(Record("", "", None), torch.randint(1, VOCAB, (32,), generator=generator).tolist(), [])
        for _ in range(rollouts)
    ]
    stage = MiniLLMStage("minillm", ctx, METHODS["minillm"], TrainingData(prompts), Schedule(1, 1e-5, 0, "constant"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stage.train_step(0)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "peak": peak,
        "kept": stage.keep,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": precision,
    }


def measure(*setting) -> dict:
    """`one_phase(*setting)` in a fresh process."""
    args = [sys.executable, __file__, "--one", json.dumps(setting)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16/32/64 rollouts of 16 tokens, 1-layer models")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one setting
    args = parser.parse_args()
    if args.one:
        rollouts, mode, tokens, layers, shape = json.loads(args.one)
        print(json.dumps(one_phase(rollouts, mode, tokens, tuple(layers), shape)))
        return

    sizes, tokens, layers, shape = (
        ((16, 32, 64), 16, (1, 1), "small") if args.quick else ((64, 128, 256), 64, (4, 2), "0.5b")
    )
    peaks = {}
    for mode in MODES:
        for rollouts in sizes:
            got = measure(rollouts, mode, tokens, layers, shape)
            peaks[mode, rollouts] = got["peak"]
            print(
                f"teacher_logits={mode} rollouts={rollouts}: peak {got['peak'] / GIB:.2f} GB "
                f"({'kept' if got['kept'] else 'recomputed'}; {got['device']}, {got['precision']}, "
                f"{tokens} tokens, vocabulary {VOCAB})",
                flush=True,
            )
    # The memory model's term that grows with the phase: kept logits, rollouts × tokens × vocabulary × 2 bytes.
    small, large = sizes[0], sizes[-1]
    predicted = kept_teacher_logits(
        Settings(gpus=1, rollouts_per_phase=large, response_tokens=tokens), VOCAB
    ) - kept_teacher_logits(Settings(gpus=1, rollouts_per_phase=small, response_tokens=tokens), VOCAB)
    grew = {mode: peaks[mode, large] - peaks[mode, small] for mode in MODES}
    print(
        f"memory model: keep grows by {predicted / GIB:.2f} GB from {small} to {large} rollouts, measured "
        f"{grew['keep'] / GIB:.2f} GB; recompute by 0, measured {grew['recompute'] / GIB:.2f} GB"
    )
    print("peak_gb " + " ".join(f"rollouts={n}:{peaks['auto', n] / GIB:.2f}" for n in sizes))


if __name__ == "__main__":
    main()
