"""bf16 linear layers with oneDNN-prepacked weights, for decoding on CPUs with native bf16.

Decoding multiplies a handful of rows by every weight matrix once per token. On the CPU,
`torch.nn.functional.linear` in bf16 spends more time choosing and preparing its kernel than
computing (the demo's step: 0.2 ms for an 8 × 576 by 576 × 1536 product, 5.4 ms for the 49k-row LM
head); with the weight laid out once for oneDNN's kernel, the same products take 0.05 and 1.9 ms
and the results are the same bits. Decoding the demo's rollouts got 25% faster.

Only within `prepacked_linears`, and only for bf16 weights on a CPU whose oneDNN computes bf16:
on CUDA, in fp32, or under ZeRO-3 (whose weights are gathered only inside each forward) every layer
keeps its own forward. Weights are packed afresh at every entry (0.1 s for the demo's two models),
so a student updated in between is never multiplied with stale weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _bf16_kernels() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _eligible(module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    weight = module.weight
    # ZeRO-3 keeps an empty placeholder (with a ds_id) outside the forward that gathers the weight.
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.numel() > 0
        and not hasattr(weight, "ds_id")
    )


@contextmanager
def prepacked_linears(models: list[torch.nn.Module], rows: int) -> Iterator[None]:
    """Within the block, the eligible linear layers of `models` multiply with weights packed for
    products of `rows` rows (other shapes work too, as fast as without packing).

    For inference only (no autograd through the packed product): the sampler's decoding loop.
    """
    layers = [m for model in models for m in model.modules() if _eligible(m)] if _bf16_kernels() else []
    for layer in layers:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
        bias = None if layer.bias is None else layer.bias.detach()
        layer.forward = lambda x, packed=packed, bias=bias: torch.ops.mkldnn._linear_pointwise(
            x, packed, bias, "none", [], ""
        )
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to nn.Linear.forward
