"""Patches of ``LoraModel``: refuse what GraLoRA cannot adapt before anything changes, undo a failed injection,
and make ``add_weighted_adapter`` right for GraLoRA adapters."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from ..config import validate_gralora_layer
from ..variant import is_gralora_adapter
from ._targets import peft_targets
from .layers import gralora_layer_classes, may_hold_gralora, unsupported_layer_error

__all__ = ["patches"]


def _in_out_features(layer: Any) -> tuple[int | None, int | None]:
    from peft.tuners.tuners_utils import _get_in_out_features

    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return _get_in_out_features(base)


def _make_create_and_replace(original: Callable) -> Callable:
    @functools.wraps(original)
    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if getattr(lora_config, "use_gralora", False):
            from peft.tuners.lora.layer import LoraLayer
            from peft.utils.other import get_pattern_key

            if kwargs.get("parameter_name") is not None:
                raise ValueError(
                    f"use_gralora=True cannot target the parameter {kwargs['parameter_name']!r} of {current_key!r}: "
                    "GraLoRA adapts nn.Linear / Conv1D modules only. Use target_modules instead of target_parameters."
                )
            # the layer type first: a shape error would be misleading for a type GraLoRA cannot adapt anyway
            if isinstance(target, LoraLayer):
                if type(target) not in gralora_layer_classes():
                    raise unsupported_layer_error(target, current_key)
            elif not may_hold_gralora(target):
                raise unsupported_layer_error(target, current_key)
            r_key = get_pattern_key(lora_config.rank_pattern.keys(), current_key)
            r = lora_config.rank_pattern.get(r_key, lora_config.r)
            in_f, out_f = _in_out_features(target)
            if in_f is not None and out_f is not None:
                validate_gralora_layer(current_key, in_f, out_f, r, lora_config.gralora_k, lora_config.hybrid_r)
        return original(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    return _create_and_replace


def _make_create_new_module(original: Callable) -> Callable:
    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if not getattr(lora_config, "use_gralora", False):
            return original(lora_config, adapter_name, target, **kwargs)
        name = kwargs.get("target_name", "<unknown>")
        try:
            new_module = original(lora_config, adapter_name, target, **kwargs)
        except ValueError as exc:
            # layers with a variant table but no GraLoRA entry (Embedding, Conv, MHA, ...) end up here
            if "use_gralora" in str(exc):
                raise unsupported_layer_error(target, name) from exc
            raise
        # layers with a hand-written variant resolver ignore use_gralora: refuse instead of training plain LoRA
        if type(new_module) not in gralora_layer_classes() or not is_gralora_adapter(new_module, adapter_name):
            raise unsupported_layer_error(new_module, name)
        return new_module

    return staticmethod(_create_new_module)


def _make_inject_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if not getattr(self.peft_config.get(adapter_name), "use_gralora", False):
            return original(self, model, adapter_name, *args, **kwargs)
        from peft.tuners.tuners_utils import BaseTunerLayer

        existing = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        try:
            return original(self, model, adapter_name, *args, **kwargs)
        except Exception:
            _remove_injected(model, adapter_name, existing)
            raise

    return inject_adapter


def _remove_injected(model: Any, adapter_name: str, existing: dict[str, Any]) -> None:
    """Undo a failed injection: unwrap layers created for it, drop the adapter from layers that existed before."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import _get_submodules

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if existing.get(name) is module:
            module.delete_adapter(adapter_name)
        else:
            parent, _, target_name = _get_submodules(model, name)
            setattr(parent, target_name, module.get_base_layer())


_LINEAR_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _make_add_weighted_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
        configs = [self.peft_config[a] for a in adapters if a in self.peft_config]
        gralora = [bool(getattr(c, "use_gralora", False)) for c in configs]
        if not any(gralora) or adapter_name in self.peft_config:
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        effective = "linear" if len(adapters) == 1 else combination_type
        if effective == "cat":
            raise ValueError(
                "add_weighted_adapter(combination_type='cat') concatenates plain LoRA factors, which misplaces "
                "GraLoRA blocks. Use combination_type='svd' (dense delta, re-factorised), or export the adapters "
                "to exact plain LoRA with peft_gralora.export_lora first."
            )
        if effective in _LINEAR_COMBINATIONS:
            layouts = {
                (g, getattr(c, "gralora_k", None), getattr(c, "hybrid_r", None))
                for g, c in zip(gralora, configs, strict=True)
            }
            if len(layouts) != 1:
                raise ValueError(
                    f"add_weighted_adapter(combination_type={effective!r}) mixes the A and B factors entry by entry, "
                    "which is only meaningful when every adapter has the same layout; got (use_gralora, gralora_k, "
                    f"hybrid_r) = {sorted(layouts, key=str)}. Use combination_type='svd' instead."
                )
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        # SVD family: the dense deltas come from the GraLoRA-aware get_delta_weight and the result is a plain LoRA
        # factorisation, so the new adapter must be plain LoRA.
        first = adapters[0]
        saved = self.peft_config[first]
        self.peft_config[first] = dataclasses.replace(saved, use_gralora=False, gralora_k=2, hybrid_r=0)
        try:
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        finally:
            self.peft_config[first] = saved

    return add_weighted_adapter


def patches() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))`` for ``LoraModel``."""
    model = peft_targets()["LoraModel"]
    return [
        (model, "_create_and_replace", _make_create_and_replace),
        (model, "_create_new_module", _make_create_new_module),
        (model, "inject_adapter", _make_inject_adapter),
        (model, "add_weighted_adapter", _make_add_weighted_adapter),
    ]
