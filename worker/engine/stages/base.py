"""What every stage shares: the training context, the data a job prepared, timing, and the LR schedule.

A stage turns one optimizer step index (0-based, within the stage) into metrics. Every random
choice is drawn from a generator seeded by (seed, what, index), never from a global stream, so the
step a job resumes at sees exactly the data and samples it would have seen.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..batch import SequenceBatch, collate, response_logits
from ..data import Example
from ..distributed import rank, world_size
from ..spec import JobSpec

Responses = Literal["gold", "teacher-samples", "none"]


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start .. start+count of an endless stream of shuffled passes over n items.

    Pass e is a permutation seeded by (seed, e), so any position can be recomputed from its index
    alone: a resumed job continues exactly where it stopped without saving a data iterator.
    """
    order, cache = [], {}
    for position in range(start, start + count):
        epoch = position // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        order.append(cache[epoch][position % n])
    return order


@dataclass(frozen=True)
class Method:
    """What a method trains on, and which stage class runs it (see the table in `stages`)."""

    stage: type
    # The responses its training examples carry. gold: each record's own response (the teacher
    # writes one, greedily, where a record has none); teacher-samples: one the teacher samples per
    # prompt (SeqKD); none: prompts only (MiniLLM samples its own responses).
    responses: Responses
    word_kd: bool = False  # the loss mixes in forward KL to the teacher, weighted by kd.kd_ratio


@dataclass
class TrainingData:
    """The training examples a job prepared; each stage takes what its method needs."""

    prompts: list[Example]  # the training records; responses may be missing
    gold: list[Example] | None = None
    teacher_samples: list[Example] | None = None
    pretrain: list[list[int]] | None = None  # token chunks of data.pretrain (MiniLLM's LM term)

    def examples(self, responses: Responses) -> list[Example]:
        found = {"gold": self.gold, "teacher-samples": self.teacher_samples, "none": self.prompts}[responses]
        if found is None:
            raise RuntimeError(f"no {responses} training examples were prepared")
        return found


@dataclass
class Context:
    """What every stage trains with."""

    spec: JobSpec
    engine: object  # deepspeed.DeepSpeedEngine
    teacher: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    device: torch.device

    def batch(self, pairs: list[tuple[list[int], list[int]]], indices: list[int]) -> SequenceBatch:
        """Collate (prompt ids, response ids) pairs `indices` onto the device."""
        return collate([pairs[i] for i in indices], self.tokenizer.pad_token_id).to(self.device)

    def micro_batch_indices(self, n: int, seed: int, micro_step: int) -> list[int]:
        """This rank's share of global micro-batch `micro_step` from the shuffled stream over n items."""
        b = self.spec.training.batch_size
        return sample_order(n, seed, (micro_step * world_size() + rank()) * b, b)

    @torch.no_grad()
    def teacher_logits(self, batch: SequenceBatch) -> torch.Tensor:
        return response_logits(self.teacher, batch, self.vocab_size)


def eval_with_checkpointing(model: torch.nn.Module) -> None:
    """Eval mode (no dropout), except that layers with gradient checkpointing on keep checkpointing.

    transformers checkpoints a layer only while that layer's own `training` flag is set; dropout
    reads the flags of the modules below it. Setting only the checkpointing layers' flags keeps
    MiniLLM's updates free of dropout (old and new log-probs must agree) and within the activation
    memory that training.gradient_checkpointing asked for.
    """
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def pairs(examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    return [(e.prompt_ids, e.response_ids) for e in examples]


class Stopwatch:
    """Wall time per named section of a step, reported as `time_<section>` metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, section: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[section] += time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.seconds.items()}


@dataclass
class Schedule:
    steps: int
    learning_rate: float
    warmup_steps: int
    lr_schedule: str

    @classmethod
    def of(cls, section) -> Schedule:
        """From a spec section with steps, learning_rate, warmup_steps and lr_schedule."""
        return cls(section.steps, section.learning_rate, section.warmup_steps, section.lr_schedule)

    def lr(self, step: int) -> float:
        """Learning rate for 0-based optimizer step `step` of this stage."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return self.learning_rate * (1 - progress)
        return self.learning_rate
