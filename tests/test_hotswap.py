"""Hotswap and rank padding of GraLoRA adapters (peft.utils.hotswap), checked against the dense block formula.

Every adapter has random B (``init_lora_weights=False``). A swap is right when each layer's factors, read with the
RESIDENT layout (its k / hybrid_r, which a swap never changes), have the INCOMING adapter's dense delta, and the model
computes what the incoming adapter loaded normally computes; a swap that cannot be exact must raise before any
weight changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

from peft_gralora.functional import gralora_fit_factors
from tests.models import TinyMLP, mlp_config
from tests.reference import dense_delta

X = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1))


config = mlp_config


# name -> the adapter's config; the tiny model's layers are 16 -> 24 and 24 -> 8
ADAPTERS = {
    "g-r4": config(),
    "g-r2": config(r=2, lora_alpha=3),
    "g-h2": config(r=6, hybrid_r=2),
    "g-k4-r8": config(r=8, gralora_k=4),
    "g-k1": config(r=2, gralora_k=1),
    "g-r8-k2-h2": config(r=8, hybrid_r=2),
    "plain-r2": config(use_gralora=False, r=2),
    "plain-r8": config(use_gralora=False, r=8, lora_alpha=5),
}


def _layout(cfg: LoraConfig) -> tuple[int, int]:
    """(k, hybrid_r) of an adapter as the dense reference reads it; plain LoRA is k=1, hybrid_r=0."""
    return (cfg.gralora_k, cfg.hybrid_r) if cfg.use_gralora else (1, 0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every adapter of ADAPTERS saved once on the same base; name -> (path, output, {layer: scaled delta})."""
    root = tmp_path_factory.mktemp("adapters")
    base = TinyMLP()
    out = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        model = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
        model.save_pretrained(root / name)
        k, h = _layout(cfg)
        deltas = {
            n: m.scaling["default"] * dense_delta(m.lora_A["default"].weight, m.lora_B["default"].weight, k, h)
            for n, m in model.named_modules()
            if isinstance(m, LoraLayer)
        }
        with torch.no_grad():
            out[name] = (root / name, model(X), deltas)
    return base, out


def _resident(base, saved_adapters, name: str) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), saved_adapters[name][0])


def _resident_deltas(model: PeftModel) -> dict[str, torch.Tensor]:
    """Each layer's scaled dense delta, read with the resident layer's own layout."""
    deltas = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            gralora = "default" in m.lora_variant
            k, h = (m.gralora_k["default"], m.hybrid_r["default"]) if gralora else (1, 0)
            scaling = float(m.scaling["default"])
            deltas[n] = scaling * dense_delta(m.lora_A["default"].weight, m.lora_B["default"].weight, k, h)
    return deltas


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# (resident, target_rank of prepare_model_for_compiled_hotswap or None, incoming) -> exact, or the refusal's words
SWAPS = [
    ("g-r4", None, "g-r4", None),
    ("g-r4", None, "g-r2", None),  # smaller: zero sub-ranks in every block, not zero rows at the end
    ("g-r4", None, "plain-r2", None),  # plain LoRA into the grid (no hybrid room): sub-block rank 2
    ("g-r4", None, "g-k1", None),
    ("g-r4", None, "g-h2", "cannot be placed exactly"),  # hybrid 2 + sub-block rank 2 > room 2
    ("g-r4", None, "g-k4-r8", "cannot be placed exactly"),  # k=4 coarsened into k=2 needs sub-block rank 8 > 2
    ("g-r4", 16, "g-k4-r8", None),  # padded to s=8: room for the coarsened grid
    ("g-r4", None, "plain-r8", "cannot be placed exactly"),
    ("g-r4", 8, "g-h2", None),  # padded to s=4: sub-block rank 2 + hybrid 2 overflowing into the grid
    ("g-r4", 8, "g-r8-k2-h2", "cannot be placed exactly"),  # needs s=3 and h=2 but the default padding is s=4, h=0
    ("g-r4", 8, "plain-r8", "cannot be placed exactly"),  # plain rank 8 costs sub-block rank 8 > 4
    ("g-h2", 8, "g-r8-k2-h2", None),  # padded to s=3, h=2
    ("g-h2", None, "plain-r2", None),  # into the hybrid branch
    ("g-k4-r8", None, "g-r4", None),  # k=2 refines into k=4 blocks, sub-block rank 2
    ("g-k4-r8", None, "g-h2", "cannot be placed exactly"),
    ("plain-r8", None, "g-r4", None),  # GraLoRA into plain LoRA through its exact export (rank 8)
    ("plain-r8", None, "g-r2", None),
    ("plain-r8", None, "g-h2", "cannot be placed exactly"),  # export rank 2 * 4 + 2 = 10 > 8
    ("plain-r2", 8, "g-r4", None),
    ("plain-r8", None, "plain-r2", None),  # plain into plain: peft's own path
]


