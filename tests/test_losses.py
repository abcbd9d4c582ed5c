"""Loss functions of the distillation engine against hand-computed and brute-force values.

Every loss in `worker.engine.losses` is checked on tiny tensors against an independent computation
(explicit Python loops, probability-space formulas, hand-derived numbers). The key test,
`test_policy_gradient_is_unbiased_for_sequence_reverse_kl`, enumerates every response of a toy
autoregressive student and checks that the engine's MiniLLM estimator (exact single-step reverse KL
+ PPO term with the *future* return R_{t+1}) has exactly the gradient of the sequence-level
KL(q‖p). The last tests check the shared tensor layout (`batch.collate` / `batch.response_logits`)
on tiny random transformers models.

Note: the loss functions compute in fp32 (`.float()`) whatever the input dtype, float64 included, so
comparisons against float64 references use fp32-level tolerances.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from worker.engine.batch import SequenceBatch, collate, response_logits
from worker.engine.losses import (
    forward_kl,
    generalized_jsd,
    gkd_loss,
    importance_weights,
    kd_loss,
    long_term_returns,
    masked_mean,
    masked_moments,
    ppo_policy_loss,
    reverse_kl,
    token_log_probs,
    vocab_terms,
    whiten,
)

NEG_INF = float("-inf")


def _py_log_softmax(row: list[float]) -> list[float]:
    finite = [x for x in row if x != NEG_INF]
    m = max(finite)
    lse = m + math.log(sum(math.exp(x - m) for x in finite))
    return [x - lse if x != NEG_INF else NEG_INF for x in row]


def _py_kl(log_a_logits: torch.Tensor, log_b_logits: torch.Tensor) -> torch.Tensor:
    """Σ_v a(v)(log a(v) − log b(v)) with an explicit loop, 0·log 0 = 0; (B, L, V) x2 -> (B, L) float64."""
    B, L, _ = log_a_logits.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            la = _py_log_softmax(log_a_logits[b, t].tolist())
            lb = _py_log_softmax(log_b_logits[b, t].tolist())
            total = 0.0
            for x, y in zip(la, lb):
                if x == NEG_INF:
                    continue  # a(v) = 0 contributes nothing
                total += math.exp(x) * (x - y)
            out[b, t] = total
    return out


# ----------------------------------------------------------------------------------------------
# 1. reverse_kl / forward_kl
# ----------------------------------------------------------------------------------------------


def test_reverse_and_forward_kl_match_explicit_double_loop():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    rkl, fkl = reverse_kl(s, t), forward_kl(s, t)
    assert rkl.shape == fkl.shape == (2, 3)
    torch.testing.assert_close(rkl.double(), _py_kl(s, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fkl.double(), _py_kl(t, s), rtol=1e-5, atol=1e-6)
    # The two directions really are different quantities on this input.
    assert not torch.allclose(rkl, fkl, atol=1e-3)
    assert (rkl > 0).all() and (fkl > 0).all()


def test_kl_is_zero_for_equal_logits_and_invariant_to_logit_shift():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(reverse_kl(s, s.clone()), torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(forward_kl(s, s.clone()), torch.zeros(2, 3), atol=1e-6, rtol=0)
    # Logits, not probabilities: a per-position constant shift changes nothing.
    torch.testing.assert_close(reverse_kl(s, s + 7.0), torch.zeros(2, 3), atol=1e-5, rtol=0)


def test_kl_handles_minus_inf_logits():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    # Tokens impossible under BOTH distributions, plus tokens impossible only under the "a" side
    # of each KL (so their a(v) = 0 and they must contribute 0, not NaN).
    s[0, 0, 1] = t[0, 0, 1] = NEG_INF
    s[1, 2, 4] = t[1, 2, 4] = NEG_INF
    s_only = s.clone()
    s_only[0, 1, 3] = NEG_INF  # q = 0 where p > 0: fine for KL(q‖p)
    t_only = t.clone()
    t_only[1, 0, 0] = NEG_INF  # p = 0 where q > 0: fine for KL(p‖q)

    rkl = reverse_kl(s_only, t)
    fkl = forward_kl(s, t_only)
    assert torch.isfinite(rkl).all() and torch.isfinite(fkl).all()
    torch.testing.assert_close(rkl.double(), _py_kl(s_only, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fkl.double(), _py_kl(t_only, s), rtol=1e-5, atol=1e-6)

    # The support mismatch in the other direction is a genuine +inf, not a NaN.
    bad = reverse_kl(s, t_only)
    assert bad[1, 0] == float("inf") and not torch.isnan(bad).any()


def test_forward_kl_gradient_finite_with_minus_inf_teacher_logits():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 2, 5, generator=g, requires_grad=True)
    t = torch.randn(1, 2, 5, generator=g)
    t[0, 0, 2] = NEG_INF  # teacher top-k'd / masked token
    forward_kl(s, t).sum().backward()
    assert torch.isfinite(s.grad).all()
    # ∇_s KL(p‖q) = q − p per position.
    expected = torch.softmax(s.detach(), -1) - torch.softmax(t, -1)
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=1e-5)


def test_reverse_kl_gradient_finite_with_minus_inf_student_logits():
    s = torch.tensor([[[0.0, 1.0, NEG_INF]]], requires_grad=True)
    t = torch.tensor([[[0.5, 0.2, 0.1]]])
    value = reverse_kl(s, t)
    assert torch.isfinite(value).all()  # the value is handled (passes)
    value.sum().backward()
    # The gradient w.r.t. the two finite logits equals that of the 2-token KL, and 0 for the −inf one.
    s2 = torch.tensor([[[0.0, 1.0]]], requires_grad=True)
    reverse_kl(s2, t[..., :2] - torch.logsumexp(t, -1, keepdim=True)).sum().backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad[..., :2], s2.grad, atol=1e-6, rtol=1e-5)


def test_kl_bf16_inputs_give_fp32_outputs():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 5, generator=g).bfloat16()
    t = torch.randn(2, 3, 5, generator=g).bfloat16()
    for fn in (reverse_kl, forward_kl):
        out = fn(s, t)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(s.float(), t.float()), atol=0, rtol=0)
    assert token_log_probs(s, torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 2. token_log_probs / masked_mean
# ----------------------------------------------------------------------------------------------


def test_token_log_probs_matches_log_softmax_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    tokens = torch.tensor([[2, 2]])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    expected = torch.tensor([[3.0 - math.log(z), math.log(2.0 / 4.0)]])
    torch.testing.assert_close(token_log_probs(logits, tokens), expected, atol=1e-6, rtol=0)

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    lp = token_log_probs(logits, tokens)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            assert lp[b, t].item() == pytest.approx(_py_log_softmax(logits[b, t].tolist())[tokens[b, t]], abs=1e-6)


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 2.0)])
def test_vocab_terms_equal_the_plain_terms_and_their_gradients(dtype, temperature):
    """The chunked autograd Function against the same terms written out plainly and differentiated by
    autograd in float64 (the exact values of the same inputs). 50 000 vocabulary entries make 20
    positions a chunk on the CPU, so 3 × 9 positions span two chunks; random upstream gradients weight
    all three outputs."""
    g = torch.Generator().manual_seed(11)
    vocab = 50_000
    student = (3 * torch.randn(3, 9, vocab, generator=g)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 9, vocab, generator=g)).to(dtype)
    tokens = torch.randint(0, vocab, (3, 9), generator=g)
    weights = torch.randn(3, 3, 9, generator=g)

    terms = vocab_terms(student, teacher, tokens, temperature)
    (grad,) = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, terms)), student)

    plain = student.detach().double().requires_grad_()
    log_q = torch.log_softmax(plain / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    expected = (
        log_q.gather(-1, tokens[..., None]).squeeze(-1),
        (log_q.exp() * (log_q - log_p)).sum(-1),
        (log_p.exp() * (log_p - log_q)).sum(-1),
    )
    (grad_ref,) = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights.double(), expected)), plain)

    for got, want in zip(terms, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)  # fp32: 1.6e-5 relative measured
    assert grad.dtype == dtype
    # In fp32 the reverse KL's gradient multiplies log-ratios of up to ~30 (logits of std 3 / T over 50k
    # entries), so fp32 is off the exact gradient by up to ~2e-4 here, 1e-4 of the largest one: plain fp32
    # autograd by 1.6e-4, the chunked pass by 2.3e-4 (AVX2; less where exp and log are more exact). A
    # wrong formula or chunk boundary is off by 0.1 or more.
    tolerance = dict(atol=5e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(grad.double(), grad_ref, **tolerance)
    assert grad.float().abs().max() > 0.01  # the comparison is not between two zeros


def test_vocab_terms_gradient_of_one_output_alone():
    """Only the log-prob used (the single-step term off): the KL outputs get no upstream gradient."""
    g = torch.Generator().manual_seed(12)
    student = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    teacher, tokens = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    logp, _, _ = vocab_terms(student, teacher, tokens, 1.0)
    (grad,) = torch.autograd.grad(logp.sum(), student)
    expected = torch.nn.functional.one_hot(tokens, 7).float() - torch.softmax(student.detach(), -1)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 3 + 7) / 4)
    zero = masked_mean(values, torch.zeros_like(mask))
    assert zero.item() == 0.0 and torch.isfinite(zero)


# ----------------------------------------------------------------------------------------------
# 3. kd_loss
# ----------------------------------------------------------------------------------------------


def _kd_inputs():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4, 5, generator=g)
    t = torch.randn(2, 4, 5, generator=g)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return s, t, targets, mask


def _hand_ce(s, targets, mask):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for t in range(s.shape[1]):
            if mask[b, t]:
                total -= _py_log_softmax(s[b, t].tolist())[targets[b, t]]
                n += 1
    return total / n


def _hand_fkl(s, t, mask):
    kl = _py_kl(t, s)
    return float((kl * mask).sum() / mask.sum())


def test_kd_loss_ratio_0_is_cross_entropy_and_accepts_no_teacher():
    s, t, targets, mask = _kd_inputs()
    ce = _hand_ce(s, targets, mask)
    assert kd_loss(s, None, targets, mask, 0.0).item() == pytest.approx(ce, rel=1e-5)
    assert kd_loss(s, t, targets, mask, 0.0).item() == pytest.approx(ce, rel=1e-5)
    ref = torch.nn.functional.cross_entropy(s[mask.bool()], targets[mask.bool()])
    assert kd_loss(s, None, targets, mask, 0.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_loss_ratio_1_is_forward_kl_and_half_mixes():
    s, t, targets, mask = _kd_inputs()
    ce, fkl = _hand_ce(s, targets, mask), _hand_fkl(s, t, mask)
    assert abs(ce - fkl) > 0.1  # the two terms differ, so the mix is informative
    assert kd_loss(s, t, targets, mask, 1.0).item() == pytest.approx(fkl, rel=1e-5)
    assert kd_loss(s, t, targets, mask, 0.5).item() == pytest.approx(0.5 * ce + 0.5 * fkl, rel=1e-5)
    assert kd_loss(s, t, targets, mask, 0.25).item() == pytest.approx(0.75 * ce + 0.25 * fkl, rel=1e-5)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
def test_kd_loss_ignores_padding_positions(kd_ratio):
    s, t, targets, mask = _kd_inputs()
    ref = kd_loss(s, t, targets, mask, kd_ratio)
    pad = ~mask.bool()
    g = torch.Generator().manual_seed(7)
    s2, t2, targets2 = s.clone(), t.clone(), targets.clone()
    s2[pad] = torch.randn(int(pad.sum()), 5, generator=g) * 1e3
    t2[pad] = torch.randn(int(pad.sum()), 5, generator=g) * 1e3
    targets2[pad] = torch.randint(0, 5, (int(pad.sum()),), generator=g)
    out = kd_loss(s2, t2, targets2, mask, kd_ratio)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # Gradients never reach padded positions.
    s3 = s2.clone().requires_grad_(True)
    kd_loss(s3, t2, targets2, mask, kd_ratio).backward()
    assert (s3.grad[pad] == 0).all() and (s3.grad[~pad] != 0).any()


# ----------------------------------------------------------------------------------------------
# 3b. generalized_jsd / gkd_loss (GKD, TRL's semantics)
# ----------------------------------------------------------------------------------------------


def _py_gjsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, in probability space with explicit loops; (B, L) float64."""
    B, L, _ = s.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            q = [math.exp(x) for x in _py_log_softmax(s[b, i].tolist())]
            p = [math.exp(x) for x in _py_log_softmax(t[b, i].tolist())]
            m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q)]
            out[b, i] = beta * sum(pv * math.log(pv / mv) for pv, mv in zip(p, m) if pv > 0) + (1 - beta) * sum(
                qv * math.log(qv / mv) for qv, mv in zip(q, m) if qv > 0
            )
    return out


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_the_mixture_formula_by_hand(beta):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    out = generalized_jsd(s, t, beta)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _py_gjsd(s, t, beta), rtol=1e-5, atol=1e-6)
    # At temperature T both distributions are softmax(logits / T).
    torch.testing.assert_close(
        generalized_jsd(s, t, beta, 2.0).double(), _py_gjsd(s / 2, t / 2, beta), rtol=1e-5, atol=1e-6
    )
    # Bounded like a JS divergence: at most the entropy of the two-point mixture (β, 1−β).
    assert (out > 0).all() and (out <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-6).all()


