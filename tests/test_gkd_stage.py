"""GKD's training step on tiny transformers models, against the loss computed by hand on the same batch.

Which responses a micro-batch trains on (the student's samples, the data's, or the teacher's samples)
and the generalised JSD on them are checked through the gradients the step hands to the optimizer. At
beta 1 and lmbda 1 the step must be MiniLLM's single-step term alone: the exact per-token reverse KL
on the student's own samples.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from toy_stage import EOS, PAD, Engine, V, tiny

from worker.engine.batch import collate, response_logits
from worker.engine.data import Example, Record
from worker.engine.losses import masked_mean, reverse_kl
from worker.engine.spec import parse_spec
from worker.engine.stages import METHODS, needs
from worker.engine.stages.base import Context, Schedule, TrainingData
from worker.engine.stages.gkd import GKDStage


def stage(gkd: dict, with_responses: bool = True, batch_size: int = 4) -> GKDStage:
    spec = parse_spec(
        {
            "method": "gkd",
            "student": {"model": "toy"},
            "data": {"max_response_tokens": 8},
            "training": {"batch_size": batch_size, "seed": 5},
            "gkd": gkd,
        }
    )
    student, teacher = tiny(1, 1), tiny(2, 2).requires_grad_(False)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    ctx = Context(spec, Engine(student), teacher, tokenizer, V, torch.device("cpu"))
    # Prompts of different lengths, and responses of different lengths ending in EOS.
    examples = [
        Example(
            Record("", "", None),
            [5 + (i * 7 + k) % 40 for k in range(1 + i % 4)],
            [6 + (i * 5 + k) % 40 for k in range(2 + i % 3)] + [EOS] if with_responses else [],
        )
        for i in range(8)
    ]
    data = TrainingData(examples, gold=examples if with_responses else None)
    return GKDStage("gkd", ctx, METHODS["gkd"], data, Schedule(4, 1e-3, 0, "constant"))


def gradients(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def assert_same(grads, expected):
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def by_hand(st: GKDStage, batch, beta: float, temperature: float) -> list[torch.Tensor]:
    """The step's gradient written out: the mixture formula over the vocabulary, in probability space."""
    student, mask = st.ctx.engine.module, batch.response_mask
    log_q = torch.log_softmax(response_logits(student, batch, V).double() / temperature, -1)
    with torch.no_grad():
        log_p = torch.log_softmax(response_logits(st.ctx.teacher, batch, V).double() / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    m = beta * p + (1 - beta) * q
    per_token = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    return [g.float() for g in gradients(masked_mean(per_token, mask), student)]


def test_off_policy_step_is_the_generalised_jsd_on_the_data_responses():
    st = stage({"beta": 0.3, "lmbda": 0.0, "temperature": 0.7})
    assert needs(st.ctx.spec) == {"gold"}
    metrics = st.train_step(0)
    assert metrics["on_policy"] == 0
    indices = st.ctx.micro_batch_indices(len(st.examples), 5, 0)
    batch = st.ctx.batch(st.pairs, indices)
    assert metrics["response_length"] == pytest.approx(float(batch.response_mask.sum()) / 4)
    assert_same(st.ctx.engine.grads[0], by_hand(st, batch, 0.3, 0.7))


def test_beta_1_lmbda_1_is_minillms_single_step_term_on_the_students_samples():
    st = stage({"beta": 1.0, "lmbda": 1.0, "temperature": 1.0}, with_responses=False)
    assert needs(st.ctx.spec) == {"none"}  # prompts alone: no responses are prepared
    metrics = st.train_step(0)
    assert metrics["on_policy"] == 1
    indices = st.ctx.micro_batch_indices(len(st.examples), 5, 0)
    batch = st._sampled(st.ctx.engine.module, indices, 0)  # the step's own draw, again
    assert batch.response_mask.sum() > 8 and batch.response_ids.shape[1] <= 8
    student = st.ctx.engine.module
    with torch.no_grad():
        teacher_logits = response_logits(st.ctx.teacher, batch, V)
    single_step = masked_mean(reverse_kl(response_logits(student, batch, V), teacher_logits), batch.response_mask)
    assert metrics["loss"] == pytest.approx(single_step.item(), rel=1e-5)
    assert_same(st.ctx.engine.grads[0], gradients(single_step, student))


def test_seq_kd_trains_off_policy_batches_on_the_teachers_samples():
    st = stage({"beta": 0.5, "lmbda": 0.0, "seq_kd": True, "temperature": 0.9}, with_responses=False)
    assert needs(st.ctx.spec) == {"none"}
    st.train_step(0)
    indices = st.ctx.micro_batch_indices(len(st.examples), 5, 0)
    batch = st._sampled(st.ctx.teacher, indices, 0)
    student_batch = st._sampled(st.ctx.engine.module, indices, 0)
    assert not torch.equal(batch.response_ids, student_batch.response_ids)  # the two models' samples differ
    assert_same(st.ctx.engine.grads[0], by_hand(st, batch, 0.5, 0.9))


def test_the_on_policy_share_is_lmbda_and_drawn_per_micro_batch_alike_on_every_rank():
    st = stage({"lmbda": 0.3}, batch_size=1)
    draws = [st.on_policy(m) for m in range(2000)]
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws == [st.on_policy(m) for m in range(2000)]  # a resumed job draws the same
    assert all(stage({"lmbda": 0.0}).on_policy(m) is False for m in range(50))
    assert all(stage({"lmbda": 1.0}).on_policy(m) is True for m in range(50))


def test_sampled_responses_stop_at_eos_and_keep_it_as_a_target():
    st = stage({"lmbda": 1.0}, with_responses=False)
    batch = st._sampled(st.ctx.engine.module, list(range(4)), 3)
    prompts = collate([(st.examples[i].prompt_ids, []) for i in range(4)], PAD)
    assert torch.equal(batch.prompt_ids[:, -prompts.prompt_ids.shape[1] :], prompts.prompt_ids)
    for ids, mask in zip(batch.response_ids, batch.response_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert EOS not in ids[: n - 1].tolist() and (ids[n - 1] == EOS or n == 8)
