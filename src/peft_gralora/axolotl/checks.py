"""What GraLoRA needs from an axolotl config, checked on the raw mapping (no axolotl, no peft import).

Used by the plugin's ``register`` (before axolotl validates), by its pydantic input model (axolotl's validation) and by
the import-hook guard that stops a GraLoRA YAML without the plugin line. Every check raises ``ValueError`` naming the
YAML key and the fix, before any model loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from ..config import GRALORA_FIELDS, SUPPORTED_INITS, validate_gralora_layer

__all__ = [
    "PLUGIN",
    "YAML_KEYS",
    "KERNEL_KEYS",
    "GraLoraAxolotlError",
    "asks_for_gralora",
    "has_plugin",
    "require_plugin",
    "check_config",
    "check_final_config",
    "apply_defaults",
    "lora_config_kwargs",
    "check_saved_adapter",
]

PLUGIN = "peft_gralora.axolotl.GraLoraPlugin"
YAML_KEYS = tuple(GRALORA_FIELDS)  # use_gralora, gralora_k, hybrid_r: flat, as in LoraConfig
# axolotl's fused LoRA kernels compute X @ A @ B whatever the variant: plain LoRA on GraLoRA weights
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
KERNEL_COST = (
    "Cost on a GPU: the fused kernels' speed-up and activation-memory saving over peft's LoRA forward (axolotl's "
    "docs/lora_optims); GraLoRA runs through peft's module forward instead, at GraLoRA's own speed. On CPU nothing "
    "is lost (the MLP kernel needs CUDA)."
)

# axolotl keys whose "on" value GraLoRA cannot honour: key -> (is_on(value), why / what to do instead)
REFUSED_KEYS: dict[str, tuple[Any, str]] = {
    "lora_target_parameters": (bool, "GraLoRA adapts nn.Linear / Conv1D modules only; use lora_target_modules"),
    "quantize_moe_experts": (bool, "it adapts MoE expert parameters (lora_target_parameters), not Linear modules"),
    "relora": (bool, "ReLoRA's quantized merge computes B @ A (plain LoRA) on the adapter factors"),
    "relora_steps": (bool, "ReLoRA's quantized merge computes B @ A (plain LoRA) on the adapter factors"),
    "nvfp4_merge_aware": (bool, "its merge-aware Linear forward computes plain LoRA on the adapter factors"),
    "gptq": (bool, "GPTQ quantized layers have no GraLoRA form in peft; use adapter: qlora (bitsandbytes)"),
    "peft_layer_replication": (bool, "replicated layers share LoRA factors through a plain-LoRA path"),
}
# nested keys: (parent, child) -> (is_on, why)
REFUSED_NESTED: dict[tuple[str, str], tuple[Any, str]] = {
    ("peft", "loftq_config"): (bool, "LoftQ initialises plain LoRA factors (init_lora_weights='loftq')"),
    ("trl", "vllm_lora_sync"): (bool, "vLLM loads the synced adapter as plain LoRA"),
    ("trl", "use_data_producer"): (bool, "async GRPO syncs weights to vLLM with a plain B @ A merge"),
    ("trl", "async_prefetch"): (bool, "async GRPO syncs weights to vLLM with a plain B @ A merge"),
}


class GraLoraAxolotlError(ValueError):
    """An axolotl config asks for something GraLoRA cannot do exactly."""


def _get(cfg: Mapping, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def asks_for_gralora(cfg: Mapping) -> bool:
    """Whether the YAML asks for GraLoRA: ``use_gralora`` true, or ``gralora_k`` / ``hybrid_r`` set without
    ``use_gralora: false``."""
    use = _get(cfg, "use_gralora")
    if use is not None and use is not False:
        return bool(use)
    return use is None and any(_get(cfg, key) is not None for key in YAML_KEYS[1:])


def has_plugin(cfg: Mapping) -> bool:
    """Whether ``plugins:`` names the GraLoRA plugin (by either import path)."""
    names = _get(cfg, "plugins") or []
    return any(name in (PLUGIN, "peft_gralora.axolotl.plugin.GraLoraPlugin") for name in names)


def require_plugin(cfg: Mapping) -> None:
    """The guard of the import hook: a GraLoRA YAML without the plugin line would train plain LoRA. Raises."""
    if asks_for_gralora(cfg) and not has_plugin(cfg):
        keys = ", ".join(f"{k}: {_get(cfg, k)!r}" for k in YAML_KEYS if _get(cfg, k) is not None)
        raise GraLoraAxolotlError(
            f"This axolotl config asks for GraLoRA ({keys}) but does not load the GraLoRA plugin, so axolotl would "
            f"drop these keys and train plain LoRA. Add this to the YAML:\n\nplugins:\n  - {PLUGIN}\n"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings(cfg: Mapping) -> tuple[int, int]:
    """``(gralora_k, hybrid_r)`` with LoraConfig's defaults, type-checked."""
    k = _get(cfg, "gralora_k")
    h = _get(cfg, "hybrid_r")
    k = GRALORA_FIELDS["gralora_k"][1] if k is None else k
    h = GRALORA_FIELDS["hybrid_r"][1] if h is None else h
    if not _is_int(k) or k < 1:
        raise GraLoraAxolotlError(f"gralora_k must be an integer >= 1, got {k!r}.")
    if not _is_int(h) or h < 0:
        raise GraLoraAxolotlError(f"hybrid_r must be an integer >= 0, got {h!r}.")
    return k, h


