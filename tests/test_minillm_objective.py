"""The composed MiniLLM objective, through `minillm_loss` and through `MiniLLMStage` itself.

tests/test_losses.py checks each loss term alone. This file checks that they are put together
right: the reward's sign, the importance weight in the PPO ratio, one temperature for sampling,
scoring and updating, and pg + single-step KL (not minus).

The models are bigram tables: the logits of the next token depend only on the current token, so
every probability the stage sees is a softmax of one table row and can be written down by hand.
The engine is plain SGD with one micro-batch per step, so one update is exactly −lr·∇loss.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from worker.engine.data import Example, Record
from worker.engine.losses import minillm_loss, token_rewards
from worker.engine.spec import parse_spec
from worker.engine.stages import METHODS
from worker.engine.stages.base import Context, Schedule, TrainingData
from worker.engine.stages.minillm import MiniLLMStage

V = 4  # token 0 is both EOS and padding, as with many real tokenizers
EOS = PAD = 0


class BigramLM(torch.nn.Module):
    """logits(next | ..., current) = table[current]. Takes the keyword arguments the engine passes."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone().float())
        # No decoder layers, so nothing for the sampler's KV cache to hold: the next token depends on the current one.
        self.config = SimpleNamespace(get_text_config=lambda decoder=False: SimpleNamespace(num_hidden_layers=0))

    def forward(self, input_ids, logits_to_keep=0, **_):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, cache=None)


class SGDEngine:
    """What the stage uses of a DeepSpeedEngine, with gradient_accumulation 1 and plain SGD.

    DeepSpeed's AdamW and gradient clipping would make one step a nonlinear function of the
    gradient; with SGD the parameter change is exactly −lr·∇loss, so tests can compare gradients.
    """

    def __init__(self, module: torch.nn.Module, lr: float):
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def backward(self, loss: torch.Tensor):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def first_update(student_table, teacher_table, *, rollouts=64, response_tokens=6, lr=1.0, seed=1, data=None, **minillm):
    """Sample one phase of `rollouts` and run one update over all of them (one step, one micro-batch).

    Returns the stage (its rollouts were scored before the update), the step's metrics and the
    student's table after the update. `data`: the LM term's text, as {"pretrain": chunks} (data.pretrain
    is set) or {"gold": examples} (minillm.lm_data train_responses); without it the term is off.
    """
    data = data or {}
    lm = {"pretrain": {"data": {"pretrain": "corpus.jsonl"}}, "gold": {"minillm": {"lm_data": "train_responses"}}}
    extra = next((lm[k] for k in data), {})  # no data.pretrain: the term is off
    spec = parse_spec(
        {
            "student": {"model": "toy"},
            "data": {"max_response_tokens": response_tokens, **extra.get("data", {})},
            "training": {"batch_size": rollouts, "seed": seed},
            "minillm": {
                "rollouts_per_phase": rollouts,
                "rollout_batch_size": rollouts,
                "ppo_epochs": 1,
                **extra.get("minillm", {}),
                **minillm,
            },
        }
    )
    student, teacher = BigramLM(student_table), BigramLM(teacher_table).requires_grad_(False)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    ctx = Context(spec, SGDEngine(student, lr), teacher, tokenizer, V, torch.device("cpu"))
    prompts = [Example(Record("", "", None), [1 + i % (V - 1)], []) for i in range(rollouts)]  # one-token prompts
    stage = MiniLLMStage(
        "minillm", ctx, METHODS["minillm"], TrainingData(prompts, **data), Schedule(1, lr, 0, "constant")
    )
    metrics = stage.train_step(0)
    return stage, metrics, student.table.detach().clone()


