"""Adapter-directory conversions: GraLoRA -> exact plain LoRA, upstream ``GraloraConfig`` <-> this package, and the
GraLoRA PEFT fork's layout -> this package.

All functions work on the saved files (``adapter_config.json`` + ``adapter_model.safetensors``); no base model and
no peft import is needed. Four adapter types are recognised (by the config and, for the fork, by its weight keys):

====================  ======================================================  ======================================
type                  adapter_config.json                                     weights per adapted module
====================  ======================================================  ======================================
``gralora``           ``peft_type: LORA``, ``use_gralora: true``              ``lora_A.weight (r, in)``,
                                                                              ``lora_B.weight (out, r)``
                                                                              [, ``lora_B.bias (out,)``,
                                                                              ``lora_magnitude_vector (out,)``]
``gralora-upstream``  ``peft_type: GRALORA`` (peft's own ``GraloraConfig``)   ``gralora_A (k, in/k, g)``,
                                                                              ``gralora_B (k, g, out/k)``
                                                                              [, ``gralora_{A,B}_general.weight``]
``gralora-fork``      ``peft_type: LORA``, ``use_gralora: true`` (the PEFT     upstream's ``gralora_*`` tensors, plus
                      fork of seed 004)                                       unused ``lora_A`` / ``lora_B`` weights
``lora``              ``peft_type: LORA``                                     ``lora_A.weight``, ``lora_B.weight``
====================  ======================================================  ======================================

The math is in :mod:`peft_gralora.functional` (``export_lora_factors``, ``upstream_to_variant``,
``variant_to_upstream``); this module reads, checks, renames and writes. Every output is written to a temporary
directory next to ``dst_dir`` and moved into place only when complete, so on any error ``dst_dir`` is untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .functional import (
    export_lora_factors,
    gralora_effective_rank,
    gralora_shape,
    upstream_to_variant,
    variant_to_upstream,
)

__all__ = [
    "AdapterConversionError",
    "export_lora",
    "convert_adapter",
    "adapter_info",
    "has_fork_layout",
    "fork_to_variant_state_dict",
    "ForkConversion",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# peft saves adapter weights under the PeftModel's attribute path; module names in patterns are relative to the model
MODEL_PREFIX = "base_model.model."

# per-module weight keys (suffixes after the module name)
_VARIANT_KEYS = {
    "A": ".lora_A.weight",
    "B": ".lora_B.weight",
    "bias": ".lora_B.bias",
    # DoRA's magnitude (use_dora=True); peft saves it without DoRA's ".weight"
    "magnitude": ".lora_magnitude_vector",
}
_UPSTREAM_KEYS = {
    "A": ".gralora_A",
    "B": ".gralora_B",
    "A_general": ".gralora_A_general.weight",
    "B_general": ".gralora_B_general.weight",
}
# the GraLoRA PEFT fork (seed 004) keeps upstream's gralora_* tensors in a LoraConfig(use_gralora=True) adapter, next
# to lora_A / lora_B weights (and lora_B's bias with lora_bias) that its forward never reads
_FORK_DEAD_KEYS = {"dead_A": ".lora_A.weight", "dead_B": ".lora_B.weight", "dead_bias": ".lora_B.bias"}
_FORK_SEGMENT = re.compile(r"(^|\.)gralora_(A|B)(_general)?(\.|$)")
# a key segment that belongs to an adapter (as opposed to modules_to_save copies and learnable base biases)
_VARIANT_SEGMENT = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
_UPSTREAM_SEGMENT = re.compile(r"(^|\.)gralora_[A-Za-z_]+(\.|$)")

_GRALORA_FIELDS = ("use_gralora", "gralora_k", "hybrid_r")
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
    *_GRALORA_FIELDS,
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


class AdapterConversionError(ValueError):
    """An adapter directory cannot be read or converted; the message says why and what to do."""


@dataclass
class _Adapter:
    """An adapter directory in memory: its config dict, its tensors and its type."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = _adapter_kind(self.config, self.path)
        if self.kind == "gralora" and has_fork_layout(self.tensors):
            self.kind = "gralora-fork"


# ---------------------------------------------------------------------------------------------------------------------
# reading and writing
# ---------------------------------------------------------------------------------------------------------------------