def _check_rank(where: str, r: Any, k: int, h: int) -> None:
    if not _is_int(r) or r < 1:
        raise GraLoraAxolotlError(f"{where} must be a positive integer with use_gralora, got {r!r}.")
    if h >= r:
        raise GraLoraAxolotlError(
            f"hybrid_r: {h} must be smaller than {where}: {r} ({where} is the total rank; the GraLoRA rank is "
            f"{where} - hybrid_r). Lower hybrid_r or raise {where}."
        )
    if (r - h) % k:
        raise GraLoraAxolotlError(
            f"{where} - hybrid_r = {r - h} must be divisible by gralora_k: {k}. Set {where} to a value with "
            f"{where} - hybrid_r a multiple of {k}, e.g. {where}: {h + k * max(1, (r - h) // k)}."
        )


def check_config(cfg: Mapping) -> None:
    """All config-time checks of a GraLoRA config (a no-op when it does not ask for GraLoRA).

    Raises:
        GraLoraAxolotlError: naming the YAML key and the fix.
    """
    use = _get(cfg, "use_gralora")
    if use is not None and not isinstance(use, bool):
        raise GraLoraAxolotlError(f"use_gralora must be true or false, got {use!r}.")
    if not use:
        stray = [key for key in YAML_KEYS[1:] if _get(cfg, key) is not None]
        if stray:
            raise GraLoraAxolotlError(
                f"{', '.join(stray)} set but use_gralora is not true: add 'use_gralora: true' to train GraLoRA, or "
                f"remove {', '.join(stray)} to train plain LoRA."
            )
        return
    adapter = _get(cfg, "adapter")
    if adapter not in ("lora", "qlora"):
        raise GraLoraAxolotlError(
            f"use_gralora needs 'adapter: lora' or 'adapter: qlora', got adapter: {adapter!r}. GraLoRA is a LoRA "
            "variant; other adapters would ignore it."
        )
    k, h = _settings(cfg)
    _check_rank("lora_r", _get(cfg, "lora_r"), k, h)
    for pattern, rank in (_get(cfg, "lora_rank_pattern") or {}).items():
        _check_rank(f"lora_rank_pattern[{pattern!r}]", rank, k, h)
    for key, (is_on, why) in REFUSED_KEYS.items():
        value = _get(cfg, key)
        if value is not None and is_on(value):
            raise GraLoraAxolotlError(
                f"use_gralora cannot be combined with {key}: {value!r}: {why}. Remove {key} or use_gralora."
            )
    for (parent, key), (is_on, why) in REFUSED_NESTED.items():
        section = _get(cfg, parent) or {}
        value = _get(section, key) if section else None
        if value is not None and is_on(value):
            raise GraLoraAxolotlError(
                f"use_gralora cannot be combined with {parent}.{key}: {value!r}: {why}. "
                f"Remove {parent}.{key} or use_gralora."
            )
    init = _get(cfg, "peft_init_lora_weights")
    if init is not None and not any(init is v or init == v for v in SUPPORTED_INITS):
        raise GraLoraAxolotlError(
            f"use_gralora supports peft_init_lora_weights in {SUPPORTED_INITS}, got {init!r}: data-driven inits "
            "(PiSSA, OLoRA, CorDA, LoftQ, EVA, ...) compute plain LoRA factors. Remove peft_init_lora_weights."
        )
    explicit = [key for key in KERNEL_KEYS if _get(cfg, key)]
    if explicit:
        raise GraLoraAxolotlError(
            f"{', '.join(f'{key}: true' for key in explicit)} cannot be used with use_gralora: axolotl's fused LoRA "
            "kernels compute X @ A @ B (plain LoRA) on the GraLoRA factors, a different function from the one "
            f"trained. Remove {', '.join(explicit)} (the GraLoRA plugin turns them off). {KERNEL_COST}"
        )
    if _get(cfg, "merge_method") == "memory_efficient":
        raise GraLoraAxolotlError(
            "merge_method: memory_efficient rebuilds a plain LoraConfig and merges B @ A, not the GraLoRA delta. "
            "Remove merge_method (the GraLoRA plugin selects 'legacy': peft's exact merge_and_unload)."
        )
    check_saved_adapter(cfg)
    check_features(cfg)


