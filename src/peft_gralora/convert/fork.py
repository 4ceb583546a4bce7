"""The GraLoRA PEFT fork's layout -> this package's (state dicts; also used by peft_gralora.integration.loading)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .layout import (
    _FORK_DEAD_KEYS,
    _FORK_SEGMENT,
    _UPSTREAM_KEYS,
    _VARIANT_KEYS,
    _VARIANT_SEGMENT,
    AdapterConversionError,
    _Adapter,
    _group_by_module,
    _int_field,
)
from .upstream import _gralora_factors_to_variant

__all__ = ["ForkConversion", "fork_to_variant_state_dict"]


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
