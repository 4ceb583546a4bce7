"""GraLoRA + DoRA: DoRA's weight decomposition over the GraLoRA update (``use_dora=True, use_gralora=True``).

DoRA (https://arxiv.org/abs/2402.09353) rescales every output row of the adapted weight to a learned magnitude::

    W' = diag(m / ||W + scaling * delta W||_row) (W + scaling * delta W)

with ``delta W`` the GraLoRA update (block ``(i, j)`` is ``B_ij A_ij``, plus the hybrid branch). The row norm is a
constant for the gradient (DoRA section 4.3). peft's own DoRA layer reads the LoRA update as ``lora_B(lora_A(x))``
and ``lora_B(lora_A(eye))``, which is wrong for GraLoRA weights, so this variant computes both through
:mod:`peft_gralora.functional`. The magnitude lives where DoRA keeps it (``lora_magnitude_vector[name].weight``), so
state-dict keys, save/load and ``requires_grad`` handling are DoRA's.

The base weight is read through :func:`peft_gralora.quant.dequantize_base_weight`, so bitsandbytes 4-bit / 8-bit
bases work, including 4-bit weights that bitsandbytes repacked for its CPU kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import gralora_forward
from .quant import dequantize_base_weight
from .variant import GraLoraLinearVariant, _transpose, adapter_magnitude, adapter_weights, gralora_delta

__all__ = ["GraLoraDoraLinearVariant", "GraLoraMagnitude"]


class GraLoraMagnitude(nn.Module):
    """Holds DoRA's magnitude vector ``m`` of shape ``(out,)`` as ``weight`` (DoRA's state-dict key)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=True)

    def __repr__(self) -> str:
        return f"lora.gralora_dora.GraLoraMagnitude(out_features={self.weight.shape[0]})"


def _row_norm(weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """``||W + scaling * delta W||`` over the input dimension: ``(out, in)`` -> ``(out,)``, in float32."""
    return torch.linalg.norm(weight_oi.float() + delta_oi.float(), dim=1)


def _base_weight_oi(module: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (dequantized) base weight as ``(out, in)``, detached."""
    weight = dequantize_base_weight(module.get_base_layer()).detach()
    weight = _transpose(weight, getattr(module, "fan_in_fan_out", False))
    return weight if dtype is None else weight.to(dtype)


def _dora_factor(module: Any, adapter: str, norm: torch.Tensor) -> torch.Tensor:
    """``m / ||W + scaling * delta W||`` as a column ``(out, 1)`` for ``(out, in)`` weights."""
    return (adapter_magnitude(module, adapter).float() / norm).view(-1, 1)


class GraLoraDoraLinearVariant(GraLoraLinearVariant):
    """GraLoRA with DoRA's magnitude on a LoRA linear layer (``nn.Linear``, ``Conv1D``, bnb 4/8-bit).

    ``y = base(x) + (m / n - 1) * (W x) + (m / n) * scaling * GraLoRA(x)`` with ``n = ||W + scaling * delta W||_row``
    (detached), which equals ``diag(m / n) (W + scaling * delta W) x`` plus the base bias.
    """

    def supports_lora_conversion(self) -> bool:
        # the magnitude rescales rows of W as well, which a low-rank delta cannot express
        return False

    @staticmethod
    def init(module: Any, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """GraLoRA's init, then ``m = ||W + scaling * delta W||_row`` (DoRA's init: the adapted layer is unchanged)."""
        GraLoraLinearVariant.init(module, adapter_name, config, **kwargs)
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            # first DoRA adapter on this layer: make the magnitude trainable like the other adapter weights
            module.adapter_layer_names = tuple(module.adapter_layer_names) + ("lora_magnitude_vector",)
        weight_A = module.lora_A[adapter_name].weight
        if weight_A.is_meta:
            # the values come from a checkpoint (low_cpu_mem_usage)
            magnitude = torch.empty(module.lora_B[adapter_name].weight.shape[0], device="meta")
        else:
            with torch.no_grad():
                delta_oi = _transpose(gralora_delta(module, adapter_name, torch.float32), module.fan_in_fan_out)
                weight_oi = _base_weight_oi(module, torch.float32).to(delta_oi.device)
                magnitude = _row_norm(weight_oi, delta_oi).to(weight_A.dtype)
        module.lora_magnitude_vector[adapter_name] = GraLoraMagnitude(magnitude)

    @staticmethod
    def _merged(module: Any, adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``diag(m / n) (W + scaling * delta W)`` in ``orig_weight``'s layout and dtype; caches ``n`` for unmerge."""
        transposed = module.fan_in_fan_out  # the base weight is stored (in, out): Conv1D
        delta_oi = _transpose(gralora_delta(module, adapter, torch.float32), transposed).to(orig_weight.device)
        if module.merged_adapters:
            # the norm belongs to the weight that forward sees: without the adapters merged before this one. Read
            # orig_weight only afterwards: the context unmerges and merges them again, possibly in place.
            with module._unmerged_base_weight() as base_weight:
                norm = _row_norm(_transpose(base_weight, transposed), delta_oi)
            weight_oi = _transpose(orig_weight.detach(), transposed).float()
        else:
            weight_oi = _transpose(orig_weight.detach(), transposed).float()
            norm = _row_norm(weight_oi, delta_oi)
        module._cache_store(f"{adapter}-gralora-dora-norm", norm)
        merged_oi = _dora_factor(module, adapter, norm) * (weight_oi + delta_oi)
        return _transpose(merged_oi, transposed).to(orig_weight.dtype)

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return GraLoraDoraLinearVariant._merged(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = GraLoraDoraLinearVariant._merged(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        transposed = module.fan_in_fan_out  # the base weight is stored (in, out): Conv1D
        norm = module._cache_pop(f"{active_adapter}-gralora-dora-norm")
        delta_oi = _transpose(gralora_delta(module, active_adapter, torch.float32), transposed).to(orig_weight.device)
        weight_oi = _transpose(orig_weight.detach(), transposed).float() / _dora_factor(module, active_adapter, norm)
        return _transpose(weight_oi - delta_oi, transposed).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """``result`` ``(..., out)`` plus the DoRA-rescaled GraLoRA output for ``x`` ``(..., in)``."""
        weight_A, weight_B = adapter_weights(module, active_adapter)
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        base = module.get_base_layer()
        x = module._cast_input_dtype(x, weight_A.dtype)
        weight_oi = _base_weight_oi(module, x.dtype)
        with torch.no_grad():
            delta_oi = _transpose(gralora_delta(module, active_adapter, x.dtype), module.fan_in_fan_out)
            norm = _row_norm(weight_oi, delta_oi).to(x.dtype)
        scale = adapter_magnitude(module, active_adapter) / norm  # (out,)
        if isinstance(dropout, nn.Identity) or not module.training:
            # reuse the base output W x (+ bias): no second pass over the (possibly quantized) weight
            bias = getattr(base, "bias", None)
            base_result = result if bias is None else result - bias
        else:
            x = dropout(x)
            base_result = F.linear(x, weight_oi)
        lora_result = gralora_forward(
            x,
            weight_A,
            weight_B,
            module.gralora_k[active_adapter],
            module.hybrid_r[active_adapter],
            module.lora_B[active_adapter].bias,
        )
        return result + (scale - 1) * base_result.to(x.dtype) + scale * lora_result * scaling