class Hand:
    """Everything the stage should have computed for its stored rollouts, from the tables, in float64.

    Probabilities are softmaxes of table rows at the token each position is predicted from; the
    importance weight is formed in probability space, the returns with explicit loops.
    """

    def __init__(self, stage: MiniLLMStage, student_table, teacher_table):
        cfg, batch = stage.cfg, stage.rollouts.batch
        self.temperature, self.alpha = cfg.temperature, cfg.teacher_mix_alpha
        self.mask = batch.response_mask.bool()
        self.context = torch.cat([batch.prompt_ids[:, -1:], batch.response_ids[:, :-1]], dim=1)  # (B, L)
        self.y = batch.response_ids
        self.q = torch.softmax(student_table.double() / cfg.temperature, -1)  # (V, V): row = current token
        self.p = torch.softmax(teacher_table.double() / cfg.temperature, -1)
        p_reward = torch.softmax(teacher_table.double(), -1)  # the reward uses the teacher at temperature 1

        q_y, p_y = self.q[self.context, self.y], self.p[self.context, self.y]  # (B, L)
        self.logp_old = q_y.log()
        self.weights = q_y / (self.alpha * p_y + (1 - self.alpha) * q_y)
        self.rewards = (p_reward[self.context, self.y].log() - q_y.log()).clamp(
            -cfg.reward_clip, cfg.reward_clip
        ) * self.mask
        self.advantages = self._whiten(self._returns(cfg.gamma))

    def _returns(self, gamma: float) -> torch.Tensor:
        """Length-normalised future return R_{t+1} = Σ_{k>t} γ^{k−t−1} r_k / Σ_{k>t} γ^{k−t−1}."""
        out = torch.zeros_like(self.rewards)
        for b in range(out.shape[0]):
            n = int(self.mask[b].sum())
            for t in range(n - 1):
                discounts = [gamma ** (k - t - 1) for k in range(t + 1, n)]
                out[b, t] = sum(d * self.rewards[b, k] for d, k in zip(discounts, range(t + 1, n))) / sum(discounts)
        return out

    def _whiten(self, values: torch.Tensor) -> torch.Tensor:
        valid = values[self.mask]
        return (values - valid.mean()) / math.sqrt(valid.var(unbiased=False) + 1e-8) * self.mask

    def reverse_kl(self) -> torch.Tensor:
        """KL(q‖p) at each position's context: (B, L)."""
        kl_rows = (self.q * (self.q.log() - self.p.log())).sum(-1)  # (V,) one per context
        return kl_rows[self.context]

    def clip_active(self, clip_range: float) -> torch.Tensor:
        """Where the PPO clip binds on the first update after sampling, when the ratio is w."""
        w, a = self.weights, self.advantages
        return (-a * w.clamp(1 - clip_range, 1 + clip_range) > -a * w) & self.mask

    def pg_loss(self, clip_range: float) -> float:
        """PPO loss on the first update: ratio = w, token mean of max(−A·w, −A·clip(w))."""
        w, a = self.weights, self.advantages
        per_token = torch.maximum(-a * w, -a * w.clamp(1 - clip_range, 1 + clip_range))
        return float(per_token[self.mask].mean())

    def gradient(self, clip_range: float, single_step: bool) -> torch.Tensor:
        """∇ of the loss w.r.t. the student table on the first update, in closed form: (V, V).

        PPO term: −A·w·∇log q(y) per token where the clip does not bind, with ∇_row log q(y) =
        (onehot(y) − q)/T. Single-step term: ∇_row KL(q‖p) = q·(log q − log p − KL)/T.
        """
        n, t = int(self.mask.sum()), self.temperature
        grad = torch.zeros(V, V, dtype=torch.float64)
        free = self.mask & ~self.clip_active(clip_range)
        for b, i in free.nonzero().tolist():
            c, y = self.context[b, i], self.y[b, i]
            grad[c] -= (
                self.advantages[b, i] * self.weights[b, i] * (torch.nn.functional.one_hot(y, V) - self.q[c]) / t / n
            )
        if single_step:
            kl = (self.q * (self.q.log() - self.p.log())).sum(-1, keepdim=True)
            per_row = self.q * (self.q.log() - self.p.log() - kl) / t
            counts = torch.bincount(self.context[self.mask], minlength=V).double()
            grad += per_row * counts[:, None] / n
        return grad


