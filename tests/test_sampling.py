import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, NoRepeatNGramLogitsProcessor

from worker.engine.sampling import ban_repeated_ngrams, draw, sample


@pytest.mark.parametrize("n", [2, 3, 6])
def test_ngram_ban_matches_transformers(n):
    g = torch.Generator().manual_seed(n)
    sequence = torch.randint(0, 4, (5, 40), generator=g)  # small vocabulary: many repeats
    logits = torch.randn(5, 4, generator=g)
    expected = NoRepeatNGramLogitsProcessor(n)(sequence, logits.clone())
    torch.testing.assert_close(ban_repeated_ngrams(sequence, logits, n), expected)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = dict(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval(), LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _prompts():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    return ids, (torch.arange(4) >= torch.tensor([[2], [0]])).long()


def test_sampling_is_seeded_and_stops_at_eos(models):
    student, teacher = models
    ids, mask = _prompts()
    kwargs = dict(max_new_tokens=12, eos_id=3, pad_id=0, vocab_size=13, mix_model=teacher, mix_alpha=0.2)
    a = sample(student, ids, mask, generator=torch.Generator().manual_seed(1), **kwargs).batch
    b = sample(student, ids, mask, generator=torch.Generator().manual_seed(1), **kwargs).batch
    assert torch.equal(a.response_ids, b.response_ids)
    for row, m in zip(a.response_ids, a.response_mask):
        valid = row[m.bool()]
        if (valid == 3).any():  # the first EOS is the last target; the rest is padding
            assert valid[-1] == 3 and (valid[:-1] != 3).all() and (row[m.sum():] == 0).all()


def test_greedy_equals_transformers_generate(models):
    student, _ = models
    ids, mask = _prompts()
    out = sample(student, ids, mask, max_new_tokens=6, eos_id=99, pad_id=0, vocab_size=13,
                 generator=torch.Generator(), temperature=0.0).batch  # fmt: skip
    reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.response_ids, reference[:, 4:])


def test_teacher_mixing_with_alpha_one_samples_the_teacher(models):
    student, teacher = models
    ids, mask = _prompts()
    greedy_teacher = sample(teacher, ids, mask, max_new_tokens=5, eos_id=99, pad_id=0, vocab_size=13,
                            generator=torch.Generator(), temperature=0.0).batch  # fmt: skip
    # α = 1 with a near-zero temperature turns the mixture into the teacher's argmax.
    mixed = sample(student, ids, mask, max_new_tokens=5, eos_id=99, pad_id=0, vocab_size=13,
                   generator=torch.Generator().manual_seed(0), mix_model=teacher, mix_alpha=1.0, temperature=1e-4).batch  # fmt: skip
    assert torch.equal(mixed.response_ids, greedy_teacher.response_ids)


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1) * 3  # unnormalised on purpose
    drawn = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).double() / len(drawn)
    assert (counts[[0, 2, 5]] == 0).all()
    torch.testing.assert_close(counts, probs[0].double() / probs[0].sum(), atol=0.015, rtol=0)
    # Seeded: the same generator state gives the same tokens.
    assert torch.equal(drawn, draw(probs, torch.Generator().manual_seed(0)))
