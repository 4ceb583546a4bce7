"""Patches of ``peft.utils.hotswap``: hotswapping and rank padding keep a GraLoRA adapter's function, or refuse.

peft's hotswap copies the incoming ``lora_A`` / ``lora_B`` into the resident tensors and pads ranks with zero rows /
columns at the end. A GraLoRA adapter is those tensors read blockwise (row ``i*s + t`` of ``lora_A`` is sub-rank ``t``
of output block ``i``; the last ``hybrid_r`` rows are the hybrid branch), so both silently compute something else
when the layouts differ. Here:

- :func:`prepare_model_for_compiled_hotswap` pads a GraLoRA adapter of rank ``r = k s + h`` to ``target_rank``
  inside its layout: every block gets zero sub-ranks (``s -> s'``) and the hybrid branch zero rows (``h -> h'``),
  with ``s' = (target_rank - h) // k`` and ``h' = target_rank - k s'`` (or ``h' = target_hybrid_r`` when given);
  the layer's ``hybrid_r`` and the passed configs follow. Plain LoRA layers are padded by peft as before.
- :func:`hotswap_adapter_from_state_dict` (which ``hotswap_adapter`` and diffusers' ``load_lora_adapter(hotswap=
  True)`` call) moves every incoming layer exactly into the resident layer's layout
  (:func:`peft_gralora.functional.gralora_fit_factors`): a smaller GraLoRA adapter with the same ``k`` is padded per
  block, a plain LoRA or a GraLoRA hybrid branch goes into the resident hybrid branch and, beyond it, into the grid,
  a GraLoRA grid with a ``k`` dividing the resident ``k`` is refined (one with a multiple of it coarsened, else its
  exact plain export is tried), and a GraLoRA adapter swapped into a plain LoRA one goes in through its exact plain
  export. The resident layout (``gralora_k``, ``hybrid_r``, the variant) never
  changes, so a compiled model is not recompiled. What does not fit raises ``ValueError`` naming the layer and the
  room it needs, before any weight changes.

The GraLoRA fields are compared per layer (the resident layer's ``gralora_k`` / ``hybrid_r`` / variant against the
incoming config's), not by ``check_hotswap_configs_compatible``: two configs that differ there can still swap exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..functional import gralora_fit_factors, gralora_shape
from ..variant import is_gralora_adapter
from .patch import Patch
from .saved_layout import check_loaded_state_dict

__all__ = ["patches", "padded_layout"]


def padded_layout(r: int, k: int, hybrid_r: int, target_rank: int, target_hybrid_r: int | None = None) -> int:
    """The hybrid rank ``h'`` of a GraLoRA adapter ``(r, k, hybrid_r)`` padded to ``target_rank``.

    By default the grid takes all it can (``s' = (target_rank - hybrid_r) // k``) and the hybrid branch the rest;
    ``target_hybrid_r`` picks ``h'`` instead (room for incoming adapters with larger hybrid branches).

    Raises:
        ValueError: when ``target_rank`` / ``target_hybrid_r`` cannot hold the adapter in its own layout.
    """
    s = (r - hybrid_r) // k
    if target_rank < r:
        raise ValueError(
            f"target_rank={target_rank} is smaller than the adapter's rank {r}; pass the largest rank of all "
            "adapters that will be swapped in."
        )
    h_new = target_hybrid_r if target_hybrid_r is not None else target_rank - k * ((target_rank - hybrid_r) // k)
    g_new = target_rank - h_new
    if h_new < hybrid_r or g_new < k * s or g_new % k:
        raise ValueError(
            f"Cannot pad a GraLoRA adapter (r={r}, gralora_k={k}, hybrid_r={hybrid_r}, sub-block rank {s}) to "
            f"target_rank={target_rank} with hybrid_r={h_new}: need hybrid_r >= {hybrid_r}, and target_rank - "
            f"hybrid_r divisible by {k} and at least {k * s}."
        )
    return h_new


def _gralora_layers(model: Any) -> list[tuple[str, Any, str]]:
    """``(module name, LoRA layer, adapter name)`` of every GraLoRA adapter in ``model``."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found.extend((name, module, a) for a in module.lora_A if is_gralora_adapter(module, a))
    return found


def _padded_linear(linear: torch.nn.Linear, weight: torch.Tensor) -> torch.nn.Linear:
    """A new ``nn.Linear`` like ``linear`` (bias, dtype, device, requires_grad) holding ``weight``."""
    new = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype, device=weight.device
    )
    new.weight.data = weight
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.data = linear.bias.data
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _make_prepare_model_for_compiled_hotswap(original: Callable) -> Callable:
    @functools.wraps(original)
    def prepare_model_for_compiled_hotswap(
        model: Any,
        *,
        target_rank: int | None = None,
        config: Any = None,
        check_compiled: str = "error",
        target_hybrid_r: int | None = None,
    ) -> None:
        """peft's function, padding GraLoRA adapters inside their layout (see :mod:`.hotswap`).

        ``target_hybrid_r`` (GraLoRA only): the hybrid rank of the padded GraLoRA adapters; by default the grid takes
        all the room it can.
        """
        found = _gralora_layers(model)
        if target_hybrid_r is not None and not found:
            raise ValueError("target_hybrid_r applies to GraLoRA adapters only, and the model holds none.")
        is_compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False)
        if not found or target_rank is None or (is_compiled and check_compiled == "error"):
            return original(model, target_rank=target_rank, config=config, check_compiled=check_compiled)
        from peft.tuners.lora import LoraLayer

        # plan every GraLoRA layer, and check the plain ones peft will pad, before anything changes
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for adapter, lora_A in module.lora_A.items():
                    rank = lora_A.weight.shape[0]
                    if rank > target_rank:
                        raise ValueError(
                            f"Trying to pad the adapter to the target rank {target_rank}, but {name!r} holds adapter "
                            f"{adapter!r} of rank {rank}. Pass the largest rank of all adapters as target_rank."
                        )
        plan = []
        for name, module, adapter in found:
            weight_A, weight_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            k, h = module.gralora_k[adapter], module.hybrid_r[adapter]
            try:
                h_new = padded_layout(weight_A.shape[0], k, h, target_rank, target_hybrid_r)
            except ValueError as exc:
                raise ValueError(f"prepare_model_for_compiled_hotswap: {name!r} adapter {adapter!r}: {exc}") from None
            with torch.no_grad():
                padded = gralora_fit_factors(weight_A.detach(), weight_B.detach(), k, h, k, h_new, target_rank)
            plan.append((module, adapter, h_new, padded))
        configs = config if isinstance(config, dict) else ({"config": config} if config is not None else {})
        new_config_h = {}
        for key, cfg in configs.items():
            if getattr(cfg, "use_gralora", False):
                if cfg.rank_pattern and any(v > target_rank for v in cfg.rank_pattern.values()):
                    raise ValueError(
                        f"prepare_model_for_compiled_hotswap: config {key!r} has ranks above target_rank."
                    )
                new_config_h[key] = padded_layout(
                    max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r,
                    cfg.gralora_k,
                    cfg.hybrid_r,
                    target_rank,
                    target_hybrid_r,
                )
        for module, adapter, h_new, (weight_A, weight_B) in plan:
            module.lora_A[adapter] = _padded_linear(module.lora_A[adapter], weight_A)
            module.lora_B[adapter] = _padded_linear(module.lora_B[adapter], weight_B)
            module.hybrid_r[adapter] = h_new
        # peft converts the scalings, pads the plain LoRA layers (GraLoRA ones already have target_rank) and sets r
        original(model, target_rank=target_rank, config=config, check_compiled=check_compiled)
        for key, h_new in new_config_h.items():
            configs[key].hybrid_r = h_new

    return prepare_model_for_compiled_hotswap


