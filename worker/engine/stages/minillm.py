"""MiniLLM: the paper's policy gradient on the reverse KL, in phases.

Each phase samples rollouts with teacher-mixed sampling and scores them, then `ppo_epochs` passes
of clipped updates run over them. The LM term (the paper's L_PT, see `lm_source`) adds a batch of
other text to every update, in the same forward as the rollouts, as the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..batch import SequenceBatch, collate, pad_columns, response_logits
from ..data import sample_order
from ..distributed import all_reduce_sum, rank, world_size
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
from ..sampling import sample
from ..spec import JobSpec
from .base import Context, Method, Schedule, Stopwatch, TrainingData, pairs


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
    # The teacher's logits at every response position (N, Lr, V), in its dtype: the single-step term
    # needs its whole distribution, and the teacher's weights never change, so it is read once a phase.
    # The price is memory: N × Lr × V × 2 or 4 bytes for the phase (64 × 64 × 49k × 2 B = 0.4 GB).
    teacher_logits: torch.Tensor


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
        if self.cfg.rollouts_per_phase % world_size() or self.rollouts_per_rank % minibatch:
            raise ValueError(
                f"minillm.rollouts_per_phase ({self.cfg.rollouts_per_phase}) must be a multiple of "
                f"resources.devices × training.batch_size × training.gradient_accumulation ({world_size() * minibatch})"
            )
        self.phase: int | None = None
        self.rollouts: Rollouts | None = None

    @staticmethod
    def needs(method: Method, spec: JobSpec) -> set[str]:
        """The data this stage trains on: prompts, and the LM term's text."""
        lm = {"pretrain": "pretrain", "train_responses": "gold", None: None}[lm_source(spec)]
        return {method.responses} | ({lm} if lm else set())

    def describe(self) -> str:
        """What this stage trains, for the job's log; MiniLLM's LM term in particular."""
        cfg, spec = self.cfg, self.ctx.spec
        if self.lm is None:
            why = "minillm.lm_coef is 0" if cfg.lm_coef == 0 else "no data.pretrain; builtin:teacher-text is one for the paper's L_PT"
            return f"{self.name}: LM term off ({why})"
        loss = "next-token loss" if cfg.kd_ratio == 0 else f"{1 - cfg.kd_ratio:g}·next-token loss + {cfg.kd_ratio:g}·forward KL to the teacher"
        if self.lm == "pretrain":
            text = f"data.pretrain ({spec.data.pretrain}: {len(self.lm_pairs)} chunks of {cfg.lm_chunk_tokens} tokens)"
        else:
            text = "the training responses (minillm.lm_data train_responses, not the paper's L_PT)"
        return f"{self.name}: LM term: {loss} on {text}, weight minillm.lm_coef {cfg.lm_coef:g}"

    # -- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, phase: int, clock: Stopwatch) -> None:
        """Sample this rank's rollouts for `phase` and score them."""
        ctx, cfg, seed = self.ctx, self.cfg, self.ctx.spec.training.seed
        student = ctx.engine.module
        student.eval()  # no dropout: old and new log-probs must agree while the weights are unchanged
        first = (phase * world_size() + rank()) * self.rollouts_per_rank
        indices = sample_order(len(self.prompts), seed + 1, first, self.rollouts_per_rank)
        generator = torch.Generator(device=ctx.device).manual_seed((seed * 1_000_003 + phase) * 1009 + rank())
        parts, kept = [], []
        for start in range(0, len(indices), cfg.rollout_batch_size):
            chunk = indices[start : start + cfg.rollout_batch_size]
            prompts = collate([(self.prompts[i].prompt_ids, []) for i in chunk], ctx.tokenizer.pad_token_id).to(ctx.device)
            with clock("sample"):
                part, teacher_logits = sample(
                    student, prompts.prompt_ids, prompts.prompt_mask,
                    max_new_tokens=ctx.spec.data.max_response_tokens, eos_id=ctx.tokenizer.eos_token_id,
                    pad_id=ctx.tokenizer.pad_token_id, vocab_size=ctx.vocab_size, generator=generator,
                    mix_model=ctx.teacher, mix_alpha=cfg.teacher_mix_alpha, temperature=cfg.temperature,
                )  # fmt: skip
            parts.append(part)
            kept.append(teacher_logits)
        batch = SequenceBatch.concat(parts, ctx.tokenizer.pad_token_id)
        width = batch.response_ids.shape[1]
        # With teacher mixing the teacher decoded every rollout, and its logits at each response
        # position are kept from there: neither the scoring below nor the updates run it again.
        teacher_logits = None if kept[0] is None else torch.cat([pad_columns(t, width) for t in kept])
        logp_old, logp_teacher, scored = [], [], []
        for start in range(0, len(batch), ctx.spec.training.batch_size):
            rows = slice(start, start + ctx.spec.training.batch_size)
            mb = batch.select(rows)
            with clock("score"):
                # The student's log-probs are recomputed by a full forward in the code path training
                # uses: the sampler's incremental (KV-cache) numerics differ slightly and would push
                # the first PPO ratio off 1. Without mixing, the teacher reads the rollouts once,
                # here, and its logits serve the updates too.
                s_logits = response_logits(student, mb, ctx.vocab_size)
                t_logits = ctx.teacher_logits(mb) if teacher_logits is None else teacher_logits[rows]
            logp_old.append(token_log_probs(scaled(s_logits, cfg.temperature), mb.response_ids))
            logp_teacher.append(token_log_probs(t_logits, mb.response_ids))
            scored.append(t_logits)
        teacher_logits = torch.cat(scored) if teacher_logits is None else teacher_logits
        mask = batch.response_mask.float()
        logp_old = torch.cat(logp_old) * mask
        logp_teacher = torch.cat(logp_teacher)
        # The importance weight compares with the teacher at the sampling temperature; the reward is
        # the teacher's own log-probability, at temperature 1 (as the reference).
        logp_teacher_t = logp_teacher if cfg.temperature == 1 else token_log_probs(scaled(teacher_logits, cfg.temperature), batch.response_ids)
        weights = importance_weights(logp_old, logp_teacher_t, cfg.teacher_mix_alpha) * mask
        rewards = token_rewards(logp_teacher, logp_old, mask, cfg.reward_clip)
        returns = long_term_returns(rewards, mask, cfg.gamma, cfg.length_normalization)
        # Whitened once per phase over every rank's rollouts (the reference whitens per micro-batch):
        # a larger sample gives steadier statistics, and it is the same for every PPO epoch.
        advantages = whiten(returns, mask, all_reduce_sum(masked_moments(returns, mask))) if cfg.whiten_advantages else returns
        self.phase = phase
        self.rollouts = Rollouts(batch, logp_old, weights, advantages.detach(), rewards, teacher_logits)

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
        order = torch.randperm(
            self.rollouts_per_rank, generator=torch.Generator().manual_seed((spec.training.seed * 7 + phase) * 101 + epoch)
        )
        engine.module.eval()  # dropout off during RL, as in the reference (PPOModel sets eval())
        sums: dict[str, float] = {}
        tokens = 0
        for k in range(ga):
            idx = order[(update * ga + k) * b : (update * ga + k + 1) * b]
            mb = ro.batch.select(idx)
            mask = mb.response_mask
            parts = [mb]
            if self.lm:
                lm = ctx.batch(self.lm_pairs, ctx.micro_batch_indices(len(self.lm_pairs), spec.training.seed + 2, step * ga + k))
                parts.append(lm)
            # PPO and LM batches share one forward, as in the reference: one pass over the weights.
            joint = SequenceBatch.concat(parts, ctx.tokenizer.pad_token_id)
            lm_teacher = None
            if self.lm and cfg.kd_ratio > 0:
                with clock("teacher_forward"):  # the LM term's forward KL to the teacher
                    lm_teacher = ctx.teacher_logits(lm)
            with clock("student_forward"):
                logits = response_logits(engine, joint, ctx.vocab_size)
                lr_ = mb.response_ids.shape[1]
                objective = minillm_loss(
                    logits[:b, :lr_], ro.teacher_logits[idx], mb.response_ids, mask,
                    ro.logp_old[idx], ro.weights[idx], ro.advantages[idx],
                    cfg.temperature, cfg.clip_range, cfg.single_step,
                )  # fmt: skip
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
                ("loss", loss), ("pg_loss", objective.pg_loss), ("reverse_kl", objective.reverse_kl),
                ("lm_loss", lm_loss), ("clip_fraction", objective.clip_fraction),
            ):  # fmt: skip
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
        return {"phase": self.phase, "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.rollouts = state["phase"], state["rollouts"]
