"""Patches of ``LoraModel``: refuse what GraLoRA cannot adapt before anything changes, undo a failed injection,
and make ``add_weighted_adapter`` right for GraLoRA adapters."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import validate_gralora_layer
from ..functional import GraloraPieces, gralora_assemble, gralora_pieces
from ..variant import is_gralora_adapter
from ._targets import peft_targets
from .layers import gralora_layer_classes, may_hold_gralora, unsupported_layer_error
from .patch import Patch

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
            return _gralora_cat(self, list(adapters), list(weights), adapter_name)
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


def _scaling_value(scaling: Any) -> float:
    # prepare_model_for_compiled_hotswap turns scalings into 0-d tensors
    return float(scaling.item() if isinstance(scaling, torch.Tensor) else scaling)


def _cat_layers(self, adapters: list[str]) -> dict[str, Any]:
    """The LoRA layers holding any of ``adapters``, checked for what ``cat`` can combine exactly (nothing changes)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, layer in self.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        held = [a for a in adapters if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]
        if not held:
            continue
        if type(layer) not in gralora_layer_classes() or any(a not in layer.lora_A for a in held):
            raise ValueError(
                f"add_weighted_adapter(combination_type='cat') with GraLoRA adapters combines Linear / Conv1D LoRA "
                f"layers only, but {name!r} is a {type(layer).__name__} holding {held}. Use combination_type='svd', "
                "or leave that module out of the adapters' target_modules."
            )
        for a in held:
            variant = layer.lora_variant.get(a)
            if variant is not None and (type(variant).__name__ != "GraLoraLinearVariant"):
                raise ValueError(
                    f"add_weighted_adapter(combination_type='cat') cannot combine adapter {a!r} on {name!r}: its "
                    f"LoRA variant {type(variant).__name__} (e.g. DoRA) is not a sum of low-rank deltas, so "
                    "concatenating its factors changes what it computes. Merge it with combination_type='svd' or "
                    "without that variant."
                )
        layers[name] = layer
    return layers


