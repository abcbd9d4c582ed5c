"""Decoding a ZeRO-3 student: its weights are gathered once for a whole sampling call, not per token."""

import pytest
import torch
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.distributed import init_process_group, initialize, whole_for_decoding
from worker.engine.sampling import sample
from worker.engine.spec import parse_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    spec = parse_spec({"student": {"model": "x"}, "deepspeed": {"zero_stage": 3, "precision": "fp32"}})
    init_process_group(spec)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    return initialize(model, spec, "fp32", lambda step: 1e-3)


def gathers_while_decoding(engine, monkeypatch, tokens: int, whole: bool) -> tuple[int, torch.Tensor]:
    """How many times a sampling call of `tokens` tokens gathered a module's weights, and what it sampled."""
    calls = []
    real = PartitionedParameterCoordinator.fetch_sub_module

    def counting(self, *args, **kwargs):  # ZeRO-3's hook before a module runs: gather its weights from every rank
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counting)
    ids, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    kwargs = dict(max_new_tokens=tokens, eos_id=99, pad_id=0, vocab_size=40, generator=torch.Generator().manual_seed(3))
    if whole:
        with whole_for_decoding(engine) as module:
            out = sample(module, ids, mask, **kwargs).batch
    else:
        out = sample(engine.module, ids, mask, **kwargs).batch
    monkeypatch.undo()
    return len(calls), out.response_ids


def test_a_zero3_student_is_gathered_once_per_sampling_call_not_per_token(engine, monkeypatch):
    per_token = [gathers_while_decoding(engine, monkeypatch, n, whole=False)[0] for n in (4, 8)]
    assert per_token[1] > per_token[0] > 0  # the plain ZeRO-3 forward gathers its layers for every token
    once = [gathers_while_decoding(engine, monkeypatch, n, whole=True)[0] for n in (4, 8)]
    assert once == [0, 0]  # gathered whole on entering, for the whole call
    # The same tokens either way; afterwards the hooks gather per module again, and training goes on.
    whole, plain = (
        gathers_while_decoding(engine, monkeypatch, 8, whole=True),
        gathers_while_decoding(engine, monkeypatch, 8, whole=False),
    )
    assert torch.equal(whole[1], plain[1]) and plain[0] == per_token[1]
    loss = engine(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
