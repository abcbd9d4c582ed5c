"""prepacked_linears: the same products, only inside the block, only for bf16 on a CPU that has the kernels."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.prepacked import _bf16_kernels, prepacked_linears
from worker.engine.sampling import sample


def test_bf16_linears_are_packed_inside_the_block_and_restored_after():
    torch.manual_seed(0)
    bf16, fp32 = torch.nn.Linear(64, 96).bfloat16(), torch.nn.Linear(64, 96)
    x = torch.randn(8, 64)
    expected = bf16(x.bfloat16())
    with torch.no_grad(), prepacked_linears([bf16, fp32], rows=8):
        assert ("forward" in vars(bf16)) == _bf16_kernels()  # packed exactly where the CPU computes bf16
        assert "forward" not in vars(fp32)  # fp32 keeps torch's own kernel
        inside = bf16(x.bfloat16())
        inside_3d = bf16(x.bfloat16().view(2, 4, 64))  # decoding's (B, 1, H) and prefill's (B, L, H)
    assert "forward" not in vars(bf16)
    torch.testing.assert_close(inside, expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(inside_3d.view(8, 96), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not _bf16_kernels(), reason="this CPU has no native bf16 kernels; nothing is packed")
def test_bf16_greedy_decoding_with_packed_weights_equals_transformers_generate():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).bfloat16().eval()
    ids = torch.randint(3, 97, (4, 7))
    mask = torch.ones_like(ids)
    out = sample(
        model,
        ids,
        mask,
        max_new_tokens=8,
        eos_id=1000,
        pad_id=0,
        vocab_size=97,
        generator=torch.Generator(),
        temperature=0.0,
    ).batch
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out.response_ids, reference[:, 7:])
