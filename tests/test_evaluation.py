"""The evaluation protocol's aggregation: per seed, then the mean over seeds."""

import pytest

from worker.engine.evaluation import distinct_n, summarize


def test_scores_are_means_over_seeds_with_the_values_of_each_seed():
    scored = [
        (10, 20.0, 4, "a b c d e"),
        (10, 40.0, 6, "f g h i j"),
        (20, 10.0, 2, "a b c d"),
        (20, 30.0, 8, "e f g h"),
    ]
    means, per_seed = summarize(scored)
    assert per_seed[10]["rouge_l"] == 30.0 and per_seed[20]["rouge_l"] == 20.0
    assert per_seed[10]["response_length"] == 5.0 and per_seed[20]["response_length"] == 5.0
    assert means["rouge_l"] == 25.0 and means["response_length"] == 5.0
    assert list(per_seed) == [10, 20]


def test_distinct_4_is_per_seed_not_pooled_over_seeds():
    """The same answers drawn under two seeds: each seed's responses are all distinct 4-grams."""
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    scored = [(seed, 0.0, 6, t) for seed in (10, 20) for t in texts]
    means, per_seed = summarize(scored)
    assert per_seed[10]["distinct_4"] == per_seed[20]["distinct_4"] == 100.0
    assert means["distinct_4"] == 100.0
    assert distinct_n(texts * 2) == pytest.approx(50.0)  # what pooling would have reported


def test_distinct_4_averages_unequal_seeds():
    scored = [(10, 0.0, 4, "a b c d"), (10, 0.0, 4, "a b c d"), (20, 0.0, 4, "a b c d")]  # seed 10 repeats itself
    means, per_seed = summarize(scored)
    assert per_seed[10]["distinct_4"] == 50.0 and per_seed[20]["distinct_4"] == 100.0
    assert means["distinct_4"] == 75.0


def test_reverse_kl_on_samples_is_the_exact_kl_at_the_tokens_each_seed_drew():
    """eval.sample_kl scores the model's own samples: zero for the teacher against itself, and for another
    model the per-token reverse KL at exactly the responses it sampled under each seed."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine.batch import collate, response_logits
    from worker.engine.data import Record, tokenize
    from worker.engine.evaluation import evaluate
    from worker.engine.losses import reverse_kl
    from worker.engine.models import load_tokenizer, resolve_model
    from worker.engine.sampling import sample
    from worker.engine.spec import parse_spec

    teacher_dir = resolve_model("builtin:tiny-teacher")
    tokenizer = load_tokenizer(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-student")).eval()
    records = [Record(f"Name a colour, {i}.", "", "Blue.") for i in range(3)]
    examples, _ = tokenize(records, tokenizer, "chat", 64, 6)
    spec = parse_spec(
        {
            "student": {"model": "x"},
            "data": {"max_response_tokens": 6},
            "eval": {"sample_kl": True, "batch_size": 2, "no_repeat_ngram_size": 0},
        }
    )
    seeds, vocab = [10, 20], len(tokenizer)
    device = torch.device("cpu")

    scores, per_seed, _ = evaluate(teacher, teacher, examples, tokenizer, spec, vocab, device, seeds)
    assert scores["reverse_kl_samples"] == pytest.approx(0.0, abs=1e-5)

    scores, per_seed, _ = evaluate(student, teacher, examples, tokenizer, spec, vocab, device, seeds)
    for seed in seeds:  # the same draws as evaluate's, scored by hand
        generator, tokens, total = torch.Generator().manual_seed(seed * 7919), 0.0, 0.0
        for start in (0, 2):
            batch = collate([(e.prompt_ids, []) for e in examples[start : start + 2]], tokenizer.pad_token_id)
            out = sample(
                student,
                batch.prompt_ids,
                batch.prompt_mask,
                max_new_tokens=6,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                vocab_size=vocab,
                generator=generator,
                no_repeat_ngram_size=0,
            ).batch
            with torch.no_grad():
                kl = reverse_kl(response_logits(student, out, vocab), response_logits(teacher, out, vocab))
            tokens += float(out.response_mask.sum())
            total += float((kl * out.response_mask).sum())
        assert per_seed[seed]["reverse_kl_samples"] == pytest.approx(total / tokens, rel=1e-4)
    assert scores["reverse_kl_samples"] == pytest.approx(sum(per_seed[s]["reverse_kl_samples"] for s in seeds) / 2)
    # Not the gold responses' KL (on these tiny random models the two differ by under 0.1%, not by 0):
    assert scores["reverse_kl_samples"] != pytest.approx(scores["reverse_kl"], rel=1e-5)

    off = parse_spec({"student": {"model": "x"}, "data": {"max_response_tokens": 6}})
    assert "reverse_kl_samples" not in evaluate(student, teacher, examples, tokenizer, off, vocab, device, [10])[0]


def test_samples_are_the_first_prompts_answered_under_the_first_seed():
    """eval.samples keeps the first N prompts' responses as the first seed drew them (no second generation)."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine.batch import collate
    from worker.engine.data import Record, tokenize
    from worker.engine.evaluation import evaluate
    from worker.engine.models import load_tokenizer, resolve_model
    from worker.engine.sampling import sample
    from worker.engine.spec import parse_spec

    tokenizer = load_tokenizer(resolve_model("builtin:tiny-teacher"))
    student = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-student")).eval()
    records = [Record(f"Name a colour, {i}.", "Be brief." if i == 1 else "", f"Blue {i}.") for i in range(3)]
    examples, _ = tokenize(records, tokenizer, "alpaca", 64, 6)
    spec = parse_spec(
        {
            "student": {"model": "x"},
            "data": {"max_response_tokens": 6},
            "eval": {"samples": 2, "batch_size": 2, "no_repeat_ngram_size": 0},
        }
    )
    vocab, device = len(tokenizer), torch.device("cpu")

    _, _, samples = evaluate(student, None, examples, tokenizer, spec, vocab, device, [20, 10])
    batch = collate([(e.prompt_ids, []) for e in examples[:2]], tokenizer.pad_token_id)
    out = sample(
        student,
        batch.prompt_ids,
        batch.prompt_mask,
        max_new_tokens=6,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab,
        generator=torch.Generator().manual_seed(20 * 7919),
        no_repeat_ngram_size=0,
    ).batch
    drawn = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
        for ids, mask in zip(out.response_ids, out.response_mask)
    ]
    assert samples == [
        {"prompt": "Name a colour, 0.", "reference": "Blue 0.", "response": drawn[0]},
        {"prompt": "Name a colour, 1.\n\nBe brief.", "reference": "Blue 1.", "response": drawn[1]},
    ]
    off = parse_spec({"student": {"model": "x"}, "data": {"max_response_tokens": 6}, "eval": {"samples": 0}})
    assert evaluate(student, None, examples, tokenizer, off, vocab, device, [10])[2] == []
