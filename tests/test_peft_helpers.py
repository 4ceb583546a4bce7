"""peft's other public helpers that read or write LoRA factors: each is right for GraLoRA or refuses it clearly.

The README's "peft helpers" table points at these tests. Adapters have random B (``init_lora_weights=False``).
"""

from __future__ import annotations

import copy
import importlib.util

import peft
import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import loftq_utils

from tests.models import TinyMLP, mlp_config
from tests.reference import dense_delta

X = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1))


def config(**kwargs) -> LoraConfig:
    return mlp_config(**{"hybrid_r": 2, **kwargs})


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    after = lora_weights(model)
    return before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def _layers(module) -> list:
    """The tuner layers stacked on one module (a mixed model nests them), outermost first."""
    found = []
    while hasattr(module, "base_layer"):
        found.append(module)
        module = module.base_layer
    return found


def reference_output(model, adapters: dict[str, tuple[int, int]], extra=None) -> torch.Tensor:
    """TinyMLP in float64 with each layer's GraLoRA deltas (adapter -> (k, hybrid_r)) and ``extra(layer)`` added."""
    h = X.double()
    inner = model.base_model.model
    for idx, name in enumerate(["lin0", "lin1"]):
        stack = _layers(getattr(inner, name))
        layer = next(m for m in stack if isinstance(m, LoraLayer))
        weight = layer.get_base_layer().weight.detach().double()
        for adapter, (k, hybrid_r) in adapters.items():
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            weight = weight + layer.scaling[adapter] * dense_delta(a, b, k, hybrid_r)
        if extra is not None:
            weight = weight + sum(extra(m) for m in stack)
        h = h @ weight.T + layer.get_base_layer().bias.detach().double()
        if idx == 0:
            h = torch.relu(h)
    return h


# ---------------------------------------------------------------------------------------------------------------------
# refused for GraLoRA, before anything changes; plain LoRA still reaches peft's function
# ---------------------------------------------------------------------------------------------------------------------


def _loftq(model, via):
    return via(model)


def _intruders(model):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    return reduce_intruder_dimension(model, logging_sink=None)


def _lorafa(model, via):
    return via(model, r=4, lora_alpha=8, lr=1e-3)


NEEDS_RIEMANNIAN = pytest.mark.skipif(
    importlib.util.find_spec("peft.optimizers.riemannian") is None, reason="this peft has no Riemannian optimizer"
)


def _riemannian(model, via):
    return via(model, torch.optim.AdamW, lr=1e-3)


REFUSED = [
    pytest.param(lambda m: _loftq(m, peft.replace_lora_weights_loftq), "replace_lora_weights_loftq", id="loftq-peft"),
    pytest.param(
        lambda m: _loftq(m, loftq_utils.replace_lora_weights_loftq), "replace_lora_weights_loftq", id="loftq-module"
    ),
    pytest.param(_intruders, "reduce_intruder_dimension", id="intruders"),
    pytest.param(
        lambda m: _lorafa(m, peft.optimizers.create_lorafa_optimizer), "create_lorafa_optimizer", id="lorafa"
    ),
    pytest.param(
        lambda m: _riemannian(m, peft.optimizers.create_riemannian_optimizer),
        "create_riemannian_optimizer",
        id="riemannian",
        marks=NEEDS_RIEMANNIAN,
    ),
]


@pytest.mark.parametrize("call, name", REFUSED)
def test_helper_refuses_gralora_before_any_change(call, name):
    model = get_peft_model(TinyMLP(), config())
    before = lora_weights(model)
    with pytest.raises(ValueError, match=rf"{name} does not support GraLoRA adapters.*silently wrong.*export"):
        call(model)
    assert unchanged(model, before)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("call, name", [p for p in REFUSED if p.id in ("intruders", "lorafa", "riemannian")])
def test_helper_still_serves_plain_lora(call, name):
    model = get_peft_model(TinyMLP(), config(use_gralora=False, hybrid_r=0))
    call(model)  # peft's own function runs (no GraLoRA refusal)


def test_loftq_plain_lora_reaches_peft():
    # peft's LoftQ replacement needs a bitsandbytes 4-bit model from a safetensors file; a TinyMLP without model_path
    # gets peft's own first refusal, which only peft's function (called with our arguments) raises
    model = get_peft_model(TinyMLP(), config(use_gralora=False, hybrid_r=0))
    with pytest.raises(ValueError, match=r"does not appear to be a transformers model.*must pass the model_path"):
        peft.replace_lora_weights_loftq(model)


OPTIMIZERS = [
    # peft's LoRA-FA step fails on any model with a frozen second adapter (plain LoRA too: it pairs lora_B with the
    # last lora_A it saw and reads a None gradient), so only its construction is checked
    pytest.param(lambda m: _lorafa(m, peft.optimizers.create_lorafa_optimizer), False, id="lorafa"),
    pytest.param(lambda m: _riemannian(m, peft.optimizers.create_riemannian_optimizer), True, id="riemannian",
                 marks=NEEDS_RIEMANNIAN),
]  # fmt: skip


