"""GraLoRA reads lora_A / lora_B blockwise, without calling them: partitioned weights, one process.

The GraLoRA-aware FSDP wrap policy keeps the factors out of units of their own; weights that are still partitioned
when GraLoRA reads them and cannot be gathered there raise an error naming the engine. The multi-process runs are in
``tests/test_sharded_training.py``.
"""

import functools

import peft.utils.other
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_gralora.integration import _originals
from tests.models import TinyMLP, tiny_llama


def _mlp(use_dora: bool = False):
    config = LoraConfig(r=4, target_modules=["lin0"], use_gralora=True, gralora_k=2, use_dora=use_dora)
    return get_peft_model(TinyMLP(), config)


@pytest.mark.parametrize("use_dora", [False, True], ids=["gralora", "gralora+dora"])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_flat_shard_is_refused(use_dora, which):
    model = _mlp(use_dora)
    layer = model.base_model.model.lin0
    x = torch.randn(3, 16)
    model(x)  # works before partitioning
    # what FSDP1 (use_orig_params) leaves on a module outside its unit's forward: a 1-D view of this rank's shard
    getattr(layer, which)["default"].weight = nn.Parameter(torch.randn(7))
    with pytest.raises(RuntimeError, match=rf"{which}\['default'\] partitioned \(shape \(7,\), expected \(n, n\)\)"):
        model(x)
    with pytest.raises(RuntimeError, match="partitioned"):
        layer.get_delta_weight("default")


def test_dora_magnitude_shard_is_refused():
    model = _mlp(use_dora=True)
    layer = model.base_model.model.lin0
    # FSDP1's view of one rank's part of the magnitude: 1-D like the whole one, but shorter
    layer.lora_magnitude_vector["default"].weight = nn.Parameter(torch.ones(12))
    expected = r"lora_magnitude_vector\['default'\] partitioned \(shape \(12,\), expected \(24,\)\)"
    with pytest.raises(RuntimeError, match=expected):
        model(torch.randn(3, 16))


def test_zero3_partition_outside_forward_names_the_fix():
    model = _mlp()
    layer = model.base_model.model.lin0
    shard = nn.Parameter(torch.empty(0))
    shard.ds_id = 0  # how a DeepSpeed ZeRO-3 parameter looks outside a forward
    layer.lora_A["default"].weight = shard
    with pytest.raises(RuntimeError, match=r"ZeRO-3 partition .*GatheredParameters"):
        layer.get_delta_weight("default")


def test_whole_plain_tensor_is_used_as_is():
    # torch.func.functional_call swaps parameters for plain tensors: not a shard, the result must be the same
    model = _mlp()
    x = torch.randn(3, 16)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    key = next(k for k in params if "lora_B" in k)
    params[key] = torch.randn_like(params[key])
    expected_model = _mlp()
    expected_model.load_state_dict(params, strict=False)
    got = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(got, expected_model(x))


def _units(policy, model) -> set[str]:
    """The names of the modules the FSDP1-style policy would wrap (a unit each)."""
    return {n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)}


@pytest.mark.parametrize("use_dora", [False, True], ids=["gralora", "gralora+dora"])
def test_wrap_policy_keeps_gralora_factors_in_the_decoder_layer_unit(use_dora):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_gralora=True, use_dora=use_dora)
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "plain"])  # both trainable: plain LoRA keeps peft's leaf units
    peft_units = _units(_originals[(peft.utils.other, "fsdp_auto_wrap_policy")](model), model)
    ours = _units(peft.utils.other.fsdp_auto_wrap_policy(model), model)
    suffixes = (".lora_A.default", ".lora_B.default") + ((".lora_magnitude_vector.default",) if use_dora else ())
    gralora_factors = {n for n in peft_units if n.endswith(suffixes)}
    # peft's own policy makes every GraLoRA factor (and GraLoRA + DoRA's magnitude) a unit: the trap
    assert len(gralora_factors) == (12 if use_dora else 8)
    assert ours == peft_units - gralora_factors
    assert {n for n in ours if n.endswith(".plain")} and {"base_model.model.model.layers.0"} <= ours


def test_wrap_policy_for_gralora_alone_is_the_decoder_layer_policy():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LoraConfig(r=4, target_modules="all-linear", use_gralora=True, use_dora=True)
    model = get_peft_model(tiny_llama(), config)
    ours = peft.utils.other.fsdp_auto_wrap_policy(model)
    # the form accelerate's FSDP2 path recognises (it shards layer by layer then)
    assert isinstance(ours, functools.partial) and ours.func is transformer_auto_wrap_policy
    assert LlamaDecoderLayer in ours.keywords["transformer_layer_cls"]
    assert _units(ours, model) == {"base_model.model.model.layers.0", "base_model.model.model.layers.1"}


def test_wrap_policy_is_peft_s_own_without_gralora():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    peft_policy = _originals[(peft.utils.other, "fsdp_auto_wrap_policy")](model)
    ours = peft.utils.other.fsdp_auto_wrap_policy(model)
    assert ours.func is peft_policy.func and _units(ours, model) == _units(peft_policy, model)


def test_accelerate_fsdp2_shards_gralora_models_layer_by_layer():
    # what the Trainer does with FSDP2 on a PEFT model: peft's policy into the plugin, then accelerate's FSDP2 policy
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_gralora=True))
    units = {}
    for name, make_policy in [
        ("ours", peft.utils.other.fsdp_auto_wrap_policy),
        ("peft", _originals[(peft.utils.other, "fsdp_auto_wrap_policy")]),
    ]:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        plugin.auto_wrap_policy = make_policy(model)
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        units[name] = policy and [n for n, m in model.named_modules() if policy(m)]
    assert units["ours"] == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert units["peft"] is None  # accelerate does not understand peft's composite policy: one unit for everything
