"""Every base layer type peft's LoRA supports, with use_gralora=True: GraLoRA, or a clear error; never plain LoRA.

Third-party layers (GPTQ, AWQ, AQLM, HQQ, EETQ, torchao, INC, TransformerEngine) are faked where the library is not
installed: a stand-in class is put where peft's ``dispatch_*`` function looks (the ``isinstance`` target and the
availability check of that peft module), so peft's real dispatcher builds its real LoRA layer class for it. The fake
base is an ``nn.Linear`` subclass only so that it has ``in_features`` / ``out_features`` / ``weight``.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import aqlm, awq, gptq, te, torchao
from peft.tuners.lora import layer as lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_gralora.dora import GraLoraDoraLinearVariant
from peft_gralora.variant import GraLoraLinearVariant


class Holder(nn.Module):
    """One targeted module ``target`` (any type), fed a suitable input by the tests that run it."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target


def _fake_linear_class(name: str, **attrs) -> type:
    """A stand-in for a third-party quantized linear layer: an ``nn.Module`` (not an ``nn.Linear``, like the real
    ones) with the attributes peft reads: ``in_features`` / ``out_features`` (``infeatures`` / ``outfeatures`` for
    GPTQ), ``weight``, ``bias``; ``attrs`` adds aliases (a str names an existing attribute) or values."""

    def __init__(self, *args, **kwargs):
        nn.Module.__init__(self)
        self.in_features = self.out_features = self.infeatures = self.outfeatures = 64
        self.weight = nn.Parameter(torch.randn(64, 64) / 8)
        self.bias = nn.Parameter(torch.zeros(64))
        for key, value in attrs.items():
            setattr(self, key, getattr(self, value) if isinstance(value, str) else value)

    def forward(self, x):
        return x @ self.weight.T + self.bias

    return type(name, (nn.Module,), {"__init__": __init__, "forward": forward})


def _fake_module(monkeypatch, dotted: str, **members) -> None:
    """Install a fake (sub)module chain ``a.b.c`` in sys.modules with ``members`` on the last one."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for key, value in members.items():
        setattr(sys.modules[dotted], key, value)


def _reexec_peft_module(mp, short: str, available: str):
    """A fresh copy of ``peft/tuners/lora/<short>.py`` executed as if its library were installed, wired into
    LoraModel's dispatch. For the modules that define their LoRA class only ``if is_<lib>_available()``."""
    import importlib.util
    from pathlib import Path

    import peft.import_utils
    from peft.tuners.lora import model as lora_model

    mp.setattr(peft.import_utils, available, lambda: True)
    path = Path(lora_layer.__file__).parent / f"{short}.py"
    spec = importlib.util.spec_from_file_location(f"peft.tuners.lora.{short}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not registered in sys.modules: peft's own module stays untouched
    mp.setattr(lora_model, f"dispatch_{short}", getattr(module, f"dispatch_{short}"))
    return module


# base type -> factory(monkeypatch) -> (base module to target, the peft LoRA class it becomes); each fakes exactly
# one dispatcher
def _gptq(mp):
    cls = _fake_linear_class("BaseQuantLinear", qweight="weight")
    _fake_module(mp, "gptqmodel.nn_modules.qlinear", BaseQuantLinear=cls)
    mp.setattr(gptq, "is_gptqmodel_available", lambda: True)
    return cls(), gptq.GPTQLoraLinear


def _awq(mp):
    cls = _fake_linear_class("AwqGEMMQuantLinear", qweight="weight")
    mp.setattr(awq, "is_gptqmodel_available", lambda: True)
    mp.setattr(awq, "is_gptqmodel_awq_layer", lambda m: isinstance(m, cls))
    return cls(), awq.AwqLoraLinear


def _aqlm(mp):
    cls = _fake_linear_class("QuantizedLinear", codes="weight", codebooks=None)
    mp.setattr(aqlm, "is_aqlm_available", lambda: True)
    mp.setattr(aqlm, "QuantizedLinear", cls, raising=False)
    return cls(), aqlm.AqlmLoraLinear


def _hqq(mp):
    cls = _fake_linear_class("HQQLinear")
    _fake_module(mp, "hqq.core.quantize", HQQLinear=cls)
    module = _reexec_peft_module(mp, "hqq", "is_hqq_available")
    return cls(), module.HqqLoraLinear


def _eetq(mp):
    cls = _fake_linear_class("EetqLinear")
    _fake_module(mp, "eetq", EetqLinear=cls)
    module = _reexec_peft_module(mp, "eetq", "is_eetq_available")
    return cls(), module.EetqLoraLinear


def _torchao(mp):
    # torchao keeps nn.Linear and swaps its weight for a quantized tensor subclass, which the dispatcher keys on
    tensor_cls = type("TorchAOBaseTensor", (nn.Parameter,), {"__module__": "torchao.utils"})
    _fake_module(mp, "torchao.utils", TorchAOBaseTensor=tensor_cls)
    _fake_module(mp, "torchao.quantization", Int4Tensor=type("Int4Tensor", (), {}))
    mp.setattr(torchao, "is_torchao_available", lambda: True)
    base = nn.Linear(64, 64)
    base.weight = tensor_cls(base.weight.data)
    return base, torchao.TorchaoLoraLinear


def _inc(mp):
    cls = _fake_linear_class("PatchedLinear")
    _fake_module(mp, "neural_compressor.torch.algorithms.fp8_quant._quant_common.helper_modules", PatchedLinear=cls)
    module = _reexec_peft_module(mp, "inc", "is_inc_available")
    return cls(), module.IncLoraLinear


def _transformer_engine(mp):
    cls = _fake_linear_class("Linear")
    fake_te = types.SimpleNamespace(pytorch=types.SimpleNamespace(Linear=cls, LayerNormLinear=cls, LayerNormMLP=cls))
    mp.setattr(te, "is_te_pytorch_available", lambda: True)
    mp.setattr(te, "te", fake_te, raising=False)
    return cls(), te.TeLinear


REFUSED = {
    "Embedding": lambda mp: (nn.Embedding(64, 32), lora_layer.Embedding),
    "Conv1d": lambda mp: (nn.Conv1d(8, 8, 3), lora_layer.Conv1d),
    "Conv2d": lambda mp: (nn.Conv2d(8, 8, 3), lora_layer.Conv2d),
    "Conv3d": lambda mp: (nn.Conv3d(8, 8, 3), lora_layer.Conv3d),
    "MultiheadAttention": lambda mp: (nn.MultiheadAttention(32, 4), lora_layer.MultiheadAttention),
    "GPTQ": _gptq,
    "AWQ": _awq,
    "AQLM": _aqlm,
    "HQQ": _hqq,
    "EETQ": _eetq,
    "torchao": _torchao,
    "INC": _inc,
    "TransformerEngine": _transformer_engine,
}


def _gralora_cfg(**kw) -> LoraConfig:
    return LoraConfig(
        **(dict(r=4, target_modules=["target"], use_gralora=True, gralora_k=2, init_lora_weights=False) | kw)
    )


@pytest.mark.parametrize("name", list(REFUSED))
def test_plain_lora_takes_the_fake_through_peft_s_own_dispatcher(name, monkeypatch):
    """Guards the fakes: with use_gralora=False, peft builds the LoRA class of that layer type."""
    base, lora_cls = REFUSED[name](monkeypatch)
    model = get_peft_model(Holder(base), LoraConfig(r=4, target_modules=["target"]))
    assert type(model.base_model.model.target) is lora_cls


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", list(REFUSED))
def test_gralora_on_unsupported_layer_types_raises_naming_type_and_module(name, use_dora, monkeypatch):
    base, lora_cls = REFUSED[name](monkeypatch)
    model = Holder(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        get_peft_model(model, _gralora_cfg(use_dora=use_dora))
    message = str(info.value)
    assert "use_gralora=True cannot adapt module 'target'" in message
    assert f"its layer type {type(base).__name__}" in message
    # refused before anything changed: still the plain base module with its weights
    assert model.target is base
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_parameters=["target.weight"], target_modules=[]), "target_parameters"),
        (dict(megatron_config={"tensor_model_parallel_size": 1}, megatron_core="megatron.core"), "megatron_config"),
    ],
    ids=["target_parameters", "Megatron"],
)
def test_config_level_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gralora_cfg(**kwargs)


