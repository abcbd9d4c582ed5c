"""MiniLLM's step, which reuses what sampling computed, against the plain step, on tiny transformers models.

The plain step (the engine's before issue 9) scored the rollouts with full forwards of both models
and ran the teacher again in every update, with autograd through log-softmaxes of the whole
(B, L, V). The step now keeps the teacher's logits from teacher-mixed decoding (KV-cache numerics,
not a full forward), reads the teacher once a phase, and takes the update's vocabulary-wide terms
from one chunked autograd Function. Here the plain step is written out again, from the pure
functions and full forwards, and everything the stage computed must agree with it: the teacher's
logits, the log-probs, weights, rewards and advantages of the rollouts, and the update's loss and
gradients. Where the teacher's logits are recomputed per update instead of kept for the phase
(minillm.teacher_logits), the step must agree with the kept one; a resume state leaves the kept ones
out, and they must come back bit for bit.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from toy_stage import EOS, PAD, Engine, V, tiny

from worker.engine.batch import response_logits
from worker.engine.data import Example, Record
from worker.engine.losses import (
    importance_weights,
    long_term_returns,
    masked_mean,
    masked_moments,
    ppo_policy_loss,
    reverse_kl,
    token_rewards,
    whiten,
)
from worker.engine.spec import parse_spec
from worker.engine.stages import METHODS
from worker.engine.stages.base import Context, Schedule, Stopwatch, TrainingData
from worker.engine.stages.minillm import MiniLLMStage, keeps_teacher_logits


def collected(alpha: float, temperature: float, teacher_logits: str = "keep") -> MiniLLMStage:
    spec = parse_spec(
        {
            "student": {"model": "toy"},
            "data": {"max_response_tokens": 10},
            "training": {"batch_size": 4, "seed": 3},
            "minillm": {
                "rollouts_per_phase": 8,
                "rollout_batch_size": 4,
                "ppo_epochs": 1,
                "teacher_mix_alpha": alpha,
                "temperature": temperature,
                "teacher_logits": teacher_logits,
            },
        }
    )
    student, teacher = tiny(1, 1), tiny(2, 2).requires_grad_(False)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    ctx = Context(spec, Engine(student), teacher, tokenizer, V, torch.device("cpu"))
    # Prompts of different lengths: left padding and position ids matter in both paths.
    prompts = [Example(Record("", "", None), [5 + (i * 7 + k) % 40 for k in range(1 + i % 4)], []) for i in range(8)]
    stage = MiniLLMStage("minillm", ctx, METHODS["minillm"], TrainingData(prompts), Schedule(4, 1e-3, 0, "constant"))
    stage.collect(0, Stopwatch())
    return stage


@pytest.mark.parametrize("teacher_logits", ["keep", "recompute"])
@pytest.mark.parametrize("alpha, temperature", [(0.2, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_rollout_statistics_equal_the_plain_full_forward_scoring(alpha, temperature, teacher_logits):
    stage = collected(alpha, temperature, teacher_logits)
    ro, cfg, ctx = stage.rollouts, stage.cfg, stage.ctx
    batch, mask = ro.batch, ro.batch.response_mask.float()
    valid = mask.bool()
    assert valid.sum() > 30 and (ro.weights[valid] - 1).abs().max() > (0.05 if alpha else -1)

    with torch.no_grad():
        s_logits = response_logits(ctx.engine.module, batch, V)
        t_logits = response_logits(ctx.teacher, batch, V)
    # Kept from decoding (with mixing) or from the one full forward (without): the teacher's logits.
    if teacher_logits == "keep":
        torch.testing.assert_close(ro.teacher_logits[valid], t_logits[valid], atol=2e-5, rtol=1e-5)
    else:
        assert ro.teacher_logits is None

    def logp(logits, t=1.0):
        return torch.log_softmax(logits / t, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)

    logp_old = logp(s_logits, temperature) * mask
    weights = importance_weights(logp_old, logp(t_logits, temperature), alpha) * mask
    rewards = token_rewards(logp(t_logits), logp_old, mask, cfg.reward_clip)
    returns = long_term_returns(rewards, mask, cfg.gamma, cfg.length_normalization)
    advantages = whiten(returns, mask, masked_moments(returns, mask))
    for name, expected in [
        ("logp_old", logp_old),
        ("weights", weights),
        ("rewards", rewards),
        ("advantages", advantages),
    ]:
        torch.testing.assert_close(getattr(ro, name), expected, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("alpha, temperature, single_step", [(0.2, 1.0, True), (0.5, 0.8, True), (0.2, 1.0, False)])
def test_update_loss_and_gradients_equal_the_plain_step(alpha, temperature, single_step):
    """One minibatch's loss and student gradients: the stage's loss (kept teacher logits, fused
    terms) against the plain one (teacher forward in the update, autograd through log-softmax)."""
    from worker.engine.losses import minillm_loss

    stage = collected(alpha, temperature)
    ro, cfg, ctx = stage.rollouts, stage.cfg, stage.ctx
    student = ctx.engine.module
    idx = torch.tensor([5, 0, 3, 6])
    mb = ro.batch.select(idx)
    mask = mb.response_mask

    def gradients(loss_of_logits):
        student.zero_grad()
        loss = loss_of_logits(response_logits(student, mb, V))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in student.parameters()]

    def fast(logits):
        return minillm_loss(
            logits,
            ro.teacher_logits[idx],
            mb.response_ids,
            mask,
            ro.logp_old[idx],
            ro.weights[idx],
            ro.advantages[idx],
            temperature,
            cfg.clip_range,
            single_step,
        ).loss

    def plain(logits):
        with torch.no_grad():
            teacher_logits = response_logits(ctx.teacher, mb, V)
        logp = torch.log_softmax(logits / temperature, -1).gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1)
        pg, _ = ppo_policy_loss(logp, ro.logp_old[idx], ro.weights[idx], ro.advantages[idx], cfg.clip_range)
        kl = masked_mean(reverse_kl(logits / temperature, teacher_logits / temperature), mask)
        return masked_mean(pg, mask) + (kl if single_step else 0)

    loss, grads = gradients(fast)
    loss_ref, grads_ref = gradients(plain)
    assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
    assert max(float(g.abs().max()) for g in grads_ref) > 1e-3
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("alpha, temperature", [(0.2, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_recomputing_the_teacher_logits_gives_the_kept_step(alpha, temperature):
    """The same update with the phase's teacher logits kept and recomputed per micro-batch: the
    same losses and gradients (the recomputed logits come from a full forward, the kept ones from
    decoding, so they agree to rounding)."""
    kept, recomputed = collected(alpha, temperature, "keep"), collected(alpha, temperature, "recompute")
    assert torch.equal(kept.rollouts.batch.response_ids, recomputed.rollouts.batch.response_ids)
    a, b = kept.train_step(0), recomputed.train_step(0)
    assert b["time_teacher_forward"] > 0 and "time_teacher_forward" not in a
    for name in ("loss", "pg_loss", "reverse_kl", "clip_fraction"):
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
    assert max(float(g.abs().max()) for g in grads_of(kept)) > 1e-3
    for g, g_ref in zip(grads_of(kept), grads_of(recomputed)):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4)


def grads_of(stage: MiniLLMStage) -> list[torch.Tensor]:
    return stage.ctx.engine.grads[0]


@pytest.mark.parametrize("alpha, temperature", [(0.2, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_a_resume_state_leaves_the_teacher_logits_out_and_they_come_back_bit_for_bit(alpha, temperature):
    stage = collected(alpha, temperature, "keep")
    buffer = io.BytesIO()
    torch.save(stage.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as a resume reads it: tensors and plain values, no code
    assert state["rollouts"]["teacher_logits"] is None and stage.rollouts.teacher_logits is not None
    resumed = collected(alpha, temperature, "keep")  # the same models and samples, as a resumed job has
    resumed.load_state_dict(state)
    resumed.train_step(0)
    assert torch.equal(resumed.rollouts.teacher_logits, stage.rollouts.teacher_logits)


def test_auto_keeps_the_teacher_logits_within_the_budget():
    spec = parse_spec(
        {
            "student": {"model": "toy"},
            "data": {"max_response_tokens": 256},
            "minillm": {"rollouts_per_phase": 64, "teacher_logits_budget_gb": 4},
        }
    )
    # 64 rollouts × 256 tokens × 49,152 × 2 bytes = 1.5 GiB fits 4; × 151,936 = 4.6 GiB does not.
    assert keeps_teacher_logits(spec, 49_152, 2) and not keeps_teacher_logits(spec, 151_936, 2)
    assert keeps_teacher_logits(
        spec.model_copy(update={"minillm": spec.minillm.model_copy(update={"teacher_logits": "keep"})}), 151_936, 2
    )
    assert not keeps_teacher_logits(
        spec.model_copy(update={"minillm": spec.minillm.model_copy(update={"teacher_logits": "recompute"})}), 49_152, 2
    )
