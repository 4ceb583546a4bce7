"""Patches of peft's LoRA layer classes: the variant tables, ``get_delta_weight``, the bitsandbytes layers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..dora import GraLoraDoraLinearVariant
from ..quant import dequantize_4bit_weight, is_cpu_packed_4bit, restore_canonical_4bit_
from ..variant import GraLoraLinearVariant, gralora_delta, is_gralora_adapter
from ._targets import bnb_targets, peft_targets
from .patch import Patch

__all__ = ["patches", "gralora_layer_classes", "unsupported_layer_error", "may_hold_gralora"]


def _make_lora_variants(original: property) -> property:
    def lora_variants(self) -> dict:
        table = dict(original.fget(self))
        table[("use_gralora",)] = GraLoraLinearVariant
        table[("use_dora", "use_gralora")] = GraLoraDoraLinearVariant
        return table

    return property(lora_variants, doc=original.__doc__)


def _make_get_delta_weight(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_delta_weight(self, adapter, *args: Any, **kwargs: Any):
        if is_gralora_adapter(self, adapter):
            return gralora_delta(self, adapter)
        return original(self, adapter, *args, **kwargs)

    return get_delta_weight


def _make_bnb_resolve_lora_variant(original: Callable) -> Callable:
    @functools.wraps(original)
    def resolve_lora_variant(self, *, config: Any, **kwargs: Any):
        if getattr(config, "use_gralora", False):
            # other variants next to use_gralora are refused at config time; DoRA is the one combination
            return GraLoraDoraLinearVariant() if config.use_dora else GraLoraLinearVariant()
        return original(self, config=config, **kwargs)

    return resolve_lora_variant


def _make_restore_4bit_first(original: Callable) -> Callable:
    """Wrap ``bnb.Linear4bit.merge`` / ``unmerge``: put a CPU-packed base weight back into bitsandbytes' canonical
    layout before peft dequantizes it (it is re-quantized by the merge anyway)."""

    @functools.wraps(original)
    def merge_or_unmerge(self, *args: Any, **kwargs: Any):
        restore_canonical_4bit_(self.get_base_layer().weight)
        return original(self, *args, **kwargs)

    return merge_or_unmerge


def _make_restore_4bit_when_training(original: Callable) -> Callable:
    """Wrap ``bnb.Linear4bit.forward``: bitsandbytes computes with a CPU-packed weight through a kernel without
    autograd, so a layer that was packed by an eval forward and then trained would cut the gradient through its base
    weight. In training mode, put the weight back first (bitsandbytes only packs in eval mode)."""

    @functools.wraps(original)
    def forward(self, x, *args: Any, **kwargs: Any):
        if self.training:
            restore_canonical_4bit_(self.get_base_layer().weight)
        return original(self, x, *args, **kwargs)

    return forward


def _make_dequantize_module_weight(original: Callable) -> Callable:
    """Wrap ``peft.tuners.lora.dora.dequantize_module_weight``: read a CPU-packed 4-bit weight correctly (DoRA's
    forward and init dequantize the base weight; on a packed weight peft's path returns garbage)."""

    @functools.wraps(original)
    def dequantize_module_weight(module: Any):
        weight = getattr(module, "weight", None)
        if is_cpu_packed_4bit(weight):
            return dequantize_4bit_weight(weight)
        return original(module)

    return dequantize_module_weight


def gralora_layer_classes() -> tuple[type, ...]:
    """LoRA layer classes whose GraLoRA support is implemented and tested (exact types, not subclasses)."""
    return (peft_targets()["Linear"], *bnb_targets().values())


def unsupported_layer_error(layer: Any, module_name: str) -> ValueError:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    supported = ", ".join(f"lora.{c.__name__}" for c in gralora_layer_classes())
    becomes = f" (LoRA layer {type(layer).__name__})" if layer is not base else ""
    return ValueError(
        f"use_gralora=True cannot adapt module {module_name!r}: its layer type {type(base).__name__}{becomes} has "
        f"no GraLoRA implementation (supported LoRA layers: {supported}, i.e. torch.nn.Linear, transformers Conv1D "
        "and bitsandbytes 4-bit / 8-bit Linear). Remove the module from target_modules (or use exclude_modules), or "
        "set use_gralora=False for plain LoRA."
    )


def may_hold_gralora(base: Any) -> bool:
    """Whether a base layer is of a kind GraLoRA can adapt (checked before peft dispatches it, so that a layer's own
    errors, e.g. "does not support DoRA", do not hide the real reason). ``nn.Linear`` subclasses that a third-party
    dispatcher claims are caught after dispatch by type."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    # torchao keeps nn.Linear but swaps the weight for a quantized tensor subclass (peft checks it the same way)
    if type(getattr(base, "weight", None)).__module__.startswith("torchao."):
        return False
    return isinstance(base, (nn.Linear, Conv1D))


_WHY_DELTA = (
    "returns the GraLoRA delta for GraLoRA adapters (DoRA merges, SVD weighted adapters, convert_to_lora, intruder "
    "reduction call it; the bitsandbytes classes override it with plain B @ A)"
)
_WHY_PACKED = (
    "bitsandbytes repacks 4-bit weights for its CPU kernel on eval forwards, after which dequantize_4bit returns "
    "garbage (and its own inverse, run when the base layer is saved, leaves absmax transposed): undo the packing "
    "correctly first, then call the original. Fixes plain LoRA / DoRA too; a no-op for weights never packed"
)


def patches() -> list[Patch]:
    """The patch rows of the LoRA layer classes."""
    t = peft_targets()
    linear = t["Linear"]
    bnb = bnb_targets()
    bnb_4bit = [bnb["Linear4bit"]] if "Linear4bit" in bnb else []
    return [
        Patch(
            linear,
            "lora_variants",
            _make_lora_variants,
            "maps ('use_gralora',) to GraLoraLinearVariant and ('use_dora', 'use_gralora') to "
            "GraLoraDoraLinearVariant",
        ),
        Patch(linear, "get_delta_weight", _make_get_delta_weight, _WHY_DELTA),
        *[
            Patch(
                bnb_cls,
                "resolve_lora_variant",
                _make_bnb_resolve_lora_variant,
                "the hand-written resolver ignores use_gralora: returns the GraLoRA (or GraLoRA + DoRA) variant for "
                "GraLoRA configs, peft's resolver otherwise",
            )
            for bnb_cls in bnb.values()
        ],
        *[Patch(bnb_cls, "get_delta_weight", _make_get_delta_weight, _WHY_DELTA) for bnb_cls in bnb.values()],
        # _save_to_state_dict runs before the base layer's own, whose inverse of the packing corrupts absmax
        *[
            Patch(bnb4, attr, _make_restore_4bit_first, _WHY_PACKED)
            for bnb4 in bnb_4bit
            for attr in ("merge", "unmerge", "_save_to_state_dict")
        ],
        *[
            Patch(
                bnb4,
                "forward",
                _make_restore_4bit_when_training,
                "in training mode, undoes the CPU packing first: a packed weight is computed by a kernel without "
                "autograd, which would cut the gradient through the base layer",
            )
            for bnb4 in bnb_4bit
        ],
        # only where bitsandbytes 4-bit exists: nothing can be CPU-packed otherwise
        *(
            [
                Patch(
                    t["dora"],
                    "dequantize_module_weight",
                    _make_dequantize_module_weight,
                    "module global used by peft's DoRA forward / init: dequantizes a CPU-packed 4-bit weight "
                    "correctly (plain DoRA's eval forward on 4-bit is ~12 % off otherwise); peft's function otherwise",
                )
            ]
            if bnb_4bit
            else []
        ),
    ]
