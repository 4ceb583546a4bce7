"""GraLoRA adapters through peft's generic operations, checked against the dense block formula (tests/reference.py).

Every adapter here has random B (``init_lora_weights=False``), so a delta that ignored the GraLoRA layout (plain
``B @ A``) or ignored the adapter altogether would fail.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, convert_to_lora, get_peft_model, save_as_lora
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from peft.utils.other import ModulesToSaveWrapper

from tests.models import TinyConv1DNet, TinyMLP, mlp_config, tiny_llama
from tests.reference import dense_delta

X = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1))


config = mlp_config


def lora_layers(model) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def ref_delta(layer: LoraLayer, adapter: str, k: int, hybrid_r: int, scaling: float) -> torch.Tensor:
    """scaling * delta W, (out, in) float64, from the layer's raw factors and the k / hybrid_r the test chose."""
    return scaling * dense_delta(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, k, hybrid_r)


def delta_out_in(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """peft's get_delta_weight in (out, in) orientation (Conv1D stores its weight transposed)."""
    delta = layer.get_delta_weight(adapter).detach().double()
    return delta.T if layer.fan_in_fan_out else delta


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """A Linear / Conv1D weight in (out, in) orientation, float64."""
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w


def two_layer_reference(base: torch.nn.Module, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Forward of TinyMLP / TinyConv1DNet in float64 with ``deltas[name]`` (out, in) added to each layer's weight."""
    h = x.double()
    names = [n for n, _ in base.named_children()]
    for idx, name in enumerate(names):
        layer = getattr(base, name)
        h = h @ (dense_weight(layer) + deltas.get(name, 0)).T + layer.bias.detach().double()
        if idx < len(names) - 1:
            h = torch.relu(h)
    return h


# ---------------------------------------------------------------------------------------------------------------------
# get_delta_weight and inference mode
# ---------------------------------------------------------------------------------------------------------------------

DELTA_CASES = [
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(gralora_k=1), id="mlp-k1"),
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(gralora_k=2, hybrid_r=2), id="mlp-k2-hybrid"),
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(r=8, gralora_k=4, use_rslora=True), id="mlp-k4-rslora"),
    pytest.param(TinyConv1DNet, ["c0", "c1"], dict(gralora_k=2, fan_in_fan_out=True), id="conv1d-k2"),
    pytest.param(
        TinyConv1DNet, ["c0", "c1"], dict(r=6, gralora_k=4, hybrid_r=2, fan_in_fan_out=True), id="conv1d-k4h"
    ),
]


def _scaling(cfg: LoraConfig) -> float:
    return cfg.lora_alpha / (cfg.r**0.5 if cfg.use_rslora else cfg.r)


@pytest.mark.parametrize("model_cls, targets, kwargs", DELTA_CASES)
def test_get_delta_weight_is_the_dense_block_formula(model_cls, targets, kwargs):
    cfg = config(target_modules=targets, **kwargs)
    model = get_peft_model(model_cls(), cfg)
    layers = lora_layers(model)
    assert len(layers) == 2
    for layer in layers.values():
        expected = ref_delta(layer, "default", cfg.gralora_k, cfg.hybrid_r, _scaling(cfg))
        torch.testing.assert_close(delta_out_in(layer, "default"), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_cls, targets, kwargs", DELTA_CASES[1:4])
def test_inference_mode(model_cls, targets, kwargs, tmp_path):
    base = model_cls()
    cfg = config(target_modules=targets, inference_mode=True, **kwargs)
    model = get_peft_model(copy.deepcopy(base), cfg)
    assert not any(p.requires_grad for p in model.parameters())
    layers = lora_layers(model)
    deltas = {
        n.rsplit(".", 1)[-1]: ref_delta(m, "default", cfg.gralora_k, cfg.hybrid_r, _scaling(cfg))
        for n, m in layers.items()
    }
    with torch.no_grad():
        out = model(X)
    torch.testing.assert_close(out.double(), two_layer_reference(base, deltas, X), atol=1e-5, rtol=1e-5)
    # a reloaded adapter is in inference mode by default, and computes the same
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].inference_mode is True
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), out, atol=0, rtol=0)


