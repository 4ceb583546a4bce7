"""Upstream peft ``GraloraConfig`` adapters <-> ``LoraConfig(use_gralora=True)`` adapters (configs and tensors; exact:
a reshape of the weights)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import GRALORA_FIELDS
from ..functional import upstream_to_variant, variant_to_upstream
from .layout import (
    _FORK_DEAD_KEYS,
    _UPSTREAM_KEYS,
    _UPSTREAM_SEGMENT,
    _VARIANT_KEYS,
    AdapterConversionError,
    _Adapter,
    _int_field,
    _neutral,
    _split_modules,
    _variant_modules,
)

# PeftConfig fields shared by both config classes, copied as they are
_COMMON_FIELDS = (
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "target_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
)
# upstream GraloraConfig field -> LoraConfig field with the same meaning (r and bias need arithmetic / renaming)
_RENAMED_FIELDS = {"alpha": "lora_alpha", "gralora_dropout": "lora_dropout", "gralora_k": "gralora_k"}
_UPSTREAM_HANDLED = {*_COMMON_FIELDS, *_RENAMED_FIELDS, "peft_type", "r", "hybrid_r", "bias", "init_weights"}
_VARIANT_HANDLED = {
    *_COMMON_FIELDS,
    *_RENAMED_FIELDS.values(),
    *GRALORA_FIELDS,
    "peft_type",
    "r",
    "bias",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    # only meaningful together with options that are checked to be off (use_qalora, megatron_config)
    "qalora_group_size",
    "megatron_core",
}


def _upstream_to_variant(adapter: _Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = adapter.config
    unknown = {k: v for k, v in cfg.items() if k not in _UPSTREAM_HANDLED and not _neutral(v)}
    if unknown:
        raise AdapterConversionError(
            f"The upstream GraloraConfig sets {unknown}, which LoraConfig(use_gralora=True) cannot represent."
        )
    k, h, r_up = _int_field(cfg, "gralora_k", 2), _int_field(cfg, "hybrid_r", 0), _int_field(cfg, "r", 32)
    if k < 1 or h < 0 or r_up < 1 or r_up % k:
        raise AdapterConversionError(
            f"Invalid upstream GraloraConfig: r={r_up}, gralora_k={k}, hybrid_r={h} (need r >= 1 divisible by "
            "gralora_k >= 1 and hybrid_r >= 0)."
        )
    bias = cfg.get("bias", "none")
    out: dict[str, Any] = {name: cfg[name] for name in _COMMON_FIELDS if name in cfg}
    out.update({ours: cfg[theirs] for theirs, ours in _RENAMED_FIELDS.items() if theirs in cfg})
    out.update(
        peft_type="LORA",
        r=r_up + h,  # our r is the total rank; scaling alpha / (r_up + h) is LoRA's alpha / r
        hybrid_r=h,
        gralora_k=k,
        use_gralora=True,
        bias="lora_only" if bias == "gralora_only" else bias,
        init_lora_weights=bool(cfg.get("init_weights", True)),
        use_rslora=False,
        lora_bias=False,
        use_dora=False,
        rank_pattern={},
        alpha_pattern={},
    )
    modules, rest = _split_modules(adapter.tensors, _UPSTREAM_KEYS, _UPSTREAM_SEGMENT, "upstream GraLoRA")
    tensors = dict(rest)
    for name, parts in modules.items():
        weight_A, weight_B = _gralora_factors_to_variant(name, parts, k, h, r_up, "upstream GraloraConfig")
        tensors[name + _VARIANT_KEYS["A"]] = weight_A
        tensors[name + _VARIANT_KEYS["B"]] = weight_B
    return out, tensors


def _gralora_factors_to_variant(
    name: str, parts: dict[str, torch.Tensor], k: int, h: int, g: int | None, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's ``gralora_A (k, in/k, g)``, ``gralora_B (k, g, out/k)`` [, ``gralora_{A,B}_general``] (upstream's
    layout, also the fork's) checked and reshaped into ``lora_A.weight (g + h, in)``, ``lora_B.weight (out, g + h)``.

    Args:
        g: the GraLoRA rank the config gives; None to take it from the tensors (the fork's rank_pattern).

    Raises:
        AdapterConversionError: naming the module, for a missing factor, hybrid weights that do not match
            ``hybrid_r``, or shapes that do not fit ``k`` / ``hybrid_r``.
    """
    missing = [f"gralora_{p}" for p in ("A", "B") if p not in parts]
    if missing:
        raise AdapterConversionError(
            f"Module {name!r} of the {source} adapter has {_part_names(parts)} but lacks {missing}: the adapter is "
            "incomplete (a damaged or partly edited file); nothing was loaded."
        )
    gen_A, gen_B = parts.get("A_general"), parts.get("B_general")
    if (gen_A is None) != (gen_B is None) or (gen_A is not None) != (h > 0):
        raise AdapterConversionError(
            f"Module {name!r} of the {source} adapter: hybrid_r={h} in the config, but its hybrid weights are "
            f"{[f'gralora_{p}' for p in ('A_general', 'B_general') if p in parts] or 'absent'} (expected both when "
            "hybrid_r > 0, neither when hybrid_r == 0)."
        )
    A_up, B_up = parts["A"], parts["B"]
    ok = A_up.dim() == 3 and B_up.dim() == 3 and A_up.shape[0] == k == B_up.shape[0]
    ok = ok and A_up.shape[2] == B_up.shape[1] and A_up.shape[2] % k == 0 and A_up.shape[2] > 0
    ok = ok and (g is None or A_up.shape[2] == g)
    if ok and h:
        ok = tuple(gen_A.shape) == (h, k * A_up.shape[1]) and tuple(gen_B.shape) == (k * B_up.shape[2], h)
    if not ok:
        shapes = {f"gralora_{p}": tuple(t.shape) for p, t in parts.items() if p in _UPSTREAM_KEYS}
        rank = f"r={g}" if g is not None else "g = r - hybrid_r"
        raise AdapterConversionError(
            f"Shape mismatch in module {name!r} of the {source} adapter: {shapes}; with {rank}, gralora_k={k}, "
            f"hybrid_r={h} it must hold gralora_A (k, in/k, g), gralora_B (k, g, out/k) with g divisible by k, "
            "gralora_A_general (hybrid_r, in), gralora_B_general (out, hybrid_r)."
        )
    return upstream_to_variant(A_up, B_up, gen_A, gen_B)


