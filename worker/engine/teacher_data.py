"""Text written by the teacher: references for the builtin demo set, SeqKD training data, and free
text for MiniLLM's LM term (`builtin:teacher-text`).

Generating it is the slow part of a short job, and the result depends only on the teacher, the
prompts and the decoding settings, so it is cached under that key and shared by every job and
process (one process generates, the others wait on the lock and read the file; a sharded teacher
generates on all the job's processes together).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace

import torch
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from .batch import collate
from .data import Example
from .distributed import barrier, is_sharded, rank, rank0_says
from .paths import cache_dir, write_atomically
from .sampling import sample

# Neutral starts for free text: common first words of English sentences, no instruction or topic.
OPENINGS = (
    "The",
    "In",
    "A",
    "It",
    "When",
    "There",
    "This",
    "One",
    "Many",
    "If",
    "After",
    "Most",
    "Some",
    "For",
    "Every",
    "On",
)


def _generate(
    teacher: torch.nn.Module,
    teacher_key: str,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    vocab_size: int,
    device: torch.device,
    greedy: bool,
    seed: int,
    check: Callable[[], None] | None,
    batch_size: int = 16,
) -> list[list[int]]:
    """The teacher's continuation of each prompt (token ids, EOS included), generated once and cached.

    `check` is called before every token and may raise (a cancelled job): the cache file is written
    whole or not at all.

    A sharded teacher (ZeRO-3) decodes only with every rank of the job at once: then all ranks decode
    the same prompts in lock step, rank 0 writes the file, and every rank reads that one.
    """
    key = json.dumps([teacher_key, prompts, max_new_tokens, greedy, seed])
    path = cache_dir() / "teacher_responses" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    sharded = is_sharded(teacher)

    def decode() -> list[list[int]]:
        generator = torch.Generator(device=device).manual_seed(seed)
        responses: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            batch = collate([(p, []) for p in prompts[start : start + batch_size]], tokenizer.pad_token_id).to(device)
            out = sample(
                teacher,
                batch.prompt_ids,
                batch.prompt_mask,
                max_new_tokens=max_new_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                vocab_size=vocab_size,
                generator=generator,
                temperature=0.0 if greedy else 1.0,
                no_repeat_ngram_size=6 if greedy else 0,
                sync_ranks=sharded,
                check=check,
            ).batch
            responses += [ids[m.bool()].tolist() for ids, m in zip(out.response_ids.cpu(), out.response_mask.cpu())]
        return responses

    if sharded:
        if not rank0_says(path.exists()):
            responses = decode()
            if rank() == 0:
                write_atomically(path, json.dumps(responses))
            barrier()
    else:  # one process decodes; the others (ranks of this job or other jobs) wait for its file
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                write_atomically(path, json.dumps(decode()))
    return json.loads(path.read_text())


def teacher_responses(
    teacher: torch.nn.Module,
    teacher_key: str,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    vocab_size: int,
    device: torch.device,
    greedy: bool,
    seed: int,
    check: Callable[[], None] | None = None,
) -> list[Example]:
    """Copies of `examples` whose responses the teacher wrote (greedy, or sampled at temperature 1).

    Greedy decoding, with the paper's no-repeated-6-gram rule against loops, gives the most likely
    answer, which is what a reference should be; SeqKD samples, as the paper does.
    """
    responses = _generate(
        teacher,
        teacher_key,
        [e.prompt_ids for e in examples],
        tokenizer,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        device=device,
        greedy=greedy,
        seed=seed,
        check=check,
    )
    return [
        replace(
            e, record=replace(e.record, response=tokenizer.decode(r, skip_special_tokens=True).strip()), response_ids=r
        )
        for e, r in zip(examples, responses)
    ]


def teacher_text(
    teacher: torch.nn.Module,
    teacher_key: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    documents: int,
    max_new_tokens: int,
    vocab_size: int,
    device: torch.device,
    seed: int,
    check: Callable[[], None] | None = None,
) -> list[str]:
    """`documents` free texts the teacher samples at temperature 1 from the `OPENINGS` in turn.

    Each opening is encoded as ordinary text (with the tokenizer's BOS where it adds one), not as a
    chat turn: the LM term is about text in general, not instructions. A document ends at EOS or
    after `max_new_tokens`.
    """
    prompts = [tokenizer.encode(OPENINGS[i % len(OPENINGS)]) for i in range(documents)]
    continuations = _generate(
        teacher,
        teacher_key,
        prompts,
        tokenizer,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        device=device,
        greedy=False,
        seed=seed,
        check=check,
    )
    return [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompts, continuations)]
