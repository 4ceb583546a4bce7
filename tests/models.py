"""Tiny models built from code or configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class TinyMLP(nn.Module):
    """Two nn.Linear layers with biases: lin0 (16 -> 24), lin1 (24 -> 8); feature sizes divisible by 1, 2, 4, 8."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 24, dtype=dtype)
        self.lin1 = nn.Linear(24, 8, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class TinyConv1DNet(nn.Module):
    """transformers Conv1D layers (GPT-2 style, weight stored (in, out)): c0 (16 -> 24), c1 (24 -> 8)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.c0 = Conv1D(24, 16)
        self.c1 = Conv1D(8, 24)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(torch.relu(self.c0(x)))


def mlp_config(**kwargs):
    """A GraLoRA ``LoraConfig`` for :class:`TinyMLP` (r=4, alpha=8, k=2, random non-zero init); ``kwargs`` override."""
    from peft import LoraConfig

    base = dict(
        r=4,
        lora_alpha=8,
        target_modules=["lin0", "lin1"],
        use_gralora=True,
        gralora_k=2,
        hybrid_r=0,
        init_lora_weights=False,
    )
    base.update(kwargs)
    return LoraConfig(**base)


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with hidden size 32 (every projection divisible by k in 1..4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D projections, n_embd 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    ).eval()