def test_merge_and_unload_tiny_llama():
    torch.manual_seed(3)
    cfg = config(r=8, lora_alpha=16, target_modules="all-linear", gralora_k=2, hybrid_r=2, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(seed=0), cfg)
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    expected_weight = q_proj.base_layer.weight.detach().double() + ref_delta(q_proj, "default", 2, 2, 2.0)
    ids = torch.arange(24).reshape(2, 12) % 128
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    torch.testing.assert_close(
        merged.model.layers[1].self_attn.q_proj.weight.double(), expected_weight, atol=1e-6, rtol=1e-5
    )
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(merged_logits, unmerged, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# add_weighted_adapter
# ---------------------------------------------------------------------------------------------------------------------

WEIGHTS = [0.7, -0.4]
ADAPTERS = ("first", "second")
# the partner of adapter "first" (r=4, k=2, h=0, alpha=8): name -> (LoraConfig overrides, k, hybrid_r, is GraLoRA)
PARTNERS = {
    "same": (dict(lora_alpha=4), 2, 0, True),
    "k4": (dict(gralora_k=4), 4, 0, True),
    "hybrid": (dict(hybrid_r=2), 2, 2, True),
    "plain": (dict(use_gralora=False), None, None, False),
}


def _two_adapters(model_cls, targets, partner: str):
    overrides, _, _, _ = PARTNERS[partner]
    fan = dict(fan_in_fan_out=model_cls is TinyConv1DNet)
    model = get_peft_model(model_cls(), config(target_modules=targets, **fan), adapter_name="first")
    model.add_adapter("second", config(target_modules=targets, **fan, **overrides))
    return model


def _adapter_delta(layer: LoraLayer, adapter: str, partner: str) -> torch.Tensor:
    """Independent (out, in) delta of adapter "first" or "second"; plain LoRA is B @ A."""
    scaling = layer.scaling[adapter]
    if adapter == "first":
        return ref_delta(layer, "first", 2, 0, scaling)
    _, k, hybrid_r, is_gralora = PARTNERS[partner]
    if is_gralora:
        return ref_delta(layer, "second", k, hybrid_r, scaling)
    return scaling * (layer.lora_B["second"].weight.double() @ layer.lora_A["second"].weight.double()).detach()


SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


# peft 0.20 multiplies each SVD-family weight by the adapter's scaling although get_delta_weight already applied it
# (fixed in peft 0.21): on 0.20 the reference reproduces that, so the test checks peft's own behaviour there
SVD_SCALES_TWICE = Version(peft.__version__) < Version("0.21")


def _expected_combination(
    combination: str, deltas: list[torch.Tensor], density: float, scalings: list[float]
) -> torch.Tensor:
    used = [w * s for w, s in zip(WEIGHTS, scalings, strict=True)] if SVD_SCALES_TWICE else WEIGHTS
    weights = torch.tensor(used, dtype=torch.float64)
    if combination in ("svd", "dare_linear_svd"):  # dare at density 1 keeps everything, unscaled
        return sum(w * d for w, d in zip(used, deltas, strict=True))
    if combination == "magnitude_prune_svd":
        return merge_utils.magnitude_prune(deltas, weights, density)
    return merge_utils.ties(deltas, weights, density, "total")  # ties_svd; dare_ties at density 1 is ties


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("partner", sorted(PARTNERS))
@pytest.mark.parametrize("combination", SVD_TYPES)
@pytest.mark.parametrize("model_cls, target", [(TinyMLP, "lin0"), (TinyConv1DNet, "c0")], ids=["mlp", "conv1d"])
def test_svd_family_gives_plain_lora_of_the_weighted_delta(model_cls, target, combination, partner):
    model = _two_adapters(model_cls, [target], partner)
    # dare drops entries at random unless density is 1; the others prune deterministically by magnitude
    density = 1.0 if combination.startswith("dare") else 0.5
    # svd_rank 16 = min(in, out) of the 16 -> 24 layer: the SVD is exact, so any difference is the delta's fault
    model.add_weighted_adapter(
        ["first", "second"], WEIGHTS, "mix", combination_type=combination, svd_rank=16, density=density
    )
    assert model.peft_config["mix"].use_gralora is False
    layer = lora_layers(model)[f"base_model.model.{target}"]
    assert "mix" not in layer.lora_variant  # plain LoRA: its factors hold a dense SVD, not GraLoRA blocks
    deltas = [_adapter_delta(layer, name, partner) for name in ADAPTERS]
    expected = _expected_combination(combination, deltas, density, [layer.scaling[name] for name in ADAPTERS])
    got = layer.lora_B["mix"].weight.double() @ layer.lora_A["mix"].weight.double() * layer.scaling["mix"]
    # (out, in) for Conv1D too: peft transposes a fan_in_fan_out delta before its SVD
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-4)
    # the source adapters keep their own configs
    assert model.peft_config["first"].use_gralora is True


