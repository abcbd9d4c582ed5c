"""Decoding speed of MiniLLM's rollouts: tokens per second of teacher-mixed sampling on the demo models.

    .venv/bin/python bench/decode.py [--batch-sizes 16 64 128] [--tokens 64] [--alpha 0.2]

Teacher SmolLM2-135M-Instruct (builtin), student its 10 evenly spaced layers (the demo's), prompts
from the builtin demo set in the chat format, one sampling call per batch size through the engine's
`sampling.sample`, at the precision `auto` picks. It prints one line per batch size: sampled
response tokens per second (tokens up to and including each row's EOS, over the call's wall time,
after one untimed warm-up call at batch 4) and a digest of the sampled tokens, so that two versions of
the sampler can be compared on the same seed.

`--compile-too` then measures the same batches with the decode step compiled over a static cache
(`resources.compile_decoding`; CUDA graphs on a GPU), after one call per batch size that compiles.

To compare with an older version of the code, run this file from a worktree of that commit:
`git worktree add ../before COMMIT && cp bench/decode.py ../before/bench/`, then
`cd ../before && ../main/.venv/bin/python bench/decode.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's engine, not an installed one

import torch  # noqa: E402

from worker.engine.batch import collate  # noqa: E402
from worker.engine.data import read_records, tokenize  # noqa: E402
from worker.engine.distributed import DTYPES, choose_precision, init_process_group  # noqa: E402
from worker.engine.host_memory import keep_freed_memory  # noqa: E402
from worker.engine.models import derive_student, load_model, load_tokenizer, resolve_model  # noqa: E402
from worker.engine.paths import PROJECT_ROOT  # noqa: E402
from worker.engine.sampling import sample  # noqa: E402
from worker.engine.spec import load_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per response")
    parser.add_argument("--alpha", type=float, default=0.2, help="teacher-mix α (0: the student decodes alone)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument(
        "--compile-too",
        action="store_true",
        help="then again with the compiled decode step (resources.compile_decoding; CUDA graphs on a GPU)",
    )
    args = parser.parse_args()

    spec = load_spec(PROJECT_ROOT / "examples" / "smollm2-minillm.yaml")
    device = init_process_group(spec)
    precision = choose_precision(spec, device)
    if device.type == "cpu":
        keep_freed_memory()  # as the engine's processes do (trainer.setup): freed buffers are reused, not faulted back
    teacher_dir = resolve_model(spec.teacher)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = derive_student(teacher_dir, spec.student.init_from_teacher, Path(tmp) / "student")
        student = load_model(student_dir, DTYPES[precision], device).eval()
    teacher = load_model(teacher_dir, DTYPES[precision], device).eval()
    tokenizer = load_tokenizer(teacher_dir)
    examples, _ = tokenize(read_records("builtin:demo"), tokenizer, "chat", spec.data.max_prompt_tokens, args.tokens)

    def decode(batch_size: int, compiled: bool = False) -> tuple[int, float, str]:
        prompts = collate(
            [(examples[i % len(examples)].prompt_ids, []) for i in range(batch_size)], tokenizer.pad_token_id
        )
        started = time.perf_counter()
        out = sample(
            student,
            prompts.prompt_ids.to(device),
            prompts.prompt_mask.to(device),
            max_new_tokens=args.tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
            generator=torch.Generator(device=device).manual_seed(args.seed),
            mix_model=teacher,
            mix_alpha=args.alpha,
            compile_steps=compiled,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        batch = out.batch
        digest = hashlib.sha256(
            batch.response_ids.masked_fill(batch.response_mask == 0, -1).cpu().numpy().tobytes()
        ).hexdigest()
        return int(batch.response_mask.sum()), seconds, digest[:12]

    decode(4)  # warm-up: first calls pay for kernel selection and allocation
    print(
        f"decode: {device.type}, precision {precision}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"alpha {args.alpha}, up to {args.tokens} tokens, seed {args.seed}"
    )
    for batch_size in args.batch_sizes:
        tokens, seconds, digest = decode(batch_size)
        print(
            f"batch {batch_size}: {tokens / seconds:.1f} tokens/s ({tokens} tokens in {seconds:.2f} s), tokens {digest}"
        )
    if args.compile_too:
        for batch_size in args.batch_sizes:
            started = time.perf_counter()
            decode(batch_size, compiled=True)  # compiles this batch's shapes
            warm = time.perf_counter() - started
            tokens, seconds, digest = decode(batch_size, compiled=True)
            print(
                f"compiled batch {batch_size}: {tokens / seconds:.1f} tokens/s ({tokens} tokens in {seconds:.2f} s; "
                f"first call, compiling, {warm:.0f} s), tokens {digest}"
            )


if __name__ == "__main__":
    main()