def test_generalized_jsd_ends_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    torch.testing.assert_close(generalized_jsd(s, t, 0.0).double(), _py_kl(t, s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0).double(), _py_kl(s, t), rtol=1e-5, atol=1e-6)
    # The mixed form itself tends to 0 at the ends: they are defined, not the limit.
    assert _py_gjsd(s, t, 1e-9).abs().max() < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_gradient_equals_plain_autograd_over_several_chunks(beta):
    # 2**18 entries a row: 4 rows to a CPU chunk, so the 12 positions are 3 checkpointed chunks.
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(3, 4, 2**18, generator=g) * 3).requires_grad_(True)
    t = torch.randn(3, 4, 2**18, generator=g) * 3
    weights = torch.rand(3, 4, generator=g)
    (generalized_jsd(s, t, beta, 1.5) * weights).sum().backward()
    s_plain = s.detach().double().requires_grad_(True)
    log_q, log_p = torch.log_softmax(s_plain / 1.5, -1), torch.log_softmax(t.double() / 1.5, -1)
    if beta == 0:
        plain = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        plain = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        plain = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    (plain * weights.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s_plain.grad, rtol=1e-4, atol=1e-8)


def test_gkd_loss_is_the_token_mean_and_ignores_padding():
    s, t, _, mask = _kd_inputs()
    per_token = _py_gjsd(s.double(), t.double(), 0.5)
    expected = float((per_token * mask).sum() / mask.sum())
    assert gkd_loss(s, t, mask, 0.5, 1.0).item() == pytest.approx(expected, rel=1e-5)
    pad = ~mask.bool()
    s2 = s.clone()
    s2[pad] = 1e3
    s2.requires_grad_(True)
    out = gkd_loss(s2, t, mask, 0.5, 1.0)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.backward()
    assert (s2.grad[pad] == 0).all() and (s2.grad[~pad] != 0).any()


