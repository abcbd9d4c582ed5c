"""The engine's numerics on a GPU, against the same computation on the CPU.

Marked `gpu`: `make gpu-check` runs them (`pytest -m gpu tests/test_gpu.py`); they skip where no CUDA
device is visible. `DISTILL_GPU_CHECK_DEVICE` names the device compared with the CPU (default
`cuda`); `make gpu-check DRY_RUN=1` sets it to `cpu`, so that the dry run exercises them too.

The GPU takes paths of its own: the loss terms run in one chunk of 64M entries instead of CPU-sized
chunks of 1M, and decoding uses CUDA kernels and a CUDA generator. These tests need nothing from
tests/conftest.py (the check runs them with --noconftest, on machines without the service's packages).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.losses import (
    importance_weights,
    long_term_returns,
    masked_moments,
    minillm_loss,
    token_log_probs,
    token_rewards,
    whiten,
)
from worker.engine.sampling import sample

DEVICE = torch.device(os.environ.get("DISTILL_GPU_CHECK_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device visible"),
]

# 4 × 24 positions of a 50k vocabulary: 5 chunks on the CPU, one on a GPU.
B, L, V = 4, 24, 50_000


def _rollout(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A MiniLLM minibatch as sampling leaves it, on the CPU: both models' logits, the sampled tokens,
    a mask of responses of different lengths and the statistics computed from them."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, L, V, generator=g).to(dtype)
    teacher = (student.float() + torch.randn(B, L, V, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.arange(L) < torch.tensor([[L], [L - 5], [9], [1]])).long()
    return dict(student=student, teacher=teacher, tokens=tokens, mask=mask)


def _statistics(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rollout statistics of the stage's collection: old log-probs, weights, rewards, advantages."""
    logp_old = token_log_probs(r["student"], r["tokens"])
    teacher_logp = token_log_probs(r["teacher"], r["tokens"])
    rewards = token_rewards(teacher_logp, logp_old, r["mask"], clip=50.0)
    returns = long_term_returns(rewards, r["mask"], gamma=1.0, length_normalization=True)
    advantages = whiten(returns, r["mask"], masked_moments(returns, r["mask"]))
    weights = importance_weights(logp_old, teacher_logp, alpha=0.2)
    return dict(logp_old=logp_old, weights=weights, rewards=rewards, advantages=advantages)


def _loss_and_gradient(
    r: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    r = {k: v.to(device) for k, v in r.items()}
    stats = _statistics(r)
    student = r["student"].clone().requires_grad_(True)
    out = minillm_loss(
        student,
        r["teacher"],
        r["tokens"],
        r["mask"],
        stats["logp_old"],
        stats["weights"],
        stats["advantages"],
        temperature=1.0,
        clip_range=0.2,
        single_step=True,
    )
    out.loss.backward()
    values = {**stats, "loss": out.loss, "pg_loss": out.pg_loss, "reverse_kl": out.reverse_kl}
    return {k: v.detach().cpu() for k, v in values.items()}, student.grad.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minillm_loss_and_gradient_match_the_cpu(dtype):
    rollout = _rollout(dtype)
    expected, expected_grad = _loss_and_gradient(rollout, torch.device("cpu"))
    got, grad = _loss_and_gradient(rollout, DEVICE)
    # Both compute in fp32 whatever the input dtype; only the order of the sums differs.
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad, **({} if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-7)))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval(), LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _sample(student, teacher, device: torch.device, **kwargs):
    """Left-padded prompts of two lengths, decoded on `device`; the result back on the CPU."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    student, teacher = student.to(device), teacher.to(device)
    out = sample(
        student,
        ids.to(device),
        mask.to(device),
        max_new_tokens=12,
        eos_id=3,
        pad_id=0,
        vocab_size=64,
        generator=torch.Generator(device).manual_seed(1),
        mix_model=teacher,
        **kwargs,
    )
    return out.batch.response_ids.cpu(), out.batch.response_mask.cpu()


def test_teacher_mixed_decoding_matches_the_cpu(models):
    """Both models decode in lock step with their KV caches; α 1 at a near-zero temperature draws the
    teacher's argmax whatever the generator, so both devices must pick the same tokens."""
    student, teacher = models
    cpu = _sample(student, teacher, torch.device("cpu"), mix_alpha=1.0, temperature=1e-4)
    dev = _sample(student, teacher, DEVICE, mix_alpha=1.0, temperature=1e-4)
    assert torch.equal(dev[0], cpu[0]) and torch.equal(dev[1], cpu[1])


def test_greedy_decoding_with_the_ngram_ban_matches_the_cpu(models):
    """The evaluation's decoding: the student alone, greedy, with the no-repeat-n-gram rule."""
    student, teacher = models
    cpu = _sample(student, teacher, torch.device("cpu"), mix_alpha=0.0, temperature=0.0, no_repeat_ngram_size=2)
    dev = _sample(student, teacher, DEVICE, mix_alpha=0.0, temperature=0.0, no_repeat_ngram_size=2)
    assert torch.equal(dev[0], cpu[0]) and torch.equal(dev[1], cpu[1])


def test_sampling_on_the_device_is_seeded(models):
    """Teacher-mixed sampling at temperature 1 draws from the device's own generator: the same seed
    gives the same rollouts there (the CPU's generator draws other numbers, so no comparison)."""
    student, teacher = models
    first = _sample(student, teacher, DEVICE, mix_alpha=0.2)
    again = _sample(student, teacher, DEVICE, mix_alpha=0.2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_compiled_decoding_matches_eager_decoding_on_the_device(models):
    """resources.compile_decoding: CUDA graphs on a GPU (torch.compile on a CPU) over a static KV cache
    give the teacher-mixed tokens and the teacher's logits of eager decoding on the same device."""
    student, teacher = (m.to(DEVICE) for m in models)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], device=DEVICE)
    mask = (torch.arange(5, device=DEVICE) >= torch.tensor([[2], [0]], device=DEVICE)).long()

    def decode(compiled: bool):
        return sample(
            student,
            ids,
            mask,
            max_new_tokens=12,
            eos_id=3,
            pad_id=0,
            vocab_size=64,
            mix_model=teacher,
            mix_alpha=0.2,
            generator=torch.Generator(DEVICE).manual_seed(1),
            sync_ranks=False,
            logits_out=torch.zeros(2, 12, 64, device=DEVICE),
            compile_steps=compiled,
        )

    eager, compiled = decode(False), decode(True)
    assert torch.equal(compiled.batch.response_ids, eager.batch.response_ids)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-3)
