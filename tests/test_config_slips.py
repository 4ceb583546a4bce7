"""GraLoRA fields without ``use_gralora=True`` are refused, at creation and when loaded (issue 18 item 2)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from tests.gralora_mlp_reference import base_of, factors_of, gralora_mlp, reference_output
from tests.models import TinyMLP


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gralora_k=4, hybrid_r=4),
        dict(gralora_k=4),
        dict(hybrid_r=4),
        dict(gralora_k=1),
        dict(use_gralora=False, gralora_k=4),
    ],
)
def test_fields_without_switch_are_refused(kwargs):
    with pytest.raises(ValueError, match=r"use_gralora=True"):
        LoraConfig(r=16, target_modules=["lin0"], **kwargs)


def test_defaults_and_gralora_configs_pass():
    assert LoraConfig(r=16, gralora_k=2, hybrid_r=0).use_gralora is False
    assert LoraConfig(r=16, use_gralora=True, gralora_k=4, hybrid_r=4).gralora_k == 4


def _plain_lora_dir(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("fields", [{"gralora_k": 4}, {"hybrid_r": 2}, {"use_gralora": False, "gralora_k": 4}])
def test_loading_such_a_config_file_is_refused(tmp_path, fields):
    model = _plain_lora_dir(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"use_gralora=True"):
        PeftConfig.from_pretrained(tmp_path)
    base = base_of(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"use_gralora=True"):
        PeftModel.from_pretrained(base, tmp_path)
    # refused before the base model was touched
    assert not any("lora_" in name for name, _ in base.named_modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_plain_peft_adapter_loads_as_before(tmp_path):
    model = _plain_lora_dir(tmp_path)
    assert "gralora_k" not in json.loads((tmp_path / "adapter_config.json").read_text())
    x = torch.randn(3, 16)
    expected = reference_output(base_of(model), factors_of(model), x, 1, 0, scaling=2.0)  # k=1: plain B @ A
    loaded = PeftModel.from_pretrained(base_of(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_gralora_adapter_loads_as_before(tmp_path):
    model = gralora_mlp(k=2, hybrid_r=2, r=6)
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 16)
    expected = reference_output(base_of(model), factors_of(model), x, 2, 2, scaling=8 / 6)
    loaded = PeftModel.from_pretrained(base_of(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_outside_the_peft_range_slips_are_refused_too():
    # the stand-in __init__ of a peft outside the supported range (auto_install) refuses the same slip
    from peft_gralora.integration import _make_refusing_init

    calls = []
    init = _make_refusing_init(lambda self, *a, **kw: calls.append(kw), "peft 9.9 is not supported")
    with pytest.raises(ValueError, match=r"use_gralora=True"):
        init(object.__new__(LoraConfig), r=4, gralora_k=4)
    assert calls == []  # refused before peft's __init__ ran
    init(object.__new__(LoraConfig), r=4, gralora_k=2)
    assert calls == [{"r": 4}]
