"""transformers' own adapter API (``PeftAdapterMixin``) with a GraLoRA config, against the ``PeftModel`` path.

The reference is a ``PeftModel`` holding the same (random, non-zero) weights: both must give the same logits, and the
base model's logits wherever the adapter is off.
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import tomllib
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from tests.models import tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _config() -> LoraConfig:
    return LoraConfig(
        r=6, lora_alpha=12, target_modules=TARGETS, use_gralora=True, gralora_k=2, hybrid_r=2, init_lora_weights=False
    )


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def native():
    """A tiny Llama with a GraLoRA adapter added through transformers' ``add_adapter`` (random B: non-zero delta)."""
    model = tiny_llama()
    torch.manual_seed(1)
    model.add_adapter(_config(), adapter_name="gra")
    model.set_adapter("gra")
    return model.eval()


def _peft_reference(native) -> PeftModel:
    """The PeftModel path on the same base weights, holding the native adapter's weights."""
    reference = get_peft_model(tiny_llama(), _config()).eval()
    # transformers' state dict names modules from the model itself, peft's from the PeftModel wrapper
    state = {f"base_model.model.{k}": v for k, v in native.get_adapter_state_dict("gra").items()}
    result = set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys
    return reference


def test_add_adapter_set_adapter_equal_the_peft_path(native, ids):
    base = _logits(tiny_llama(), ids)
    got = _logits(native, ids)
    torch.testing.assert_close(got, _logits(_peft_reference(native), ids), **TOL)
    assert (got - base).abs().max() > 1e-3  # the adapter does something
    assert native.active_adapters() == ["gra"]


def test_disable_enable_adapters(native, ids):
    base, adapted = _logits(tiny_llama(), ids), _logits(native, ids)
    native.disable_adapters()
    torch.testing.assert_close(_logits(native, ids), base, **TOL)
    native.enable_adapters()
    torch.testing.assert_close(_logits(native, ids), adapted, **TOL)


def test_get_adapter_state_dict_is_our_layout(native):
    state = native.get_adapter_state_dict("gra")
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    # lora_A (r, in), lora_B (out, r) with the total r
    assert {tuple(t.shape) for k, t in state.items() if "q_proj.lora_A" in k} == {(6, 32)}


def test_save_pretrained_then_peft_and_transformers_loaders(native, ids, tmp_path):
    adapted = _logits(native, ids)
    native.save_pretrained(tmp_path / "saved")
    config = LoraConfig.from_pretrained(tmp_path / "saved")
    assert (config.use_gralora, config.gralora_k, config.hybrid_r) == (True, 2, 2)
    assert not any("gralora_" in k for k in load_file(tmp_path / "saved" / "adapter_model.safetensors"))
    by_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved").eval()
    torch.testing.assert_close(_logits(by_peft, ids), adapted, **TOL)
    by_transformers = tiny_llama()
    by_transformers.load_adapter(str(tmp_path / "saved"), adapter_name="again")
    torch.testing.assert_close(_logits(by_transformers.eval(), ids), adapted, **TOL)
    # save_pretrained after load_adapter (refused by transformers 5.24 with peft < 0.22) round-trips too
    by_transformers.save_pretrained(tmp_path / "resaved")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "resaved").eval()
    torch.testing.assert_close(_logits(again, ids), adapted, **TOL)


def test_delete_adapter_gives_the_base_model_back(native, ids):
    native.delete_adapter("gra")
    torch.testing.assert_close(_logits(native, ids), _logits(tiny_llama(), ids), **TOL)


def test_pins_give_a_stack_whose_adapter_api_accepts_the_supported_peft():
    """transformers refuses peft below its MIN_PEFT_VERSION in this API (5.24 requires peft 0.22): the pins must keep
    every allowed transformers above the lowest supported peft, and the installed pair must fit the pins."""
    from transformers.integrations import peft as tf_peft

    from peft_gralora.integration import SUPPORTED_PEFT

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    reqs = {Requirement(r).name: Requirement(r) for r in pyproject["project"]["dependencies"]}
    assert str(reqs["peft"].specifier) == str(Requirement(f"peft{SUPPORTED_PEFT}").specifier)
    assert Version(transformers.__version__) in reqs["transformers"].specifier
    assert Version(peft.__version__) in reqs["peft"].specifier
    assert not reqs["transformers"].specifier.contains("5.24.0")
    lowest_peft = re.search(r">=\s*([\d.]+)", SUPPORTED_PEFT).group(1)
    assert Version(lowest_peft) >= Version(getattr(tf_peft, "MIN_PEFT_VERSION", "0"))
