"""The kernels of one decoding step at batch 64 on the demo models' shapes, timed alone.

    .venv/bin/python bench/decode_kernels.py

Two measurements behind ideas that were tried for decoding speed and rejected (docs/performance.md):

- attention of one query token over a cache left-padded to the batch's longest prompt, against the
  same attention run per group of rows (sorted by prompt length) over each group's own columns;
- the projections of a decoder layer as bf16 linears with oneDNN-prepacked weights (as
  `worker/engine/prepacked.py` does), apart and fused (q/k/v in one, gate/up in one).

Shapes: SmolLM2-135M (hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536); the prompt
lengths of the demo's batch of 64 and its prefill groups, 50 tokens into decoding.
"""

from __future__ import annotations

import time

import torch

ROWS, KV_HEADS, GROUP, HEAD_DIM, HIDDEN, MLP = 64, 3, 3, 64, 576, 1536
# The demo batch's prompt lengths (count, length), in the prefill groups `sampling.prefill_groups` makes.
PROMPTS = [(24, 40), (12, 45), (11, 58), (7, 74), (8, 87), (2, 96)]


def timed(fn, repeats: int) -> float:
    """Milliseconds per call, after a few untimed calls."""
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def attention() -> None:
    longest, decoded = max(length for _, length in PROMPTS), 50
    columns = longest + decoded
    query = torch.randn(
        ROWS, KV_HEADS, GROUP, HEAD_DIM, dtype=torch.bfloat16
    )  # one token, GQA packed per key/value head
    keys = torch.randn(ROWS, KV_HEADS, columns + 16, HEAD_DIM, dtype=torch.bfloat16)[
        :, :, :columns
    ]  # a view, as the cache's
    values = torch.randn_like(keys)
    mask = torch.zeros(ROWS, 1, 1, columns, dtype=torch.bool)
    groups, row = [], 0
    for count, length in PROMPTS:
        mask[row : row + count, ..., longest - length :] = True
        groups.append((row, row + count, longest - length))
        row += count
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def whole():
        return sdpa(query, keys, values, attn_mask=mask)

    def grouped():
        return torch.cat(
            [sdpa(query[a:b], keys[a:b, :, c:], values[a:b, :, c:], attn_mask=mask[a:b, ..., c:]) for a, b, c in groups]
        )

    attended = sum((b - a) * (columns - c) for a, b, c in groups) / (ROWS * columns)
    print(
        f"attention, one layer: whole cache {timed(whole, 100):.3f} ms; per group of rows ({attended:.0%} of the "
        f"columns) {timed(grouped, 100):.3f} ms; largest difference {(whole() - grouped()).abs().max():.4f}"
    )


def projections() -> None:
    rows = torch.randn(ROWS, HIDDEN, dtype=torch.bfloat16)
    wide = torch.randn(ROWS, MLP, dtype=torch.bfloat16)

    def linear(inputs: torch.Tensor, out_features: int) -> float:
        packed = torch.ops.mkldnn._reorder_linear_weight(
            torch.randn(out_features, inputs.shape[1], dtype=torch.bfloat16), ROWS
        )
        return timed(lambda: torch.ops.mkldnn._linear_pointwise(inputs, packed, None, "none", [], ""), 200)

    q, kv, qkv = linear(rows, HIDDEN), linear(rows, KV_HEADS * HEAD_DIM), linear(rows, HIDDEN + 2 * KV_HEADS * HEAD_DIM)
    gate, gate_up, down = linear(rows, MLP), linear(rows, 2 * MLP), linear(wide, HIDDEN)
    print(
        f"projections, one layer: q {q:.3f} + k, v 2 × {kv:.3f} ms against q/k/v fused {qkv:.3f} ms; "
        f"gate, up 2 × {gate:.3f} ms against fused {gate_up:.3f} ms; o {q:.3f}, down {down:.3f} ms"
    )


if __name__ == "__main__":
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    attention()
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        projections()
    else:
        print("projections: this CPU's oneDNN has no bf16 kernels (the engine decodes in fp32 here)")
