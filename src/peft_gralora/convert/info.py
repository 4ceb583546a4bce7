"""What an adapter directory holds (``peft-gralora info``)."""

from __future__ import annotations

import os
from typing import Any

from ..functional import gralora_effective_rank
from .dispatch import _as_variant
from .files import _read_adapter
from .layout import _VARIANT_KEYS, _VARIANT_SEGMENT, _module_key, _split_modules, _variant_modules

__all__ = ["adapter_info"]


def adapter_info(src_dir: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What an adapter directory holds.

    Returns:
        A dict with ``type`` (``"gralora"``, ``"gralora-upstream"``, ``"gralora-fork"`` or ``"lora"``),
        ``peft_type``, ``task_type``, ``base_model_name_or_path``, ``r`` (total rank, this package's convention;
        ``upstream_r`` for upstream adapters), ``gralora_k``, ``hybrid_r``, ``lora_alpha``, ``use_rslora``,
        ``modules`` (one dict per adapted module: ``name``, ``in_features``, ``out_features``, ``r``,
        ``effective_rank``), ``num_modules``, ``adapter_parameters`` (adapter factors and lora_B biases; for a fork
        adapter, what it holds once converted, without the fork's unused ``lora_A`` / ``lora_B``),
        ``other_parameters`` (modules_to_save copies, learnable base biases), ``parameter_count`` (both),
        ``effective_rank`` (the largest over modules: ``min(k * (r - hybrid_r) + hybrid_r, in, out)``) and
        ``plain_lora_rank`` (the largest rank of
        :func:`export_lora`'s output).
    """
    original = _read_adapter(src_dir, allow_pickle)
    adapter = _as_variant(original)
    cfg = adapter.config
    if adapter.kind == "lora":
        modules, rest = _split_modules(adapter.tensors, _VARIANT_KEYS, _VARIANT_SEGMENT, "LoRA")
        k, h = 1, 0
        ranks = {name: (parts["A"].shape[0], None) for name, parts in modules.items()}
    else:
        modules, rest, ranks = _variant_modules(adapter)
        k, h = cfg.get("gralora_k", 2), cfg.get("hybrid_r", 0)
    rows = []
    for name, parts in sorted(modules.items()):
        r_mod = ranks[name][0]
        in_f, out_f = parts["A"].shape[1], parts["B"].shape[0]
        rows.append(
            {
                "name": _module_key(name),
                "in_features": in_f,
                "out_features": out_f,
                "r": r_mod,
                "effective_rank": gralora_effective_rank(in_f, out_f, r_mod, k, h),
                "plain_lora_rank": k * (r_mod - h) + h,
            }
        )
    adapter_params = sum(t.numel() for parts in modules.values() for t in parts.values())
    other_params = sum(t.numel() for t in rest.values())
    info = {
        "path": str(original.path),
        "type": original.kind,
        "peft_type": original.config.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "gralora_k": k,
        "hybrid_r": h,
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "num_modules": len(rows),
        "modules": rows,
        "adapter_parameters": adapter_params,
        "other_parameters": other_params,
        "parameter_count": adapter_params + other_params,
        "effective_rank": max(row["effective_rank"] for row in rows),
        "plain_lora_rank": max(row["plain_lora_rank"] for row in rows),
    }
    if original.kind == "gralora-upstream":
        info["upstream_r"] = original.config.get("r")
    return info
