"""Reading a GraLoRA factor's weight whole under FSDP2, FSDP1 and DeepSpeed ZeRO-3 (core: no peft import).

GraLoRA reads ``lora_A[name].weight`` ``(r, in)`` and ``lora_B[name].weight`` ``(out, r)`` (and GraLoRA + DoRA's
``lora_magnitude_vector[name].weight`` ``(out,)``) blockwise instead of calling those submodules, so an engine that
gathers a parameter only when *its* module is called never gathers them. :func:`full_weight` is the slow path of
:func:`peft_gralora.variant.adapter_weights` for such weights:

- **FSDP2** units around a factor module (``fully_shard(lora_A)``): the unit is unsharded with FSDP2's public
  ``unshard()``, the weight copied (differentiably: the gradient still reaches the unsharded parameter, which the
  root's post-backward callback reduce-scatters) and the unit resharded at once, so it never holds a full weight that
  an optimizer step could leave stale.
- **DeepSpeed ZeRO-3** gathers a partitioned parameter read inside a forward by itself; outside a forward it is an
  error naming ``GatheredParameters``.
- Everything else still partitioned when read (FSDP1 units around a factor, a shard read outside any forward) raises
  a ``RuntimeError`` naming the engine and the fix: never a computation on a shard.

The peft side (the GraLoRA-aware FSDP auto-wrap policy) is in :mod:`peft_gralora.integration.distributed`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["full_weight"]


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