LINEAR_TYPES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("combination", LINEAR_TYPES)
def test_linear_family_same_layout_stays_gralora(combination):
    base = TinyMLP()
    model = get_peft_model(copy.deepcopy(base), config(hybrid_r=2), adapter_name="first")
    model.add_adapter("second", config(hybrid_r=2, lora_alpha=4))
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type=combination, density=1.0)
    cfg = model.peft_config["mix"]
    assert (cfg.use_gralora, cfg.gralora_k, cfg.hybrid_r, cfg.r) == (True, 2, 2, 4)
    for layer in lora_layers(model).values():
        assert type(layer.lora_variant["mix"]).__name__ == "GraLoraLinearVariant"
        A, B = layer.lora_A["mix"].weight.double(), layer.lora_B["mix"].weight.double()
        if combination in ("linear", "dare_linear", "magnitude_prune"):
            # at density 1 these are weighted sums: A side carries the sign, both sides sqrt(|w * scaling|)
            factors = [(w * layer.scaling[n]) for w, n in zip(WEIGHTS, ADAPTERS, strict=True)]
            exp_A = sum(
                (1 if f >= 0 else -1) * abs(f) ** 0.5 * layer.lora_A[n].weight.double()
                for f, n in zip(factors, ADAPTERS, strict=True)
            )
            exp_B = sum(
                abs(f) ** 0.5 * layer.lora_B[n].weight.double() for f, n in zip(factors, ADAPTERS, strict=True)
            )
            torch.testing.assert_close(A, exp_A.detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(B, exp_B.detach(), atol=1e-6, rtol=1e-5)
        # whatever the combination made of the factors, they are read as GraLoRA blocks
        expected = ref_delta(layer, "mix", 2, 2, layer.scaling["mix"])
        torch.testing.assert_close(delta_out_in(layer, "mix"), expected, atol=1e-6, rtol=1e-5)
    model.set_adapter("mix")
    with torch.no_grad():
        out = model(X)
    deltas = {n.rsplit(".", 1)[-1]: ref_delta(m, "mix", 2, 2, m.scaling["mix"]) for n, m in lora_layers(model).items()}
    torch.testing.assert_close(out.double(), two_layer_reference(base, deltas, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["svd", "linear"])
def test_single_adapter_is_scaled_exactly(combination):
    # peft turns every single-adapter combination into "linear": the result must stay GraLoRA and scale the delta
    model = get_peft_model(TinyMLP(), config(hybrid_r=2), adapter_name="first")
    model.add_weighted_adapter(["first"], [0.5], "scaled", combination_type=combination)
    assert model.peft_config["scaled"].use_gralora is True
    for layer in lora_layers(model).values():
        torch.testing.assert_close(
            delta_out_in(layer, "scaled"),
            0.5 * ref_delta(layer, "first", 2, 2, layer.scaling["first"]),
            atol=1e-6,
            rtol=1e-5,
        )


@pytest.mark.parametrize("partner", ["k4", "hybrid", "plain"])
@pytest.mark.parametrize("combination", LINEAR_TYPES)
def test_linear_family_mixed_layouts_refused(combination, partner):
    model = _two_adapters(TinyMLP, ["lin0", "lin1"], partner)
    with pytest.raises(ValueError, match=rf"combination_type='{combination}'.*same layout.*combination_type='svd'"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type=combination, density=1.0)
    assert "mix" not in model.peft_config
    assert not any("mix" in layer.lora_A for layer in lora_layers(model).values())


# partners for cat: the shared PARTNERS plus rank_pattern, rslora on the first adapter's side, and k = 1
CAT_PARTNERS = {
    **PARTNERS,
    "hybrid-rslora": (dict(r=8, hybrid_r=2, use_rslora=True), 2, 2, True),
    "rank-pattern": (dict(r=8, rank_pattern={"lin1": 4}), 2, 0, True),
    "k1": (dict(gralora_k=1, hybrid_r=1), 1, 1, True),
    "plain-rslora": (dict(use_gralora=False, r=6, use_rslora=True), None, None, False),
}
# partner -> (use_gralora, gralora_k, r, hybrid_r) of the result on TinyMLP with "first" = (r=4, k=2, h=0)
CAT_LAYOUTS = {
    "same": (True, 2, 8, 0),
    "k4": (True, 2, 12, 0),  # k=4 coarsened into k=2 blocks: sub-block rank 2 * 2 * 1 = 4 (its export would be 16)
    "hybrid": (True, 2, 8, 2),
    "plain": (True, 2, 8, 4),
    "hybrid-rslora": (True, 2, 12, 2),
    "rank-pattern": (True, 2, 12, 0),
    "k1": (True, 2, 8, 4),  # k=1 is plain LoRA of rank 3 plus its hybrid rank 1
    "plain-rslora": (True, 2, 10, 6),
}


def _cat_partner_delta(layer: LoraLayer, partner: str) -> torch.Tensor:
    _, k, hybrid_r, is_gralora = CAT_PARTNERS[partner]
    scaling = layer.scaling["second"]
    if is_gralora:
        return ref_delta(layer, "second", k, hybrid_r, scaling)
    return scaling * (layer.lora_B["second"].weight.double() @ layer.lora_A["second"].weight.double()).detach()


def _cat_model(partner: str, first: dict | None = None, second_targets=("lin0", "lin1")):
    model = get_peft_model(TinyMLP(), config(**(first or {})), adapter_name="first")
    model.add_adapter("second", config(target_modules=list(second_targets), **CAT_PARTNERS[partner][0]))
    return model


@pytest.mark.parametrize("partner", sorted(CAT_PARTNERS))
def test_cat_is_the_weighted_sum_of_the_deltas(partner):
    model = _cat_model(partner)
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type="cat")
    cfg = model.peft_config["mix"]
    assert (cfg.use_gralora, cfg.gralora_k, cfg.r, cfg.hybrid_r) == CAT_LAYOUTS[partner]
    for layer in lora_layers(model).values():
        expected = WEIGHTS[0] * ref_delta(layer, "first", 2, 0, layer.scaling["first"])
        expected = expected + WEIGHTS[1] * _cat_partner_delta(layer, partner)
        # the independent reference reads the new factors with the new config's layout
        got = ref_delta(layer, "mix", cfg.gralora_k, cfg.hybrid_r, layer.scaling["mix"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # and the layer itself computes it (forward and delta)
        torch.testing.assert_close(delta_out_in(layer, "mix"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("second_targets", [("lin0", "lin1"), ("lin1",)], ids=["same-targets", "other-targets"])
@pytest.mark.parametrize("partner", ["same", "k4", "hybrid", "plain", "hybrid-rslora", "rank-pattern"])
@pytest.mark.parametrize(
    "first",
    [{}, dict(use_rslora=True, hybrid_r=2), dict(gralora_k=4, r=8)],
    ids=["first-plain-scaling", "first-rslora", "first-k4"],  # first-k4: k=2 partners are refined into k=4 blocks
)
def test_cat_with_unit_weights_is_both_adapters_active(partner, first, second_targets):
    # peft's own property of cat: weights [1, 1] compute what both adapters active at once compute
    model = _cat_model(partner, first, second_targets)
    model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "mix", combination_type="cat")
    model.base_model.set_adapter(["first", "second"])
    with torch.no_grad():
        both = model(X)
    model.set_adapter("mix")
    with torch.no_grad():
        mixed = model(X)
    model.base_model.set_adapter(["first"])
    with torch.no_grad():
        only_first = model(X)
    assert (both - only_first).abs().max() > 1e-2  # the second adapter matters
    torch.testing.assert_close(mixed, both, atol=1e-5, rtol=1e-5)


def test_cat_three_adapters_and_bias():
    model = get_peft_model(TinyMLP(), config(lora_bias=True), adapter_name="first")
    model.add_adapter("second", config(hybrid_r=2))
    model.add_adapter("third", config(use_gralora=False, r=2))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["first"].bias)
    weights = [0.5, -1.5, 2.0]
    model.add_weighted_adapter(["first", "second", "third"], weights, "mix", combination_type="cat")
    cfg = model.peft_config["mix"]
    assert (cfg.use_gralora, cfg.r, cfg.hybrid_r, cfg.lora_bias) == (True, 10, 4, True)
    model.set_adapter("mix")
    with torch.no_grad():
        out = model(X).double()
    # the reference: every layer's weighted delta, plus the weighted bias of "first"
    h = X.double()
    for idx, name in enumerate(["lin0", "lin1"]):
        layer = lora_layers(model)[f"base_model.model.{name}"]
        delta = weights[0] * ref_delta(layer, "first", 2, 0, layer.scaling["first"])
        delta = delta + weights[1] * ref_delta(layer, "second", 2, 2, layer.scaling["second"])
        plain = layer.lora_B["third"].weight.double() @ layer.lora_A["third"].weight.double()
        delta = delta + weights[2] * layer.scaling["third"] * plain.detach()
        bias = weights[0] * layer.scaling["first"] * layer.lora_B["first"].bias.detach().double()
        w = layer.get_base_layer().weight.detach().double() + delta
        h = h @ w.T + layer.get_base_layer().bias.detach().double() + bias
        if idx == 0:
            h = torch.relu(h)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)


def test_cat_gives_plain_lora_when_k_does_not_divide_a_layer():
    # "first" (k=8) adapts lin0 (16 -> 24) only; "second" (plain LoRA) also adapts lin1 (24 -> 12), where no k=8
    # GraLoRA adapter fits (12 % 8 != 0): the result is plain LoRA, every part in its exact plain form
    from collections import OrderedDict

    net = torch.nn.Sequential(
        OrderedDict(lin0=torch.nn.Linear(16, 24), relu=torch.nn.ReLU(), lin1=torch.nn.Linear(24, 12))
    )
    model = get_peft_model(net, config(target_modules=["lin0"], r=8, gralora_k=8), adapter_name="first")
    model.add_adapter("second", config(use_gralora=False))
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type="cat")
    cfg = model.peft_config["mix"]
    assert cfg.use_gralora is False and cfg.r == 8 * 8 + 4
    for name, layer in lora_layers(model).items():
        assert "mix" not in layer.lora_variant
        expected = (
            WEIGHTS[1]
            * layer.scaling["second"]
            * (layer.lora_B["second"].weight.double() @ layer.lora_A["second"].weight.double()).detach()
        )
        if name.endswith("lin0"):
            expected = expected + WEIGHTS[0] * ref_delta(layer, "first", 8, 0, layer.scaling["first"])
        got = layer.lora_B["mix"].weight.double() @ layer.lora_A["mix"].weight.double() * layer.scaling["mix"]
        torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)


