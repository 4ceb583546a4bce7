"""Guards on axolotl's own code paths that would compute plain LoRA on GraLoRA weights, applied when their module is
imported (:mod:`._import_hook`, loaded by the package's import hook at interpreter start) or at once by
:func:`._import_hook.apply` (the plugin's ``register``) for those already imported.

- ``cli.config.prepare_plugins`` and ``utils.config.prepare_plugins``: a config with ``use_gralora`` / ``gralora_k``
  / ``hybrid_r`` and no GraLoRA plugin stops, naming the ``plugins:`` line to add (axolotl would drop the keys and
  train plain LoRA).
- ``cli.utils.lora_merge.merge_lora_sharded_efficient`` (and ``cli.merge_lora``'s by-name binding): refuses a GraLoRA
  adapter; it rebuilds a plain ``LoraConfig`` and merges ``B @ A`` (the plugin selects ``merge_method: legacy``,
  peft's exact ``merge_and_unload``).
- ``monkeypatch.lora_kernels.apply_lora_kernel_patches``: refuses a model with GraLoRA adapters (the fused kernels
  compute ``X @ A @ B``).
- ``monkeypatch.relora.lora_delta_weight``: refuses GraLoRA layers (ReLoRA's quantized merge computes ``B @ A``).
- ``core.trainers.grpo.async_trainer.AsyncGRPOTrainer._sync_peft_weights_no_merge`` / ``._sync_lora_adapter``: refuse
  GraLoRA models (they send a plain ``B @ A`` merge, or the adapter as plain LoRA, to vLLM).

Each guard calls axolotl's original for everything that is not GraLoRA. Imports nothing heavy at module level.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

__all__ = ["guard_module", "is_guarded"]

_MARK = "__peft_gralora_guard__"


def is_guarded(func: Any) -> bool:
    return getattr(func, _MARK, False)


def _wrap(owner: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, attr, None)
    if original is None or is_guarded(original):
        return  # an axolotl without this attribute, or guarded already
    guarded = functools.wraps(original)(make(original))
    setattr(guarded, _MARK, True)
    setattr(owner, attr, guarded)


def _gralora_adapters(model: Any) -> list[str]:
    from ..variant import is_gralora_adapter

    names: dict[str, None] = {}
    for module in model.modules():
        for name in getattr(module, "lora_A", {}) or {}:
            if is_gralora_adapter(module, name):
                names[name] = None
    return list(names)


def _refusal(what: str, why: str, fix: str) -> ValueError:
    from .checks import GraLoraAxolotlError

    return GraLoraAxolotlError(
        f"{what} does not support GraLoRA adapters: {why}, so the result would be silently plain LoRA. {fix}"
    )


def _prepare_plugins(module: Any) -> None:
    from .checks import require_plugin

    def make(original: Callable) -> Callable:
        def prepare_plugins(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            require_plugin(cfg)
            return original(cfg, *args, **kwargs)

        return prepare_plugins

    _wrap(module, "prepare_plugins", make)


def _saved_is_gralora(path: Any) -> bool:
    config_file = os.path.join(str(path), "adapter_config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return bool(json.load(f).get("use_gralora"))


def _efficient_merge(module: Any) -> None:
    def make(original: Callable) -> Callable:
        def merge_lora_sharded_efficient(*args: Any, **kwargs: Any) -> Any:
            path = kwargs.get("lora_adapter_path", args[1] if len(args) > 1 else None)
            if path is not None and _saved_is_gralora(path):
                raise _refusal(
                    f"axolotl's memory-efficient merge (merge_method: memory_efficient, the default) of {path}",
                    "it rebuilds a plain LoraConfig and merges B @ A",
                    "Set 'merge_method: legacy' (peft's exact merge_and_unload), or add the plugin line "
                    "'plugins: [peft_gralora.axolotl.GraLoraPlugin]' with 'use_gralora: true', which selects it.",
                )
            return original(*args, **kwargs)

        return merge_lora_sharded_efficient

    _wrap(module, "merge_lora_sharded_efficient", make)


def _lora_kernels(module: Any) -> None:
    def make(original: Callable) -> Callable:
        def apply_lora_kernel_patches(model: Any, cfg: Any, *args: Any, **kwargs: Any) -> Any:
            adapters = _gralora_adapters(model)
            if adapters:
                raise _refusal(
                    f"axolotl's fused LoRA kernels (lora_mlp_kernel / lora_qkv_kernel / lora_o_kernel, adapters "
                    f"{adapters})",
                    "they compute X @ A @ B",
                    "Set lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel and lora_embedding_kernel to false (the "
                    "GraLoRA plugin does this).",
                )
            return original(model, cfg, *args, **kwargs)

        return apply_lora_kernel_patches

    _wrap(module, "apply_lora_kernel_patches", make)


def _relora(module: Any) -> None:
    from ..variant import is_gralora_adapter

    def make(original: Callable) -> Callable:
        def lora_delta_weight(layer: Any, *args: Any, **kwargs: Any) -> Any:
            if any(is_gralora_adapter(layer, name) for name in getattr(layer, "lora_A", {}) or {}):
                raise _refusal("axolotl's ReLoRA merge", "it merges B @ A", "Train GraLoRA without relora.")
            return original(layer, *args, **kwargs)

        return lora_delta_weight

    _wrap(module, "lora_delta_weight", make)


def _async_grpo(module: Any) -> None:
    trainer = getattr(module, "AsyncGRPOTrainer", None)
    if trainer is None:
        return

    def make(original: Callable) -> Callable:
        def sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            model = getattr(self, "model", None)
            if model is not None and _gralora_adapters(model):
                raise _refusal(
                    f"axolotl's async GRPO weight sync ({original.__name__})",
                    "it sends a B @ A merge or a plain LoRA adapter to vLLM",
                    "Use GRPO without use_data_producer / async_prefetch / vllm_lora_sync.",
                )
            return original(self, *args, **kwargs)

        return sync

    for name in ("_sync_peft_weights_no_merge", "_sync_lora_adapter"):
        _wrap(trainer, name, make)


_GUARDS: dict[str, Callable[[Any], None]] = {
    "axolotl.cli.config": _prepare_plugins,
    "axolotl.utils.config": _prepare_plugins,
    "axolotl.cli.utils.lora_merge": _efficient_merge,
    "axolotl.cli.merge_lora": _efficient_merge,
    "axolotl.monkeypatch.lora_kernels": _lora_kernels,
    "axolotl.monkeypatch.relora": _relora,
    "axolotl.core.trainers.grpo.async_trainer": _async_grpo,
}


def guard_module(module: Any) -> None:
    """Apply the guard of one just-imported axolotl module (idempotent)."""
    guard = _GUARDS.get(module.__name__)
    if guard is not None:
        guard(module)