@pytest.mark.parametrize("resident, target_rank, incoming, refused", SWAPS)
def test_hotswap_is_exact_or_refused(saved, resident, target_rank, incoming, refused):
    base, adapters = saved
    model = _resident(base, adapters, resident)
    if target_rank:
        prepare_model_for_compiled_hotswap(model, target_rank=target_rank, config=model.peft_config)
    # padding keeps the resident adapter's function
    for name, delta in _resident_deltas(model).items():
        torch.testing.assert_close(delta, adapters[resident][2][name], atol=1e-6, rtol=1e-6)
    if refused:
        before = _weights(model)
        with pytest.raises(ValueError, match=rf"{refused}.*Nothing was swapped"):
            hotswap_adapter(model, adapters[incoming][0], adapter_name="default", torch_device="cpu")
        after = _weights(model)
        assert all(torch.equal(before[n], after[n]) for n in before)
        return
    hotswap_adapter(model, adapters[incoming][0], adapter_name="default", torch_device="cpu")
    for name, delta in _resident_deltas(model).items():
        torch.testing.assert_close(delta, adapters[incoming][2][name], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(X), adapters[incoming][1], atol=1e-5, rtol=1e-5)


def test_hotswap_from_state_dict_with_a_wrong_config_is_refused(saved):
    # the low-level entry point diffusers calls: a GraLoRA state dict with a config that does not describe it
    base, adapters = saved
    model = _resident(base, adapters, "g-r4")
    state = {n: p.detach().clone() * 2 for n, p in model.named_parameters() if "lora_" in n}
    before = _weights(model)
    with pytest.raises(ValueError, match=r"does not match its config.*gralora_k=3"):
        hotswap_adapter_from_state_dict(model, state, "default", config(gralora_k=3, r=6, target_modules=["lin0"]))
    assert all(torch.equal(before[n], p) for n, p in _weights(model).items())


def test_hotswap_with_dora_and_another_layout_is_refused(saved, tmp_path):
    base, adapters = saved
    model = get_peft_model(copy.deepcopy(base), config(use_dora=True))
    before = _weights(model)
    incoming = get_peft_model(copy.deepcopy(base), config(r=2, use_dora=True))
    incoming.save_pretrained(tmp_path / "dora-r2")
    with pytest.raises(ValueError, match=r"DoRA.*not supported"):
        hotswap_adapter(model, tmp_path / "dora-r2", adapter_name="default", torch_device="cpu")
    assert all(torch.equal(before[n], p) for n, p in _weights(model).items())


def test_prepare_pads_inside_the_layout_and_updates_hybrid_r(saved):
    base, adapters = saved
    model = _resident(base, adapters, "g-h2")  # r=6: s=2, h=2
    prepare_model_for_compiled_hotswap(model, target_rank=9, config=model.peft_config)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.hybrid_r) == (9, 3)  # s' = (9 - 2) // 2 = 3, h' = 9 - 6 = 3
    layer = model.base_model.model.lin0
    assert layer.lora_A["default"].weight.shape == (9, 16) and layer.hybrid_r["default"] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(X), adapters["g-h2"][1], atol=1e-5, rtol=1e-5)


