"""Fine-tuning on fixed responses: SFT, word-level KD and the training part of SeqKD.

- SFT: cross-entropy on the responses.
- KD: (1−r)·cross-entropy + r·forward KL to the teacher, teacher-forced on the same responses.
- SeqKD: SFT on responses the teacher sampled (the table in `stages` says which responses).
"""

from __future__ import annotations

from ..batch import response_logits
from ..distributed import world_size
from ..losses import kd_loss
from ..spec import JobSpec
from .base import Context, Method, Schedule, Stopwatch, TrainingData, pairs


class FinetuneStage:
    def __init__(self, name: str, ctx: Context, method: Method, data: TrainingData, schedule: Schedule):
        self.name, self.ctx, self.schedule = name, ctx, schedule
        self.pairs, self.responses = pairs(data.examples(method.responses)), method.responses
        self.kd_ratio = ctx.spec.kd.kd_ratio if method.word_kd else 0.0

    @staticmethod
    def needs(method: Method, spec: JobSpec) -> set[str]:
        """The training responses this stage uses."""
        return {method.responses}

    def describe(self) -> str:
        """What this stage trains, for the job's log."""
        loss = (
            "cross-entropy"
            if self.kd_ratio == 0
            else f"{1 - self.kd_ratio:g}·cross-entropy + {self.kd_ratio:g}·forward KL to the teacher"
        )
        return f"{self.name}: {loss} on {self.responses} responses, {self.schedule.steps} steps"

    def train_step(self, step: int) -> dict[str, float]:
        ctx, spec = self.ctx, self.ctx.spec
        engine, ga = ctx.engine, spec.training.gradient_accumulation
        engine.train()
        loss_sum, tokens, clock = 0.0, 0, Stopwatch()
        for k in range(ga):
            batch = ctx.batch(self.pairs, ctx.micro_batch_indices(len(self.pairs), spec.training.seed, step * ga + k))
            with clock("teacher_forward"):
                teacher_logits = ctx.teacher_logits(batch) if self.kd_ratio > 0 else None
            with clock("student_forward"):
                logits = response_logits(engine, batch, ctx.vocab_size)
                loss = kd_loss(logits, teacher_logits, batch.response_ids, batch.response_mask, self.kd_ratio)
            with clock("backward"):
                engine.backward(loss)
            with clock("optimizer"):
                engine.step()
            loss_sum += loss.item() / ga
            tokens += int(batch.response_mask.sum())
        elapsed = sum(clock.seconds.values())
        return {"loss": loss_sum, "tokens_per_s": tokens * world_size() / elapsed, **clock.metrics()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
