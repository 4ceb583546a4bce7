"""GraLoRA -> an exactly equivalent plain LoRA adapter (block-diagonal factors and a permutation; no SVD)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import GRALORA_FIELDS
from ..functional import export_lora_factors
from .dispatch import _as_variant
from .files import _check_destination, _read_adapter, _write_adapter
from .layout import _VARIANT_KEYS, AdapterConversionError, _Adapter, _module_key, _number, _scaling, _variant_modules

__all__ = ["export_lora"]


def _plain_lora(adapter: _Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = adapter.config
    k, h, r = cfg.get("gralora_k", 2), cfg.get("hybrid_r", 0), cfg["r"]
    rslora = bool(cfg.get("use_rslora", False))
    modules, rest, ranks = _variant_modules(adapter)

    def exported(r_mod: int, alpha_mod: float) -> tuple[int, float]:
        # rank k*g + h; alpha chosen so that plain LoRA's alpha / rank equals this module's GraLoRA scaling
        rank = k * (r_mod - h) + h
        return rank, _scaling(alpha_mod, r_mod, rslora) * rank

    r_out, alpha_out = exported(r, cfg.get("lora_alpha", 8))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    tensors = dict(rest)
    for name, parts in modules.items():
        weight_A, weight_B = export_lora_factors(parts["A"], parts["B"], k, h)
        tensors[name + _VARIANT_KEYS["A"]] = weight_A
        tensors[name + _VARIANT_KEYS["B"]] = weight_B
        # lora_B's bias sits inside lora_B in both forms, so it gets the same scaling: unchanged. DoRA's magnitude
        # divides by the row norms of W + scaling * B @ A, which the exact factors leave unchanged: unchanged too.
        for part in ("bias", "magnitude"):
            if part in parts:
                tensors[name + _VARIANT_KEYS[part]] = parts[part]
        rank_mod, alpha_mod = exported(*ranks[name])
        if rank_mod != weight_A.shape[0]:  # the export's rank is k*g + h by construction; a cheap guard
            raise AdapterConversionError(f"Internal error: module {name!r} exported to rank {weight_A.shape[0]}.")
        # exact module names (escaped) so that no pattern reaches another module
        key = re.escape(_module_key(name))
        if rank_mod != r_out:
            rank_pattern[key] = rank_mod
        if alpha_mod != alpha_out:
            alpha_pattern[key] = _number(alpha_mod)
    out = {name: value for name, value in cfg.items() if name not in GRALORA_FIELDS}
    # peft returns the first matching pattern: most specific (longest) names first
    out.update(
        r=r_out,
        lora_alpha=_number(alpha_out),
        use_rslora=False,
        rank_pattern=dict(sorted(rank_pattern.items(), key=lambda kv: (-len(kv[0]), kv[0]))),
        alpha_pattern=dict(sorted(alpha_pattern.items(), key=lambda kv: (-len(kv[0]), kv[0]))),
    )
    return out, tensors


def export_lora(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write a GraLoRA adapter as an exactly equivalent plain LoRA adapter (no SVD, no approximation).

    Each module of rank ``r`` becomes a plain LoRA module of rank ``k * (r - hybrid_r) + hybrid_r`` whose
    ``lora_B @ lora_A`` equals the GraLoRA delta (block-diagonal factors and a permutation; docs/design.md, "The
    math").
    The scaling is folded into ``lora_alpha`` (and per-module ``alpha_pattern`` / ``rank_pattern`` entries when
    modules differ), with ``use_rslora=False``. GraLoRA+DoRA becomes plain DoRA with the same magnitudes (the row
    norms of ``W + scaling * B @ A`` do not change with exact factors). Everything else in the config and the state
    dict (target_modules, modules_to_save weights, learnable biases, ``lora_bias``, task type, base model name, ...)
    is kept. The result loads in plain peft, without this package. Upstream ``GraloraConfig`` adapters are accepted
    too.

    Args:
        src_dir: a saved GraLoRA adapter directory (``LoraConfig(use_gralora=True)`` or upstream ``GraloraConfig``).
        dst_dir: where to write; must not exist or be empty unless ``overwrite``.
        overwrite: replace a non-empty ``dst_dir``.
        allow_pickle: accept an ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).

    Returns:
        ``dst_dir`` as a ``Path``.

    Raises:
        AdapterConversionError: (a ``ValueError``) for unreadable, unsupported or inconsistent input; ``dst_dir`` is
            left untouched.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    _check_destination(dst, src, overwrite)
    adapter = _as_variant(_read_adapter(src, allow_pickle))
    if adapter.kind == "lora":
        raise AdapterConversionError(f"{str(src)!r} is already a plain LoRA adapter (no use_gralora); nothing to do.")
    config, tensors = _plain_lora(adapter)
    _write_adapter(dst, config, tensors)
    return dst
