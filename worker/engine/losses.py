"""Loss terms as pure functions of tensors.

Shapes: B sequences, L response positions, V vocabulary. `logits[b, t]` is the distribution over
response token t of sequence b (already aligned: it was produced from the tokens before it).
`mask[b, t]` is 1 where response token t is a real target: every sampled or gold token up to and
including the first EOS, never padding. Per-token functions return (B, L) and leave the reduction to
`masked_mean`, so callers decide how to average and tests can weight sequences exactly.

All vocabulary-wide arithmetic is fp32 whatever the model's precision: bf16 log-softmax over 49k
entries loses most of the probability mass of rare tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` (B, L) over positions where `mask` (B, L) is set; 0 if none are."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in fp32 (B, L, V); no copy of a 25M-entry tensor for nothing at temperature 1."""
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


def _rows_per_chunk(vocab: int, device: torch.device) -> int:
    """Rows of about 1M entries on the CPU (a few MB, cache-sized), 64M on a GPU."""
    return max(1, (2**20 if device.type == "cpu" else 2**26) // vocab)


def _row_chunks(rows: int, vocab: int, device: torch.device) -> list[slice]:
    step = _rows_per_chunk(vocab, device)
    return [slice(i, i + step) for i in range(0, rows, step)]


def token_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (B, L, V), (B, L) -> (B, L) in fp32.

    As logit − logsumexp, a chunk of positions at a time: the fp32 copy of each chunk stays in cache,
    where a log-softmax of the whole (B, L, V) would write and reread hundreds of MB.
    """
    flat, index = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
    parts = []
    for rows in _row_chunks(flat.shape[0], flat.shape[1], flat.device):
        chunk = flat[rows].float()
        parts.append(chunk.gather(-1, index[rows]).squeeze(-1) - chunk.logsumexp(-1))
    return torch.cat(parts).view(tokens.shape)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ_v a (log a − log b) over the last axis, with 0·log 0 = 0."""
    a = log_a.exp()
    # Mask the log-ratio, not the product: a·(−inf − log b) in the backward pass would be NaN at a = 0
    # and spread to the whole row through log_softmax.
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * log_ratio).sum(-1)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Exact KL(q_student ‖ p_teacher) per position over the whole vocabulary: (B, L, V) x2 -> (B, L).

    This is MiniLLM's single-step term: its gradient flows through q in both the weight and the log.
    """
    return _kl(torch.log_softmax(student_logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Exact KL(p_teacher ‖ q_student) per position: (B, L, V) x2 -> (B, L). Word-level KD.

    Same gradient as the teacher-student cross-entropy the reference code uses (they differ by the
    teacher's entropy, a constant); KL reads as a distance, 0 when the student matches.
    """
    return _kl(torch.log_softmax(teacher_logits.float(), -1), torch.log_softmax(student_logits.float(), -1))


class _VocabTerms(torch.autograd.Function):
    """log q(y), KL(q‖p) and KL(p‖q) per position, q = softmax(s / T), p = softmax(t / T), in chunks.

    The vocabulary-wide terms of the training losses in one pass over cache-sized chunks of
    positions, forward and backward: autograd through the plain ops keeps several fp32 copies of
    (B, L, V) and walks each from memory, which cost more than the student's forward on the CPU.
    The backward recomputes q and p per chunk and uses, each divided by T:
    ∂ log q(y)/∂s = onehot(y) − q,  ∂ KL(q‖p)/∂s = q ⊙ (log q − log p − KL(q‖p)),  ∂ KL(p‖q)/∂s = q − p.
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, temperature: float):
        v = student_logits.shape[-1]
        s, t, y = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), tokens.reshape(-1, 1)
        out = torch.empty(3, s.shape[0], device=s.device)  # log q(y), reverse KL, forward KL
        for rows in _row_chunks(s.shape[0], v, s.device):
            log_q, log_p = _log_softmaxes(s[rows], t[rows], temperature)
            out[0, rows] = log_q.gather(-1, y[rows]).squeeze(-1)
            out[1, rows] = _kl(log_q, log_p)
            out[2, rows] = _kl(log_p, log_q)
        ctx.save_for_backward(student_logits, teacher_logits, tokens, out[1])
        ctx.temperature = temperature
        return tuple(o.view(tokens.shape) for o in out)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        student_logits, teacher_logits, tokens, reverse = ctx.saved_tensors
        v = student_logits.shape[-1]
        s, t, y = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), tokens.reshape(-1, 1)
        g_logp, g_rkl, g_fkl = (torch.zeros_like(reverse) if g is None else g.reshape(-1).float() for g in grads)
        grad = torch.empty_like(s)
        for rows in _row_chunks(s.shape[0], v, s.device):
            log_q, log_p = _log_softmaxes(s[rows], t[rows], ctx.temperature)
            q, p = log_q.exp(), log_p.exp()
            log_ratio = torch.where(q > 0, log_q - log_p, torch.zeros_like(q))
            d = q * ((log_ratio - reverse[rows, None]) * g_rkl[rows, None] - g_logp[rows, None] + g_fkl[rows, None])
            d -= p * g_fkl[rows, None]
            d.scatter_add_(-1, y[rows], g_logp[rows, None])
            grad[rows] = d / ctx.temperature
        return grad.view(student_logits.shape), None, None, None


def _log_softmaxes(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log q and log p of one chunk (rows, V) at `temperature`, in fp32."""
    return torch.log_softmax(scaled(student, temperature), -1), torch.log_softmax(scaled(teacher, temperature), -1)


