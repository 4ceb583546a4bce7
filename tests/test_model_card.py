"""save_pretrained writes a model card that says the adapter is GraLoRA and how to use it (issue 18 item 5)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from tests.gralora_mlp_reference import gralora_mlp
from tests.models import TinyMLP

try:  # imported while GraLoRA is installed (the module builds GraLoRA configs at import time)
    from tests.test_diffusers import UNetPipe, _config, _unet
except ImportError:  # diffusers not installed
    _unet = None


def test_card_of_a_new_folder(tmp_path):
    gralora_mlp(k=2, hybrid_r=2, r=6).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert {"gralora", "peft-gralora", "lora"} <= set(card.data.tags)
    assert card.data.library_name == "peft"  # peft's own card logic ran
    text = card.text
    for part in (
        "GraLoRA adapter",
        "pip install peft-gralora",
        "| `default` | 6 | 2 | 2 |",
        "PeftModel.from_pretrained",
        "peft-gralora export-lora",
        "- PEFT ",  # peft's framework versions block is kept
    ):
        assert part in text, part


def test_existing_readme_is_updated_not_overwritten(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n")
    model = gralora_mlp(k=2, hybrid_r=0, r=4)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: the section is replaced, not repeated
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit"
    assert "# My adapter" in card.text and "Trained on my data." in card.text
    assert card.text.count("<!-- peft-gralora:start -->") == 1
    assert "| `default` | 4 | 2 | 0 |" in card.text


def test_plain_lora_card_has_no_gralora_text(tmp_path):
    torch.manual_seed(0)
    get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"])).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "gralora" not in (card.data.tags or [])
    assert "GraLoRA" not in card.text


def test_card_lists_every_gralora_adapter(tmp_path):
    model = gralora_mlp(k=2, hybrid_r=0, r=4)
    model.add_adapter("other", LoraConfig(r=8, target_modules=["lin0"], use_gralora=True, gralora_k=4, hybrid_r=4))
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "| `default` | 4 | 2 | 0 |" in text and "| `other` | 8 | 4 | 4 |" in text
    assert "`plain`" not in text


def test_diffusers_saves_write_the_card(tmp_path):
    if _unet is None:
        pytest.skip("diffusers is not installed")
    from peft.utils import get_peft_model_state_dict

    unet = _unet()
    unet.add_adapter(_config(r=6, k=2, h=2))
    unet.save_lora_adapter(tmp_path / "adapter")
    UNetPipe.save_lora_weights(tmp_path / "pipe", unet_lora_layers=get_peft_model_state_dict(unet))
    for folder, name in ((tmp_path / "adapter", "default"), (tmp_path / "pipe", "unet")):
        card = ModelCard.load(folder / "README.md")
        assert {"gralora", "peft-gralora"} <= set(card.data.tags)
        assert f"| `{name}` | 6 | 2 | 2 |" in card.text and "peft-gralora export-lora" in card.text
