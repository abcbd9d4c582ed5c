"""Autoregressive sampling, with MiniLLM's teacher-mixed sampling as a special case.

One decoding loop serves rollouts (student mixed with teacher), evaluation (student or teacher
alone, with the paper's no-repeat-6-gram rule) and teacher-generated data (SeqKD, demo references).
It takes a `torch.Generator`, so the same seed gives the same samples however often a job is resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .batch import SequenceBatch
from .prepacked import prepacked_linears


def ban_repeated_ngrams(sequence: Tensor, logits: Tensor, n: int) -> Tensor:
    """Set to −inf every token that would complete an n-gram already present in `sequence` (B, L).

    The rule of transformers' NoRepeatNGramLogitsProcessor, vectorised: that one walks every row in
    Python at every step, which made evaluation decoding several times slower than the model.
    """
    length = sequence.shape[1]
    if length < n:
        return logits
    suffix = sequence[:, length - n + 1 :]  # the (n−1)-gram the next token would extend
    windows = sequence.unfold(1, n - 1, 1)[:, : length - n + 1]  # (n−1)-grams that have a successor
    seen = (windows == suffix.unsqueeze(1)).all(-1)
    followers = sequence[:, n - 1 :]
    banned = torch.where(seen, torch.tensor(float("-inf"), device=logits.device), torch.tensor(0.0, device=logits.device))
    return logits.scatter_add(1, followers, banned.to(logits.dtype))


class Sampled(NamedTuple):
    batch: SequenceBatch
    # The mix model's logits at every response position (B, Lr, V) in its own dtype, so that MiniLLM
    # need not run the teacher again; None when it did not decode (no mix model, or α 0).
    mix_logits: Tensor | None


def _step(model: torch.nn.Module, ids: Tensor, attention_mask: Tensor, positions: Tensor, cache) -> tuple[Tensor, object]:
    """The next-token logits (B, V) in the model's own dtype, and the grown cache."""
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


def draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of `probs` (B, V), unnormalised and non-negative: (B,).

    Inverse-CDF sampling: one uniform per row against the running sum. It draws from the same
    distribution as `torch.multinomial`, which on the CPU spends more time per row of a 49k
    vocabulary than a decoding step of a small model spends in its matmuls. A token of probability 0
    is never drawn: the first position where the cumulative sum exceeds u·total raised the sum there.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.shape[1] - 1)


def _all_ranks_done(done: bool) -> bool:
    """Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return done
    flag = torch.tensor([1 if done else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mix_model: torch.nn.Module | None = None,
    mix_alpha: float = 0.0,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 0,
    sync_ranks: bool = True,
    check: Callable[[], None] | None = None,
) -> Sampled:
    """Sample responses to left-padded prompts (B, Lq); top-k 0 and top-p 1, as in the paper.

    With `mix_model`, the next token is drawn from (1 − α)·softmax(model) + α·softmax(mix_model):
    both models decode in lock step, each with its own KV cache, and both see the same tokens.
    `temperature=0` decodes greedily. A sequence ends at its first EOS, which is kept as a target.
    `sync_ranks`: stop only when every rank is done, for models whose forward is collective (ZeRO-3).
    `check` is called before every token; it may raise to abandon the batch (a cancelled job).
    """
    models = [model] if mix_model is None or mix_alpha == 0 else [model, mix_model]
    weights = [1.0] if len(models) == 1 else [1 - mix_alpha, mix_alpha]
    batch_size, device = prompt_ids.shape[0], prompt_ids.device

    attention_mask = prompt_mask.clone()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, caches = prompt_ids, [None] * len(models)
    sequence = prompt_ids
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    tokens, masks, mix_logits = [], [], []
    with prepacked_linears(models, batch_size):
        for _ in range(max_new_tokens):
            if check is not None:
                check()
            probs = None
            for i, m in enumerate(models):
                raw, caches[i] = _step(m, step_ids, attention_mask, positions, caches[i])
                raw = raw[:, :vocab_size]
                if i == 1:
                    mix_logits.append(raw)
                logits = raw.float()
                if no_repeat_ngram_size > 0:
                    logits = ban_repeated_ngrams(sequence, logits, no_repeat_ngram_size)
                if temperature == 0:
                    p = torch.nn.functional.one_hot(logits.argmax(-1), vocab_size).float()
                else:
                    p = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1)
                probs = p if len(models) == 1 else p.mul_(weights[i]) if probs is None else probs.add_(p, alpha=weights[i])
            next_ids = draw(probs, generator)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            masks.append(~finished)
            tokens.append(next_ids)
            finished = finished | (next_ids == eos_id)
            if _all_ranks_done(bool(finished.all())) if sync_ranks else bool(finished.all()):
                break
            step_ids = next_ids.unsqueeze(-1)
            sequence = torch.cat([sequence, step_ids], dim=1)
            attention_mask = torch.cat([attention_mask, masks[-1].long().unsqueeze(-1)], dim=1)
            positions = positions[:, -1:] + 1
    batch = SequenceBatch(prompt_ids, prompt_mask, torch.stack(tokens, 1), torch.stack(masks, 1).long())
    return Sampled(batch, torch.stack(mix_logits, 1) if mix_logits else None)