def check_final_config(cfg: Any) -> None:
    """After axolotl's own validators (which auto-enable the fused kernels for lora/qlora): nothing may have turned
    a kernel or the memory-efficient merge back on."""
    if not _get(cfg, "use_gralora"):
        return
    on = [key for key in KERNEL_KEYS if _get(cfg, key)]
    if on:
        raise GraLoraAxolotlError(
            f"{', '.join(on)} ended up enabled for a GraLoRA config (set to true by axolotl or another plugin): the "
            "fused kernels compute plain LoRA. Set them to false explicitly in the YAML."
        )
    if _get(cfg, "merge_method") == "memory_efficient":
        raise GraLoraAxolotlError("merge_method: memory_efficient computes plain LoRA merges; use 'legacy'.")


def apply_defaults(cfg: MutableMapping) -> list[str]:
    """Switch off what would compute plain LoRA on GraLoRA weights (unset keys only; set ones were checked).

    Returns:
        one log line per setting changed.
    """
    changed = []
    for key in KERNEL_KEYS:
        if _get(cfg, key) is None:
            cfg[key] = False
            changed.append(key)
    lines = []
    if changed:
        lines.append(
            f"GraLoRA: {', '.join(changed)} set to false (axolotl's fused LoRA kernels compute plain LoRA, "
            f"X @ A @ B, on any adapter). {KERNEL_COST}"
        )
    if _get(cfg, "merge_method") is None:
        cfg["merge_method"] = "legacy"
        lines.append(
            "GraLoRA: merge_method set to 'legacy' (peft's merge_and_unload, which merges the GraLoRA delta; the "
            "memory-efficient merge rebuilds plain LoRA). It loads the whole base model once to merge."
        )
    return lines


def lora_config_kwargs(cfg: Mapping) -> dict[str, Any]:
    """The ``LoraConfig`` fields of a GraLoRA config (empty for plain LoRA)."""
    if not _get(cfg, "use_gralora"):
        return {}
    k, h = _settings(cfg)
    return {"use_gralora": True, "gralora_k": k, "hybrid_r": h}


def check_saved_adapter(cfg: Mapping) -> None:
    """``lora_model_dir`` (continue / resume, merge, inference): peft builds the adapter from the saved
    ``adapter_config.json``, not from the YAML, so both must say the same."""
    path = _get(cfg, "lora_model_dir")
    config_file = os.path.join(str(path), "adapter_config.json") if path else None
    if not config_file or not os.path.isfile(config_file):
        return  # not saved yet (merge-lora of output_dir, hub ids: checked when the adapter loads)
    with open(config_file, encoding="utf-8") as f:
        saved = json.load(f)
    want = lora_config_kwargs(cfg)
    have = {key: saved.get(key, GRALORA_FIELDS[key][1]) for key in YAML_KEYS}
    if not have["use_gralora"]:
        have = {"use_gralora": False}
    if have != want:
        raise GraLoraAxolotlError(
            f"lora_model_dir {path!r} holds an adapter with {have}, but this config asks for {want}; peft would load "
            "the saved adapter as it is. Make the YAML's use_gralora / gralora_k / hybrid_r match the adapter."
        )


_MODULE_DIMS = {  # module name -> (in_features, out_features) from a transformers decoder config
    "q_proj": ("hidden", "q"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "inter"),
    "up_proj": ("hidden", "inter"),
    "down_proj": ("inter", "hidden"),
    "lm_head": ("hidden", "vocab"),
}


def model_dims(base_model: str) -> dict[str, int] | None:
    """Feature sizes of a local transformers decoder config (``config.json`` in a folder), or None if unknown."""
    config_file = os.path.join(base_model, "config.json") if base_model else ""
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        c = json.load(f)
    c = c.get("text_config", c)
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    if not (_is_int(hidden) and _is_int(heads)):
        return None
    head_dim = c.get("head_dim") or hidden // heads
    dims = {"hidden": hidden, "q": heads * head_dim, "kv": c.get("num_key_value_heads", heads) * head_dim}
    if _is_int(c.get("intermediate_size")):
        dims["inter"] = c["intermediate_size"]
    if _is_int(c.get("vocab_size")):
        dims["vocab"] = c["vocab_size"]
    return dims


def check_features(cfg: Mapping) -> None:
    """Divisibility of every targeted module's features by ``gralora_k``, where the base model's config is local
    and the module names are the usual decoder ones (peft checks every module again when it adapts them)."""
    dims = model_dims(str(_get(cfg, "base_model") or ""))
    if dims is None:
        return
    k, h = _settings(cfg)
    targets = _get(cfg, "lora_target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if _get(cfg, "lora_target_linear"):
        targets += [name for name in _MODULE_DIMS if name != "lm_head"]  # as axolotl's find_all_linear_names
    for name in dict.fromkeys(targets):
        sides = _MODULE_DIMS.get(name)
        if sides is None or sides[0] not in dims or sides[1] not in dims:
            continue
        try:
            validate_gralora_layer(name, dims[sides[0]], dims[sides[1]], _get(cfg, "lora_r"), k, h)
        except ValueError as exc:
            raise GraLoraAxolotlError(f"{exc} (sizes from {_get(cfg, 'base_model')}/config.json)") from None
