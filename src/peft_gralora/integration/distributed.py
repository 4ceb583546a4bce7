"""Sharded training (FSDP2, FSDP1, DeepSpeed ZeRO): GraLoRA reads its factors' weights, the engines expect calls.

GraLoRA reads ``lora_A[name].weight`` ``(r, in)`` and ``lora_B[name].weight`` ``(out, r)`` (and GraLoRA + DoRA's
``lora_magnitude_vector[name].weight`` ``(out,)``) blockwise instead of calling those submodules. An engine that
gathers a parameter only when *its* module is called therefore never gathers them:

- **peft's** ``fsdp_auto_wrap_policy`` (applied by transformers' Trainer to every PEFT model) makes each trainable leaf
  Linear its own FSDP unit. The patched policy (:func:`_make_fsdp_auto_wrap_policy`) leaves GraLoRA's factor modules
  out, so they join the enclosing unit (the decoder layer's, or the root's), which is unsharded while it runs. When
  nothing but GraLoRA factors would have had a unit of its own, it is plainly
  ``partial(transformer_auto_wrap_policy, transformer_layer_cls=...)`` with peft's decoder-layer classes: accelerate's
  FSDP2 path understands that form and shards layer by layer, where it makes the whole model one unit for peft's.
- **FSDP2** units around a factor module that exist anyway (``fully_shard(lora_A)``): :func:`full_weight` unshards the
  unit with FSDP2's public ``unshard()``, copies the weight (differentiably: the gradient still reaches the unsharded
  parameter, which the root's post-backward callback reduce-scatters) and reshards it at once, so the unit never
  holds a full weight that an optimizer step could leave stale.
- **DeepSpeed ZeRO-3** gathers a partitioned parameter that is read inside a forward by itself (its
  ``ZeROOrderedDict`` registers it as an external parameter of the running module), so it needs nothing here.
- Everything else that is still partitioned when read (FSDP1 units around a factor, a shard read outside any
  forward) raises a ``RuntimeError`` naming the engine and the fix: never a computation on a shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .patch import Patch

__all__ = ["patches", "full_weight", "gralora_factor_modules"]


def gralora_factor_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules whose weights GraLoRA reads without calling them: ``lora_A`` / ``lora_B`` (and the DoRA
    magnitude) of every GraLoRA adapter in ``model``."""
    from ..variant import is_gralora_adapter

    found: list[nn.Module] = []
    for layer in model.modules():
        variants = getattr(layer, "lora_variant", None)
        if not isinstance(variants, dict):
            continue
        for name in variants:
            if not is_gralora_adapter(layer, name):
                continue
            for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
                container = getattr(layer, attr, None)
                if container is not None and name in container:
                    found.append(container[name])
    return found