def test_prepare_target_hybrid_r(saved):
    base, adapters = saved
    model = _resident(base, adapters, "g-r4")
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config, target_hybrid_r=2)
    assert model.peft_config["default"].hybrid_r == 2
    hotswap_adapter(model, adapters["g-r8-k2-h2"][0], adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(X), adapters["g-r8-k2-h2"][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_rank=2), r"target rank 2.*rank 4"),
        (dict(target_rank=8, target_hybrid_r=1), r"target_rank=8 with hybrid_r=1.*divisible by 2"),
        (dict(target_rank=6, target_hybrid_r=4), r"target_rank=6 with hybrid_r=4.*at least 4"),
    ],
)
def test_prepare_refuses_before_any_change(saved, kwargs, match):
    base, adapters = saved
    model = _resident(base, adapters, "g-r4")
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        prepare_model_for_compiled_hotswap(model, config=model.peft_config, **kwargs)
    assert model.peft_config["default"].r == 4 and model.base_model.model.lin0.hybrid_r["default"] == 0
    assert all(torch.equal(before[n], p) for n, p in _weights(model).items())
    assert isinstance(model.base_model.model.lin0.scaling["default"], float)  # not even the scalings converted


@pytest.mark.parametrize(
    "resident, swaps",
    [("g-r4", ["g-r2", "plain-r2", "g-h2", "g-k1", "g-r4"]), ("plain-r2", ["g-r4", "plain-r8", "g-r2"])],
    ids=["gralora-resident", "plain-resident"],
)
def test_compiled_hotswap_does_not_recompile(saved, resident, swaps):
    import torch._dynamo

    base, adapters = saved
    model = _resident(base, adapters, resident)
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), adapters[resident][1], atol=1e-5, rtol=1e-5)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for incoming in swaps:
                hotswap_adapter(compiled, adapters[incoming][0], adapter_name="default", torch_device="cpu")
                with torch.no_grad():
                    torch.testing.assert_close(compiled(X), adapters[incoming][1], atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# functional.gralora_fit_factors: any layout into any other, against the dense formula
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(0, 3)),
    dst=st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 12), st.integers(0, 12)),
    seed=st.integers(0, 2**16),
)
def test_fit_factors_is_exact_or_refused(src, dst, seed):
    (k, s, h), (tk, ts, th) = src, dst
    gen = torch.Generator().manual_seed(seed)
    weight_A = torch.randn(k * s + h, 8, generator=gen, dtype=torch.float64)
    weight_B = torch.randn(12, k * s + h, generator=gen, dtype=torch.float64)
    expected = dense_delta(weight_A, weight_B, k, h)
    try:
        new_A, new_B = gralora_fit_factors(weight_A, weight_B, k, h, tk, th, tk * ts + th)
    except ValueError as exc:
        assert "does not fit" in str(exc)
        # refused only when neither the refined / coarsened grid nor the plain export fits
        grid_need = s if tk % k == 0 else (k // tk) ** 2 * s if k % tk == 0 else None  # refined / coarsened
        embed_fits = k > 1 and grid_need is not None and grid_need + max(0, h - th) <= ts
        export_rank = (s if k == 1 else k * k * s) + h  # k=1 is plain already; else the export has rank k * g
        export_tried = k == 1 or k != tk
        assert not embed_fits and not (export_tried and max(0, export_rank - th) <= ts)
        return
    assert new_A.shape == (tk * ts + th, 8) and new_B.shape == (12, tk * ts + th)
    torch.testing.assert_close(dense_delta(new_A, new_B, tk, th), expected, rtol=1e-10, atol=1e-10)
