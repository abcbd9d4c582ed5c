"""MiniLLM: the paper's policy gradient on the reverse KL, in phases.

Each phase samples rollouts with teacher-mixed sampling and scores them, then `ppo_epochs` passes
of clipped updates run over them. The LM term (the paper's L_PT, see `lm_source`) adds a batch of
other text to every update, in the same forward as the rollouts, as the reference code does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from ..batch import SequenceBatch, collate, response_logits
from ..distributed import all_reduce_sum, is_sharded, rank, whole_for_decoding, world_size
from ..losses import (
    importance_weights,
    kd_loss,
    long_term_returns,
    masked_moments,
    minillm_loss,
    scaled,
    token_log_probs,
    token_rewards,
    whiten,
)
from ..preflight import rollouts_problem
from ..sampling import sample
from ..spec import JobSpec
from .base import Context, Method, Schedule, Stopwatch, TrainingData, eval_with_checkpointing, pairs, sample_order


def lm_source(spec: JobSpec) -> Literal["pretrain", "train_responses"] | None:
    """What the LM term trains on: data.pretrain (the paper's L_PT), the training responses (only when
    asked for by name, minillm.lm_data), or nothing (None: the term is off)."""
    m = spec.minillm
    if m.lm_coef == 0:
        return None
    if m.lm_data == "train_responses":
        return "train_responses"
    return "pretrain" if spec.data.pretrain else None


@dataclass
class Rollouts:
    """One phase's samples and everything the updates need, all (N, Lr) beside the batch."""

    batch: SequenceBatch
    logp_old: torch.Tensor  # student log-prob of each sampled token, right after sampling
    weights: torch.Tensor  # importance weight q_old / p̃ per token
    advantages: torch.Tensor  # detached, normalised long-term returns
    rewards: torch.Tensor  # log p_teacher − log q_old per token, clipped (for reporting)
    # The teacher's logits at every response position (N, Lr, V) in its dtype, when they are kept for
    # the phase (see `keeps_teacher_logits`); None when each update recomputes its micro-batch's, and
    # in a resume state (rebuilt on resume, bit for bit, by `MiniLLMStage.teacher_logits_again`).
    teacher_logits: torch.Tensor | None


def teacher_logits_bytes(spec: JobSpec, vocab_size: int, element_size: int) -> int:
    """What keeping a phase's teacher logits takes on each process: rollouts × longest response × vocabulary."""
    return spec.minillm.rollouts_per_phase // world_size() * spec.data.max_response_tokens * vocab_size * element_size


def keeps_teacher_logits(spec: JobSpec, vocab_size: int, element_size: int) -> bool:
    """minillm.teacher_logits, with auto decided by the budget (the same on every process and every resume)."""
    mode = spec.minillm.teacher_logits
    if mode == "auto":
        return teacher_logits_bytes(spec, vocab_size, element_size) <= spec.minillm.teacher_logits_budget_gb * 2**30
    return mode == "keep"