def row_reverse_kl(student_table, teacher_table) -> torch.Tensor:
    """KL(q(·|c)‖p(·|c)) for every context c: (V,)."""
    lq, lp = torch.log_softmax(student_table, -1), torch.log_softmax(teacher_table, -1)
    return (lq.exp() * (lq - lp)).sum(-1)


def random_tables(seed: int, student_scale=1.0, teacher_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * student_scale, torch.randn(V, V, generator=g) * teacher_scale


# ----------------------------------------------------------------------------------------------
# minillm_loss on hand values
# ----------------------------------------------------------------------------------------------


def _log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def test_minillm_loss_hand_values():
    """Two tokens, three vocabulary entries: every part written out with math, temperature 2."""
    temperature, clip_range = 2.0, 0.2
    student = [[0.0, 2.0, -2.0], [1.0, 1.0, 0.0]]
    teacher = [[4.0, 0.0, 0.0], [0.0, 2.0, 2.0]]
    tokens, advantages, weights = [1, 2], [1.5, -0.5], [1.1, 0.6]  # the second weight is below 1 − ε
    lq = [_log_softmax([x / temperature for x in row]) for row in student]
    lp = [_log_softmax([x / temperature for x in row]) for row in teacher]
    # First update after sampling: logp_old is the current log-prob, so ratio = w.
    logp_old = [lq[t][tokens[t]] for t in range(2)]
    # Token 0: inside the clip, −A·w. Token 1: A < 0 and w < 1 − ε, the clip binds: −A·(1 − ε).
    pg = [-1.5 * 1.1, 0.5 * (1 - clip_range)]
    rkl = [sum(math.exp(a) * (a - b) for a, b in zip(lq[t], lp[t])) for t in range(2)]

    student_logits = torch.tensor([student], requires_grad=True)
    args = (
        torch.tensor([teacher]),
        torch.tensor([tokens]),
        torch.ones(1, 2),
        torch.tensor([logp_old]),
        torch.tensor([weights]),
        torch.tensor([advantages]),
        temperature,
        clip_range,
    )
    out = minillm_loss(student_logits, *args, single_step=True)
    assert out.pg_loss.item() == pytest.approx(sum(pg) / 2, rel=1e-5)
    assert out.reverse_kl.item() == pytest.approx(sum(rkl) / 2, rel=1e-5)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    # The sum, not the difference: both terms are minimised.
    assert out.loss.item() == pytest.approx((sum(pg) + sum(rkl)) / 2, rel=1e-5)
    # Without the single-step term the KL is still reported, but not trained on.
    off = minillm_loss(student_logits, *args, single_step=False)
    assert off.loss.item() == pytest.approx(sum(pg) / 2, rel=1e-5)
    assert off.reverse_kl.item() == pytest.approx(out.reverse_kl.item())

    # Gradient: −A·w·∇log q(y) on the unclipped token, nothing from the clipped one, + ∇KL, all
    # through logits / T, token mean.
    out.loss.backward()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(2):
        q = torch.tensor(lq[t], dtype=torch.float64).exp()
        p = torch.tensor(lp[t], dtype=torch.float64).exp()
        expected[t] += q * (q.log() - p.log() - rkl[t]) / temperature / 2
    expected[0] -= (
        1.5 * 1.1 * (torch.nn.functional.one_hot(torch.tensor(1), 3) - torch.tensor(lq[0]).exp()) / temperature / 2
    )
    torch.testing.assert_close(student_logits.grad[0].double(), expected, atol=1e-6, rtol=1e-5)


def test_minillm_loss_ignores_padding():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, V, generator=g), torch.randn(2, 3, V, generator=g)
    tokens = torch.randint(0, V, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp_old, advantages = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    weights = torch.rand(2, 3, generator=g) + 0.5
    ref = minillm_loss(s, t, tokens, mask, logp_old, weights, advantages, 1.0, 0.2, True)
    pad = ~mask.bool()
    s2, t2, junk = s.clone(), t.clone(), torch.randn(int(pad.sum()), V, generator=g) * 100
    s2[pad], t2[pad] = junk, -junk
    logp_old2, advantages2 = logp_old.clone(), advantages.clone()
    logp_old2[pad], advantages2[pad] = -50.0, 1e3
    out = minillm_loss(s2, t2, tokens, mask, logp_old2, weights, advantages2, 1.0, 0.2, True)
    for name in ("loss", "pg_loss", "reverse_kl", "clip_fraction"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))