@pytest.mark.parametrize(
    ("base", "fifo", "use_dora", "variant"),
    [
        (nn.Linear(16, 24), False, False, GraLoraLinearVariant),
        (Conv1D(24, 16), True, False, GraLoraLinearVariant),
        (nn.Linear(16, 24), False, True, GraLoraDoraLinearVariant),
        (Conv1D(24, 16), True, True, GraLoraDoraLinearVariant),
    ],
    ids=["Linear", "Conv1D", "Linear-DoRA", "Conv1D-DoRA"],
)
def test_supported_types_resolve_to_gralora(base, fifo, use_dora, variant):
    model = get_peft_model(Holder(base), _gralora_cfg(fan_in_fan_out=fifo, use_dora=use_dora))
    layer = model.base_model.model.target
    assert type(layer) is lora_layer.Linear
    assert type(layer.lora_variant["default"]) is variant


def test_adding_gralora_to_an_existing_plain_lora_layer_of_another_type_is_refused():
    model = get_peft_model(Holder(nn.Embedding(64, 32)), LoraConfig(r=4, target_modules=["target"]))
    with pytest.raises(ValueError, match="cannot adapt module 'target'.*Embedding"):
        model.add_adapter("gra", _gralora_cfg())


class _CustomLinear(nn.Linear):
    pass


class _CustomLoraLinear(nn.Module, lora_layer.LoraLayer):
    """A user's LoRA layer through peft's custom-module API, with a hand-written resolver that knows no GraLoRA (as
    peft's bitsandbytes layers had): without the guard, use_gralora=True would silently train plain LoRA here."""

    def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
        super().__init__()
        lora_layer.LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config, **kwargs):
        return None

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


@pytest.mark.parametrize("use_gralora", [False, True])
def test_custom_lora_module_with_its_own_resolver(use_gralora):
    cfg = _gralora_cfg() if use_gralora else LoraConfig(r=4, target_modules=["target"])
    cfg._register_custom_module({_CustomLinear: _CustomLoraLinear})
    model = Holder(_CustomLinear(16, 24))
    if not use_gralora:
        assert type(get_peft_model(model, cfg).base_model.model.target) is _CustomLoraLinear
        return
    with pytest.raises(ValueError, match=r"cannot adapt module 'target': its layer type _CustomLinear \(LoRA layer "):
        get_peft_model(model, cfg)
    assert type(model.target) is _CustomLinear
