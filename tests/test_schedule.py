import pytest

from worker.engine.stages.base import Schedule


def test_warmup_then_constant():
    s = Schedule(steps=10, learning_rate=1.0, warmup_steps=4, lr_schedule="constant")
    assert [s.lr(i) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_and_linear_decay_after_warmup():
    cos = Schedule(steps=6, learning_rate=2.0, warmup_steps=2, lr_schedule="cosine")
    assert [cos.lr(i) for i in (2, 4)] == pytest.approx([2.0, 1.0])  # start of decay, halfway
    lin = Schedule(steps=5, learning_rate=1.0, warmup_steps=0, lr_schedule="linear")
    assert [lin.lr(i) for i in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
