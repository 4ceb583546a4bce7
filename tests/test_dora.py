"""GraLoRA + DoRA (use_dora=True, use_gralora=True) on nn.Linear and transformers Conv1D.

The reference is DoRA's formula written densely here, with the GraLoRA update built block by block:
W' = diag(m / ||W + s dW||_row) (W + s dW), the norm a constant for the gradient.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant

from peft_gralora.dora import GraLoraDoraLinearVariant

from .models import TinyConv1DNet, TinyMLP

MODELS = {"linear": (TinyMLP, ["lin0", "lin1"], False), "conv1d": (TinyConv1DNet, ["c0", "c1"], True)}
# (r, k, hybrid_r): pure GraLoRA at k 2 and 4, and a hybrid branch
SHAPES = [(4, 2, 0), (8, 4, 0), (6, 2, 2)]
CASES = [pytest.param(m, *s, id=f"{m}-r{s[0]}-k{s[1]}-h{s[2]}") for m in MODELS for s in SHAPES]


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


def _dense_delta(A: torch.Tensor, B: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """Differentiable block formula: block (i, j) of dW is B_ij A_ij, plus B_h A_h."""
    r, in_f = A.shape
    out_f = B.shape[0]
    g = r - h
    s, n, m = g // k, in_f // k, out_f // k
    rows = []
    for i in range(k):
        rows.append(
            torch.cat(
                [
                    B[i * m : (i + 1) * m, j * s : (j + 1) * s] @ A[i * s : (i + 1) * s, j * n : (j + 1) * n]
                    for j in range(k)
                ],
                dim=1,
            )
        )
    delta = torch.cat(rows, dim=0)
    return delta + B[:, g:] @ A[g:] if h else delta


def _reference_layer(layer, x: torch.Tensor, fifo: bool, k: int, h: int) -> torch.Tensor:
    """DoRA-over-GraLoRA output of one adapted layer for x (..., in), differentiable in A, B and m."""
    base = layer.get_base_layer()
    weight = base.weight.detach().T if fifo else base.weight.detach()  # (out, in)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    adapted = weight + layer.scaling["default"] * _dense_delta(A, B, k, h)
    norm = torch.linalg.norm(adapted, dim=1).detach()
    return x @ ((m / norm)[:, None] * adapted).T + base.bias.detach()


def _reference_model(peft_model, targets, x, fifo, k, h):
    inner = peft_model.base_model.model
    hidden = torch.relu(_reference_layer(getattr(inner, targets[0]), x, fifo, k, h))
    return _reference_layer(getattr(inner, targets[1]), hidden, fifo, k, h)


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
        delta = _dense_delta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2, 0)
        expected = torch.linalg.norm(weight + layer.scaling["default"] * delta, dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected, rtol=1e-6, atol=1e-6)
    # init == identity map: the adapted layer still computes W + s dW (DoRA's magnitude at init)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = peft_model(x)
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model", "r", "k", "h"), CASES)
def test_forward_and_gradients_match_dense_reference(model, r, k, h):
    peft_model, targets, fifo = _make(model, r, k, h)
    x = torch.randn(2, 5, 16)
    out = peft_model(x)
    ref = _reference_model(peft_model, targets, x, fifo, k, h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("model", "r", "k", "h"), CASES)
@pytest.mark.parametrize("safe_merge", [False, True])
def test_training_then_merge_equals_forward(model, r, k, h, safe_merge):
    peft_model, targets, _ = _make(model, r, k, h)
    x = torch.randn(6, 16)
    target = torch.randn(6, 8)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    magnitude = peft_model.base_model.model.get_submodule(targets[0]).lora_magnitude_vector["default"].weight
    before = magnitude.detach().clone()
    losses = []
    for _ in range(5):
        loss = (peft_model(x) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(magnitude.detach(), before)
    peft_model.eval()
    base_weights = {
        n: getattr(peft_model.base_model.model, n).get_base_layer().weight.detach().clone() for n in targets
    }
    with torch.no_grad():
        expected = peft_model(x)
        peft_model.merge_adapter(safe_merge=safe_merge)
        torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-5)
        peft_model.unmerge_adapter()
        for n in targets:
            torch.testing.assert_close(
                getattr(peft_model.base_model.model, n).get_base_layer().weight, base_weights[n], rtol=1e-5, atol=1e-6
            )
        torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
def test_save_and_load_round_trip(model, tmp_path):
    peft_model, targets, fifo = _make(model, 6, 2, 2)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = MODELS[model][0]()  # same seed -> same base weights as _make
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].use_dora and loaded.peft_config["default"].use_gralora
    layer = getattr(loaded.base_model.model, targets[0])
    assert type(layer.lora_variant["default"]) is GraLoraDoraLinearVariant
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_mixed_batch_is_refused_like_dora():
    peft_model, _, _ = _make("linear", 4, 2, 0)
    peft_model.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        peft_model(torch.randn(2, 16), adapter_names=["default", "__base__"])


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
    delta = layer.scaling["default"] * _dense_delta(A, B, 2, 2)
    norm = torch.linalg.norm(weight + delta, dim=1).detach()
    scale = layer.lora_magnitude_vector["default"].weight / norm
    dropped = layer.lora_dropout["default"](x)
    ref = x @ weight.T + base.bias + (scale - 1) * (dropped @ weight.T) + scale * (dropped @ delta.T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
