"""GKD: generalised knowledge distillation, TRL's GKDTrainer step for step.

Each micro-batch is on-policy with probability gkd.lmbda: the student samples the responses to its
prompts. Otherwise it trains on the training responses, or (gkd.seq_kd) on responses the teacher
samples. Either way the loss is the generalised Jensen-Shannon divergence between the student's and
the teacher's next-token distributions at every response token (`losses.gkd_loss`), both at
gkd.temperature. At beta 1 and lmbda 1 this is MiniLLM's single-step term alone, which is what makes
it the baseline that tells whether MiniLLM's long-term return and teacher mixing earn their cost.
"""

from __future__ import annotations

import torch

from ..batch import SequenceBatch, collate, response_logits
from ..distributed import is_sharded, rank, whole_for_decoding, world_size
from ..losses import gkd_loss
from ..sampling import sample
from ..spec import JobSpec
from .base import Context, Method, Schedule, Stopwatch, TrainingData, pairs


def trains_on_fixed_responses(spec: JobSpec) -> bool:
    """Whether some micro-batches use the data's responses: off-policy ones exist and seq_kd is off."""
    return spec.gkd.lmbda < 1 and not spec.gkd.seq_kd


class GKDStage:
    def __init__(self, name: str, ctx: Context, method: Method, data: TrainingData, schedule: Schedule):
        self.name, self.ctx, self.schedule = name, ctx, schedule
        self.cfg = ctx.spec.gkd
        (responses,) = self.needs(method, ctx.spec)
        self.examples = data.examples(responses)
        self.pairs = pairs(self.examples)

    @staticmethod
    def needs(method: Method, spec: JobSpec) -> set[str]:
        """The training responses when some micro-batches use them, else the prompts alone."""
        return {method.responses if trains_on_fixed_responses(spec) else "none"}

    def describe(self) -> str:
        """What this stage trains, for the job's log."""
        cfg = self.cfg
        divergence = {0.0: "forward KL", 1.0: "reverse KL"}.get(cfg.beta, f"generalised JSD (beta {cfg.beta:g})")
        rest = "responses the teacher samples" if cfg.seq_kd else "the training responses"
        return (
            f"{self.name}: {divergence} to the teacher at temperature {cfg.temperature:g}, on the student's own "
            f"samples in a share {cfg.lmbda:g} of micro-batches and on {rest} in the rest, {self.schedule.steps} steps"
        )

    @torch.no_grad()
    def _sampled(self, model: torch.nn.Module, indices: list[int], micro_step: int) -> SequenceBatch:
        """Responses `model` samples to the prompts `indices`, from a generator seeded by the micro-batch and rank."""
        ctx = self.ctx
        prompts = collate([(self.examples[i].prompt_ids, []) for i in indices], ctx.tokenizer.pad_token_id)
        prompts = prompts.to(ctx.device)
        seed = (ctx.spec.training.seed * 1_000_003 + micro_step) * 1009 + rank()
        return sample(
            model,
            prompts.prompt_ids,
            prompts.prompt_mask,
            max_new_tokens=ctx.spec.data.max_response_tokens,
            eos_id=ctx.tokenizer.eos_token_id,
            pad_id=ctx.tokenizer.pad_token_id,
            vocab_size=ctx.vocab_size,
            generator=torch.Generator(device=ctx.device).manual_seed(seed),
            temperature=self.cfg.temperature,
            sync_ranks=is_sharded(model),
            compile_steps=ctx.spec.resources.compile_decoding,
        ).batch

    def on_policy(self, micro_step: int) -> bool:
        """Whether global micro-batch `micro_step` samples its own responses. Drawn from the micro-batch's
        index alone, so every rank decides alike (a sharded model's forward needs all of them) and a
        resumed job decides as the uninterrupted one did."""
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.ctx.spec.training.seed * 7_919 + micro_step))
        return bool(draw < self.cfg.lmbda)

    def train_step(self, step: int) -> dict[str, float]:
        ctx, spec, cfg = self.ctx, self.ctx.spec, self.cfg
        engine, ga = ctx.engine, spec.training.gradient_accumulation
        loss_sum, tokens, sequences, own, clock = 0.0, 0, 0, 0, Stopwatch()
        for k in range(ga):
            micro = step * ga + k
            indices = ctx.micro_batch_indices(len(self.examples), spec.training.seed, micro)
            if self.on_policy(micro):
                own += 1
                engine.module.eval()  # samples of the model as it is, without dropout
                with clock("sample"), whole_for_decoding(engine) as student:
                    batch = self._sampled(student, indices, micro)
            elif cfg.seq_kd:
                with clock("sample"):
                    batch = self._sampled(ctx.teacher, indices, micro)
            else:
                batch = ctx.batch(self.pairs, indices)
            engine.train()
            with clock("teacher_forward"):
                teacher_logits = ctx.teacher_logits(batch)
            with clock("student_forward"):
                logits = response_logits(engine, batch, ctx.vocab_size)
                loss = gkd_loss(logits, teacher_logits, batch.response_mask, cfg.beta, cfg.temperature)
            with clock("backward"):
                engine.backward(loss)
            with clock("optimizer"):
                engine.step()
            loss_sum += loss.item() / ga
            tokens += int(batch.response_mask.sum())
            sequences += len(batch)
        return {
            "loss": loss_sum,
            "on_policy": own / ga,
            "response_length": tokens / sequences,
            "tokens_per_s": tokens * world_size() / sum(clock.seconds.values()),
            **clock.metrics(),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
