"""Autoregressive sampling, with MiniLLM's teacher-mixed sampling as a special case.

One decoding loop serves rollouts (student mixed with teacher), evaluation (student or teacher
alone, with the paper's no-repeat-6-gram rule) and teacher-generated data (SeqKD, demo references).
It takes a `torch.Generator`, so the same seed gives the same samples however often a job is resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, StaticCache

from .batch import SequenceBatch
from .prepacked import prepacked_linears


def ban_repeated_ngrams(sequence: Tensor, logits: Tensor, n: int) -> Tensor:
    """Set to −inf every token that would complete an n-gram already present in `sequence` (B, L).

    The rule of transformers' NoRepeatNGramLogitsProcessor, vectorised: that one walks every row in
    Python at every step, which made evaluation decoding several times slower than the model.
    """
    length = sequence.shape[1]
    if length < n:
        return logits
    suffix = sequence[:, length - n + 1 :]  # the (n−1)-gram the next token would extend
    windows = sequence.unfold(1, n - 1, 1)[:, : length - n + 1]  # (n−1)-grams that have a successor
    seen = (windows == suffix.unsqueeze(1)).all(-1)
    followers = sequence[:, n - 1 :]
    banned = torch.where(
        seen, torch.tensor(float("-inf"), device=logits.device), torch.tensor(0.0, device=logits.device)
    )
    return logits.scatter_add(1, followers, banned.to(logits.dtype))


class Sampled(NamedTuple):
    batch: SequenceBatch
    # The logits of the last model that decoded (the mix model when mixing) at every response position
    # (B, Lr, V) in its own dtype, so that MiniLLM need not run the teacher again: a view of
    # `logits_out`, None without it.
    logits: Tensor | None


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers allocated once for the whole decode (prompt + new tokens).

    Each token writes its column in place and attention reads a view of the filled part. The
    library's DynamicLayer grows by concatenation, which copies the whole cache at every token (at
    batch 64 on the demo models, a seventh of decoding); its StaticLayer would attend over the whole
    capacity at every token. The buffers start at zero: prompts prefilled in groups leave their
    left padding unwritten, and masked attention weights (0) times garbage (NaN) would be NaN.
    """

    def __init__(self, batch: int, capacity: int):
        super().__init__()
        self.batch, self.capacity, self.length = batch, capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        heads = key_states.shape[1]
        self.key_buffer = key_states.new_zeros(self.batch, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_zeros(self.batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _grow_to(self, length: int) -> tuple[Tensor, Tensor]:
        self.length = length
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        return self._grow_to(end)

    def write_prompt(self, rows: Tensor, keys: Tensor, values: Tensor, prompt_len: int) -> None:
        """Place the keys and values (r, heads, w, dim) of a group of left-padded prompts, cut to their
        own width w, at the end of the prompt columns of `rows`."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        width = keys.shape[-2]
        self.key_buffer[rows, :, prompt_len - width : prompt_len] = keys
        self.value_buffer[rows, :, prompt_len - width : prompt_len] = values
        self._grow_to(prompt_len)


def _decoder_layers(model: torch.nn.Module) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def _step(model: torch.nn.Module, ids: Tensor, attention_mask: Tensor, positions: Tensor, cache: Cache) -> Tensor:
    """The next-token logits (B, V) in the model's own dtype; `cache` grows by the fed tokens."""
    out = model(
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


STATIC_CAPACITY_STEP = 256  # compiled decoding rounds its cache's length up to a multiple of this


def compiled_forward(model: torch.nn.Module):
    """`model.forward` compiled for decoding steps of fixed shapes (a static KV cache and a mask of its
    full length), kept on the model so that every call after the first reuses it. On a GPU it runs as
    CUDA graphs (mode reduce-overhead): one launch per token instead of one per operation."""
    compiled = getattr(model, "_distill_compiled_forward", None)
    if compiled is None:
        cuda = next(model.parameters()).device.type == "cuda"
        compiled = torch.compile(model.forward, dynamic=False, mode="reduce-overhead" if cuda else None)
        model._distill_compiled_forward = compiled
    return compiled


# What one more prefill forward costs, counted in prompt positions: its fixed cost (about 15 ms on
# the demo models here) is what some 30 positions of compute take. Rough: the grouping hardly depends on it.
GROUP_COST = 32


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped for prefilling, each group cut to its longest prompt: the grouping of the rows
    sorted by length that computes the fewest prompt positions, padding included, counting
    GROUP_COST positions for each extra forward (dynamic programming over the sorted rows)."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[j]: cost of the first j sorted rows
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]  # the longest of rows i..j-1, sorted
        best[j], cut[j] = min((best[i] + (j - i) * width + GROUP_COST, i) for i in range(j))
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _prefill(
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, positions: Tensor, cache: Cache, grouped: bool
) -> Tensor:
    """The logits after each prompt (B, V), with `cache` holding the prompts' keys and values.

    `grouped`: rows run in groups of similar prompt length (`prefill_groups`), each cut to its own
    longest prompt. Left padding to the batch's longest prompt is otherwise computed on: on the
    demo's prompts (39 tokens on average, 96 at most in a batch of 64) 60% of the prefill was
    padding, and the prefill was a third of decoding. Not for collective forwards (ZeRO-3), whose
    count must not depend on the data.
    """
    if not grouped:
        return _step(model, prompt_ids, prompt_mask, positions, cache)
    batch, prompt_len = prompt_ids.shape
    lengths = prompt_mask.sum(-1)
    logits = None
    for group in prefill_groups(lengths.tolist()):
        rows = torch.tensor(group, device=prompt_ids.device)
        width = max(int(lengths[rows].max()), 1)
        part = Cache(layers=[DynamicLayer() for _ in range(_decoder_layers(model))])
        cut = slice(prompt_len - width, prompt_len)
        out = _step(model, prompt_ids[rows, cut], prompt_mask[rows, cut], positions[rows, cut], part)
        if logits is None:
            logits = out.new_empty(batch, out.shape[-1])
        logits[rows] = out
        for layer, filled in zip(cache.layers, part.layers):
            layer.write_prompt(rows, filled.keys, filled.values, prompt_len)
    return logits


BLOCK = 256  # vocabulary entries per block of `draw`'s two-level search


def draw(weights: Tensor, u: Tensor) -> Tensor:
    """One token per row of `weights` (B, V), unnormalised and non-negative, for uniforms `u` (B, 1) in [0, 1): (B,).

    Inverse-CDF sampling in two levels: the block of BLOCK entries where the running sum first
    exceeds u·total, then the entry within it. One cumulative sum over the whole row (what
    `torch.multinomial` and a flat search need) is a sequential scan of V entries, which took 14 ms
    per step at batch 64 over 49k entries here; block sums vectorise, and the scans are over V/BLOCK
    and BLOCK entries. A token of weight 0 is never drawn: the search may overshoot by rounding only
    onto an entry whose weight is 0, and is pulled back to the last positive one.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // BLOCK)
    if vocab % BLOCK:
        weights = torch.nn.functional.pad(weights, (0, blocks * BLOCK - vocab))
    blocked = weights.view(rows, blocks, BLOCK)
    block_cdf = blocked.sum(-1).cumsum(-1)  # (B, blocks)
    total = block_cdf[:, -1:]
    target = u.to(block_cdf.dtype) * total
    last_block = (block_cdf < total).sum(-1, keepdim=True)  # the last block with weight
    block = torch.searchsorted(block_cdf, target, right=True).minimum(last_block)
    within = blocked.gather(1, block.unsqueeze(-1).expand(rows, 1, BLOCK)).squeeze(1).cumsum(-1)  # (B, BLOCK)
    before = block_cdf.gather(1, block) - within[:, -1:]  # the weight of the blocks before
    last_entry = (within < within[:, -1:]).sum(-1, keepdim=True)
    entry = torch.searchsorted(within, target - before, right=True).minimum(last_entry)
    return (block * BLOCK + entry).squeeze(-1)


def next_tokens(
    logits: list[Tensor], u: Tensor, alpha: float, temperature: float, history: Tensor, no_repeat_ngram_size: int
) -> Tensor:
    """The next token of each row (B,) from one model's logits (B, V), or from two models' mixture
    (1 − α)·p_0 + α·p_1, for uniforms `u` (B, 1).

    A row of the mixture first picks its model (the second with probability α, by u < α) and then
    draws from that model alone with the rest of u rescaled: the same distribution as drawing from
    the mixed probabilities, at one softmax per row instead of two. `temperature` 0 takes the
    argmax of the picked model; `no_repeat_ngram_size` bans tokens that would repeat an n-gram of
    `history` (B, L).
    """
    chosen = logits[0]
    if len(logits) == 2:
        second = u < alpha
        chosen = torch.where(second, logits[1], logits[0])
        u = torch.where(second, u / alpha, (u - alpha) / (1 - alpha))
    chosen = chosen.float()
    if no_repeat_ngram_size > 0:
        chosen = ban_repeated_ngrams(history, chosen, no_repeat_ngram_size)
    if temperature == 0:
        return chosen.argmax(-1)
    return draw(torch.softmax(chosen if temperature == 1 else chosen / temperature, dim=-1), u)


def _all_ranks_done(done: bool) -> bool:
    """Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively)."""
    flag = torch.tensor([1 if done else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    generator: torch.Generator | None,
    mix_model: torch.nn.Module | None = None,
    mix_alpha: float = 0.0,
    logits_out: Tensor | None = None,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 0,
    sync_ranks: bool = True,
    sync_every: int = 16,
    forced_ids: Tensor | None = None,
    compile_steps: bool = False,
    check: Callable[[], None] | None = None,
) -> Sampled:
    """Sample responses to left-padded prompts (B, Lq); top-k 0 and top-p 1, as in the paper.

    With `mix_model`, the next token is drawn from (1 − α)·softmax(model) + α·softmax(mix_model):
    both models decode in lock step, each with its own KV cache, and both see the same tokens.
    `logits_out` (B, ≥ max_new_tokens, V): where to write the last model's raw logits at each step.
    `temperature=0` decodes greedily. A sequence ends at its first EOS, which is kept as a target.
    `sync_ranks`: stop only when every rank is done, for models whose forward is collective (ZeRO-3);
    the ranks agree every `sync_every` tokens, so a rank may decode up to `sync_every` − 1 columns of
    padding after its last row ended. `forced_ids` (B, ≥ steps): feed these tokens instead of drawing
    (replays an earlier call's decoding exactly, to get its logits back; `generator` may be None).
    `compile_steps`: decode with `compiled_forward` over transformers' StaticCache (attention over the
    whole capacity, prompts prefilled in one forward); not for collective forwards (ZeRO-3 hooks).
    `check` is called before every token; it may raise to abandon the batch (a cancelled job).
    """
    models = [model] if mix_model is None or mix_alpha == 0 else [model, mix_model]
    batch_size, prompt_len, device = *prompt_ids.shape, prompt_ids.device
    collective = sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    static = compile_steps and not collective
    capacity = prompt_len + max_new_tokens
    if static:  # a few fixed shapes, whatever the prompts' lengths, so that the compiled step is reused
        capacity = -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP

    # The attention mask and the token history live in preallocated buffers too (views grow).
    attention_mask = torch.zeros(batch_size, capacity, dtype=prompt_mask.dtype, device=device)
    attention_mask[:, :prompt_len] = prompt_mask
    sequence = torch.full((batch_size, capacity), pad_id, dtype=prompt_ids.dtype, device=device)
    sequence[:, :prompt_len] = prompt_ids
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    tokens = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)
    masks = torch.zeros(batch_size, max_new_tokens, dtype=torch.long, device=device)
    # Ranks agree to stop every `sync_every` tokens; alone, the batch stops at its last EOS.
    check_every = sync_every if collective else 1
    if static:
        caches = [StaticCache(config=m.config, max_cache_len=capacity) for m in models]
    else:
        caches = [
            Cache(layers=[_PreallocatedLayer(batch_size, capacity) for _ in range(_decoder_layers(m))]) for m in models
        ]
    steps = 0
    step_ids = None  # the token each step after the prefill feeds: the one the step before sampled
    with prepacked_linears([] if static else models, batch_size):  # packed weights would be baked into the graph
        for t in range(max_new_tokens):
            if check is not None:
                check()
            length = prompt_len + t
            step_logits = []
            for i, m in enumerate(models):
                if t == 0:
                    raw = _prefill(
                        m, prompt_ids, prompt_mask, positions, caches[i], grouped=not collective and not static
                    )
                elif static:  # a copy: the next replay of a CUDA graph overwrites its output
                    raw = _step(compiled_forward(m), step_ids, attention_mask, positions, caches[i]).clone()
                else:
                    raw = _step(m, step_ids, attention_mask[:, :length], positions, caches[i])
                step_logits.append(raw[:, :vocab_size])
            if logits_out is not None:
                logits_out[:, t] = step_logits[-1]
            if forced_ids is not None:
                next_ids = forced_ids[:, t]
            else:
                u = torch.rand(batch_size, 1, generator=generator, device=device)
                next_ids = next_tokens(
                    step_logits, u, mix_alpha, temperature, sequence[:, :length], no_repeat_ngram_size
                )
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            tokens[:, t], masks[:, t] = next_ids, (~finished).long()
            finished = finished | (next_ids == eos_id)
            steps = t + 1
            if steps % check_every == 0 and (_all_ranks_done if collective else bool)(bool(finished.all())):
                break
            step_ids = next_ids.unsqueeze(-1)
            sequence[:, length] = next_ids
            attention_mask[:, length] = masks[:, t]
            positions = positions[:, -1:] + 1
    batch = SequenceBatch(prompt_ids, prompt_mask, tokens[:, :steps], masks[:, :steps])
    return Sampled(batch, None if logits_out is None else logits_out[:, :steps])
