"""GraLoRA as a peft LoRA variant: stateless static hooks over the host layer's own ``lora_A`` / ``lora_B``.

State lives on the host ``lora.Linear`` (or a bnb LoRA layer), keyed by adapter name: ``gralora_k[name]`` and
``hybrid_r[name]`` next to LoRA's ``r``, ``scaling``, ``lora_dropout``. All math is in :mod:`peft_gralora.functional`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .functional import (
    gralora_add_delta_,
    gralora_add_forward,
    gralora_delta_weight,
    init_gralora_A_,
    register_compile_ops,
)
from .sharding import full_weight

__all__ = ["GraLoraLinearVariant", "adapter_magnitude", "adapter_weights", "gralora_delta", "is_gralora_adapter"]

# extra per-adapter attributes we keep on the host layer; peft deletes them with the adapter
GRALORA_LAYER_ATTRS = ("gralora_k", "hybrid_r")


def is_gralora_adapter(module: Any, adapter_name: str) -> bool:
    """Whether ``adapter_name`` on this LoRA layer is a GraLoRA adapter."""
    return isinstance(getattr(module, "lora_variant", {}).get(adapter_name), GraLoraLinearVariant)


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _is_no_op(dropout: nn.Module) -> bool:
    """peft's ``lora_dropout`` entry does nothing: ``nn.Identity`` (dropout 0), or ``nn.Dropout`` in eval mode."""
    return type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.training)


