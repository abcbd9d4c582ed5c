import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, NoRepeatNGramLogitsProcessor

from worker.engine.batch import response_logits
from worker.engine.sampling import GROUP_COST, ban_repeated_ngrams, draw, next_tokens, prefill_groups, sample


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
            assert valid[-1] == 3 and (valid[:-1] != 3).all() and (row[m.sum() :] == 0).all()


def test_greedy_equals_transformers_generate(models):
    student, _ = models
    ids, mask = _prompts()
    out = sample(
        student,
        ids,
        mask,
        max_new_tokens=6,
        eos_id=99,
        pad_id=0,
        vocab_size=13,
        generator=torch.Generator(),
        temperature=0.0,
    ).batch
    reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.response_ids, reference[:, 4:])


def test_teacher_mixing_with_alpha_one_samples_the_teacher(models):
    student, teacher = models
    ids, mask = _prompts()
    greedy_teacher = sample(
        teacher,
        ids,
        mask,
        max_new_tokens=5,
        eos_id=99,
        pad_id=0,
        vocab_size=13,
        generator=torch.Generator(),
        temperature=0.0,
    ).batch
    # α = 1 with a near-zero temperature turns the mixture into the teacher's argmax.
    mixed = sample(
        student,
        ids,
        mask,
        max_new_tokens=5,
        eos_id=99,
        pad_id=0,
        vocab_size=13,
        generator=torch.Generator().manual_seed(0),
        mix_model=teacher,
        mix_alpha=1.0,
        temperature=1e-4,
    ).batch
    assert torch.equal(mixed.response_ids, greedy_teacher.response_ids)


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1) * 3  # unnormalised on purpose
    drawn = draw(probs, torch.rand(len(probs), 1, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(drawn, minlength=6).double() / len(drawn)
    assert (counts[[0, 2, 5]] == 0).all()
    torch.testing.assert_close(counts, probs[0].double() / probs[0].sum(), atol=0.015, rtol=0)
    # Seeded: the same generator state gives the same tokens.
    assert torch.equal(drawn, draw(probs, torch.rand(len(probs), 1, generator=torch.Generator().manual_seed(0))))


def test_draw_over_many_blocks_and_a_partial_last_one():
    """A vocabulary of 3.5 blocks: the two levels of the search find the same token as one flat search."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(500, 900, generator=g) ** 8  # mostly tiny weights, a few large ones
    probs[:, 700:] = 0  # whole blocks without weight, and the partial last one
    u = torch.rand(500, 1, generator=g)
    flat = torch.searchsorted(
        probs.double().cumsum(-1), u.double() * probs.double().sum(-1, keepdim=True), right=True
    ).squeeze(-1)
    drawn = draw(probs, u)
    assert (drawn < 700).all() and (probs.gather(1, drawn[:, None]) > 0).all()
    assert (drawn == flat).float().mean() > 0.99  # fp32 block sums against a float64 scan: rare ties differ


def test_a_mixture_row_picks_its_model_and_draws_from_it():
    """(1 − α)·p_0 + α·p_1 over many rows: the frequencies of the mixture, not of either model."""
    logits = [
        torch.tensor([[3.0, 0.0, 0.0, -9.0]]).repeat(40_000, 1),
        torch.tensor([[-9.0, 0.0, 3.0, 0.0]]).repeat(40_000, 1),
    ]
    u = torch.rand(40_000, 1, generator=torch.Generator().manual_seed(2))
    drawn = next_tokens(logits, u, 0.3, 1.0, torch.zeros(40_000, 0, dtype=torch.long), 0)
    expected = 0.7 * torch.softmax(logits[0][0], -1) + 0.3 * torch.softmax(logits[1][0], -1)
    torch.testing.assert_close(
        torch.bincount(drawn, minlength=4).double() / 40_000, expected.double(), atol=0.01, rtol=0
    )


def test_prefill_groups_cover_every_row_once_at_the_least_padded_cost():
    lengths = [40, 3, 41, 3, 90, 4, 39]
    groups = prefill_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    # Short prompts together, the long one alone: 3 × 4 + 3 × 41 + 90 + 3 forwards, less than one group of 7 × 90.
    assert [sorted(lengths[r] for r in g) for g in groups] == [[3, 3, 4], [39, 40, 41], [90]]
    assert prefill_groups([5] * 8) == [list(range(8))]  # equal lengths: one forward
    assert 3 * 4 + 3 * 41 + 90 + 3 * GROUP_COST < 7 * 90 + GROUP_COST


def test_prompts_of_many_lengths_prefilled_in_groups_decode_as_transformers_does(models):
    """Greedy decoding of prompts from 1 to 12 tokens long, prefilled in groups cut to their own
    width, writes into the cache what one padded forward would: the same tokens as `generate`."""
    student, _ = models
    lengths = [1, 12, 2, 11, 3, 10, 4, 9, 5, 8, 6, 7]
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 12 - n :] = torch.arange(1, n + 1) % 12 + 1
        mask[row, 12 - n :] = 1
    assert len(prefill_groups(lengths)) > 1
    out = sample(
        student,
        ids,
        mask,
        max_new_tokens=6,
        eos_id=99,
        pad_id=0,
        vocab_size=13,
        generator=torch.Generator(),
        temperature=0.0,
        sync_ranks=False,
        logits_out=torch.empty(12, 6, 13),
    )
    reference = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.batch.response_ids, reference[:, 12:])
    # The logits at every step, not only their argmax, are those of one forward over the whole sequence.
    with torch.no_grad():
        torch.testing.assert_close(out.logits, response_logits(student, out.batch, 13), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_decoding_over_a_static_cache_samples_what_eager_decoding_does(models):
    """sample(compile_steps=True): the decode step compiled (torch.compile; CUDA graphs on a GPU) over
    transformers' StaticCache gives the tokens and logits of the eager path, teacher mixing included."""
    student, teacher = models
    ids, mask = _prompts()
    kwargs = dict(
        max_new_tokens=8, eos_id=3, pad_id=0, vocab_size=13, mix_model=teacher, mix_alpha=0.3, sync_ranks=False
    )
    eager = sample(
        student, ids, mask, generator=torch.Generator().manual_seed(4), logits_out=torch.empty(2, 8, 13), **kwargs
    )
    compiled = sample(
        student,
        ids,
        mask,
        generator=torch.Generator().manual_seed(4),
        logits_out=torch.empty(2, 8, 13),
        compile_steps=True,
        **kwargs,
    )
    assert torch.equal(compiled.batch.response_ids, eager.batch.response_ids)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-4)
    assert hasattr(student, "_distill_compiled_forward") and hasattr(teacher, "_distill_compiled_forward")