def vocab_terms(
    student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(log q(tokens), KL(q‖p), KL(p‖q)) per position at `temperature`: (B, L, V) x2, (B, L) -> (B, L) x3, fp32.

    Equal to `token_log_probs(scaled(s, T), tokens)`, `reverse_kl(s / T, t / T)` and
    `forward_kl(s / T, t / T)`, gradients included (with respect to the student's logits; the
    teacher's get none), at a fraction of their memory traffic.
    """
    return _VocabTerms.apply(student_logits, teacher_logits.detach(), tokens, temperature)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, mask: Tensor, kd_ratio: float
) -> Tensor:
    """(1 − kd_ratio)·cross-entropy on `targets` + kd_ratio·forward KL, token mean. Scalar.

    kd_ratio 0 is plain SFT and needs no teacher logits.
    """
    if kd_ratio == 0:
        return masked_mean(-token_log_probs(student_logits, targets), mask)
    logp, _, forward = vocab_terms(student_logits, teacher_logits, targets)
    return masked_mean(-(1 - kd_ratio) * logp + kd_ratio * forward, mask)


def _generalized_jsd_rows(student: Tensor, teacher: Tensor, beta: float, temperature: float) -> Tensor:
    """`generalized_jsd` of one chunk of positions (rows, V) -> (rows,)."""
    log_q, log_p = _log_softmaxes(student, teacher, temperature)
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence per position, TRL's semantics: (B, L, V) x2 -> (B, L), fp32.

    With q = softmax(s / T), p = softmax(t / T) and the mixture m = β·p + (1−β)·q:
    β·KL(p‖m) + (1−β)·KL(q‖m) for 0 < β < 1; β = 0 is forward KL(p‖q), β = 1 reverse KL(q‖p) (the
    mixed form tends to 0 at both ends, so the ends are defined as the two KLs, as TRL does).
    Computed a chunk of positions at a time, each under activation checkpointing: autograd keeps only
    the chunk's inputs and recomputes its log-softmaxes in the backward, instead of holding several
    fp32 copies of (B, L, V). The teacher's logits get no gradient.
    """
    v = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v)
    step = _rows_per_chunk(v, s.device)
    parts = [
        checkpoint(_generalized_jsd_rows, s_rows, t_rows, beta, temperature, use_reentrant=False)
        for s_rows, t_rows in zip(s.split(step), t.split(step))
    ]
    return torch.cat(parts).view(student_logits.shape[:-1])


def gkd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float, temperature: float) -> Tensor:
    """GKD's loss: `generalized_jsd` averaged over the valid response tokens (B, L, V) x2, (B, L) -> scalar.

    The token mean is TRL's (its divergence summed over labelled tokens, divided by their number).
    """
    return masked_mean(generalized_jsd(student_logits, teacher_logits, beta, temperature), mask)