def test_cat_refuses_dora_before_anything_changes():
    model = get_peft_model(TinyMLP(), config(), adapter_name="first")
    model.add_adapter("second", config(use_dora=True))
    with pytest.raises(ValueError, match=r"combination_type='cat'.*GraLoraDoraLinearVariant.*not a sum"):
        model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type="cat")
    assert "mix" not in model.peft_config
    assert not any("mix" in layer.lora_A for layer in lora_layers(model).values())


# ---------------------------------------------------------------------------------------------------------------------
# convert_to_lora / save_as_lora
# ---------------------------------------------------------------------------------------------------------------------

CONVERT_CASES = [
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(gralora_k=1), id="mlp-k1"),
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(gralora_k=2), id="mlp-k2"),
    pytest.param(TinyMLP, ["lin0", "lin1"], dict(gralora_k=2, hybrid_r=2), id="mlp-k2-hybrid"),
    pytest.param(TinyConv1DNet, ["c0", "c1"], dict(gralora_k=2, fan_in_fan_out=True), id="conv1d-k2"),
]


@pytest.mark.filterwarnings("ignore:Converting a PEFT adapter to LoRA")
# peft's converted config does not carry fan_in_fan_out; peft sets it back for Conv1D with this warning
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("model_cls, targets, kwargs", CONVERT_CASES)
def test_convert_to_lora_at_full_rank(model_cls, targets, kwargs, tmp_path):
    base = model_cls()
    cfg = config(target_modules=targets, **kwargs)
    model = get_peft_model(copy.deepcopy(base), cfg)
    # 8 covers the GraLoRA rank k (r - h) + h <= 8 of every case, and is min(in, out) of the 24 -> 8 layer
    lora_cfg, state = convert_to_lora(model, rank=8)
    assert lora_cfg.use_gralora is False
    for name, layer in lora_layers(model).items():
        got = state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()
        expected = ref_delta(layer, "default", cfg.gralora_k, cfg.hybrid_r, _scaling(cfg))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    save_as_lora(tmp_path, model, rank=8)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].use_gralora is False
    assert all(layer.lora_variant == {} for layer in lora_layers(loaded).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Converting a PEFT adapter to LoRA")
def test_convert_to_lora_at_rank_r_is_not_enough():
    # the GraLoRA delta has rank k * r = 8 here: a plain LoRA of rank r = 4 cannot hold it
    model = get_peft_model(TinyMLP(), config(target_modules=["lin0"]))
    layer = lora_layers(model)["base_model.model.lin0"]
    _, state = convert_to_lora(model, rank=4)
    got = state["base_model.model.lin0.lora_B.weight"] @ state["base_model.model.lin0.lora_A.weight"]
    expected = ref_delta(layer, "default", 2, 0, 2.0)
    assert torch.linalg.matrix_rank(expected).item() == 8
    assert (got.double() - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# modules_to_save, layers_to_transform, low_cpu_mem_usage
# ---------------------------------------------------------------------------------------------------------------------


def test_modules_to_save(tmp_path):
    base = TinyMLP()
    cfg = config(target_modules=["lin0"], modules_to_save=["lin1"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    wrapper = model.base_model.model.lin1
    assert isinstance(wrapper, ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.lin0.lora_A.default.weight",
        "base_model.model.lin0.lora_B.default.weight",
        "base_model.model.lin1.modules_to_save.default.weight",
        "base_model.model.lin1.modules_to_save.default.bias",
    }
    with torch.no_grad():  # a trained copy of lin1 differs from the base one
        wrapper.modules_to_save["default"].weight.add_(0.5)
        out = model(X)
    layer = model.base_model.model.lin0
    saved_lin1 = wrapper.modules_to_save["default"]
    deltas = {"lin0": ref_delta(layer, "default", 2, 0, 2.0), "lin1": (saved_lin1.weight - base.lin1.weight).double()}
    torch.testing.assert_close(out.double(), two_layer_reference(base, deltas, X), atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), out, atol=0, rtol=0)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(X), base(X), atol=0, rtol=0)


def test_layers_to_transform():
    cfg = config(
        r=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        gralora_k=4,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_llama(seed=0), cfg)
    layers = lora_layers(model)
    assert sorted(layers) == [
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    ]
    for layer in layers.values():
        assert type(layer.lora_variant["default"]).__name__ == "GraLoraLinearVariant"
        torch.testing.assert_close(delta_out_in(layer, "default"), ref_delta(layer, "default", 4, 0, 1.0))
    # the adapted v_proj computes base + delta on its own input
    v_proj = layers["base_model.model.model.layers.1.self_attn.v_proj"]
    h = torch.randn(3, 32)
    expected = h.double() @ (v_proj.base_layer.weight.double() + ref_delta(v_proj, "default", 4, 0, 1.0)).T
    with torch.no_grad():
        torch.testing.assert_close(v_proj(h).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("via", ["from_pretrained", "load_adapter"])
def test_low_cpu_mem_usage_load(via, tmp_path):
    base = TinyMLP()
    cfg = config(gralora_k=2, hybrid_r=2)
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(X)
    if via == "from_pretrained":
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
        name = "default"
    else:
        # load next to a different adapter, then switch to it
        loaded = get_peft_model(copy.deepcopy(base), config(gralora_k=4))
        loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
        loaded.set_adapter("other")
        name = "other"
    assert not any(p.is_meta for p in loaded.parameters())
    for layer_name, layer in lora_layers(loaded).items():
        source = lora_layers(model)[layer_name]
        assert torch.equal(layer.lora_A[name].weight, source.lora_A["default"].weight)
        assert torch.equal(layer.lora_B[name].weight, source.lora_B["default"].weight)
        assert (layer.gralora_k[name], layer.hybrid_r[name]) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=0, rtol=0)
