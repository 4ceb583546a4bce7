"""GraLoRA reads lora_A / lora_B blockwise: partitioned weights (ZeRO-3, per-Linear FSDP units) must be refused."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.models import TinyMLP


@pytest.mark.parametrize("use_dora", [False, True], ids=["gralora", "gralora+dora"])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_partitioned_weight_is_refused(use_dora, which):
    model = get_peft_model(
        TinyMLP(), LoraConfig(r=4, target_modules=["lin0"], use_gralora=True, gralora_k=2, use_dora=use_dora)
    )
    layer = model.base_model.model.lin0
    x = torch.randn(3, 16)
    model(x)  # works before partitioning
    # what ZeRO-3 leaves on a module outside its forward: an empty 1-D shard
    getattr(layer, which)["default"].weight = nn.Parameter(torch.empty(0))
    with pytest.raises(RuntimeError, match=r"partitioned LoRA weights .*ZeRO-3 and FSDP units .*Use DDP"):
        model(x)
    with pytest.raises(RuntimeError, match="partitioned LoRA weights"):
        layer.get_delta_weight("default")