# ----------------------------------------------------------------------------------------------
# MiniLLMStage on bigram models
# ----------------------------------------------------------------------------------------------


def test_uniform_student_moves_towards_the_token_the_teacher_prefers():
    student = torch.zeros(V, V)  # uniform in every context
    teacher = torch.tensor([0.0, 0.0, 3.0, 0.0]).repeat(V, 1)  # prefers token 2 after every token
    _, metrics, after = first_update(student, teacher)
    q_before, q_after = torch.softmax(student, -1), torch.softmax(after, -1)
    for c in range(1, V):  # the contexts sampled tokens are predicted from (never EOS)
        assert q_after[c, 2] > q_before[c, 2] + 0.02, c
        assert q_after[c].argmax() == 2, c
    assert (row_reverse_kl(after, teacher)[1:] < row_reverse_kl(student, teacher)[1:]).all()
    assert metrics["pg_loss"] != 0  # the policy-gradient term takes part in the update


def test_rewards_are_positive_exactly_where_the_teacher_is_more_likely_than_the_student():
    student, teacher = random_tables(seed=3)
    stage, _, _ = first_update(student, teacher)
    ro, hand = stage.rollouts, Hand(stage, student, teacher)
    torch.testing.assert_close(ro.rewards.double(), hand.rewards, atol=1e-5, rtol=1e-5)
    valid = hand.mask
    teacher_prefers = (torch.softmax(teacher, -1) > torch.softmax(student, -1))[hand.context, hand.y]
    assert torch.equal(ro.rewards[valid] > 0, teacher_prefers[valid])
    assert teacher_prefers[valid].any() and (~teacher_prefers[valid]).any()  # both signs occur
    assert (ro.rewards[~valid] == 0).all()


