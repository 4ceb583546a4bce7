"""GraLoRA adapter files record their layout in the safetensors header; a contradicting config is refused."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter
from safetensors import safe_open

from peft_gralora.integration.saved_layout import AdapterLayoutError
from tests.gralora_mlp_reference import base_of, factors_of, gralora_mlp, reference_output
from tests.models import TinyMLP, mlp_config


def _header(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()


@pytest.fixture
def saved(tmp_path):
    model = gralora_mlp(k=2, hybrid_r=2, r=6)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_header_records_the_layout(saved):
    _, path = saved
    assert _header(path) == {"format": "pt", "use_gralora": "true", "gralora_k": "2", "hybrid_r": "2", "r": "6"}


def test_header_is_written_in_sorted_order(saved):
    # safetensors writes metadata from a hash map (random order per process): sorted, the same adapter, same bytes
    import json
    import struct

    _, path = saved
    data = (path / "adapter_model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + size], object_pairs_hook=list)[0][1]
    assert [k for k, _ in meta] == sorted(k for k, _ in meta)


def test_plain_lora_file_is_unchanged(tmp_path):
    torch.manual_seed(0)
    get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"])).save_pretrained(tmp_path)
    assert _header(tmp_path) == {"format": "pt"}


def test_named_adapters_get_their_own_layout(tmp_path):
    model = gralora_mlp(k=2, hybrid_r=0, r=4)
    model.add_adapter("other", mlp_config(r=8, gralora_k=4, hybrid_r=4))
    model.save_pretrained(tmp_path)
    assert _header(tmp_path)["gralora_k"] == "2"
    assert _header(tmp_path / "other") | {} == {
        "format": "pt",
        "use_gralora": "true",
        "gralora_k": "4",
        "hybrid_r": "4",
        "r": "8",
    }


# plain LoRA of the same r and shapes; another k with the same r; another hybrid_r
CONTRADICTING = {
    "plain_lora": dict(use_gralora=False, gralora_k=2, hybrid_r=0),
    "other_k": dict(gralora_k=1, hybrid_r=2),
    "other_hybrid": dict(gralora_k=2, hybrid_r=4),
}


@pytest.mark.parametrize("which", sorted(CONTRADICTING))
def test_from_pretrained_with_a_contradicting_config_is_refused(saved, which):
    model, path = saved
    config = mlp_config(r=6, **CONTRADICTING[which])
    base = base_of(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLayoutError, match=r"gralora_k=2, hybrid_r=2, r=6"):
        PeftModel.from_pretrained(base, path, config=config)
    assert not any("lora_" in name for name, _ in base.named_modules())  # refused before the model was touched
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_matching_config_loads_exactly(saved):
    model, path = saved
    x = torch.randn(3, 16)
    expected = reference_output(base_of(model), factors_of(model), x, 2, 2, scaling=8 / 6)
    loaded = PeftModel.from_pretrained(base_of(model), path, config=mlp_config(r=6, hybrid_r=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_load_adapter_and_hotswap_check_too(saved, tmp_path):
    model, path = saved
    # an adapter_config.json that does not belong to the weights (copied from another adapter)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    other = gralora_mlp(k=1, hybrid_r=2, r=6)
    other.peft_config["default"].save_pretrained(wrong)
    host = gralora_mlp(k=2, hybrid_r=2, r=6, seed=1)
    with pytest.raises(AdapterLayoutError):
        host.load_adapter(wrong, adapter_name="second")
    assert "second" not in host.peft_config
    resident = factors_of(host)
    with pytest.raises(AdapterLayoutError):
        hotswap_adapter(host, str(wrong), adapter_name="default")
    after = factors_of(host)
    assert all(torch.equal(resident[n][i], after[n][i]) for n in resident for i in (0, 1))