@pytest.mark.parametrize(("create", "step"), OPTIMIZERS)
def test_optimizers_ignore_frozen_gralora_adapters(create, step):
    # a frozen GraLoRA adapter next to a trained plain LoRA one: the optimizer is built, over the trainable plain
    # adapter's parameters only (a frozen GraLoRA factor is never preconditioned nor stepped)
    model = get_peft_model(TinyMLP(), config(), adapter_name="gralora")
    model.add_adapter("plain", config(use_gralora=False, hybrid_r=0))
    model.base_model.set_adapter("plain")  # trains "plain" only
    assert not model.base_model.model.lin0.lora_A["gralora"].weight.requires_grad
    optimizer = create(model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # every trained parameter is in the optimizer's groups; whatever else is there (LoRA-FA lists all) is frozen
    assert trained and trained <= {n for n, p in model.named_parameters() if id(p) in in_groups}
    assert all(".plain." in n for n in trained) and any("lora_B.plain" in n for n in trained)
    if not step:
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(X).square().sum().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trained, moved  # the GraLoRA factors are neither preconditioned nor stepped


def test_arrow_refuses_gralora_experts(tmp_path):
    from peft import ArrowConfig, create_arrow_model

    for i in range(2):
        get_peft_model(TinyMLP(), config()).save_pretrained(tmp_path / f"expert{i}")
    base = TinyMLP()
    before = {n: p.clone() for n, p in base.named_parameters()}
    paths = [str(tmp_path / f"expert{i}") for i in range(2)]
    with pytest.raises(ValueError, match=r"create_arrow_model does not support GraLoRA.*expert0.*expert1"):
        create_arrow_model(base, paths, ArrowConfig(top_k=1))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # nothing was loaded into the base model
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())


def test_weight_conversion_on_save_refused(tmp_path):
    # save_pretrained(path_initial_model_for_weight_conversion=...) stacks trained and initial factors (rank 2r)
    model = get_peft_model(TinyMLP(), config())
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].weight.add_(1.0)
    before = lora_weights(model)
    with pytest.raises(ValueError, match=r"path_initial_model_for_weight_conversion.*GraLoRA.*misplaces"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert unchanged(model, before) and list(model.peft_config) == ["default"]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# right for GraLoRA as peft has them
# ---------------------------------------------------------------------------------------------------------------------


def test_mixed_model_gralora_with_loha():
    model = get_peft_model(TinyMLP(), config(), mixed=True)
    model.add_adapter("loha", LoHaConfig(r=2, target_modules=["lin0"], init_weights=False))
    model.set_adapter(["default", "loha"])

    def loha_delta(layer):
        return layer.get_delta_weight("loha").detach().double() if "loha" in getattr(layer, "hada_w1_a", {}) else 0

    with torch.no_grad():
        out = model(X).double()
    expected = reference_output(model, {"default": (2, 2)}, extra=loha_delta)
    assert (expected - reference_output(model, {})).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast):
    # peft casts adapter weights of a half-precision model to float32 (or keeps them), elementwise: blocks unchanged
    model = get_peft_model(TinyMLP(dtype=torch.bfloat16), config(), autocast_adapter_dtype=autocast)
    dtype = torch.float32 if autocast else torch.bfloat16
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        out = model(X.bfloat16()).double()
    expected = reference_output(model, {"default": (2, 2)})
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)  # bfloat16 base
    # a layout mistake is far larger than bfloat16's error
    wrong = reference_output(model, {"default": (1, 0)})
    assert (wrong - expected).abs().max() > 0.3


def test_cast_mixed_precision_params():
    model = get_peft_model(TinyMLP(), config())
    reference = reference_output(model, {"default": (2, 2)})
    peft.cast_mixed_precision_params(model, torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert model.base_model.model.lin0.get_base_layer().weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(X.bfloat16()).double()
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.05)


def test_loraplus_groups_gralora_factors_by_name():
    # LoRA+ only gives lora_B a larger learning rate; every GraLoRA block B_ij A_ij is a LoRA pair, so that holds
    model = get_peft_model(TinyMLP(), config())
    opt = peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    by_lr = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_lr[id(p)] = group["lr"]
    layer = model.base_model.model.lin0
    assert by_lr[id(layer.lora_A["default"].weight)] == pytest.approx(1e-3)
    assert by_lr[id(layer.lora_B["default"].weight)] == pytest.approx(16e-3)


def test_state_dict_helpers_keep_the_layout():
    # get_peft_model_state_dict / set_peft_model_state_dict move whole tensors: a round trip is bit-exact
    base = TinyMLP()
    model = get_peft_model(copy.deepcopy(base), config())
    state = peft.get_peft_model_state_dict(model)
    other = get_peft_model(copy.deepcopy(base), config())
    peft.set_peft_model_state_dict(other, state)
    with torch.no_grad():
        assert torch.equal(other(X), model(X))


def test_rescale_adapter_scale():
    # peft.helpers.rescale_adapter_scale multiplies each layer's scaling: the whole GraLoRA delta scales with it
    from peft.helpers import rescale_adapter_scale

    model = get_peft_model(TinyMLP(), config())
    half = reference_output(model, {}, extra=lambda layer: 0.5 * layer.scaling["default"] * _delta(layer))
    with rescale_adapter_scale(model, 0.5), torch.no_grad():
        torch.testing.assert_close(model(X).double(), half, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(X).double(), reference_output(model, {"default": (2, 2)}), atol=1e-5, rtol=1e-5
        )


def _delta(layer) -> torch.Tensor:
    if not isinstance(layer, LoraLayer):
        return 0
    return dense_delta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2, 2)