class MiniLLMStage:
    def __init__(self, name: str, ctx: Context, method: Method, data: TrainingData, schedule: Schedule):
        self.name, self.ctx, self.schedule = name, ctx, schedule
        self.prompts = data.examples(method.responses)
        spec = ctx.spec
        self.cfg = spec.minillm
        self.lm = lm_source(spec)
        if self.lm == "pretrain":
            # A chunk is a "prompt" of its first token and a "response" of the rest: every token after
            # the first is predicted from the ones before it (the reference's 511 targets of 512).
            self.lm_pairs = [(c[:1], c[1:]) for c in data.pretrain]
        else:
            self.lm_pairs = pairs(data.examples("gold")) if self.lm == "train_responses" else []
        self.rollouts_per_rank = self.cfg.rollouts_per_phase // world_size()
        minibatch = spec.training.batch_size * spec.training.gradient_accumulation
        self.steps_per_epoch = self.rollouts_per_rank // minibatch
        if problem := rollouts_problem(spec):
            raise ValueError(f"minillm.rollouts_per_phase ({self.cfg.rollouts_per_phase}): {problem}")
        self.teacher_dtype = next(ctx.teacher.parameters()).dtype
        self.keep = keeps_teacher_logits(spec, ctx.vocab_size, self.teacher_dtype.itemsize)
        self.phase: int | None = None
        self.rollouts: Rollouts | None = None

    @staticmethod
    def needs(method: Method, spec: JobSpec) -> set[str]:
        """The data this stage trains on: prompts, and the LM term's text."""
        lm = {"pretrain": "pretrain", "train_responses": "gold", None: None}[lm_source(spec)]
        return {method.responses} | ({lm} if lm else set())

    def describe(self) -> str:
        """What this stage trains, for the job's log: MiniLLM's LM term, and where the teacher's logits come from."""
        cfg, spec = self.cfg, self.ctx.spec
        size = teacher_logits_bytes(spec, self.ctx.vocab_size, self.teacher_dtype.itemsize) / 2**30
        if self.keep:
            logits = f"teacher logits kept for each phase ({size:.2f} GB per process)"
        else:
            logits = f"teacher logits recomputed for each update (keeping them would take {size:.2f} GB per process)"
        if self.lm is None:
            why = (
                "minillm.lm_coef is 0"
                if cfg.lm_coef == 0
                else "no data.pretrain; builtin:teacher-text is one for the paper's L_PT"
            )
            return f"{self.name}: LM term off ({why}); {logits}"
        loss = (
            "next-token loss"
            if cfg.kd_ratio == 0
            else f"{1 - cfg.kd_ratio:g}·next-token loss + {cfg.kd_ratio:g}·forward KL to the teacher"
        )
        if self.lm == "pretrain":
            text = f"data.pretrain ({spec.data.pretrain}: {len(self.lm_pairs)} chunks of {cfg.lm_chunk_tokens} tokens)"
        else:
            text = "the training responses (minillm.lm_data train_responses, not the paper's L_PT)"
        return f"{self.name}: LM term: {loss} on {text}, weight minillm.lm_coef {cfg.lm_coef:g}; {logits}"

    # -- sampling -------------------------------------------------------------------------------

    @property
    def mixing(self) -> bool:
        return self.cfg.teacher_mix_alpha > 0

    @property
    def collective(self) -> bool:
        """Whether decoding runs a forward every rank must join (a ZeRO-3 student or a sharded teacher):
        sampling and its replay must decide alike, or the replay would not give the same bits."""
        return is_sharded(self.ctx.engine.module) or is_sharded(self.ctx.teacher)

    def _chunks(self) -> range:
        """Where each sampling call's rows start among this rank's rollouts."""
        return range(0, self.rollouts_per_rank, self.cfg.rollout_batch_size)

    def _logits_buffer(self) -> torch.Tensor:
        """Room for the phase's teacher logits at the longest response. Zeros: the columns past a
        batch's last token are never written, and stay finite (masked out, but multiplied by 0)."""
        shape = (self.rollouts_per_rank, self.ctx.spec.data.max_response_tokens, self.ctx.vocab_size)
        return torch.zeros(shape, dtype=self.teacher_dtype, device=self.ctx.device)

    def _sample(self, model, prompt_ids, prompt_mask, **kwargs):
        ctx = self.ctx
        return sample(
            model,
            prompt_ids,
            prompt_mask,
            max_new_tokens=ctx.spec.data.max_response_tokens,
            eos_id=ctx.tokenizer.eos_token_id,
            pad_id=ctx.tokenizer.pad_token_id,
            vocab_size=ctx.vocab_size,
            temperature=self.cfg.temperature,
            compile_steps=ctx.spec.resources.compile_decoding,
            **kwargs,
        )

    @torch.no_grad()
    def collect(self, phase: int, clock: Stopwatch) -> None:
        """Sample this rank's rollouts for `phase` and score them."""
        ctx, cfg, seed = self.ctx, self.cfg, self.ctx.spec.training.seed
        first = (phase * world_size() + rank()) * self.rollouts_per_rank
        indices = sample_order(len(self.prompts), seed + 1, first, self.rollouts_per_rank)
        generator = torch.Generator(device=ctx.device).manual_seed((seed * 1_000_003 + phase) * 1009 + rank())
        # With teacher mixing the teacher decodes every rollout, and its logits at each response
        # position are kept from there when the phase keeps them: the updates never run it again.
        kept = self._logits_buffer() if self.keep else None
        ctx.engine.module.eval()  # no dropout: old and new log-probs must agree while the weights are unchanged
        parts = []
        with clock("sample"), whole_for_decoding(ctx.engine) as student:
            for start in self._chunks():
                chunk = indices[start : start + cfg.rollout_batch_size]
                prompts = collate([(self.prompts[i].prompt_ids, []) for i in chunk], ctx.tokenizer.pad_token_id).to(
                    ctx.device
                )
                out = self._sample(
                    student,
                    prompts.prompt_ids,
                    prompts.prompt_mask,
                    generator=generator,
                    mix_model=ctx.teacher,
                    mix_alpha=cfg.teacher_mix_alpha,
                    sync_ranks=self.collective,
                    logits_out=kept[start : start + len(chunk)] if kept is not None and self.mixing else None,
                )
                parts.append(out.batch)
        batch = SequenceBatch.concat(parts, ctx.tokenizer.pad_token_id)
        width = batch.response_ids.shape[1]
        student = ctx.engine.module
        logp_old, logp_teacher, logp_teacher_t = [], [], []
        for start in range(0, len(batch), ctx.spec.training.batch_size):
            rows = slice(start, start + ctx.spec.training.batch_size)
            mb = batch.select(rows)
            with clock("score"):
                # The student's log-probs are recomputed by a full forward in the code path training
                # uses: the sampler's incremental (KV-cache) numerics differ slightly and would push
                # the first PPO ratio off 1. The teacher runs here unless mixing kept its logits.
                s_logits = response_logits(student, mb, ctx.vocab_size)
                if kept is not None and self.mixing:
                    t_logits = kept[rows, :width]
                else:
                    t_logits = ctx.teacher_logits(mb)
                    if kept is not None:
                        kept[rows, :width] = t_logits
            logp_old.append(token_log_probs(scaled(s_logits, cfg.temperature), mb.response_ids))
            logp_teacher.append(token_log_probs(t_logits, mb.response_ids))
            # The importance weight compares with the teacher at the sampling temperature; the reward
            # is the teacher's own log-probability, at temperature 1 (as the reference).
            logp_teacher_t.append(
                logp_teacher[-1]
                if cfg.temperature == 1
                else token_log_probs(scaled(t_logits, cfg.temperature), mb.response_ids)
            )
        mask = batch.response_mask.float()
        logp_old = torch.cat(logp_old) * mask
        logp_teacher = torch.cat(logp_teacher)
        weights = importance_weights(logp_old, torch.cat(logp_teacher_t), cfg.teacher_mix_alpha) * mask
        rewards = token_rewards(logp_teacher, logp_old, mask, cfg.reward_clip)
        returns = long_term_returns(rewards, mask, cfg.gamma, cfg.length_normalization)
        # Whitened once per phase over every rank's rollouts (the reference whitens per micro-batch):
        # a larger sample gives steadier statistics, and it is the same for every PPO epoch.
        advantages = (
            whiten(returns, mask, all_reduce_sum(masked_moments(returns, mask))) if cfg.whiten_advantages else returns
        )
        self.phase = phase
        self.rollouts = Rollouts(
            batch, logp_old, weights, advantages.detach(), rewards, None if kept is None else kept[:, :width]
        )

    @torch.no_grad()
    def teacher_logits_again(self) -> torch.Tensor:
        """The kept teacher logits of the current phase, computed again exactly as `collect` did: by
        replaying the teacher's side of each sampling call on the sampled tokens (mixing), or by the
        scoring's forwards (no mixing). A resume state leaves them out (they are the phase's largest
        tensor by far); the same computation on the same inputs gives the same bits, so a resumed job
        continues exactly as the uninterrupted one."""
        ctx, batch = self.ctx, self.rollouts.batch
        kept, width = self._logits_buffer(), batch.response_ids.shape[1]
        if not self.mixing:
            for start in range(0, len(batch), ctx.spec.training.batch_size):
                rows = slice(start, start + ctx.spec.training.batch_size)
                kept[rows, :width] = ctx.teacher_logits(batch.select(rows))
            return kept[:, :width]
        for start in self._chunks():
            rows = slice(start, start + self.cfg.rollout_batch_size)
            part = batch.select(rows)
            own = int(
                part.prompt_mask.sum(-1).max()
            )  # the call's own prompt width, before the phase's concat padded it
            self._sample(
                ctx.teacher,
                part.prompt_ids[:, -own:],
                part.prompt_mask[:, -own:],
                generator=None,
                sync_ranks=self.collective,
                forced_ids=part.response_ids,
                logits_out=kept[rows],
            )
        return kept[:, :width]

    # -- updates --------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        ctx, cfg, spec = self.ctx, self.cfg, self.ctx.spec
        engine, ga, b = ctx.engine, spec.training.gradient_accumulation, spec.training.batch_size
        phase, within = divmod(step, self.steps_per_epoch * cfg.ppo_epochs)
        epoch, update = divmod(within, self.steps_per_epoch)
        clock = Stopwatch()
        if self.phase != phase:
            self.collect(phase, clock)
        ro = self.rollouts
        if self.keep and ro.teacher_logits is None:  # resumed mid-phase
            with clock("teacher_forward"):
                ro.teacher_logits = self.teacher_logits_again()
        order = torch.randperm(
            self.rollouts_per_rank,
            generator=torch.Generator().manual_seed((spec.training.seed * 7 + phase) * 101 + epoch),
        )
        eval_with_checkpointing(engine.module)  # dropout off during RL, as in the reference (PPOModel sets eval())
        sums: dict[str, float] = {}
        tokens = 0
        for k in range(ga):
            idx = order[(update * ga + k) * b : (update * ga + k + 1) * b]
            mb = ro.batch.select(idx)
            mask = mb.response_mask
            parts = [mb]
            if self.lm:
                lm = ctx.batch(
                    self.lm_pairs, ctx.micro_batch_indices(len(self.lm_pairs), spec.training.seed + 2, step * ga + k)
                )
                parts.append(lm)
            # PPO and LM batches share one forward, as in the reference: one pass over the weights.
            joint = SequenceBatch.concat(parts, ctx.tokenizer.pad_token_id)
            if ro.teacher_logits is not None:
                teacher = ro.teacher_logits[idx]
            else:
                with clock("teacher_forward"):  # recomputed: memory independent of the phase's size
                    teacher = ctx.teacher_logits(mb)
            lm_teacher = None
            if self.lm and cfg.kd_ratio > 0:
                with clock("teacher_forward"):  # the LM term's forward KL to the teacher
                    lm_teacher = ctx.teacher_logits(lm)
            with clock("student_forward"):
                logits = response_logits(engine, joint, ctx.vocab_size)
                lr_ = mb.response_ids.shape[1]
                objective = minillm_loss(
                    logits[:b, :lr_],
                    teacher,
                    mb.response_ids,
                    mask,
                    ro.logp_old[idx],
                    ro.weights[idx],
                    ro.advantages[idx],
                    cfg.temperature,
                    cfg.clip_range,
                    cfg.single_step,
                )
                loss = objective.loss
                lm_loss = torch.zeros(())
                if self.lm:
                    n = lm.response_ids.shape[1]
                    lm_loss = kd_loss(logits[b:, :n], lm_teacher, lm.response_ids, lm.response_mask, cfg.kd_ratio)
                    loss = loss + cfg.lm_coef * lm_loss
                    tokens += int(lm.response_mask.sum())
            with clock("backward"):
                engine.backward(loss)
            with clock("optimizer"):
                engine.step()
            tokens += int(mask.sum())
            for name, value in (
                ("loss", loss),
                ("pg_loss", objective.pg_loss),
                ("reverse_kl", objective.reverse_kl),
                ("lm_loss", lm_loss),
                ("clip_fraction", objective.clip_fraction),
            ):
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / ga
        valid = ro.batch.response_mask.float()
        return {
            **sums,
            "reward": float(ro.rewards.sum() / valid.sum().clamp(min=1)),
            "response_length": float(valid.sum(1).mean()),
            "tokens_per_s": tokens * world_size() / sum(clock.seconds.values()),
            **clock.metrics(),
        }

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors, lists and numbers, which a resume reads with torch.load(weights_only=True)."""
        rollouts = None if self.rollouts is None else asdict(replace(self.rollouts, teacher_logits=None))
        return {"phase": self.phase, "rollouts": rollouts}

    def load_state_dict(self, state: dict) -> None:
        rollouts = state["rollouts"]
        if rollouts is not None:
            rollouts = Rollouts(**{**rollouts, "batch": SequenceBatch(**rollouts["batch"])})
        self.phase, self.rollouts = state["phase"], rollouts
