"""What a saved adapter directory holds: file names, per-module weight keys, the adapter types, and views of a state
dict by module (shared by every conversion; no file I/O here)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..functional import gralora_shape

__all__ = ["AdapterConversionError", "has_fork_layout", "CONFIG_NAME", "SAFETENSORS_NAME", "BIN_NAME", "MODEL_PREFIX"]


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
# the GraLoRA PEFT fork keeps upstream's gralora_* tensors in a LoraConfig(use_gralora=True) adapter, next
# to lora_A / lora_B weights (and lora_B's bias with lora_bias) that its forward never reads
_FORK_DEAD_KEYS = {"dead_A": ".lora_A.weight", "dead_B": ".lora_B.weight", "dead_bias": ".lora_B.bias"}
_FORK_SEGMENT = re.compile(r"(^|\.)gralora_(A|B)(_general)?(\.|$)")
# a key segment that belongs to an adapter (as opposed to modules_to_save copies and learnable base biases)
_VARIANT_SEGMENT = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
_UPSTREAM_SEGMENT = re.compile(r"(^|\.)gralora_[A-Za-z_]+(\.|$)")


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


def has_fork_layout(tensors: Iterable[str]) -> bool:
    """Whether a state dict's keys hold the GraLoRA fork's weights (``<module>.gralora_A`` / ``gralora_B`` /
    ``gralora_{A,B}_general.weight``). Only meaningful for a ``LoraConfig(use_gralora=True)`` adapter: upstream's
    ``GraloraConfig`` (``peft_type: GRALORA``) uses the same names for its own tuner."""
    return any(_FORK_SEGMENT.search(key) for key in tensors)


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