def test_token_rewards_hand_values():
    teacher_logp = torch.tensor([[-1.0, -80.0, -2.0, -3.0], [-0.5, -1.0, -70.0, -9.0]])
    student_logp = torch.tensor([[-3.0, -1.0, -0.5, -60.0], [-0.25, -75.0, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = [[2.0, -50.0, -1.5, 50.0], [-0.25, 50.0, 0.0, 0.0]]
    assert token_rewards(teacher_logp, student_logp, mask, clip=50.0).tolist() == expected
    assert token_rewards(teacher_logp, student_logp, mask, clip=5.0).tolist() == [
        [2.0, -5.0, -1.5, 5.0],
        [-0.25, 5.0, 0.0, 0.0],
    ]
    # A token the teacher rules out entirely still gets a finite reward.
    assert (
        token_rewards(torch.tensor([[float("-inf")]]), torch.tensor([[-1.0]]), torch.ones(1, 1), 50.0).item() == -50.0
    )


def test_rewards_are_clipped_at_the_reference_bound():
    """Reference: ±100 on rewards scaled by 1/0.5, i.e. ±50 on log p − log q; the default."""
    assert parse_spec({"student": {"model": "toy"}}).minillm.reward_clip == 50.0
    # The student rules out token 3 (sampled only through the teacher's share of p̃), the teacher
    # rules out token 2: their rewards are about +100 and −100 before the clip.
    student = torch.tensor([0.0, 0.0, 0.0, -100.0]).repeat(V, 1)
    teacher = torch.tensor([0.0, 0.0, -100.0, 2.0]).repeat(V, 1)
    stage, metrics, _ = first_update(student, teacher, teacher_mix_alpha=0.5)
    ro, hand = stage.rollouts, Hand(stage, student, teacher)
    valid = hand.mask
    assert (ro.rewards[valid & (hand.y == 3)] == 50.0).all() and (hand.y[valid] == 3).any()
    assert (ro.rewards[valid & (hand.y == 2)] == -50.0).all() and (hand.y[valid] == 2).any()
    torch.testing.assert_close(ro.rewards.double(), hand.rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.advantages.double(), hand.advantages, atol=1e-4, rtol=1e-4)
    assert all(math.isfinite(v) for v in metrics.values())


def test_first_ppo_ratio_after_sampling_is_the_importance_weight():
    """ratio = exp(log q_θ − log q_old)·w is w on the first update; checked through the step's loss."""
    student, teacher = random_tables(seed=4)
    stage, metrics, _ = first_update(student, teacher, teacher_mix_alpha=0.5)
    ro, hand, clip_range = stage.rollouts, Hand(stage, student, teacher), stage.cfg.clip_range
    torch.testing.assert_close(ro.weights.double(), hand.weights * hand.mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.advantages.double(), hand.advantages, atol=1e-4, rtol=1e-4)
    # Teeth: the weights are far from 1 and the clip binds on some tokens, not all.
    assert (hand.weights[hand.mask] - 1).abs().max() > 0.3
    clip_fraction = float(hand.clip_active(clip_range)[hand.mask].double().mean())
    assert 0 < clip_fraction < 1
    assert metrics["pg_loss"] == pytest.approx(hand.pg_loss(clip_range), rel=1e-4, abs=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(clip_fraction, abs=1e-6)


def test_scoring_and_update_use_the_sampling_temperature():
    temperature = 2.0
    student = torch.tensor([0.0, 3.0, 0.0, -2.0]).repeat(V, 1) + torch.eye(V)
    teacher = torch.tensor([0.0, -1.0, 3.0, 1.0]).repeat(V, 1)
    stage, metrics, _ = first_update(student, teacher, rollouts=512, temperature=temperature)
    ro, hand = stage.rollouts, Hand(stage, student, teacher)
    mask = hand.mask
    torch.testing.assert_close(ro.logp_old.double()[mask], hand.logp_old[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.weights.double()[mask], hand.weights[mask], atol=1e-5, rtol=1e-5)
    # The update sees the same distributions: the single-step KL is KL(q_T‖p_T), and the first
    # PPO ratio is still w (it would not be if the update scored at another temperature).
    assert metrics["reverse_kl"] == pytest.approx(float(hand.reverse_kl()[mask].mean()), rel=1e-5)
    assert metrics["pg_loss"] == pytest.approx(hand.pg_loss(stage.cfg.clip_range), rel=1e-4, abs=1e-5)

    # Sampling and scoring agree: the importance weights turn the teacher-mixed samples into draws
    # from the student at temperature T. Self-normalised weighted token frequencies per context
    # recover q_T, not the student at temperature 1.
    q_t, q_1 = torch.softmax(student / temperature, -1), torch.softmax(student, -1)
    for c in range(1, V):
        here = mask & (hand.context == c)
        w, y = ro.weights[here].double(), hand.y[here]
        assert len(y) > 250, c
        freq = torch.zeros(V, dtype=torch.float64).index_add_(0, y, w) / w.sum()
        assert (freq - q_t[c]).abs().max() < 0.06, (c, freq, q_t[c])
        assert (q_1[c] - q_t[c]).abs().max() > 0.2  # the test can tell the temperatures apart


@pytest.mark.parametrize("single_step", [True, False])
def test_loss_is_pg_plus_single_step_reverse_kl(single_step):
    student, teacher = random_tables(seed=5)
    stage, metrics, _ = first_update(student, teacher, single_step=single_step)
    hand = Hand(stage, student, teacher)
    assert metrics["reverse_kl"] == pytest.approx(float(hand.reverse_kl()[hand.mask].mean()), rel=1e-5)
    assert metrics["reverse_kl"] > 0.1
    expected = metrics["pg_loss"] + (metrics["reverse_kl"] if single_step else 0.0)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_single_step_term_alone_lowers_the_reverse_kl():
    """One-token responses have no future: advantages are 0 and the update is −lr·∇KL(q‖p)."""
    student, teacher = random_tables(seed=6)
    stage, metrics, after = first_update(student, teacher, response_tokens=1, lr=0.3)
    assert (stage.rollouts.advantages == 0).all() and metrics["pg_loss"] == 0
    # The prompts' tokens 1..3 are the only contexts.
    assert (row_reverse_kl(after, teacher)[1:] < row_reverse_kl(student, teacher)[1:]).all()


@pytest.mark.parametrize(
    "temperature, alpha, single_step, gamma", [(1.0, 0.2, True, 1.0), (0.7, 0.5, True, 0.9), (2.0, 0.2, False, 1.0)]
)
def test_one_update_is_minus_lr_times_the_hand_gradient(temperature, alpha, single_step, gamma):
    """The whole chain: rollouts → rewards → whitened returns → weights → clipped PPO + KL → step."""
    student, teacher = random_tables(seed=7)
    lr = 1.0
    stage, _, after = first_update(
        student, teacher, lr=lr, temperature=temperature, teacher_mix_alpha=alpha, single_step=single_step, gamma=gamma
    )
    hand = Hand(stage, student, teacher)
    expected = student.double() - lr * hand.gradient(stage.cfg.clip_range, single_step)
    assert (after.double() - student.double()).abs().max() > 0.01  # a step that tells terms apart
    torch.testing.assert_close(after.double(), expected, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The LM term
# ----------------------------------------------------------------------------------------------


def _cross_entropy(table: torch.Tensor, tokens: list[int]) -> float:
    """Mean −log q(next | current) of a token sequence under a bigram table."""
    logq = torch.log_softmax(table.double(), -1)
    return float(-torch.stack([logq[a, b] for a, b in zip(tokens, tokens[1:])]).mean())


def test_the_lm_term_is_next_token_loss_on_the_corpus_in_the_same_update():
    student, teacher = random_tables(seed=8)
    corpus = [1, 2, 3, 3, 1, 2, 0, 2]  # one chunk: its first token is context only, the other 7 are targets
    off_stage, off, _ = first_update(student, teacher)
    stage, on, _ = first_update(student, teacher, data={"pretrain": [corpus]})
    assert stage.lm_pairs == [([1], [2, 3, 3, 1, 2, 0, 2])]
    assert on["lm_loss"] == pytest.approx(_cross_entropy(student, corpus), rel=1e-6)  # plain CE (kd_ratio 0)
    # The LM rows share the forward without changing what the rollouts see.
    assert on["pg_loss"] == pytest.approx(off["pg_loss"], rel=1e-6) and on["reverse_kl"] == pytest.approx(
        off["reverse_kl"], rel=1e-6
    )
    assert on["loss"] == pytest.approx(on["pg_loss"] + on["reverse_kl"] + on["lm_loss"], rel=1e-6)
    assert off["lm_loss"] == 0 and off_stage.lm_pairs == []
    assert "LM term: next-token loss on data.pretrain (corpus.jsonl: 1 chunks of 512 tokens)" in stage.describe()
    assert off_stage.describe() == (
        "minillm: LM term off (no data.pretrain; builtin:teacher-text is one for the paper's "
        "L_PT); teacher logits kept for each phase (0.00 GB per process)"
    )  # 64 × 6 × 4 × 4 bytes


def test_the_lm_term_on_training_responses_only_when_named():
    student, teacher = random_tables(seed=9)
    gold = [Example(Record("", "", "x"), [1 + i % (V - 1)], [3, 3, 2, EOS]) for i in range(8)]
    stage, metrics, _ = first_update(student, teacher, data={"gold": gold}, kd_ratio=0.5)
    assert stage.lm_pairs == [(e.prompt_ids, e.response_ids) for e in gold]
    assert "LM term: 0.5·next-token loss + 0.5·forward KL to the teacher on the training responses" in stage.describe()
    assert "not the paper's L_PT" in stage.describe() and metrics["lm_loss"] > 0
