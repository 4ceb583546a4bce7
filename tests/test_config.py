"""GraLoRA's three LoraConfig fields: validation (config time and layer time) and their round trip through disk.

Every bad input is checked against its error message, and every layer-time error must leave the model as it was.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import config as lora_config
from peft.tuners.lora.config import ArrowConfig, BdLoraConfig, MontecloraConfig, VeloraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_gralora.config import GRALORA_FIELDS, UNSUPPORTED_WITH_GRALORA
from tests.models import TinyMLP


def gralora_config(**kwargs) -> LoraConfig:
    base = dict(r=8, lora_alpha=16, target_modules=["lin0", "lin1"], use_gralora=True, gralora_k=2, hybrid_r=0)
    base.update(kwargs)
    return LoraConfig(**base)


# ---------------------------------------------------------------------------------------------------------------------
# config time
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_and_help_texts():
    cfg = LoraConfig(r=8)
    assert (cfg.use_gralora, cfg.gralora_k, cfg.hybrid_r) == (False, 2, 0)
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    for name in GRALORA_FIELDS:
        assert len(fields[name].metadata["help"]) > 40, name
    # peft's variant resolver keys on is_lora_variant: only the switch may carry it
    assert fields["use_gralora"].metadata.get("is_lora_variant") is True
    assert not fields["gralora_k"].metadata.get("is_lora_variant")
    assert not fields["hybrid_r"].metadata.get("is_lora_variant")


@pytest.mark.parametrize("kwargs", [dict(gralora_k=1), dict(gralora_k=4, hybrid_r=4), dict(r=6, gralora_k=3)])
def test_valid_configs_pass(kwargs):
    cfg = gralora_config(**kwargs)
    assert cfg.use_gralora is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gralora_k=0), "gralora_k must be an integer >= 1, got 0"),
        (dict(gralora_k=-2), "gralora_k must be an integer >= 1, got -2"),
        (dict(gralora_k=2.0), "gralora_k must be an integer >= 1, got 2.0"),
        (dict(gralora_k="2"), "gralora_k must be an integer >= 1, got '2'"),
        # bool is an int subclass; True must not pass for k=1
        (dict(gralora_k=True), "gralora_k must be an integer >= 1, got True"),
        (dict(hybrid_r=-1), "hybrid_r must be an integer >= 0, got -1"),
        (dict(hybrid_r=1.5), "hybrid_r must be an integer >= 0, got 1.5"),
        (dict(r=0), "r must be a positive integer, got 0"),
        (dict(hybrid_r=8), r"hybrid_r=8 must be smaller than r=8 \(r is the total rank"),
        (dict(hybrid_r=9), "hybrid_r=9 must be smaller than r=8"),
        (dict(r=7), r"r - hybrid_r = 7 must be divisible by gralora_k=2"),
        (dict(gralora_k=4, hybrid_r=2), r"r - hybrid_r = 6 must be divisible by gralora_k=4.*e\.g\. r=6"),
        (dict(r=9, gralora_k=3, hybrid_r=1), r"r - hybrid_r = 8 must be divisible by gralora_k=3"),
    ],
)
def test_bad_k_r_hybrid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gralora_config(**kwargs)


@pytest.mark.parametrize(
    "hybrid_r, pattern, match",
    [
        (0, {"lin0": 7}, r"rank_pattern\['lin0'\] - hybrid_r = 7 must be divisible by gralora_k=2"),
        (2, {"lin1": 2}, r"hybrid_r=2 must be smaller than rank_pattern\['lin1'\]=2"),
        (0, {"lin0": 0}, r"rank_pattern\['lin0'\] must be a positive integer, got 0"),
        (0, {"lin0": 4, "^lin1$": 3.0}, r"rank_pattern\['\^lin1\$'\] must be a positive integer, got 3\.0"),
    ],
)
def test_bad_rank_pattern_entry(hybrid_r, pattern, match):
    with pytest.raises(ValueError, match=match):
        gralora_config(hybrid_r=hybrid_r, rank_pattern=pattern)


def test_plain_lora_is_not_validated():
    # plain LoRA with the GraLoRA fields at their defaults is not validated by GraLoRA's rules (r=7 is not even)
    cfg = LoraConfig(r=7, gralora_k=2, hybrid_r=0)
    assert cfg.use_gralora is False
    # the fields set without use_gralora=True would silently train plain LoRA: tests/test_config_slips.py


# one "switched on" value per option in UNSUPPORTED_WITH_GRALORA; the coverage test below keeps this list complete
UNSUPPORTED_VALUES = {
    "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
    "arrow_config": ArrowConfig(),
    "alora_invocation_tokens": [1, 2],
    "velora_config": VeloraConfig(),
    "monteclora_config": MontecloraConfig(),
    # KaSA is new in peft 0.21: on peft 0.20 LoraConfig has no kasa_config (nothing to refuse)
    **({"kasa_config": lora_config.KasaConfig()} if hasattr(lora_config, "KasaConfig") else {}),
    "use_qalora": True,
    "megatron_config": {"tensor_model_parallel_size": 1},
    "target_parameters": ["lin0.weight"],
}


def test_every_unsupported_option_has_a_case():
    # every option this peft's LoraConfig has (peft 0.20 has no kasa_config)
    assert set(UNSUPPORTED_VALUES) == {o for o in UNSUPPORTED_WITH_GRALORA if o in LoraConfig.__dataclass_fields__}


@pytest.mark.parametrize("option", sorted(UNSUPPORTED_VALUES))
def test_unsupported_option_refused(option):
    with pytest.raises(ValueError, match=rf"use_gralora=True cannot be combined with {option}=.*Unset {option}"):
        gralora_config(task_type="CAUSAL_LM", **{option: UNSUPPORTED_VALUES[option]})
    # and the same option stays accepted for plain LoRA, so the refusal is GraLoRA's, not peft's
    LoraConfig(r=8, task_type="CAUSAL_LM", **{option: UNSUPPORTED_VALUES[option]})


# peft itself warns that EVA / CorDA run with their default sub-config before our check refuses them
@pytest.mark.filterwarnings("ignore:`init_lora_weights` is")
@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "eva", "orthogonal", "lora_ga", "mica"]
)
def test_unsupported_init_refused(init, monkeypatch):
    kwargs = {}
    if init == "loftq":
        # peft checks for scipy and a loftq_config before our validation runs; pretend scipy is there so that the
        # GraLoRA check (not peft's ImportError) is what refuses the config
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: object() if name == "scipy" else real_find_spec(name, *a)
        )
        kwargs["loftq_config"] = {"loftq_bits": 4}
    with pytest.raises(ValueError, match=rf"supports init_lora_weights in .*got '{re.escape(init)}'"):
        gralora_config(init_lora_weights=init, **kwargs)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_supported_inits(init):
    assert gralora_config(init_lora_weights=init).init_lora_weights == init


# ---------------------------------------------------------------------------------------------------------------------
# layer time: errors name the module, and leave the model unchanged
# ---------------------------------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """A good Linear first (so that it would be adapted before the bad module is reached), then one bad target."""

    def __init__(self, bad: nn.Module) -> None:
        super().__init__()
        self.good = nn.Linear(8, 8)
        self.bad = bad
        self.after = nn.Linear(8, 8)


def _snapshot(model: nn.Module):
    return (
        {name: type(m) for name, m in model.named_modules()},
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    types, params, grads = snapshot
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()), "a LoRA layer was left injected"
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(now[name], value), name
        assert now[name].requires_grad == grads[name], name


@pytest.mark.parametrize(
    "bad, shape",
    [
        (nn.Linear(9, 8), "in_features=9, out_features=8"),
        (nn.Linear(8, 6), "in_features=8, out_features=6"),
        # Conv1D stores (in, out): nx=9 inputs, nf=6 outputs
        (Conv1D(6, 9), "in_features=9, out_features=6"),
    ],
    ids=["linear-in", "linear-out", "conv1d"],
)
def test_features_not_divisible_by_k(bad, shape):
    model = Mixed(bad)
    snap = _snapshot(model)
    cfg = LoraConfig(r=8, target_modules=["good", "bad", "after"], use_gralora=True, gralora_k=4)
    with pytest.raises(ValueError, match=rf"divisible by gralora_k=4, but module 'bad' has {shape}"):
        get_peft_model(model, cfg)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "bad",
    [
        nn.Embedding(10, 8),
        # sizes not divisible by k: the type is the reason to refuse, not the shape
        nn.Embedding(11, 8),
        nn.Conv1d(7, 8, 3),
        nn.Conv1d(8, 8, 3),
        nn.Conv2d(8, 8, 3),
        nn.Conv3d(8, 8, 1),
        nn.MultiheadAttention(8, 2),
    ],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_layer_type(bad):
    model = Mixed(bad)
    snap = _snapshot(model)
    cfg = LoraConfig(r=4, target_modules=["good", "bad", "after"], use_gralora=True, gralora_k=2)
    name = type(bad).__name__
    with pytest.raises(ValueError, match=rf"cannot adapt module 'bad': its layer type {name} .*no GraLoRA"):
        get_peft_model(model, cfg)
    _assert_unchanged(model, snap)
    # the same target list is fine for plain LoRA: the refusal is specific to GraLoRA
    plain = get_peft_model(Mixed(bad), LoraConfig(r=4, target_modules=["good", "bad"]))
    assert isinstance(plain.base_model.model.bad, BaseTunerLayer)


def test_target_parameters_refused_model_unchanged():
    model = TinyMLP()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="cannot be combined with target_parameters=.*use target_modules"):
        get_peft_model(model, gralora_config(target_modules=[], target_parameters=["lin0.weight"]))
    _assert_unchanged(model, snap)


def test_failed_add_adapter_leaves_existing_adapter_alone():
    model = get_peft_model(Mixed(nn.Linear(9, 8)), LoraConfig(r=4, target_modules=["good"], use_gralora=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modules_before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="module 'bad' has in_features=9"):
        model.add_adapter("second", LoraConfig(r=4, target_modules=["good", "after", "bad"], use_gralora=True))
    assert list(model.peft_config) == ["default"]
    assert {name: type(m) for name, m in model.named_modules()} == modules_before
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], v) for n, v in before.items())


# ---------------------------------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------------------------------


def test_gralora_config_round_trip(tmp_path):
    cfg = gralora_config(r=12, gralora_k=4, hybrid_r=4, use_rslora=True)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["use_gralora"], saved["gralora_k"], saved["hybrid_r"]) == (True, 4, 4)
    for loader in (PeftConfig.from_pretrained, LoraConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert isinstance(loaded, LoraConfig)
        assert (loaded.use_gralora, loaded.gralora_k, loaded.hybrid_r, loaded.r) == (True, 4, 4, 12)
        assert loaded.use_rslora is True


def test_plain_lora_config_saves_without_gralora_fields(tmp_path):
    # so that plain LoRA adapters saved with this package installed stay loadable by vanilla peft without warnings
    LoraConfig(r=8, target_modules=["lin0"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not set(GRALORA_FIELDS) & set(saved)
    assert "r" in saved and saved["r"] == 8
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert (loaded.use_gralora, loaded.gralora_k, loaded.hybrid_r) == (False, 2, 0)


def test_invalid_saved_config_is_refused_on_load(tmp_path):
    gralora_config().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["gralora_k"] = 3
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"r - hybrid_r = 8 must be divisible by gralora_k=3"):
        PeftConfig.from_pretrained(tmp_path)


def test_model_save_writes_fields(tmp_path):
    model = get_peft_model(TinyMLP(), gralora_config(hybrid_r=2))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["use_gralora"], saved["gralora_k"], saved["hybrid_r"]) == (True, 2, 2)
    loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path)
    assert (loaded.peft_config["default"].use_gralora, loaded.peft_config["default"].hybrid_r) == (True, 2)


def test_repr_shows_fields_for_gralora_only():
    text = repr(gralora_config(gralora_k=4, hybrid_r=4))
    assert text.startswith("LoraConfig(") and text.endswith(")")
    assert "use_gralora=True, gralora_k=4, hybrid_r=4)" in text
    assert "gralora" not in repr(LoraConfig(r=8))


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        ({}, {}, True),
        ({}, {"use_gralora": False}, False),
        ({}, {"gralora_k": 4}, False),
        ({}, {"hybrid_r": 4}, False),
        ({"r": 16}, {}, False),  # peft's own fields still count
    ],
)
def test_eq_compares_gralora_fields(left, right, equal):
    def make(overrides):
        kwargs = {"r": 8, "target_modules": ["lin0"], **overrides}
        if kwargs.pop("use_gralora", True):
            return LoraConfig(use_gralora=True, **{"gralora_k": 2, "hybrid_r": 0, **kwargs})
        return LoraConfig(**kwargs)  # everything else identical, GraLoRA off

    assert (make(left) == make(right)) is equal
    assert (make(right) == make(left)) is equal
    assert make(left) != "LoraConfig"


def test_dataclass_api_keeps_fields():
    cfg = gralora_config(gralora_k=4, hybrid_r=4)
    as_dict = dataclasses.asdict(cfg)
    assert (as_dict["use_gralora"], as_dict["gralora_k"], as_dict["hybrid_r"]) == (True, 4, 4)
    copied = dataclasses.replace(cfg, r=16)
    assert (copied.use_gralora, copied.gralora_k, copied.hybrid_r, copied.r) == (True, 4, 4, 16)
    with pytest.raises(ValueError, match="hybrid_r=4 must be smaller than r=4"):
        dataclasses.replace(cfg, r=4)
