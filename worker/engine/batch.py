"""The one tensor layout every method uses: prompts left-padded, responses right-padded.

    prompt_ids    (B, Lq)  pad … pad p1 … pn        prompt_mask    0 … 0 1 … 1
    response_ids  (B, Lr)  y1 … ym EOS pad … pad    response_mask  1 … 1 1 0 … 0

Response columns line up across the batch, so one forward yields aligned (B, Lr, V) logits for gold
responses (SFT, KD) and sampled ones (MiniLLM) alike. `response_mask` is explicit rather than
derived from `ids != pad`: pad and EOS are often the same token, and the first EOS must stay a
trained target or the student never learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SequenceBatch:
    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, index: Tensor | slice) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(batches: list[SequenceBatch], pad_id: int) -> SequenceBatch:
        lq = max(b.prompt_ids.shape[1] for b in batches)
        lr = max(b.response_ids.shape[1] for b in batches)

        def pad(t: Tensor, width: int, value: int, left: bool) -> Tensor:
            extra = width - t.shape[1]
            return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

        return SequenceBatch(
            torch.cat([pad(b.prompt_ids, lq, pad_id, True) for b in batches]),
            torch.cat([pad(b.prompt_mask, lq, 0, True) for b in batches]),
            torch.cat([pad(b.response_ids, lr, pad_id, False) for b in batches]),
            torch.cat([pad(b.response_mask, lr, 0, False) for b in batches]),
        )


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """(prompt ids, response ids) pairs -> SequenceBatch."""
    lq = max(len(p) for p, _ in examples)
    lr = max(max(len(r) for _, r in examples), 1)
    batch = SequenceBatch(
        torch.full((len(examples), lq), pad_id, dtype=torch.long),
        torch.zeros((len(examples), lq), dtype=torch.long),
        torch.full((len(examples), lr), pad_id, dtype=torch.long),
        torch.zeros((len(examples), lr), dtype=torch.long),
    )
    for i, (prompt, response) in enumerate(examples):
        batch.prompt_ids[i, lq - len(prompt) :] = torch.tensor(prompt)
        batch.prompt_mask[i, lq - len(prompt) :] = 1
        batch.response_ids[i, : len(response)] = torch.tensor(response, dtype=torch.long)
        batch.response_mask[i, : len(response)] = 1
    return batch


def response_logits(model: torch.nn.Module, batch: SequenceBatch, vocab_size: int) -> Tensor:
    """Logits predicting each response token, from one forward over prompt + response: (B, Lr, V).

    The last response token is not fed (nothing is predicted from it), and only the Lr positions
    that predict response tokens are projected onto the vocabulary: the LM head over prompt
    positions would be the largest matmul of the step, for nothing. Logits are cut to the
    tokenizer's `vocab_size` so padded embedding rows never take probability mass.
    """
    lr = batch.response_ids.shape[1]
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids[:, :-1]], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask[:, :-1]], dim=1)
    # Explicit positions: prompts are left-padded, and absolute-position models (GPT-2) would
    # otherwise place the first real token at the pad count.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=lr)
    return out.logits[..., :vocab_size]
