"""The saved config matches what the layers compute, whatever the patch state at save time (issue 18 item 3).

A model built while GraLoRA is installed keeps computing GraLoRA after ``gralora_installed()`` exits or after
``uninstall()``; what it saves then must reload as GraLoRA.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import safetensors
import torch
from peft import PeftModel

from peft_gralora import export_lora
from peft_gralora.integration import gralora_installed, install, is_installed, uninstall
from tests.gralora_mlp_reference import base_of, factors_of, gralora_mlp, reference_output

try:  # imported while GraLoRA is installed: the module builds GraLoRA configs at import time
    from tests.test_diffusers import _config as _diffusers_config
    from tests.test_diffusers import _unet
except ImportError:  # diffusers not installed
    _unet = None

K, H, R = 2, 2, 6
SCALING = 8 / R


@pytest.fixture
def hook_off():
    """GraLoRA not installed (as with PEFT_GRALORA_DISABLE=1), put back afterwards."""
    was = is_installed()
    uninstall()
    try:
        yield
    finally:
        if was:
            install()


def _built_in_block():
    with gralora_installed():
        model = gralora_mlp(k=K, hybrid_r=H, r=R)
    return model


def _expected(model, x):
    return reference_output(base_of(model), factors_of(model), x, K, H, SCALING)


def _assert_reloads_as_gralora(path, model, x):
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg.get("use_gralora"), cfg.get("gralora_k"), cfg.get("hybrid_r")) == (True, K, H)
    with gralora_installed():
        loaded = PeftModel.from_pretrained(base_of(model), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).double(), _expected(model, x), atol=1e-5, rtol=1e-5)


def test_saved_after_the_block(hook_off, tmp_path):
    model = _built_in_block()
    x = torch.randn(3, 16)
    with torch.no_grad():  # still computes GraLoRA outside the block
        torch.testing.assert_close(model(x).double(), _expected(model, x), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    _assert_reloads_as_gralora(tmp_path, model, x)


def test_saved_after_uninstall(hook_off, tmp_path):
    install()
    model = gralora_mlp(k=K, hybrid_r=H, r=R)
    uninstall()
    model.save_pretrained(tmp_path)
    _assert_reloads_as_gralora(tmp_path, model, torch.randn(3, 16))


def test_merge_and_unload_after_the_block(hook_off):
    model = _built_in_block()
    x = torch.randn(3, 16)
    expected = _expected(model, x)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_export_lora_of_an_adapter_saved_after_the_block(hook_off, tmp_path):
    model = _built_in_block()
    model.save_pretrained(tmp_path / "gralora")
    x = torch.randn(3, 16)
    with gralora_installed():
        export_lora(tmp_path / "gralora", tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert not cfg.get("use_gralora")
    loaded = PeftModel.from_pretrained(base_of(model), tmp_path / "lora").eval()  # plain peft (hook off)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), _expected(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "replace"])
def test_config_copies_keep_the_fields(hook_off, how):
    model = _built_in_block()
    cfg = model.peft_config["default"]
    if how == "pickle":
        other = pickle.loads(pickle.dumps(cfg))
    elif how == "deepcopy":
        other = copy.deepcopy(cfg)
    else:
        with gralora_installed():  # replace() calls __init__ with the three fields: only GraLoRA-aware peft takes them
            other = dataclasses.replace(cfg, lora_dropout=0.1)
    names = {f.name for f in dataclasses.fields(other)}
    assert {"r", "target_modules", "use_gralora", "gralora_k", "hybrid_r"} <= names
    assert {k: other.to_dict()[k] for k in ("use_gralora", "gralora_k", "hybrid_r")} == dict(
        use_gralora=True, gralora_k=K, hybrid_r=H
    )


def test_replace_after_uninstall_is_loud(hook_off):
    model = _built_in_block()
    with pytest.raises(TypeError, match="use_gralora"):
        dataclasses.replace(model.peft_config["default"], lora_dropout=0.1)


def test_plain_lora_config_stays_plain():
    from peft import LoraConfig

    cfg = LoraConfig(r=4, target_modules=["lin0"])
    assert "__dataclass_fields__" not in vars(cfg)
    assert "use_gralora" not in cfg.to_dict()


def test_diffusers_save_lora_adapter_after_the_block(hook_off, tmp_path):
    if _unet is None:
        pytest.skip("diffusers is not installed")
    with gralora_installed():
        unet = _unet()
        unet.add_adapter(_diffusers_config(k=K, h=H, r=R))
    assert "GraLoraLinearVariant" in {
        type(v).__name__ for m in unet.modules() for v in getattr(m, "lora_variant", {}).values()
    }
    unet.save_lora_adapter(tmp_path)
    with safetensors.safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["use_gralora"], meta["gralora_k"], meta["hybrid_r"]) == (True, K, H)
