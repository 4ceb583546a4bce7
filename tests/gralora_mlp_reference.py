"""A GraLoRA TinyMLP with non-zero adapter weights, and its output through the dense reference (tests/reference.py).

Shared by the activation, save-guard, model-card and layout-metadata tests: what the model should compute is written
out densely here, never through peft_gralora's own functions.
"""

from __future__ import annotations

import torch

from tests.models import TinyMLP, mlp_config
from tests.reference import dense_delta


def gralora_mlp(k: int = 2, hybrid_r: int = 0, r: int = 4, seed: int = 0):
    """``get_peft_model(TinyMLP(), GraLoRA config)`` with every lora_A / lora_B filled with non-zero random values."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TinyMLP(), mlp_config(r=r, gralora_k=k, hybrid_r=hybrid_r)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    return model


def reference_output(base: TinyMLP, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], x, k, hybrid_r, scaling):
    """TinyMLP's output with a GraLoRA delta ``scaling * dense_delta(A, B)`` added to each of ``lin0`` / ``lin1``."""
    out = x.double()
    for name in ("lin0", "lin1"):
        layer = getattr(base, name)
        weight = layer.weight.detach().double() + scaling * dense_delta(*factors[name], k, hybrid_r)
        out = out @ weight.T + layer.bias.detach().double()
        if name == "lin0":
            out = torch.relu(out)
    return out


def factors_of(peft_model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"lin0": (lora_A.weight, lora_B.weight), "lin1": ...}`` of a TinyMLP peft model, detached copies."""
    inner = peft_model.base_model.model
    return {
        name: (
            getattr(inner, name).lora_A[adapter].weight.detach().clone(),
            getattr(inner, name).lora_B[adapter].weight.detach().clone(),
        )
        for name in ("lin0", "lin1")
    }


def base_of(peft_model) -> TinyMLP:
    """A fresh TinyMLP holding the base weights of ``peft_model`` (unmerged)."""
    inner = peft_model.base_model.model
    base = TinyMLP()
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            layer = getattr(inner, name).get_base_layer()
            getattr(base, name).weight.copy_(layer.weight)
            getattr(base, name).bias.copy_(layer.bias)
    return base
