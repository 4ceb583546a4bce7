"""One matrix of GraLoRA configs x the generic LoRA operations of peft, checked against an independent dense model.

The reference replaces every targeted weight W by ``W + scaling * delta W`` (delta W from tests/reference.py, which is
differentiable, so gradients come from autograd through it) and runs the untouched base model through
``functional_call`` in float64. GraLoRA + DoRA (``use_dora=True``) is an axis of the matrix: its reference weight is
DoRA's ``diag(m / ||W + scaling * delta W||_row) (W + scaling * delta W)`` (tests/reference.py ``dora_weight``), with
magnitudes moved away from their init so that the rescaling is not the identity. Every adapter starts with random,
non-zero A *and* B (``init_lora_weights=False``) or is trained first, so no merge check can pass with a zero delta.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from tests.models import TinyConv1DNet, TinyMLP
from tests.reference import dense_delta, dora_weight


@dataclass(frozen=True)
class Case:
    k: int
    hybrid: bool
    rslora: bool = False
    bias: bool = False
    dtype: torch.dtype = torch.float32
    arch: str = "linear"  # "linear": nn.Linear (TinyMLP); "conv1d": transformers Conv1D (fan_in_fan_out)
    dora: bool = False  # GraLoRA + DoRA (peft refuses lora_bias with DoRA, so never both)

    @property
    def hybrid_r(self) -> int:
        return 2 if self.hybrid else 0

    @property
    def r(self) -> int:
        return 2 * self.k + self.hybrid_r  # sub-block rank 2

    @property
    def targets(self) -> list[str]:
        return ["lin0", "lin1"] if self.arch == "linear" else ["c0", "c1"]

    def config(self, **overrides) -> LoraConfig:
        kw = dict(
            r=self.r,
            lora_alpha=6,
            target_modules=self.targets,
            use_gralora=True,
            gralora_k=self.k,
            hybrid_r=self.hybrid_r,
            use_rslora=self.rslora,
            lora_bias=self.bias,
            fan_in_fan_out=self.arch == "conv1d",
            use_dora=self.dora,
            init_lora_weights=False,  # random B: merges and outputs cannot agree by accident
        )
        kw = {**kw, **overrides}
        if not kw["use_gralora"]:  # gralora_k / hybrid_r without use_gralora=True are refused
            kw.pop("gralora_k")
            kw.pop("hybrid_r")
        return LoraConfig(**kw)

    def base(self) -> nn.Module:
        """The same base weights on every call (fresh copies for reload tests)."""
        torch.manual_seed(1234)
        model = TinyMLP(self.dtype) if self.arch == "linear" else TinyConv1DNet(self.dtype)
        if self.k == 3:  # 16 and 8 are not divisible by 3: same classes, sizes 12 -> 24 -> 6
            if self.arch == "linear":
                model.lin0, model.lin1 = nn.Linear(12, 24, dtype=self.dtype), nn.Linear(24, 6, dtype=self.dtype)
            else:
                model.c0, model.c1 = Conv1D(24, 12).to(self.dtype), Conv1D(6, 24).to(self.dtype)
        return model

    @property
    def in_features(self) -> int:
        return 12 if self.k == 3 else 16

    def input(self, *lead: int) -> torch.Tensor:
        return torch.randn(*(lead or (2, 3)), self.in_features).to(self.dtype)

    @property
    def tol(self) -> dict:
        if self.dtype == torch.float32:
            return dict(atol=1e-5, rtol=1e-5)
        # bf16 base layers (unit roundoff 3.9e-3) round every activation and merged weight: a few ulps over 2 layers
        return dict(atol=2e-2, rtol=2e-2)

    def __str__(self) -> str:
        flags = [f"k{self.k}", "hyb" if self.hybrid else "pure", self.arch, str(self.dtype).removeprefix("torch.")]
        flags += ["rslora"] * self.rslora + ["bias"] * self.bias + ["dora"] * self.dora
        return "-".join(flags)


def _all_cases() -> list[Case]:
    # every k x hybrid x layer type in fp32; rslora and lora_bias rotate so that each (rslora, bias) pair meets both
    # hybrid settings on both layer types; bf16 on one case per k
    cases = [
        Case(k, hybrid, rslora=hybrid != (k > 2), bias=k % 2 == 0, arch=arch)
        for arch in ("linear", "conv1d")
        for k in (1, 2, 3, 4)
        for hybrid in (False, True)
    ]
    cases += [
        Case(k, hybrid=k % 2 == 1, bias=k > 2, dtype=torch.bfloat16, arch=arch)
        for k, arch in zip((1, 2, 3, 4), ("linear", "conv1d", "linear", "conv1d"), strict=True)
    ]
    # the DoRA axis: every k, both hybrid settings, both layer types and rslora, each at least once; one in bf16
    cases += [
        Case(k, hybrid, rslora=k == 4, arch=arch, dora=True)
        for k, hybrid, arch in (
            (1, False, "linear"),
            (2, False, "linear"),
            (2, True, "conv1d"),
            (3, True, "linear"),
            (4, False, "conv1d"),
        )
    ]
    cases.append(Case(2, True, dtype=torch.bfloat16, arch="linear", dora=True))
    return cases


ALL = _all_cases()
# the heavier operations run on a representative subset: hybrid and pure, every layer type, k = 1..4, bf16
SUBSET = [
    Case(2, True, rslora=True, bias=True),
    Case(4, False, arch="conv1d"),
    Case(3, True, bias=True, arch="conv1d"),
    Case(1, False),
    Case(2, True, dtype=torch.bfloat16, arch="conv1d"),
    Case(2, True, arch="conv1d", dora=True),
    Case(4, False, rslora=True, dora=True),
]
all_cases = pytest.mark.parametrize("case", ALL, ids=str)
subset = pytest.mark.parametrize("case", SUBSET, ids=str)


# ---------------------------------------------------------------------------------------------------------------------
# the independent dense reference
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Factors:
    """One layer's adapter, copied out of the peft model in float64."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    magnitude: torch.Tensor | None  # DoRA's m (out,), None without DoRA
    scaling: float
    k: int
    h: int
    fan_in_fan_out: bool

    def adapted(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the base weight with earlier adapters applied) with this adapter applied, in the base weight's
        layout (differentiable, float64). DoRA's row norm is taken with ``base_weight``, as forward and merge do."""

        def t(w: torch.Tensor) -> torch.Tensor:  # (out, in) <-> the base weight's layout
            return w.T if self.fan_in_fan_out else w

        delta = dense_delta(self.A, self.B, self.k, self.h) * self.scaling
        if self.magnitude is None:
            return t(t(weight) + delta)
        return t(dora_weight(t(weight), delta, self.magnitude, norm_weight=t(base_weight)))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def factors(model: nn.Module, adapter: str = "default", requires_grad: bool = False) -> dict[str, Factors]:
    out = {}
    for name, layer in lora_layers(model).items():
        lin_B = layer.lora_B[adapter]

        def copy_(t: torch.Tensor) -> torch.Tensor:
            return t.detach().double().clone().requires_grad_(requires_grad)

        gralora = getattr(layer, "gralora_k", {}).get(adapter)
        magnitude = layer.lora_magnitude_vector[adapter].weight if adapter in layer.lora_magnitude_vector else None
        out[name] = Factors(
            copy_(layer.lora_A[adapter].weight),
            copy_(lin_B.weight),
            None if lin_B.bias is None else copy_(lin_B.bias),
            None if magnitude is None else copy_(magnitude),
            layer.scaling[adapter],
            gralora or 1,  # a plain LoRA adapter is GraLoRA with k=1, h=0
            layer.hybrid_r[adapter] if gralora else 0,
            layer.fan_in_fan_out,
        )
    return out