# ----------------------------------------------------------------------------------------------
# 4. importance_weights
# ----------------------------------------------------------------------------------------------


def test_importance_weights():
    g = torch.Generator().manual_seed(8)
    q = torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    p = torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    lq, lp = q.log(), p.log()

    torch.testing.assert_close(importance_weights(lq, lp, 0.0), torch.ones_like(lq), atol=0, rtol=0)
    for alpha in (0.2, 0.7):
        expected = q / ((1 - alpha) * q + alpha * p)  # probability space, directly
        torch.testing.assert_close(importance_weights(lq, lp, alpha), expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(importance_weights(lq, lp, 1.0), q / p, atol=1e-12, rtol=1e-10)

    # Teacher gives the sampled token zero probability: w = q / ((1 − α) q) = 1 / (1 − α).
    lp_inf = lp.clone()
    lp_inf[0, 1] = NEG_INF
    w = importance_weights(lq, lp_inf, 0.2)
    assert torch.isfinite(w).all()
    assert w[0, 1].item() == pytest.approx(1 / 0.8, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# 5. long_term_returns
# ----------------------------------------------------------------------------------------------

BIG = 1e6
RETURN_REWARDS = torch.tensor([[1.0, 2.0, 3.0, 4.0, BIG], [5.0, -1.0, BIG, -BIG, BIG]], dtype=torch.float64)
RETURN_MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


@pytest.mark.parametrize(
    "gamma, norm, expected",
    [
        # R_t = Σ_{t' > t} r_t' over valid tokens.
        (1.0, False, [[9.0, 7.0, 4.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]),
        # ... divided by the number of valid future tokens (3, 2, 1).
        (1.0, True, [[3.0, 3.5, 4.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]),
        # R_t = r_{t+1} + 0.5 r_{t+2} + 0.25 r_{t+3}: 2 + 1.5 + 1 = 4.5, 3 + 2 = 5, 4.
        (0.5, False, [[4.5, 5.0, 4.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]),
        # ... divided by the discounted counts 1.75, 1.5, 1.
        (0.5, True, [[4.5 / 1.75, 5.0 / 1.5, 4.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]),
    ],
)
def test_long_term_returns_hand_values(gamma, norm, expected):
    out = long_term_returns(RETURN_REWARDS, RETURN_MASK, gamma, norm)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_long_term_returns_brute_force_random():
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    lengths = [6, 3, 1]
    mask = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    rewards[~mask.bool()] = 1e9  # must never leak in
    for gamma in (1.0, 0.95):
        for norm in (False, True):
            out = long_term_returns(rewards, mask, gamma, norm)
            for b, n in enumerate(lengths):
                for t in range(6):
                    if t >= n - 1:
                        assert out[b, t].item() == 0.0
                        continue
                    num = sum(gamma ** (k - t - 1) * rewards[b, k].item() for k in range(t + 1, n))
                    den = sum(gamma ** (k - t - 1) for k in range(t + 1, n))
                    assert out[b, t].item() == pytest.approx(num / den if norm else num, rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 6. masked_moments / whiten
# ----------------------------------------------------------------------------------------------


def test_whiten_uses_only_valid_entries_and_keeps_padding_zero():
    g = torch.Generator().manual_seed(10)
    values = torch.randn(3, 5, generator=g) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    values[~mask.bool()] = 1e4  # garbage in padding
    moments = masked_moments(values, mask)
    valid = values[mask.bool()].double()
    torch.testing.assert_close(
        moments, torch.stack([torch.tensor(10.0, dtype=torch.float64), valid.sum(), (valid**2).sum()])
    )
    out = whiten(values, mask, moments)
    assert (out[~mask.bool()] == 0).all()
    w = out[mask.bool()].double()
    assert w.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert w.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    expected = (values[mask.bool()].double() - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)


def test_masked_moments_add_across_shards():
    """The all-reduce property: moments of two shards summed = moments of the whole batch."""
    g = torch.Generator().manual_seed(11)
    values = torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    whole = masked_moments(values, mask)
    halves = masked_moments(values[:2], mask[:2]) + masked_moments(values[2:], mask[2:])
    torch.testing.assert_close(halves, whole, atol=1e-10, rtol=1e-12)
    # Whitening each shard with the summed moments gives the whole-batch result.
    torch.testing.assert_close(
        torch.cat([whiten(values[:2], mask[:2], halves), whiten(values[2:], mask[2:], halves)]),
        whiten(values, mask, whole),
    )
    # ... which is not what per-shard statistics give.
    local = whiten(values[:2], mask[:2], masked_moments(values[:2], mask[:2]))
    assert not torch.allclose(local, whiten(values, mask, whole)[:2], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# 7. ppo_policy_loss
# ----------------------------------------------------------------------------------------------


def test_ppo_policy_loss_hand_values():
    eps = 0.2
    # (ratio, advantage) -> (loss, clip active)
    cases = [
        (1.1, 2.0, -2.2, False),  # inside: −A·ratio
        (0.9, -3.0, 2.7, False),  # inside, negative advantage
        (1.5, 2.0, -2.4, True),  # above, A > 0: capped at −A(1+ε)
        (1.5, -2.0, 3.0, False),  # above, A < 0: the unclipped loss is larger (pessimistic)
        (0.5, 2.0, -1.0, False),  # below, A > 0: unclipped −A·0.5 is larger
        (0.5, -2.0, 1.6, True),  # below, A < 0: capped at −A(1−ε)
    ]
    ratio = torch.tensor([[c[0] for c in cases]], dtype=torch.float64)
    adv = torch.tensor([[c[1] for c in cases]], dtype=torch.float64)
    # Split the ratio between the log-prob change and the weight to check both enter it.
    weights = torch.full_like(ratio, 0.8)
    logp_old = torch.full_like(ratio, -1.3)
    logp = logp_old + (ratio / weights).log()
    logp.requires_grad_(True)
    loss, clipped = ppo_policy_loss(logp, logp_old, weights, adv, eps)
    torch.testing.assert_close(loss.detach(), torch.tensor([[c[2] for c in cases]], dtype=torch.float64))
    assert clipped.tolist() == [[c[3] for c in cases]]
    loss.sum().backward()
    # d/dlogp of −A·ratio is −A·ratio where the unclipped branch is active, 0 where the clip is.
    expected_grad = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    torch.testing.assert_close(logp.grad, expected_grad)
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~clipped] != 0).all()


def test_ppo_policy_loss_first_epoch_is_weighted_policy_gradient():
    """logp_old = logp: ratio = w, and ∇ = −A·w·∇log q (the importance-weighted policy gradient)."""
    g = torch.Generator().manual_seed(12)
    logp = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.tensor([[1.0, 1.1, 0.9], [1.0, 1.05, 0.95]], dtype=torch.float64)
    adv = torch.randn(2, 3, generator=g, dtype=torch.float64)
    loss, clipped = ppo_policy_loss(logp, logp.detach(), w, adv, 0.2)
    assert not clipped.any()
    torch.testing.assert_close(loss.detach(), -adv * w)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv * w)


# ----------------------------------------------------------------------------------------------
# 8. The MiniLLM estimator is unbiased for the sequence-level reverse KL (brute-force enumeration)
# ----------------------------------------------------------------------------------------------

V, T = 3, 3
EOS = 2


def _prefix_index() -> dict[tuple[int, ...], int]:
    prefixes = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
    return {p: i for i, p in enumerate(prefixes)}


def _toy_problem(seed: int):
    index = _prefix_index()
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(len(index), V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(len(index), V, generator=g, dtype=torch.float64) * 1.5
    return index, theta, teacher


def _sequences(with_eos: bool) -> list[tuple[int, ...]]:
    """Every response the toy model can produce: fixed length T, or up to and including the first EOS."""
    if not with_eos:
        return list(itertools.product(range(V), repeat=T))
    out = []
    for n in range(1, T + 1):
        for y in itertools.product(range(V), repeat=n):
            if EOS not in y[:-1] and (y[-1] == EOS or n == T):
                out.append(y)
    return out


def _exact_sequence_kl_grad(index, theta, teacher, seqs) -> torch.Tensor:
    """∇θ KL(q‖p) = ∇θ Σ_y q(y)(log q(y) − log p(y)), by enumeration, in float64."""
    lq_tab, lp_tab = torch.log_softmax(theta, -1), torch.log_softmax(teacher, -1)
    kl = 0.0
    for y in seqs:
        lq = sum(lq_tab[index[y[:t]], y[t]] for t in range(len(y)))
        lp = sum(lp_tab[index[y[:t]], y[t]] for t in range(len(y)))
        kl = kl + lq.exp() * (lq - lp)
    (grad,) = torch.autograd.grad(kl, theta)
    with torch.no_grad():
        total = sum(float(sum(lq_tab[index[y[:t]], y[t]] for t in range(len(y))).exp()) for y in seqs)
    assert total == pytest.approx(1.0)  # the enumeration covers every response
    return grad


def _estimator_expected_grad(index, theta, teacher, seqs, returns_mode: str, single_step: bool) -> torch.Tensor:
    """Σ_y q(y)·∇L(y) for the per-sequence surrogate the engine optimises (α = 0, first PPO epoch).

    Responses are right-padded to T with EOS (pad = EOS, as in the engine); padded positions read
    the table rows of prefixes that contain an EOS, which the true KL never uses, and get
    deliberately garbage rewards.
    """
    B = len(seqs)
    ids = torch.full((B, T), EOS, dtype=torch.long)
    mask = torch.zeros(B, T)
    rows = torch.zeros(B, T, dtype=torch.long)
    for b, y in enumerate(seqs):
        ids[b, : len(y)] = torch.tensor(y)
        mask[b, : len(y)] = 1
        padded = tuple(ids[b].tolist())
        for t in range(T):
            rows[b, t] = index[padded[:t]]
    s_logits, t_logits = theta[rows], teacher[rows]  # (B, T, V)

    logp = token_log_probs(s_logits, ids)
    logq_seq = (logp * mask).sum(-1).detach().double()  # sampling probability q(y), no gradient
    rewards = (token_log_probs(t_logits, ids) - logp).detach()  # not masked: padding must not leak
    future = long_term_returns(rewards, mask, gamma=1.0, length_normalization=False).detach()
    if returns_mode == "future":  # R_{t+1}: what the engine uses
        advantages = future
    elif returns_mode == "including_current":  # R_t = r_t + R_{t+1}: the reference code's choice
        advantages = (future + rewards * mask).detach()
    else:
        raise ValueError(returns_mode)

    pg, clipped = ppo_policy_loss(logp, logp.detach(), torch.ones_like(logp), advantages, clip_range=0.2)
    assert not clipped.any()
    per_seq = (pg * mask).sum(-1)
    if single_step:
        per_seq = per_seq + (reverse_kl(s_logits, t_logits) * mask).sum(-1)
    (grad,) = torch.autograd.grad((logq_seq.exp() * per_seq.double()).sum(), theta)
    return grad


@pytest.mark.parametrize("with_eos", [False, True], ids=["fixed_length", "eos_and_padding"])
def test_policy_gradient_is_unbiased_for_sequence_reverse_kl(with_eos):
    index, theta, teacher = _toy_problem(seed=13 + with_eos)
    seqs = _sequences(with_eos)
    truth = _exact_sequence_kl_grad(index, theta, teacher, seqs)
    assert truth.abs().max() > 0.05  # a non-trivial target

    # Engine: exact single-step reverse KL + PPO term with the future return R_{t+1}.
    engine = _estimator_expected_grad(index, theta, teacher, seqs, "future", single_step=True)
    torch.testing.assert_close(engine, truth, atol=2e-6, rtol=1e-5)
    if with_eos:
        # Rows of prefixes that contain an EOS are only read at padded positions: zero gradient.
        pad_rows = [i for p, i in index.items() if EOS in p]
        assert (engine[pad_rows] == 0).all()

    # Teeth: keeping the single-step term AND including r_t in the return counts the current
    # token twice, and the expectation no longer matches.
    double = _estimator_expected_grad(index, theta, teacher, seqs, "including_current", single_step=True)
    assert not torch.allclose(double, truth, atol=1e-3, rtol=1e-2)
    # The surplus is exactly one more copy of the single-step gradient.
    single_only = engine - _estimator_expected_grad(index, theta, teacher, seqs, "future", single_step=False)
    torch.testing.assert_close(double - truth, single_only, atol=2e-6, rtol=1e-5)

    # R_t alone (plain Eq. 2 without the decomposition) is unbiased too: the decomposition only
    # swaps the sampled current-token term for its exact expectation.
    plain = _estimator_expected_grad(index, theta, teacher, seqs, "including_current", single_step=False)
    torch.testing.assert_close(plain, truth, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 9. batch.collate / batch.response_logits on tiny random models
# ----------------------------------------------------------------------------------------------

PAD = EOS_ID = 1
EXAMPLES = [([3, 4, 5], [6, 7, EOS_ID]), ([8], [9, 2, 5, 4, EOS_ID])]


def _tiny_model(kind: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=11,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=PAD,
            eos_token_id=EOS_ID,
            bos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    else:  # absolute learned positions: catches wrong position ids under left padding
        config = transformers.GPT2Config(
            vocab_size=11,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=64,
            pad_token_id=PAD,
            eos_token_id=EOS_ID,
            bos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


def test_collate_layout_keeps_eos_as_target():
    batch = collate(EXAMPLES, PAD)
    assert batch.prompt_ids.tolist() == [[3, 4, 5], [PAD, PAD, 8]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.response_ids.tolist() == [[6, 7, EOS_ID, PAD, PAD], [9, 2, 5, 4, EOS_ID]]
    # EOS == pad id here, yet the EOS stays a target: the mask comes from lengths, not from ids.
    assert batch.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # concat of the per-example batches gives the same layout.
    parts = [collate([e], PAD) for e in EXAMPLES]
    joined = SequenceBatch.concat(parts, PAD)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(joined, name), getattr(batch, name)), name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_response_logits_match_unpadded_single_row_forward(kind):
    model = _tiny_model(kind)
    batch = collate(EXAMPLES, PAD)
    logits = response_logits(model, batch, vocab_size=11)
    assert logits.shape == (2, batch.response_ids.shape[1], 11)
    for i, (prompt, response) in enumerate(EXAMPLES):
        alone = model(input_ids=torch.tensor([prompt + response[:-1]])).logits[0, -len(response) :]
        torch.testing.assert_close(logits[i, : len(response)], alone, atol=1e-5, rtol=1e-5)
        # token_log_probs on the batch equals the unpadded log-likelihood of each response token,
        # the EOS included.
        lp = token_log_probs(logits[i : i + 1, : len(response)], torch.tensor([response]))
        torch.testing.assert_close(
            lp[0], torch.log_softmax(alone, -1)[torch.arange(len(response)), response], atol=1e-5, rtol=1e-5
        )
    # Cutting to a smaller tokenizer vocabulary just drops the padded embedding rows.
    torch.testing.assert_close(response_logits(model, batch, vocab_size=9), logits[..., :9])
