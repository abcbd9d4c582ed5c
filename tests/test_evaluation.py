"""The evaluation protocol's aggregation: per seed, then the mean over seeds."""

import pytest

from worker.engine.evaluation import distinct_n, summarize


def test_scores_are_means_over_seeds_with_the_values_of_each_seed():
    scored = [(10, 20.0, 4, "a b c d e"), (10, 40.0, 6, "f g h i j"), (20, 10.0, 2, "a b c d"), (20, 30.0, 8, "e f g h")]
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