def reference(base: nn.Module, x: torch.Tensor, *adapters: dict[str, Factors]):
    """float64 output of the untouched ``base`` with every adapter applied to its weights (and lora bias) in turn;
    differentiable in the factors, for the gradient checks."""
    params = {name: p.detach().double() for name, p in base.named_parameters()}
    for layer_factors in adapters:
        for name, f in layer_factors.items():
            base_weight = base.get_submodule(name).weight.detach().double()
            params[f"{name}.weight"] = f.adapted(params[f"{name}.weight"], base_weight)
            if f.bias is not None:
                params[f"{name}.bias"] = params[f"{name}.bias"] + f.bias * f.scaling
    return functional_call(base, params, (x.double(),))


def expected_weights(base: nn.Module, *adapters: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """Merged float64 weights (and biases) of every targeted layer."""
    out = {}
    for layer_factors in adapters:
        for name, f in layer_factors.items():
            layer = base.get_submodule(name)
            weight = layer.weight.detach().double()
            out[f"{name}.weight"] = f.adapted(out.get(f"{name}.weight", weight), weight).detach()
            if f.bias is not None:
                out[f"{name}.bias"] = out.get(f"{name}.bias", layer.bias.double()) + f.bias * f.scaling
    return out


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current base weights (and biases) of the LoRA layers, keyed like expected_weights."""
    out = {}
    for name, layer in lora_layers(model).items():
        base_layer = layer.get_base_layer()
        out[f"{name}.weight"] = base_layer.weight.detach().clone()
        out[f"{name}.bias"] = base_layer.bias.detach().clone()
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, case: Case) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **case.tol)


def assert_weights(actual: dict, expected: dict, case: Case) -> None:
    for key, value in expected.items():
        assert_close(actual[key], value, case)


def move_magnitudes(model: nn.Module, adapter: str = "default") -> None:
    """Scale DoRA's magnitudes by random factors in [0.5, 1.5]: at init ``m = ||W + s dW||`` and DoRA's rescaling is
    the identity, which a GraLoRA adapter without DoRA would pass too."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[adapter].weight
                m.mul_((0.5 + torch.rand(m.shape, generator=gen)).to(m.dtype))


def build(case: Case, **overrides) -> tuple[PeftModel, nn.Module]:
    """The peft model (DoRA magnitudes moved) and an untouched copy of its base model."""
    base = case.base()
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, case.config(**overrides)).eval()
    move_magnitudes(model)
    return model, untouched