def _part_names(parts: dict[str, torch.Tensor]) -> list[str]:
    names = {**{p: f"gralora_{p}" for p in _UPSTREAM_KEYS}, **{p: s[1:] for p, s in _FORK_DEAD_KEYS.items()}}
    return sorted(names.get(p, p) for p in parts)


def _variant_to_upstream(adapter: _Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = adapter.config
    for name, value in cfg.items():
        if name in _VARIANT_HANDLED or _neutral(value):
            continue
        raise AdapterConversionError(
            f"{name}={value!r} cannot be represented by upstream GraloraConfig (it has no such option); export to "
            "plain LoRA with export_lora instead, or retrain without it."
        )
    init = cfg.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise AdapterConversionError(f"init_lora_weights={init!r} cannot be represented by upstream GraloraConfig.")
    modules, rest, ranks = _variant_modules(adapter)
    k, h, r = cfg.get("gralora_k", 2), cfg.get("hybrid_r", 0), cfg["r"]
    alpha = cfg.get("lora_alpha", 8)
    for name, (r_mod, alpha_mod) in ranks.items():
        if (r_mod, alpha_mod) != (r, alpha):
            raise AdapterConversionError(
                f"Module {name!r} has r={r_mod}, lora_alpha={alpha_mod} from rank_pattern/alpha_pattern, but upstream "
                f"GraloraConfig has one r and alpha for all modules (r={r}, lora_alpha={alpha}); export to plain LoRA "
                "with export_lora instead."
            )
    bias = cfg.get("bias", "none")
    out: dict[str, Any] = {name: cfg[name] for name in _COMMON_FIELDS if name in cfg}
    out.update({theirs: cfg[ours] for theirs, ours in _RENAMED_FIELDS.items() if ours in cfg})
    out.update(
        peft_type="GRALORA",
        r=r - h,  # upstream's r is the GraLoRA rank; its scaling alpha / (r_up + hybrid_r) equals ours
        hybrid_r=h,
        gralora_k=k,
        alpha=alpha,
        bias="gralora_only" if bias == "lora_only" else bias,
        init_weights=init is not False,
    )
    tensors = dict(rest)
    for name, parts in modules.items():
        A_up, B_up, gen_A, gen_B = variant_to_upstream(parts["A"], parts["B"], k, h)
        tensors[name + _UPSTREAM_KEYS["A"]] = A_up
        tensors[name + _UPSTREAM_KEYS["B"]] = B_up
        if gen_A is not None:
            tensors[name + _UPSTREAM_KEYS["A_general"]] = gen_A
            tensors[name + _UPSTREAM_KEYS["B_general"]] = gen_B
    return out, tensors
