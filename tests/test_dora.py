"""GraLoRA + DoRA (use_dora=True, use_gralora=True): what is DoRA-specific.

The generic operations (forward and gradients, merge / unmerge, merge_and_unload, save / load, several adapters, the
mixed-batch refusal, training then merging) run on GraLoRA + DoRA as an axis of tests/test_variant_matrix.py. Here:
the variant is resolved, the magnitude's init, and DoRA's dropout path. References from tests/reference.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant

from peft_gralora.dora import GraLoraDoraLinearVariant

from .models import TinyConv1DNet, TinyMLP
from .reference import dense_delta, dora_weight

MODELS = {"linear": (TinyMLP, ["lin0", "lin1"], False), "conv1d": (TinyConv1DNet, ["c0", "c1"], True)}


def _make(model: str, r: int, k: int, h: int, seed: int = 0):
    cls, targets, fifo = MODELS[model]
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        use_gralora=True,
        use_dora=True,
        gralora_k=k,
        hybrid_r=h,
        fan_in_fan_out=fifo,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(cls(), cfg)
    # move the magnitudes away from their init so that m / ||W + s dW|| != 1 everywhere
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return peft_model, targets, fifo


def test_resolves_gralora_dora_and_leaves_plain_dora_alone():
    peft_model, targets, _ = _make("linear", 4, 2, 0)
    layer = getattr(peft_model.base_model.model, targets[0])
    assert type(layer.lora_variant["default"]) is GraLoraDoraLinearVariant
    plain = get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=targets, use_dora=True))
    assert type(plain.base_model.model.lin0.lora_variant["default"]) is DoraLinearVariant


@pytest.mark.parametrize("model", list(MODELS))
def test_magnitude_init_is_row_norm_of_adapted_weight(model):
    cls, targets, fifo = MODELS[model]
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4, target_modules=targets, use_gralora=True, use_dora=True, fan_in_fan_out=fifo, init_lora_weights=False
    )
    peft_model = get_peft_model(cls(), cfg)
    for name in targets:
        layer = getattr(peft_model.base_model.model, name)
        weight = layer.get_base_layer().weight.T if fifo else layer.get_base_layer().weight
        delta = dense_delta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2, 0)
        expected = torch.linalg.norm(weight.double() + layer.scaling["default"] * delta, dim=1)
        magnitude = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(magnitude.double(), expected, rtol=1e-6, atol=1e-6)
    # init == identity map: the adapted layer still computes W + s dW (DoRA's magnitude at init)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = peft_model(x)
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(x), y, rtol=1e-5, atol=1e-5)


class _FixedMask(torch.nn.Module):
    """A deterministic stand-in for nn.Dropout: multiplies the input by a fixed 0 / 2 mask."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.arange(width) % 3 != 0).float() * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize("model", list(MODELS))
def test_dropout_path_matches_dora_semantics(model):
    """With dropout in training, DoRA applies the rescaling to the dropped input only:
    y = W x + b + (m/n - 1) W d(x) + (m/n) s dW d(x)."""
    peft_model, targets, fifo = _make(model, 6, 2, 2)
    layer = getattr(peft_model.base_model.model, targets[0])
    layer.lora_dropout["default"] = _FixedMask(16)
    peft_model.train()
    x = torch.randn(3, 16)
    out = layer(x)
    base = layer.get_base_layer()
    weight = base.weight.detach().T if fifo else base.weight.detach()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = layer.scaling["default"] * dense_delta(A, B, 2, 2)
    adapted = dora_weight(weight, delta, layer.lora_magnitude_vector["default"].weight)  # (m/n) (W + s dW)
    dropped = layer.lora_dropout["default"](x).double()
    weight = weight.double()
    # (m/n - 1) W d(x) + (m/n) s dW d(x) = ((m/n) (W + s dW) - W) d(x)
    ref = x.double() @ weight.T + base.bias.double() + dropped @ (adapted - weight).T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