# ---------------------------------------------------------------------------------------------------------------------
# operations on every config
# ---------------------------------------------------------------------------------------------------------------------


@all_cases
def test_forward_matches_dense_reference(case):
    model, base = build(case)
    x = case.input()
    with torch.no_grad():
        out = model(x)
    assert out.dtype == case.dtype
    assert_close(out, reference(base, x, factors(model)), case)


@all_cases
def test_backward_matches_autograd_through_dense_reference(case):
    model, base = build(case)
    model.train()
    x = case.input()
    probe = torch.randn(2, 3, 6 if case.k == 3 else 8)  # a loss that weights every output differently
    (model(x).float() * probe).sum().backward()
    ref = factors(model, requires_grad=True)
    (reference(base, x, ref) * probe.double()).sum().backward()
    # in bf16 the base layers' activations are bf16, so the gradients are only as exact as bf16 (case.tol)
    for name, layer in lora_layers(model).items():
        f = ref[name]
        assert_close(layer.lora_A["default"].weight.grad, f.A.grad, case)
        assert_close(layer.lora_B["default"].weight.grad, f.B.grad, case)
        if case.bias:
            assert_close(layer.lora_B["default"].bias.grad, f.bias.grad, case)
        if case.dora:
            assert_close(layer.lora_magnitude_vector["default"].weight.grad, f.magnitude.grad, case)
        assert layer.get_base_layer().weight.grad is None  # the base stays frozen


@all_cases
@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_unmerge_round_trip(case, safe_merge):
    model, base = build(case)
    x = case.input()
    original = base_weights(model)
    with torch.no_grad():
        unmerged_out = model(x)
        model.merge_adapter(safe_merge=safe_merge)
        assert_weights(base_weights(model), expected_weights(base, factors(model)), case)
        assert_close(model(x), unmerged_out, case)
        model.unmerge_adapter()
        assert_weights(base_weights(model), original, case)
        assert_close(model(x), unmerged_out, case)


@all_cases
def test_merge_and_unload(case):
    model, base = build(case)
    x = case.input()
    expected_out = reference(base, x, factors(model))
    expected = expected_weights(base, factors(model))
    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    assert_weights(dict(merged.named_parameters()), expected, case)
    with torch.no_grad():
        assert_close(merged(x), expected_out, case)


@all_cases
def test_disable_adapter_gives_the_base_model(case):
    model, base = build(case)
    x = case.input()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(x), base(x))
        assert_close(model(x), reference(base, x, factors(model)), case)


@all_cases
def test_trainable_parameters_equal_plain_lora(case):
    gralora, _ = build(case)
    plain = get_peft_model(case.base(), case.config(use_gralora=False))
    n_trainable = gralora.get_nb_trainable_parameters()
    assert n_trainable == plain.get_nb_trainable_parameters()
    # and it is LoRA's r (in + out) per layer: no hidden parameters next to lora_A / lora_B
    expected = sum(
        case.r * (layer.in_features + layer.out_features) + layer.out_features * (case.bias + case.dora)
        for layer in lora_layers(gralora).values()
    )
    assert n_trainable[0] == expected


# ---------------------------------------------------------------------------------------------------------------------
# heavier operations on the representative subset
# ---------------------------------------------------------------------------------------------------------------------


@subset
def test_safe_merge_refuses_nan_and_leaves_weights(case):
    model, _ = build(case)
    original = base_weights(model)
    layer = lora_layers(model)[case.targets[0]]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    for key, value in original.items():
        if key.startswith(case.targets[0]):
            assert torch.equal(base_weights(model)[key], value)