def _adapter_kind(config: dict[str, Any], path: Path) -> str:
    peft_type = config.get("peft_type")
    if peft_type == "GRALORA":
        return "gralora-upstream"
    if peft_type == "LORA":
        return "gralora" if config.get("use_gralora") else "lora"
    raise AdapterConversionError(
        f"{path / CONFIG_NAME} has peft_type={peft_type!r}; only LORA (plain or use_gralora=True) and GRALORA "
        "(upstream GraloraConfig) adapters are supported."
    )


def _read_adapter(src_dir: str | os.PathLike, allow_pickle: bool = False) -> _Adapter:
    """Read ``adapter_config.json`` and the weights (safetensors; ``.bin`` only with ``allow_pickle``)."""
    path = Path(src_dir)
    if not path.is_dir():
        raise AdapterConversionError(f"Adapter directory {str(path)!r} does not exist or is not a directory.")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterConversionError(f"{str(path)!r} has no {CONFIG_NAME}: it is not a saved peft adapter.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConversionError(f"Cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterConversionError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    return _Adapter(path, config, _read_tensors(path, allow_pickle))


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safe_file, bin_file = path / SAFETENSORS_NAME, path / BIN_NAME
    if safe_file.is_file():
        try:
            return load_file(safe_file, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterConversionError(f"Cannot read {safe_file} (corrupt or truncated?): {exc}") from exc
    if bin_file.is_file():
        if not allow_pickle:
            raise AdapterConversionError(
                f"{bin_file} is a pickle file, which can run code when loaded, and there is no {SAFETENSORS_NAME}. "
                "If you trust it, pass allow_pickle=True (CLI: --allow-bin); it is then loaded with "
                "torch.load(weights_only=True)."
            )
        try:
            loaded = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
            raise AdapterConversionError(f"Cannot read {bin_file} with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise AdapterConversionError(f"{bin_file} does not hold a state dict (a dict of name -> tensor).")
        # separate, contiguous storage: safetensors refuses tensors that share memory
        return {k: v.detach().clone().contiguous() for k, v in loaded.items()}
    raise AdapterConversionError(f"{str(path)!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}.")


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise AdapterConversionError(f"Destination {str(dst)!r} exists and is not a directory.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise AdapterConversionError(f"Destination {str(dst)!r} is the source directory; choose another one.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise AdapterConversionError(
            f"Destination {str(dst)!r} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
        )


def _write_adapter(dst: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write into a fresh temporary directory beside ``dst``, then move it into place (replacing ``dst``)."""
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    old = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / SAFETENSORS_NAME), {"format": "pt"})
        if dst.exists():
            # rename(2) cannot replace a non-empty directory: move it aside first, put it back if the swap fails
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except OSError:
            if old is not None:
                os.replace(old, dst)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# per-module views of a state dict
# ---------------------------------------------------------------------------------------------------------------------


def _module_key(name: str) -> str:
    """The module name peft matches ``rank_pattern`` / ``alpha_pattern`` against (relative to the base model)."""
    return name.removeprefix(MODEL_PREFIX)


def _pattern_value(patterns: dict[str, Any] | None, module_key: str, default: Any) -> Any:
    """The value of the first pattern matching ``module_key`` with peft's rule (``(.*\\.)?(pattern)$``)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def _group_by_module(
    tensors: dict[str, torch.Tensor],
    suffixes: dict[str, str],
    is_adapter_key: Callable[[str], bool],
    unknown: Callable[[str], str],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module: {part: tensor}}`` for keys ending in one of ``suffixes`` (``part -> suffix``), and the other keys.

    Raises:
        AdapterConversionError: with ``unknown(key)`` for a key that ``is_adapter_key`` claims but no suffix matches.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for part, suffix in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            if is_adapter_key(key):
                raise AdapterConversionError(unknown(key))
            rest[key] = tensor
    return modules, rest


def _split_modules(
    tensors: dict[str, torch.Tensor], suffixes: dict[str, str], segment: re.Pattern, kind: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group adapter tensors by module name; everything else (modules_to_save, base biases) is returned as is.

    Raises:
        AdapterConversionError: on adapter keys this converter does not know (DoRA magnitudes, embeddings, ...).
    """
    modules, rest = _group_by_module(
        tensors,
        suffixes,
        lambda key: segment.search(key) is not None,
        lambda key: (
            f"Unsupported weight {key!r} in a {kind} adapter: only {sorted(suffixes.values())} are "
            "understood (embedding adapters and other LoRA options cannot be converted)."
        ),
    )
    for name, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise AdapterConversionError(
                f"Module {name!r} of the {kind} adapter has {sorted(parts)} but needs both A and B factors."
            )
    if not modules:
        raise AdapterConversionError(f"The {kind} adapter holds no adapter weights ({sorted(suffixes.values())}).")
    return modules, rest


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _number(x: float) -> int | float:
    """Write integral alphas as JSON integers."""
    return int(x) if float(x).is_integer() else x


def _int_field(config: dict[str, Any], name: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AdapterConversionError(f"adapter_config.json field {name!r} must be an integer, got {value!r}.")
    return value


def _neutral(value: Any) -> bool:
    """Whether a config value is an option's off state (None, False, empty)."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _variant_modules(
    adapter: _Adapter,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """Tensors of a GraLoRA-variant adapter by module, checked against its config; plus ``(r, alpha)`` per module."""
    cfg = adapter.config
    k, h, r = _int_field(cfg, "gralora_k", 2), _int_field(cfg, "hybrid_r", 0), _int_field(cfg, "r", 8)
    alpha = cfg.get("lora_alpha", 8)
    dora = bool(cfg.get("use_dora", False))
    modules, rest = _split_modules(adapter.tensors, _VARIANT_KEYS, _VARIANT_SEGMENT, "GraLoRA")
    ranks: dict[str, tuple[int, float]] = {}
    for name, parts in modules.items():
        key = _module_key(name)
        r_mod = _pattern_value(cfg.get("rank_pattern"), key, r)
        alpha_mod = _pattern_value(cfg.get("alpha_pattern"), key, alpha)
        weight_A, weight_B = parts["A"], parts["B"]
        if weight_A.dim() != 2 or weight_A.shape[0] != r_mod:
            raise AdapterConversionError(
                f"Shape mismatch in module {name!r}: lora_A.weight has shape {tuple(weight_A.shape)}, but the config "
                f"gives this module r={r_mod} (expected ({r_mod}, in_features))."
            )
        try:
            gralora_shape(weight_A, weight_B, k, h)
        except ValueError as exc:
            raise AdapterConversionError(f"Shape mismatch in module {name!r}: {exc}") from exc
        for part in ("bias", "magnitude"):
            vector = parts.get(part)
            if vector is not None and tuple(vector.shape) != (weight_B.shape[0],):
                raise AdapterConversionError(
                    f"Shape mismatch in module {name!r}: {_VARIANT_KEYS[part][1:]} has shape {tuple(vector.shape)}, "
                    f"expected ({weight_B.shape[0]},)."
                )
        if ("magnitude" in parts) != dora:
            raise AdapterConversionError(
                f"Module {name!r}: use_dora={dora} in the config, but its DoRA magnitude (lora_magnitude_vector) is "
                f"{'present' if 'magnitude' in parts else 'missing'}."
            )
        ranks[name] = (r_mod, alpha_mod)
    return modules, rest, ranks


# ---------------------------------------------------------------------------------------------------------------------
# upstream <-> variant (configs and tensors)
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# the GraLoRA PEFT fork's layout -> this package's (state dicts; also used by peft_gralora.integration.loading)
# ---------------------------------------------------------------------------------------------------------------------


def has_fork_layout(tensors: Iterable[str]) -> bool:
    """Whether a state dict's keys hold the GraLoRA fork's weights (``<module>.gralora_A`` / ``gralora_B`` /
    ``gralora_{A,B}_general.weight``). Only meaningful for a ``LoraConfig(use_gralora=True)`` adapter: upstream's
    ``GraloraConfig`` (``peft_type: GRALORA``) uses the same names for its own tuner."""
    return any(_FORK_SEGMENT.search(key) for key in tensors)


@dataclass
class ForkConversion:
    """The result of :func:`fork_to_variant_state_dict`."""

    tensors: dict[str, torch.Tensor]
    modules: list[str]
    # modules whose (unused) lora_B bias was non-zero in the fork's file and is loaded as zeros
    ignored_bias: list[str]


def fork_to_variant_state_dict(
    tensors: dict[str, torch.Tensor],
    *,
    gralora_k: int,
    hybrid_r: int,
    lora_bias: bool = False,
    use_dora: bool = False,
    init_lora_weights: Any = True,
) -> ForkConversion:
    """Convert a state dict saved by the GraLoRA PEFT fork into this package's layout, exactly.

    Per adapted module ``<m>`` the fork stores ``<m>.gralora_A (k, in/k, g)`` and ``<m>.gralora_B (k, g, out/k)``
    (upstream ``GraloraConfig``'s layout, computing the same function) and, with ``hybrid_r > 0``,
    ``<m>.gralora_{A,B}_general.weight``; next to them ``<m>.lora_A.weight (r, in)`` / ``<m>.lora_B.weight (out, r)``
    [/ ``<m>.lora_B.bias``] that its forward never reads. The result holds ``<m>.lora_A.weight`` /
    ``<m>.lora_B.weight`` from the ``gralora_*`` tensors (the pure reshape of
    :func:`~peft_gralora.functional.upstream_to_variant`), with ``lora_bias`` a zero ``<m>.lora_B.bias`` (the fork's
    forward adds none), and every other key (modules_to_save copies, base biases) as it was. ``g`` (hence each
    module's ``r = g + hybrid_r``) is read from the tensors, so a fork ``rank_pattern`` carries over.

    Args:
        tensors: the saved state dict (keys without adapter names, as peft saves them).
        gralora_k, hybrid_r, lora_bias, use_dora, init_lora_weights: the adapter config's fields.

    Raises:
        AdapterConversionError: naming the module, before anything is converted: a module with ``gralora_*`` tensors
            missing or of the wrong shape, modules in this package's layout next to the fork's (a mixed file), dead
            weights whose shapes do not match, a non-zero ``lora_B`` although ``init_lora_weights`` zeroed it (the
            fork never trains it: someone else did, in the same module), unknown ``gralora_*`` keys, or
            ``use_dora=True`` (the fork ignores DoRA for GraLoRA adapters and saves no magnitude).
    """
    if use_dora:
        raise AdapterConversionError(
            "This adapter was saved by the GraLoRA PEFT fork with use_dora=True, which that fork ignores for GraLoRA "
            "adapters (its forward is plain GraLoRA; no DoRA magnitude was saved), while this package would run "
            'GraLoRA + DoRA. To load what the fork computed, set "use_dora": false in its adapter_config.json.'
        )
    suffixes = {**_UPSTREAM_KEYS, **_FORK_DEAD_KEYS}
    modules, rest = _group_by_module(
        tensors,
        suffixes,
        lambda key: bool(_FORK_SEGMENT.search(key) or _VARIANT_SEGMENT.search(key)),
        lambda key: (
            f"Unsupported weight {key!r} in an adapter saved by the GraLoRA PEFT fork: only "
            f"{sorted(suffixes.values())} are understood per module."
        ),
    )
    ours = sorted(name for name, parts in modules.items() if not parts.keys() & _UPSTREAM_KEYS.keys())
    if ours:
        raise AdapterConversionError(
            f"The adapter mixes layouts: some modules hold the GraLoRA fork's gralora_A / gralora_B weights, but "
            f"{ours[:3]}{' and more' if len(ours) > 3 else ''} hold only lora_A / lora_B (this package's layout), "
            "which the fork never writes. It was assembled from different sources; nothing was loaded. Re-save "
            "each part with the tool that trained it."
        )
    out = dict(rest)
    ignored_bias = []
    for name, parts in modules.items():
        weight_A, weight_B = _gralora_factors_to_variant(name, parts, gralora_k, hybrid_r, None, "GraLoRA fork")
        dead_shapes = {"dead_A": weight_A.shape, "dead_B": weight_B.shape, "dead_bias": weight_B.shape[:1]}
        for part, expected in dead_shapes.items():
            if part in parts and parts[part].shape != expected:
                raise AdapterConversionError(
                    f"Module {name!r} of the GraLoRA fork adapter: {_FORK_DEAD_KEYS[part][1:]} has shape "
                    f"{tuple(parts[part].shape)}, but its gralora_* weights give {tuple(expected)}; this is not the "
                    "fork's layout (mixed or edited file), nothing was loaded."
                )
        # the fork zeroes lora_B unless init_lora_weights=False and never trains it (its forward does not read it)
        if init_lora_weights is not False and "dead_B" in parts and parts["dead_B"].any():
            raise AdapterConversionError(
                f"Module {name!r} holds the GraLoRA fork's gralora_* weights and also a non-zero lora_B.weight, "
                f"which the fork leaves at zero (init_lora_weights={init_lora_weights!r}) and never trains: the "
                "module mixes the fork's layout with trained LoRA weights of another origin; nothing was loaded."
            )
        out[name + _VARIANT_KEYS["A"]] = weight_A
        out[name + _VARIANT_KEYS["B"]] = weight_B
        if lora_bias:
            out[name + _VARIANT_KEYS["bias"]] = weight_B.new_zeros(weight_B.shape[0])
            if "dead_bias" in parts and parts["dead_bias"].any():
                ignored_bias.append(name)
    return ForkConversion(out, sorted(modules), sorted(ignored_bias))


def _fork_to_variant(adapter: _Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = adapter.config
    result = fork_to_variant_state_dict(
        adapter.tensors,
        gralora_k=_int_field(cfg, "gralora_k", 2),
        hybrid_r=_int_field(cfg, "hybrid_r", 0),
        lora_bias=bool(cfg.get("lora_bias", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        init_lora_weights=cfg.get("init_lora_weights", True),
    )
    # the config already is a LoraConfig(use_gralora=True) one, with this package's meaning of every field
    return dict(cfg), result.tensors


def _as_variant(adapter: _Adapter) -> _Adapter:
    """The adapter as a GraLoRA-variant adapter (converting upstream and fork ones in memory)."""
    if adapter.kind in ("gralora-upstream", "gralora-fork"):
        config, tensors = (_upstream_to_variant if adapter.kind == "gralora-upstream" else _fork_to_variant)(adapter)
        return _Adapter(adapter.path, config, tensors)
    return adapter


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------


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
    out = {name: value for name, value in cfg.items() if name not in _GRALORA_FIELDS}
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
    ``lora_B @ lora_A`` equals the GraLoRA delta (block-diagonal factors and a permutation, DESIGN.md "Exact export").
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


def convert_adapter(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    to: str = "variant",
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Convert between upstream peft ``GraloraConfig`` adapters and ``LoraConfig(use_gralora=True)`` adapters, and
    from the GraLoRA PEFT fork's layout to this package's.

    Exact in both directions (a reshape of the weights; upstream's ``r`` is ``r - hybrid_r`` here, its ``alpha`` is
    ``lora_alpha``, so the scaling is the same); a round trip returns identical tensors. An adapter saved by the fork
    (``use_gralora=True`` with ``gralora_A`` / ``gralora_B`` weights) converts ``to="variant"``: its config is kept,
    its ``gralora_*`` tensors become ``lora_A`` / ``lora_B`` and its unused ``lora_A`` / ``lora_B`` are dropped (see
    :func:`fork_to_variant_state_dict`).

    Args:
        src_dir: the adapter directory to convert.
        dst_dir: where to write; must not exist or be empty unless ``overwrite``.
        to: ``"variant"`` (upstream or fork -> this package) or ``"upstream"`` (this package -> upstream).
        overwrite: replace a non-empty ``dst_dir``.
        allow_pickle: accept an ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).

    Returns:
        ``dst_dir`` as a ``Path``.

    Raises:
        AdapterConversionError: (a ``ValueError``) for a wrong source type (e.g. a plain LoRA adapter), options the
            target cannot represent (``use_rslora``, ``lora_bias``, per-module ranks for upstream, unknown upstream
            fields), unreadable files or shape mismatches; ``dst_dir`` is left untouched.
    """
    wanted = {"variant": ("gralora-upstream", "gralora-fork"), "upstream": ("gralora",)}
    if to not in wanted:
        raise AdapterConversionError(f"to must be 'variant' or 'upstream', got {to!r}.")
    src, dst = Path(src_dir), Path(dst_dir)
    _check_destination(dst, src, overwrite)
    adapter = _read_adapter(src, allow_pickle)
    if adapter.kind not in wanted[to]:
        hint = {
            "lora": "it is a plain LoRA adapter: only GraLoRA adapters can be converted",
            "gralora": "it is already a LoraConfig(use_gralora=True) adapter",
            "gralora-upstream": "it is already an upstream GraloraConfig adapter",
            "gralora-fork": "it was saved by the GraLoRA PEFT fork; convert it with to='variant' first",
        }[adapter.kind]
        raise AdapterConversionError(f"Cannot convert {str(src)!r} to={to!r}: {hint}.")
    if to == "upstream":
        config, tensors = _variant_to_upstream(adapter)
    else:
        config, tensors = (_upstream_to_variant if adapter.kind == "gralora-upstream" else _fork_to_variant)(adapter)
    _write_adapter(dst, config, tensors)
    return dst


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