def _transformer_layer_classes(policy: Any) -> set[type] | None:
    """The decoder-layer classes inside peft's policy (``_or_policy`` of a leaf policy and a transformer one)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    for part in getattr(policy, "keywords", {}).get("policies", ()):
        if isinstance(part, functools.partial) and part.func is transformer_auto_wrap_policy:
            return set(part.keywords.get("transformer_layer_cls", ()))
    return None


def _make_fsdp_auto_wrap_policy(original: Callable) -> Callable:
    @functools.wraps(original)
    def fsdp_auto_wrap_policy(model: nn.Module) -> Callable:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = original(model)
        keep_out = {id(m) for m in gralora_factor_modules(model)}
        if not keep_out:
            return policy
        layer_classes = _transformer_layer_classes(policy)
        if layer_classes:
            layers = tuple(layer_classes)
            others = [
                m
                for m in model.modules()
                if id(m) not in keep_out
                and not isinstance(m, layers)
                and policy(module=m, recurse=False, nonwrapped_numel=0)
            ]
            if not others:
                # only GraLoRA factors would be units of their own: wrap decoder layers, as for a full fine-tune. In
                # this form accelerate's FSDP2 path recognises the policy and shards layer by layer (it ignores
                # peft's composite policy and makes the whole model one unit)
                return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)

        def gralora_aware_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
            # a GraLoRA factor never becomes a unit of its own: it stays in the unit of the layer that reads it
            if not recurse and id(module) in keep_out:
                return False
            return policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel)

        return gralora_aware_policy

    return fsdp_auto_wrap_policy


def patches() -> list[Patch]:
    """The patch row of peft's FSDP auto-wrap policy.

    transformers (``update_fsdp_plugin_peft``) imports it from ``peft.utils.other`` at call time, so the module
    attribute is the one patch point.
    """
    from peft.utils import other as peft_other

    return [
        Patch(
            peft_other,
            "fsdp_auto_wrap_policy",
            _make_fsdp_auto_wrap_policy,
            "the policy transformers' Trainer applies to PEFT models makes every trainable Linear its own FSDP unit, "
            "which GraLoRA (reading the weights without calling the module) would never unshard: keeps GraLoRA's "
            "factors in the enclosing unit; peft's policy unchanged otherwise",
        )
    ]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _fsdp2_full_weight(sub: nn.Module, what: str) -> torch.Tensor:
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(sub, FSDPModule):
        raise RuntimeError(
            f"{what} is an FSDP2 shard (DTensor) read outside the forward of the FSDP unit that holds it. GraLoRA "
            "can only read it inside that unit's forward (or its own fully_shard unit); call unshard() on the "
            "enclosing unit first, or read a full state dict."
        )
    if getattr(sub, "bias", None) is not None:
        raise RuntimeError(
            f"{what}: a GraLoRA factor with a bias (lora_bias=True) in its own FSDP2 unit is not supported. Leave "
            "lora_A / lora_B out of fully_shard (shard whole decoder layers) or use lora_bias=False."
        )
    # the gradient reaches the shard only through the root's post-backward callback: a unit that no FSDP2 root ran
    # around (its lazy init marks every unit below it) would leave the factor untrained without a word
    if getattr(sub._get_fsdp_state(), "_is_root", None) is not False:
        raise RuntimeError(
            f"{what} is its own FSDP2 unit, but no enclosing FSDP2 module has run it: GraLoRA reads the weight "
            "without calling the module, so its gradient is reduce-scattered only by an enclosing root's backward. "
            "fully_shard the model (the root) as well, or leave lora_A / lora_B out of fully_shard."
        )
    sub.unshard()
    try:
        # a copy, so the unit can reshard now; autograd still sends the gradient to the unsharded parameter, which
        # the root's post-backward callback reduce-scatters into the shard
        weight = sub.weight.clone()
    finally:
        sub.reshard()
    return weight


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("n" if n < 0 else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def full_weight(sub: nn.Module, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``sub.weight`` as a full (unpartitioned) tensor of ``shape``, or a clear error.

    The slow path of :func:`peft_gralora.variant.adapter_weights`, taken only when the weight is not a plain
    ``nn.Parameter`` of the expected shape.

    Args:
        sub: the factor module (``lora_A[name]``, ``lora_B[name]``, ``lora_magnitude_vector[name]``).
        what: its name for error messages, e.g. ``"lora_A['default']"``.
        shape: the full weight's shape, ``-1`` for sizes not checked: ``(-1, -1)`` for the factors (their shards are
            1-D), ``(out,)`` for the magnitude.

    Raises:
        RuntimeError: the weight is partitioned and cannot be gathered here (FSDP1 unit around the factor, a ZeRO-3
            partition read outside a forward, an FSDP2 shard outside its unit's forward), naming the fix.
    """
    weight = sub.weight
    if _is_dtensor(weight):
        return _fsdp2_full_weight(sub, what)
    if weight.dim() == len(shape) and all(n < 0 or n == got for n, got in zip(shape, weight.shape, strict=True)):
        return weight  # a plain tensor (functional_call, a tensor subclass) that is whole
    if hasattr(weight, "ds_id"):
        raise RuntimeError(
            f"{what} is a DeepSpeed ZeRO-3 partition (shape {tuple(weight.shape)}) read outside a forward. ZeRO-3 "
            "gathers it only inside a forward; wrap this call in "
            "deepspeed.zero.GatheredParameters(model.parameters()) (e.g. to merge or export), or save the adapter "
            "from the engine's consolidated 16-bit state dict."
        )
    is_fsdp1 = type(sub).__name__ == "FullyShardedDataParallel"
    raise RuntimeError(
        f"GraLoRA found {what} partitioned (shape {tuple(weight.shape)}, expected {_shape_text(shape)})"
        + (": it is its own FSDP1 unit" if is_fsdp1 else "")
        + ". GraLoRA reads the weight without calling the module, so a unit around the module alone never gathers "
        "it. Wrap with peft's fsdp_auto_wrap_policy as patched by peft-gralora (it keeps GraLoRA's lora_A / lora_B "
        "in the decoder layer's unit), or wrap whole decoder layers, or use FSDP2 / DeepSpeed."
    )