def _embedding_is_cheaper(k: int, hybrid_r: int, target_k: int, r: int) -> bool:
    """Whether a grid of ``k`` blocks takes less (or equal) rank refined / coarsened into ``target_k`` blocks than
    exported to plain LoRA (``k g``). Refined: ``target_k s``; coarsened by ``q``: ``target_k q^2 s``."""
    s = (r - hybrid_r) // k
    if target_k % k == 0:
        return target_k * s <= k * k * s
    if k % target_k == 0:
        return target_k * (k // target_k) ** 2 * s <= k * k * s
    return False


def _gralora_cat(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """``cat`` for any mix of GraLoRA and plain LoRA adapters, exact: the new adapter's delta is
    ``sum_i weights[i] * delta_i`` (with each adapter's own scaling).

    Layout of the result (:func:`peft_gralora.functional.gralora_assemble`): a GraLoRA adapter with the ``gralora_k``
    of the first GraLoRA adapter; every GraLoRA adapter with that ``k`` joins block by block (sub-block rank
    ``s = s_1 + s_2 + ...``); a GraLoRA adapter with another ``k`` joins the blocks too when its ``k`` divides or is
    a multiple of that ``k`` and that takes less rank than its exact plain export (rank ``k g``), else the export
    joins the hybrid branch; hybrid branches and plain LoRA adapters sit side by side in the hybrid branch. When a
    layer's features are not divisible by that ``k``, the result is a plain LoRA adapter holding every adapter's exact
    plain form. The weights and scalings are folded into the ``A`` factors, as peft's ``cat`` does.
    """
    _, _, new_target_modules = self._check_add_weighted_adapter(
        adapters=adapters, combination_type="cat", svd_rank=None
    )
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights.")
    configs = [self.peft_config[a] for a in adapters]
    layers = _cat_layers(self, adapters)
    layout = {
        a: (c.gralora_k, c.hybrid_r) if c.use_gralora else (1, 0) for a, c in zip(adapters, configs, strict=True)
    }
    target_k = next(c.gralora_k for c in configs if c.use_gralora)
    shapes = {n: (layer.in_features, layer.out_features) for n, layer in layers.items()}
    if any(i % target_k or o % target_k for i, o in shapes.values()):
        target_k = 0  # a plain LoRA result: (k=1, hybrid_r=0) in the layout maths below
    cut_k = max(target_k, 1)
    # pieces per layer, unscaled (the weights are folded in once the new scaling is known); a grid with another k is
    # refined / coarsened into the target blocks or exported to plain LoRA, whichever takes less rank
    embed = {a: _embedding_is_cheaper(*layout[a], cut_k, configs[adapters.index(a)].r) for a in adapters}
    cut = {
        name: {
            a: gralora_pieces(layer.lora_A[a].weight, layer.lora_B[a].weight, *layout[a], cut_k, embed=embed[a])
            for a in dict.fromkeys(adapters)
            if a in layer.lora_A
        }
        for name, layer in layers.items()
    }
    # each adapter keeps its own slot, sized by its largest layer (rank_pattern), so the layout is one per model
    grid_rank = sum(max((c[a].grid_rank for c in cut.values() if a in c), default=0) for a in adapters)
    plain_rank = sum(max((c[a].plain_rank for c in cut.values() if a in c), default=0) for a in adapters)
    if grid_rank == 0:  # no grid to join (k = 1, or a plain result): everything is one plain-LoRA-like grid
        grid_rank, plain_rank = plain_rank, 0
    new_r = cut_k * grid_rank + plain_rank
    use_bias = any(c.lora_bias for c in configs)
    first = configs[0]
    new_config = dataclasses.replace(
        first,
        r=new_r,
        lora_alpha=new_r,
        target_modules=new_target_modules,
        alpha_pattern={},
        rank_pattern={},
        use_gralora=bool(target_k),
        gralora_k=target_k or 2,
        hybrid_r=plain_rank if target_k else 0,
        lora_bias=use_bias,
        use_dora=False,
        init_lora_weights=True,  # every weight is overwritten below: no data-driven init may touch the base model
    )
    new_scaling = (new_r / math.sqrt(new_r)) if new_config.use_rslora else 1.0
    planned = {}
    for name, layer in layers.items():
        pieces = []
        bias = None
        for a, w in zip(adapters, weights, strict=True):
            if a not in layer.lora_A:
                continue
            factor = w * _scaling_value(layer.scaling[a]) / new_scaling
            p = cut[name][a]
            pieces.append(
                GraloraPieces(p.k, [(a3 * factor, b3) for a3, b3 in p.grid], [(pa * factor, pb) for pa, pb in p.plain])
            )
            b = layer.lora_B[a].bias
            if b is not None:
                bias = factor * b.detach() if bias is None else bias + factor * b.detach()
        in_f, out_f = shapes[name]
        with torch.no_grad():
            planned[name] = (*gralora_assemble(pieces, new_r, new_config.hybrid_r, in_f, out_f), bias)

    self.peft_config[adapter_name] = new_config
    try:
        self.inject_adapter(self.model, adapter_name)
    except Exception:
        del self.peft_config[adapter_name]
        raise
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import _freeze_adapter

    _freeze_adapter(self.model, adapter_name)

    with torch.no_grad():
        for name, layer in self.model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            new_A, new_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            new_A.weight.zero_()
            new_B.weight.zero_()
            if new_B.bias is not None:
                new_B.bias.zero_()
            if name in planned:
                weight_A, weight_B, bias = planned[name]
                new_A.weight.copy_(weight_A)
                new_B.weight.copy_(weight_B)
                if bias is not None:
                    new_B.bias.copy_(bias)


def patches() -> list[Patch]:
    """The patch rows of ``LoraModel``."""
    model = peft_targets()["LoraModel"]
    return [
        Patch(
            model,
            "_create_and_replace",
            _make_create_and_replace,
            "refuses, before anything changes, modules GraLoRA cannot adapt: wrong shape for gralora_k, an existing "
            "LoRA layer type without GraLoRA, parameters (target_parameters)",
        ),
        Patch(
            model,
            "_create_new_module",
            _make_create_new_module,
            "refuses layer types that would otherwise silently train plain LoRA",
        ),
        Patch(
            model,
            "inject_adapter",
            _make_inject_adapter,
            "peft adapts targets one by one: when GraLoRA refuses a later target, takes the layers already adapted "
            "back out, so a refused config leaves the model unchanged",
        ),
        Patch(
            model,
            "add_weighted_adapter",
            _make_add_weighted_adapter,
            "each combination type gives the right result for GraLoRA adapters or a clear error (never plain-LoRA "
            "math on GraLoRA weights); cat is exact for every mix of GraLoRA / plain LoRA adapters",
        ),
    ]
