"""Against upstream peft's own GraLoRA tuner (``peft.GraloraConfig``) holding the same weights.

Mapping (docs/design.md, "The math"): upstream r = our r - hybrid_r, upstream alpha = our lora_alpha, upstream
hybrid_r = ours; the weights move by the pure reshape of ``functional.upstream_to_variant`` and gradients move back
with its inverse.
Upstream uses random B (``init_weights=False``), so every block contributes.
"""

from __future__ import annotations

import pytest
import torch
from peft import GraloraConfig, LoraConfig, get_peft_model
from peft.tuners.gralora.layer import GraloraLayer
from peft.tuners.lora import LoraLayer

from peft_gralora.functional import upstream_to_variant, variant_to_upstream
from tests.models import tiny_gpt2, tiny_llama

ALPHA = 12
TOL = dict(atol=1e-5, rtol=1e-5)
MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True),  # Conv1D: fan_in_fan_out
}
# (our total r, k, hybrid_r)
COMBOS = [(4, 2, 0), (8, 4, 0), (6, 2, 2), (9, 4, 1), (3, 1, 1)]
matrix = pytest.mark.parametrize(
    "arch, r, k, h", [(arch, *combo) for arch in MODELS for combo in COMBOS], ids=lambda v: str(v)
)


def _layers(model, cls) -> dict:
    # both wrappers name a layer by its path inside the base model
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, cls)}


def _hybrid(layer, side: str) -> torch.Tensor | None:
    general = getattr(layer, f"gralora_{side}_general")["default"]
    return getattr(general, "weight", None)  # nn.Identity when hybrid_r == 0


def build_pair(arch: str, r: int, k: int, h: int):
    """Upstream's GraLoRA model and ours on identical base weights, ours loaded from upstream's weights."""
    factory, targets, conv = MODELS[arch]
    common = dict(target_modules=targets, fan_in_fan_out=conv)
    theirs = get_peft_model(
        factory(),
        GraloraConfig(r=r - h, alpha=ALPHA, hybrid_r=h, gralora_k=k, init_weights=False, **common),
    )
    ours = get_peft_model(
        factory(),
        LoraConfig(r=r, lora_alpha=ALPHA, use_gralora=True, gralora_k=k, hybrid_r=h, **common),
    )
    their_layers, our_layers = _layers(theirs, GraloraLayer), _layers(ours, LoraLayer)
    assert their_layers.keys() == our_layers.keys() and their_layers
    with torch.no_grad():
        for name, t in their_layers.items():
            weight_A, weight_B = upstream_to_variant(
                t.gralora_A["default"], t.gralora_B["default"], _hybrid(t, "A"), _hybrid(t, "B")
            )
            our_layers[name].lora_A["default"].weight.copy_(weight_A)
            our_layers[name].lora_B["default"].weight.copy_(weight_B)
            assert our_layers[name].scaling["default"] == pytest.approx(t.scaling["default"])
    return theirs.eval(), ours.eval()  # eval: GPT-2's own dropout off, gradients still flow


def _inputs() -> torch.Tensor:
    return torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@matrix
def test_same_outputs_and_parameter_count(arch, r, k, h):
    theirs, ours = build_pair(arch, r, k, h)
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)
    # the LoRA parameter budget at our r is upstream's at r - h plus the hybrid branch
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@matrix
def test_same_gradients(arch, r, k, h):
    theirs, ours = build_pair(arch, r, k, h)
    ids = _inputs()
    probe = torch.randn(2, 7, 128)  # weights every logit differently
    for model in (theirs, ours):
        (model(ids).logits * probe).sum().backward()
    our_layers = _layers(ours, LoraLayer)
    for name, t in _layers(theirs, GraloraLayer).items():
        o = our_layers[name]
        mapped = variant_to_upstream(o.lora_A["default"].weight.grad, o.lora_B["default"].weight.grad, k, h)
        hybrid = (_hybrid(t, "A").grad, _hybrid(t, "B").grad) if h else (None, None)
        expected = (t.gralora_A["default"].grad, t.gralora_B["default"].grad, *hybrid)
        for got, want in zip(mapped, expected, strict=True):
            if want is None:
                assert got is None
                continue
            # these gradients reach ~30, where fp32 rounding alone is ~1e-5: compare relative to the largest entry
            scale = want.abs().max()
            assert scale > 0  # a gradient that is zero everywhere would prove nothing
            torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=0)


@matrix
def test_same_merged_weights(arch, r, k, h):
    theirs, ours = build_pair(arch, r, k, h)
    ids = _inputs()
    with torch.no_grad():
        expected_logits = theirs(ids).logits
    for name, t in _layers(theirs, GraloraLayer).items():
        # the dense delta, layer by layer, in the base weight's layout
        torch.testing.assert_close(
            _layers(ours, LoraLayer)[name].get_delta_weight("default"), t.get_delta_weight("default"), **TOL
        )
    their_merged, our_merged = theirs.merge_and_unload(), ours.merge_and_unload()
    their_params = dict(their_merged.named_parameters())
    for key, value in our_merged.named_parameters():
        torch.testing.assert_close(value, their_params[key], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(our_merged(ids).logits, expected_logits, **TOL)