def _incoming_layers(state_dict: dict[str, Any], adapter_name: str) -> dict[str, dict[str, str]]:
    """module name -> {"A": key, "B": key} for the ``lora_A`` / ``lora_B`` weights of ``state_dict``."""
    layers: dict[str, dict[str, str]] = {}
    for key in state_dict:
        parts = key.split(".")
        is_factor = len(parts) >= 4 and parts[-3] in ("lora_A", "lora_B")
        if is_factor and parts[-1] == "weight" and parts[-2] == adapter_name:
            layers.setdefault(".".join(parts[:-3]), {})[parts[-3][-1]] = key
    return layers


def _make_hotswap_adapter_from_state_dict(original: Callable) -> Callable:
    @functools.wraps(original)
    def hotswap_adapter_from_state_dict(
        model: Any,
        state_dict: dict[str, torch.Tensor],
        adapter_name: str,
        config: Any,
        parameter_prefix: str = "lora_",
    ) -> None:
        check_loaded_state_dict(state_dict, config)
        incoming_gralora = bool(getattr(config, "use_gralora", False))
        from peft.tuners.lora import LoraLayer

        new_state = dict(state_dict)
        for module_name, keys in _incoming_layers(state_dict, adapter_name).items():
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                continue  # peft reports unexpected keys itself
            if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
                continue
            resident_gralora = is_gralora_adapter(module, adapter_name)
            if not (incoming_gralora or resident_gralora):
                continue
            where = f"hotswap of adapter {adapter_name!r} into {module_name!r}"
            if set(keys) != {"A", "B"}:
                raise ValueError(f"{where}: the incoming state dict holds only one of lora_A / lora_B.")
            variant = module.lora_variant.get(adapter_name)
            if config.use_dora or (variant is not None and type(variant).__name__ != "GraLoraLinearVariant"):
                raise ValueError(
                    f"{where}: hotswapping GraLoRA adapters with DoRA (or another LoRA variant) is not supported. "
                    "Load the adapter with load_adapter / PeftModel.from_pretrained instead."
                )
            weight_A, weight_B = state_dict[keys["A"]], state_dict[keys["B"]]
            resident_A = module.lora_A[adapter_name].weight
            res_k, res_h = (1, 0)
            if resident_gralora:
                res_k, res_h = module.gralora_k[adapter_name], module.hybrid_r[adapter_name]
            in_k, in_h = (config.gralora_k, config.hybrid_r) if incoming_gralora else (1, 0)
            try:
                gralora_shape(weight_A, weight_B, in_k, in_h)
            except ValueError as exc:
                raise ValueError(f"{where}: the incoming adapter does not match its config: {exc}") from None
            same_layout = incoming_gralora == resident_gralora and (in_k, in_h) == (res_k, res_h)
            if same_layout and weight_A.shape[0] >= resident_A.shape[0]:
                continue  # read the same way: peft copies (equal rank) or grows the tensors (larger rank)
            try:
                with torch.no_grad():
                    fitted_A, fitted_B = gralora_fit_factors(
                        weight_A.to(resident_A.device),
                        weight_B.to(resident_A.device),
                        in_k,
                        in_h,
                        res_k,
                        res_h,
                        resident_A.shape[0],
                    )
            except ValueError as exc:
                incoming = f"GraLoRA (gralora_k={in_k}, hybrid_r={in_h})" if incoming_gralora else "plain LoRA"
                resident = f"GraLoRA (gralora_k={res_k}, hybrid_r={res_h})" if resident_gralora else "plain LoRA"
                raise ValueError(
                    f"{where}: the incoming {incoming} adapter of rank {weight_A.shape[0]} cannot be placed exactly "
                    f"in the resident {resident} layout of rank {resident_A.shape[0]}: {exc} Pad the resident adapter "
                    "first with prepare_model_for_compiled_hotswap(model, target_rank=..., target_hybrid_r=...) (or "
                    "diffusers' enable_lora_hotswap(target_rank=...)) to a layout that holds it, or load it with "
                    "load_adapter instead of hotswapping. Nothing was swapped."
                ) from None
            new_state[keys["A"]], new_state[keys["B"]] = fitted_A, fitted_B
        return original(model, new_state, adapter_name, config, parameter_prefix)

    return hotswap_adapter_from_state_dict


def patches() -> list[Patch]:
    """The patch rows of ``peft.utils.hotswap``.

    ``hotswap_adapter`` and diffusers look both functions up in this module when they run, so patching the module's
    attributes covers them.
    """
    from peft.utils import hotswap

    return [
        Patch(
            hotswap,
            "prepare_model_for_compiled_hotswap",
            _make_prepare_model_for_compiled_hotswap,
            "pads GraLoRA adapters inside their layout (zero sub-ranks per block, zero hybrid rows) and keeps the "
            "layer's hybrid_r and the configs in step",
        ),
        Patch(
            hotswap,
            "hotswap_adapter_from_state_dict",
            _make_hotswap_adapter_from_state_dict,
            "moves each incoming layer exactly into the resident layer's layout (GraLoRA or plain), or raises "
            "ValueError before any weight changes; hotswap_adapter and diffusers' hotswap call it through the module",
        ),
    ]