@subset
def test_save_load_reload_is_bit_exact(case, tmp_path):
    model, _ = build(case)
    x = case.input()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["use_gralora"], saved["gralora_k"], saved["hybrid_r"]) == (True, case.k, case.hybrid_r)
    loaded = PeftModel.from_pretrained(case.base(), tmp_path).eval()
    assert loaded.peft_config["default"].gralora_k == case.k
    assert loaded.peft_config["default"].use_dora == case.dora
    for name, layer in lora_layers(loaded).items():  # GraLoRA's variant (or GraLoRA + DoRA's), not peft's own
        assert type(layer.lora_variant["default"]) is type(lora_layers(model)[name].lora_variant["default"])
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@subset
def test_multiple_adapters_and_set_adapter(case):
    model, base = build(case)
    # a second GraLoRA adapter with another sub-block rank (3) and the hybrid setting flipped
    other_h = 2 - case.hybrid_r
    model.add_adapter("other", case.config(r=3 * case.k + other_h, hybrid_r=other_h))
    move_magnitudes(model, "other")
    x = case.input()
    ref_default, ref_other = factors(model, "default"), factors(model, "other")
    with torch.no_grad():
        model.set_adapter("other")
        assert_close(model(x), reference(base, x, ref_other), case)
        model.set_adapter("default")
        assert_close(model(x), reference(base, x, ref_default), case)
        model.base_model.set_adapter(["default", "other"])
        assert_close(model(x), reference(base, x, ref_default, ref_other), case)
        model.merge_adapter()
        assert_weights(base_weights(model), expected_weights(base, ref_default, ref_other), case)


@subset
def test_delete_adapter(case):
    model, base = build(case)
    model.add_adapter("other", case.config())
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    for layer in lora_layers(model).values():
        for attr in ("lora_A", "lora_B", "scaling", "gralora_k", "hybrid_r", "lora_magnitude_vector"):
            assert "other" not in getattr(layer, attr)
    assert not any("other" in key for key in model.state_dict())
    x = case.input()
    with torch.no_grad():
        assert_close(model(x), reference(base, x, factors(model)), case)


@subset
def test_mixed_batch_with_base_gralora_and_plain_lora(case):
    model, base = build(case)
    model.add_adapter("plain", case.config(use_gralora=False, r=3))
    names = ["default", "__base__", "plain", "default", "plain"]
    x = case.input(len(names), 3)
    if case.dora:  # as for plain DoRA: refused before anything runs
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            model(x, adapter_names=names)
        return
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    expected = {
        "default": reference(base, x, factors(model, "default")),
        "plain": reference(base, x, factors(model, "plain")),
        "__base__": reference(base, x),
    }
    for row, name in enumerate(names):
        assert_close(mixed[row], expected[name][row], case)


@subset
def test_merge_equals_forward_after_training(case):
    # the usual init (B = 0), then a few optimizer steps: the merge must use the trained, non-zero blocks
    model, base = build(case, init_lora_weights=True)
    x = case.input(8, 3)
    target = torch.randn(8, 3, 6 if case.k == 3 else 8).to(case.dtype)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = (model(x).float() - target.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    trained = factors(model)
    assert all(torch.count_nonzero(f.B) == f.B.numel() for f in trained.values())
    with torch.no_grad():
        out = model(x)
        assert_close(out, reference(base, x, trained), case)
        model.merge_adapter()
        assert_weights(base_weights(model), expected_weights(base, trained), case)
        assert_close(model(x), out, case)


@subset
def test_dropout_only_in_train_mode(case):
    model, base = build(case, lora_dropout=0.5)
    x = case.input()
    with torch.no_grad():
        model.train()
        first, second = model(x), model(x)
        model.eval()
        evaluated = model(x)
        assert torch.equal(evaluated, model(x))
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, evaluated)
    assert_close(evaluated, reference(base, x, factors(model)), case)


@pytest.mark.parametrize("case", [c for c in ALL if c.k == 1], ids=str)
def test_k1_is_plain_lora(case):
    gralora, _ = build(case)
    plain = get_peft_model(case.base(), case.config(use_gralora=False)).eval()
    plain.load_state_dict(gralora.state_dict())  # same keys: GraLoRA stores LoRA's own weights
    x = case.input()
    with torch.no_grad():
        assert_close(gralora(x), plain(x), case)
    for name, layer in lora_layers(gralora).items():
        assert_close(layer.get_delta_weight("default"), lora_layers(plain)[name].get_delta_weight("default"), case)


class _Scaled(nn.Module):
    """A parametrization: the weight seen by the layer is ``factor * original``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.factor * weight


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_parametrized_adapter_weight_is_read_through_the_parametrization(which, grad):
    """A weight under ``torch.nn.utils.parametrize`` is not a registered parameter (``_parameters``, which the forward
    reads directly for speed): the forward must use the parametrized value, not the original or nothing."""
    from torch.nn.utils import parametrize

    case = Case(2, hybrid=True, bias=True)
    model, base = build(case)
    x = case.input()
    with torch.no_grad():
        before = model(x)
    for layer in lora_layers(model).values():
        parametrize.register_parametrization(getattr(layer, which)["default"], "weight", _Scaled(-3.0))
    with torch.set_grad_enabled(grad):
        out = model(x)
    assert not torch.allclose(out, before)
    assert_close(out, reference(base, x, factors(model)), case)
