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
- **FSDP2** units around a factor module that exist anyway (``fully_shard(lora_A)``):
  :func:`peft_gralora.sharding.full_weight` unshards the unit with FSDP2's public ``unshard()``, copies the weight
  (differentiably: the gradient still reaches the unsharded parameter, which the root's post-backward callback
  reduce-scatters) and reshards it at once, so the unit never holds a full weight that an optimizer step could leave
  stale.
- **DeepSpeed ZeRO-3** gathers a partitioned parameter that is read inside a forward by itself (its
  ``ZeROOrderedDict`` registers it as an external parameter of the running module), so it needs nothing here.
- Everything else that is still partitioned when read (FSDP1 units around a factor, a shard read outside any
  forward) raises a ``RuntimeError`` naming the engine and the fix: never a computation on a shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..sharding import full_weight
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