def importance_weights(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """w_t = q(y_t) / p̃(y_t) with p̃ = α·p + (1−α)·q, per token: (B, L) x2 -> (B, L).

    The paper's single-step approximation of the importance weight (Eq. 5), computed in log space so
    that a token the teacher gives zero probability still gets a finite weight.
    """
    if alpha == 0:
        return torch.ones_like(student_logp)
    if alpha == 1:
        return (student_logp - teacher_logp).exp()
    log_mix = torch.logaddexp(math.log(1 - alpha) + student_logp, math.log(alpha) + teacher_logp)
    return (student_logp - log_mix).exp()


def token_rewards(teacher_logp: Tensor, student_logp: Tensor, mask: Tensor, clip: float) -> Tensor:
    """r_t = log p(y_t) − log q_old(y_t), clipped to [−clip, clip], 0 at padding: (B, L) x3 -> (B, L).

    The clip is the reference code's: a token one model finds (nearly) impossible can have a reward in
    the hundreds, which would dominate its sequence's returns and, through the whitening's standard
    deviation, shrink every other advantage of the phase.
    """
    return (teacher_logp - student_logp).clamp(-clip, clip) * mask


def long_term_returns(rewards: Tensor, mask: Tensor, gamma: float, length_normalization: bool) -> Tensor:
    """R_{t+1}: the (discounted) sum of rewards after token t, per token: (B, L) x2 -> (B, L).

    With `length_normalization` it is divided by the (discounted) number of valid future tokens, the
    paper's Eq. 6: without it the sum of negative-on-average rewards favours short responses. The
    current token's reward is left out on purpose: its expectation is the single-step term, computed
    exactly over the vocabulary, so including it (as the reference code does) would count it twice.
    The last valid token has no future and gets 0.
    """
    mask = mask.to(rewards.dtype)
    future_sum = torch.zeros_like(rewards[:, 0])
    future_count = torch.zeros_like(future_sum)
    returns = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        returns[:, t] = future_sum / future_count.clamp(min=1e-8) if length_normalization else future_sum
        returns[:, t] = torch.where(future_count > 0, returns[:, t], torch.zeros_like(future_sum))
        future_sum = rewards[:, t] * mask[:, t] + gamma * future_sum
        future_count = mask[:, t] + gamma * future_count
    return returns * mask


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """[count, sum, sum of squares] of the valid entries, as one tensor that ranks can all-reduce."""
    mask = mask.to(torch.float64)
    v = values.to(torch.float64) * mask
    return torch.stack([mask.sum(), v.sum(), (v * v).sum()])


def whiten(values: Tensor, mask: Tensor, moments: Tensor) -> Tensor:
    """(values − mean) / std using `masked_moments` (possibly summed over ranks); padding stays 0.

    Unlike the reference code, padding is left out of the statistics: pads carry reward 0 and would
    pull the mean towards 0 by an amount that depends on how long the responses happen to be.
    """
    count, total, total_sq = moments.tolist()
    mean = total / max(count, 1.0)
    var = max(total_sq / max(count, 1.0) - mean * mean, 0.0)
    return ((values - mean) / math.sqrt(var + 1e-8)) * mask.to(values.dtype)


def ppo_policy_loss(
    logp: Tensor, logp_old: Tensor, weights: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """PPO-clipped policy-gradient term per token, and whether the clip was active: (B, L) each.

    ratio = q_θ(y_t) / p̃_old(y_t) = exp(log q_θ − log q_old) · w_t, with p̃ frozen at sampling time.
    On the first update after sampling ratio = w_t, and its gradient is w_t ∇log q_θ: the importance-
    weighted policy gradient. The pessimistic max() of the two surrogate losses bounds the step, and is
    also the only bound on w, as in the reference code.
    """
    ratio = (logp - logp_old).exp() * weights
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


@dataclass
class MiniLLMLoss:
    """The MiniLLM objective on one rollout minibatch: scalars, token means over valid tokens."""

    loss: Tensor  # pg_loss + reverse_kl with the single-step term, else pg_loss
    pg_loss: Tensor  # PPO-clipped long-term term
    reverse_kl: Tensor  # exact single-step KL(q_θ‖p), computed (and reported) even when not trained on
    clip_fraction: Tensor  # share of tokens where the PPO clip was active


def minillm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    logp_old: Tensor,
    weights: Tensor,
    advantages: Tensor,
    temperature: float,
    clip_range: float,
    single_step: bool,
) -> MiniLLMLoss:
    """MiniLLM's loss on rollouts: PPO term on the long-term return + exact single-step reverse KL.

    student_logits (B, L, V) with gradient, teacher_logits (B, L, V), tokens (B, L) the sampled
    responses, mask (B, L); logp_old, weights and advantages (B, L) come from sampling time: the
    student's log-prob of each token at `temperature`, w = q_old / p̃ and the detached advantages.
    Both models' logits are divided by the sampling temperature, so that the ratio q_θ / q_old and
    the single-step KL are about the distributions the rollouts were drawn from.
    """
    logp, kl, _ = vocab_terms(student_logits, teacher_logits, tokens, temperature)
    pg, clipped = ppo_policy_loss(logp, logp_old, weights, advantages, clip_range)
    pg_loss = masked_mean(pg, mask)
    # No importance weight on the single-step term, as in the reference code (the paper's Eq. 5 has one):
    # - it is an exact sum over the vocabulary under q_θ, so it never uses the sampled y_t that w_t corrects for;
    # - given the prefix, E_{y_t∼p̃}[w_t] = 1, so multiplying by w_t would add variance and correct nothing;
    # - the prefix y_<t also came from p̃, but that needs the product of earlier ratios, which Eq. 5 drops anyway.
    rkl = masked_mean(kl, mask)
    loss = pg_loss + rkl if single_step else pg_loss
    return MiniLLMLoss(loss, pg_loss, rkl, masked_mean(clipped.float(), mask))
