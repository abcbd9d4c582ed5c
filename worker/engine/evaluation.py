"""Evaluation with the MiniLLM paper's protocol.

Responses are sampled (temperature 1, top-k 0, top-p 1, no repeated 6-grams) once per seed and scored
with Rouge-L F1 (Porter stemming, max over references, x100) by the `rouge-score` package the paper
used. Alongside: mean response length (tokens), distinct-4 of the responses, and the per-token
reverse and forward KL between student and teacher on the held-out gold responses (teacher-forced);
with `eval.sample_kl`, also the reverse KL on the model's own sampled responses, per seed.
A few of the sampled responses are kept to be read (`eval.samples`): those of the first prompts under the first
seed, so that every model and every step answers the same prompts.
The sampled metrics are computed per seed and averaged over seeds, as the paper reports the mean of
5 seeds; distinct-4 too, so that the same response drawn under two seeds does not count as a repeat.
Prompts are split across ranks and the results gathered, so every rank does its share of forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from .batch import collate, response_logits
from .data import Example
from .distributed import all_reduce_sum, rank, world_size
from .losses import forward_kl, reverse_kl
from .sampling import sample
from .spec import JobSpec

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    return max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100


def distinct_n(texts: list[str], n: int = 4) -> float:
    """Distinct n-grams over all word n-grams of the texts, x100 (the paper's Dist-4)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def summarize(scored: list[tuple[int, float, int, str]]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """(seed, Rouge-L, length, text) per sampled response -> (means over seeds, values per seed)."""
    per_seed = {}
    for seed in dict.fromkeys(s[0] for s in scored):
        mine = [s for s in scored if s[0] == seed]
        per_seed[seed] = {
            "rouge_l": sum(s[1] for s in mine) / len(mine),
            "response_length": sum(s[2] for s in mine) / len(mine),
            "distinct_4": distinct_n([s[3] for s in mine]),
        }
    means = {
        k: sum(v[k] for v in per_seed.values()) / len(per_seed) for k in ("rouge_l", "response_length", "distinct_4")
    }
    return means, per_seed


def _gather(items: list) -> list:
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    vocab_size: int,
    device: torch.device,
    seeds: list[int],
    check: Callable[[], None] | None = None,
) -> tuple[dict[str, float], dict[int, dict[str, float]], list[dict[str, str | None]]]:
    """Scores of `model` on `examples`, sampled once per seed: (means over seeds, values per seed,
    sample generations: {prompt, reference, response} of the first `eval.samples` examples under the first seed).

    With `teacher`, the means also hold the KLs to it on the gold responses (no sampling, no seed).
    `check` is called before every generated token and every scoring batch; it may raise (a cancelled job).
    """
    was_training = model.training
    model.eval()
    mine = examples[rank() :: world_size()]
    cfg = spec.eval
    scored = []  # (seed, rouge, length, text)
    samples = []  # (index in examples, sample)
    sample_kl = {}  # seed -> (sampled tokens, summed reverse KL at them)
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed * 7919 + rank())
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start : start + cfg.batch_size]
            batch = collate([(e.prompt_ids, []) for e in chunk], tokenizer.pad_token_id).to(device)
            out = sample(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                max_new_tokens=spec.data.max_response_tokens,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                vocab_size=vocab_size,
                generator=generator,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                check=check,
            ).batch
            if teacher is not None and cfg.sample_kl:
                # Exact over the vocabulary at each sampled position, as MiniLLM's single-step term.
                kl = reverse_kl(response_logits(model, out, vocab_size), response_logits(teacher, out, vocab_size))
                m = out.response_mask.double()
                sums = sample_kl.setdefault(seed, torch.zeros(2, dtype=torch.float64))
                sums += torch.stack([m.sum(), (kl * m).sum()]).cpu()
            for offset, (example, ids, mask) in enumerate(zip(chunk, out.response_ids.cpu(), out.response_mask.cpu())):
                text = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
                score = rouge_l(text, [example.record.response or ""])
                scored.append((seed, score, int(mask.sum()), text))
                index = rank() + (start + offset) * world_size()  # this rank holds examples[rank::world_size]
                if seed == seeds[0] and index < cfg.samples:
                    samples.append(
                        (
                            index,
                            {"prompt": example.record.message, "reference": example.record.response, "response": text},
                        )
                    )
    scores, per_seed = summarize(_gather(scored))
    samples = [sample for _, sample in sorted(_gather(samples), key=lambda s: s[0])]
    for seed, sums in sample_kl.items():  # the same seeds, in the same order, on every rank
        sums = all_reduce_sum(sums)
        per_seed[seed]["reverse_kl_samples"] = float(sums[1] / sums[0].clamp(min=1))
    if sample_kl:
        scores["reverse_kl_samples"] = sum(v["reverse_kl_samples"] for v in per_seed.values()) / len(per_seed)
    if teacher is not None:
        sums = torch.zeros(3, dtype=torch.float64)  # tokens, reverse KL, forward KL
        for start in range(0, len(mine), cfg.batch_size):
            if check is not None:
                check()
            chunk = mine[start : start + cfg.batch_size]
            batch = collate([(e.prompt_ids, e.response_ids) for e in chunk], tokenizer.pad_token_id).to(device)
            s_logits = response_logits(model, batch, vocab_size)
            t_logits = response_logits(teacher, batch, vocab_size)
            m = batch.response_mask.double()
            sums += torch.stack(
                [m.sum(), (reverse_kl(s_logits, t_logits) * m).sum(), (forward_kl(s_logits, t_logits) * m).sum()]
            ).cpu()
        sums = all_reduce_sum(sums)
        scores["reverse_kl"] = float(sums[1] / sums[0])
        scores["forward_kl"] = float(sums[2] / sums[0])
    model.train(was_training)
    return scores, per_seed, samples
