"""A stage's surroundings in miniature, for tests that run one training step without DeepSpeed: tiny Llama
models of a 48-token vocabulary and the part of a DeepSpeedEngine that a step uses."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

V, EOS, PAD = 48, 2, 0


class Engine:
    """The part of a DeepSpeedEngine that a training step uses; `step` keeps the gradients instead of
    applying them, so that two steps can be compared."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.grads = module, []

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.grads.append([p.grad.clone() for p in self.module.parameters()])
        self.module.zero_grad()


def tiny(seed: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the tiny init's near-uniform ones
        model.lm_head.weight.mul_(20)
    return model