def _full_weight(sub: Any, what: str, adapter_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``sub.weight``, checked to be whole: ``shape`` is its full shape, ``-1`` where any size will do."""
    # the registered parameter, read without nn.Module.__getattr__ (a decode step is all such overhead); a weight
    # that is not a registered parameter (a parametrization, a property) goes through the attribute
    weight = sub._parameters.get("weight")
    if weight is None:
        weight = sub.weight
    # one cheap check on the common path; shards (FSDP2 DTensors, FSDP1 / ZeRO-3 flat views) take the slow one
    if type(weight) is nn.Parameter and weight.dim() == len(shape) and (shape[0] < 0 or weight.shape[0] == shape[0]):
        return weight
    return full_weight(sub, f"{what}[{adapter_name!r}]", shape)


def adapter_weights(module: Any, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``, as GraLoRA reads them.

    GraLoRA reads them blockwise instead of calling the ``lora_A`` / ``lora_B`` submodules, so an engine that gathers
    a weight only when its own module is called would leave it partitioned: FSDP2 units around a single factor are
    unsharded here (:mod:`peft_gralora.sharding`); DeepSpeed ZeRO-3 gathers by itself in a forward.

    Raises:
        RuntimeError: when a weight is partitioned and cannot be gathered here (an FSDP1 unit around a single
            ``lora_A`` / ``lora_B``, a ZeRO-3 partition outside a forward), naming the engine and the fix.
    """
    modules = module._modules  # module.lora_A[name] without two Python-level __getattr__ / __getitem__ calls
    sub_A, sub_B = modules["lora_A"]._modules[adapter_name], modules["lora_B"]._modules[adapter_name]
    # the registered parameters, read without nn.Module.__getattr__; one cheap test on the common path (shards:
    # FSDP2 DTensors, FSDP1 / ZeRO-3 1-D views; weights that are not registered parameters: the checked path)
    weight_A, weight_B = sub_A._parameters.get("weight"), sub_B._parameters.get("weight")
    if type(weight_A) is nn.Parameter and type(weight_B) is nn.Parameter and weight_A.dim() == weight_B.dim() == 2:
        return weight_A, weight_B
    return (
        _full_weight(sub_A, "lora_A", adapter_name, (-1, -1)),
        _full_weight(sub_B, "lora_B", adapter_name, (-1, -1)),
    )


def adapter_magnitude(module: Any, adapter_name: str) -> torch.Tensor:
    """GraLoRA + DoRA's magnitude ``lora_magnitude_vector[adapter_name].weight`` ``(out,)``, unpartitioned."""
    out = module.lora_B[adapter_name].out_features  # a 1-D shard has the right rank: check the length too
    return _full_weight(module.lora_magnitude_vector[adapter_name], "lora_magnitude_vector", adapter_name, (out,))


def _compute_factors(weight_A: torch.Tensor, weight_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # half-precision matmuls on CPU are slow and inexact: upcast the (small) factors, as LoRA does
    if weight_B.device.type == "cpu" and weight_B.dtype in (torch.float16, torch.bfloat16):
        return weight_A.float(), weight_B.float()
    return weight_A, weight_B


def gralora_delta(module: Any, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scaling * delta W`` of one GraLoRA adapter, in the base weight's layout (``(in, out)`` for Conv1D).

    Half-precision factors on CPU are upcast for the product (slow / inexact half matmuls there), as LoRA does.

    Args:
        dtype: dtype of the result; defaults to the adapter weights' dtype.
    """
    weight_A, weight_B = adapter_weights(module, adapter_name)
    out_dtype = dtype or weight_B.dtype
    weight_A, weight_B = _compute_factors(weight_A, weight_B)
    k, h = module.gralora_k[adapter_name], module.hybrid_r[adapter_name]
    transposed = getattr(module, "fan_in_fan_out", False)  # the base weight is stored (in, out): Conv1D
    scaling = module.scaling[adapter_name]
    if torch.is_grad_enabled() and (weight_A.requires_grad or weight_B.requires_grad):
        delta = _transpose(gralora_delta_weight(weight_A, weight_B, k, h), transposed) * scaling  # differentiable
    else:  # written straight into its final layout, scaled on the way: one weight-sized tensor in all
        shape = (weight_A.shape[1], weight_B.shape[0]) if transposed else (weight_B.shape[0], weight_A.shape[1])
        delta = gralora_add_delta_(
            weight_B.new_empty(shape), weight_A, weight_B, k, h, alpha=scaling, transposed=transposed, overwrite=True
        )
    return delta.to(out_dtype)


def _add_delta_in_place(module: Any, adapter_name: str, weight: torch.Tensor, sign: float) -> bool:
    """``weight += sign * scaling * delta W`` without a weight-sized temporary, when ``weight`` (the base weight's
    data, in its own layout) has the factors' dtype and device; returns False (nothing done) otherwise."""
    weight_A, weight_B = _compute_factors(*adapter_weights(module, adapter_name))
    if weight.dtype != weight_B.dtype or weight.device != weight_B.device or weight.requires_grad:
        return False
    gralora_add_delta_(
        weight,
        weight_A.detach(),
        weight_B.detach(),
        module.gralora_k[adapter_name],
        module.hybrid_r[adapter_name],
        alpha=sign * module.scaling[adapter_name],
        transposed=getattr(module, "fan_in_fan_out", False),
    )
    return True


class GraLoraLinearVariant:
    """GraLoRA on a LoRA linear layer (``nn.Linear``, ``Conv1D`` with ``fan_in_fan_out``, bnb 4/8-bit).

    ``y = base(x) + scaling * (sum_j B_ij A_ij x_j + [B_h A_h x]_i)`` with the blocks read out of ``lora_A.weight``
    ``(r, in)`` and ``lora_B.weight`` ``(out, r)`` (see :mod:`peft_gralora.functional`).
    """

    def supports_lora_conversion(self) -> bool:
        # get_delta_weight is GraLoRA-aware, so peft's SVD conversion sees the true delta
        return True

    @staticmethod
    def init(module: Any, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Record ``k`` / ``hybrid_r`` on the layer and give ``A_ij`` their block fan-in init."""
        for attr in GRALORA_LAYER_ATTRS:
            if not hasattr(module, attr):
                setattr(module, attr, {})
            if attr not in module.other_param_names:
                module.other_param_names = tuple(module.other_param_names) + (attr,)
        register_compile_ops()  # for torch.compile, once per process
        module.gralora_k[adapter_name] = config.gralora_k
        module.hybrid_r[adapter_name] = config.hybrid_r
        weight_A = module.lora_A[adapter_name].weight
        # meta tensors get their values from a checkpoint (low_cpu_mem_usage); the others keep LoRA's init otherwise
        if config.init_lora_weights is True and not weight_A.is_meta:
            init_gralora_A_(weight_A.data, config.gralora_k, config.hybrid_r)

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        merged = orig_weight.detach().clone()  # peft checks it for NaN before it replaces the weight
        if not _add_delta_in_place(module, active_adapter, merged, 1.0):
            merged += gralora_delta(module, active_adapter, orig_weight.dtype)
        return merged

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        if not _add_delta_in_place(module, active_adapter, orig_weight.data, 1.0):
            orig_weight.data += gralora_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # peft assigns the result to the weight's data, so subtracting in place there is what it asks for
        if _add_delta_in_place(module, active_adapter, orig_weight.data, -1.0):
            return orig_weight.data
        return orig_weight.data - gralora_delta(module, active_adapter, orig_weight.dtype)

    @staticmethod
    def forward(
        module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """``result + scaling * GraLoRA(dropout(x))``; ``x`` is ``(..., in)``, ``result`` is ``(..., out)``."""
        weight_A, weight_B = adapter_weights(module, active_adapter)
        dropout = module._modules["lora_dropout"]._modules[active_adapter]  # module.lora_dropout[name], faster
        if not _is_no_op(dropout):  # a module call costs as much as a GEMM at one token
            x = dropout(x)
        if x.dtype != weight_A.dtype:
            x = module._cast_input_dtype(x, weight_A.dtype)
        # lora_B has a bias exactly when lora_bias is set (peft's merge relies on the same flag); skip the lookup
        bias = module.lora_B[active_adapter].bias if module.lora_bias[active_adapter] else None
        return gralora_add_forward(
            result,
            x,
            weight_A,
            weight_B,
            module.gralora_k[active_adapter],
            module.hybrid_r[active_adapter],
            module.scaling[active_adapter],
            bias,
        )
