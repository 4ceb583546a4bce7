"""The three ``LoraConfig`` fields of GraLoRA and their validation (no peft import).

``r`` stays LoRA's total rank: the GraLoRA part has rank ``g = r - hybrid_r`` split into ``k x k`` sub-blocks of rank
``g / k``; ``scaling`` stays LoRA's (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GRALORA_FIELDS",
    "UNSUPPORTED_WITH_GRALORA",
    "validate_gralora_config",
    "validate_gralora_layer",
]

# name -> (type, default, help); `use_gralora` is the switch peft's variant resolver looks for.
GRALORA_FIELDS: dict[str, tuple[type, Any, str]] = {
    "use_gralora": (
        bool,
        False,
        "Enable GraLoRA (Granular Low-Rank Adaptation, https://arxiv.org/abs/2505.20355): the weight is split into "
        "a gralora_k x gralora_k grid of blocks, each with its own low-rank adapter of rank (r - hybrid_r) / "
        "gralora_k. Same parameter count and FLOPs as LoRA at the same r, up to gralora_k times the rank.",
    ),
    "gralora_k": (
        int,
        2,
        "Number of GraLoRA blocks per side (>= 1). (r - hybrid_r) and the in/out features of every targeted "
        "module must be divisible by it. gralora_k=1 is plain LoRA. The paper recommends 2 for r <= 32, 4 above.",
    ),
    "hybrid_r": (
        int,
        0,
        "Part of the total rank r given to a plain LoRA branch next to the GraLoRA blocks (Hybrid GraLoRA); "
        "0 <= hybrid_r < r. The GraLoRA rank is r - hybrid_r.",
    ),
}

# LoraConfig options that GraLoRA cannot honour, with what to do instead. A predicate per option decides whether the
# option is "on": the value differs from LoRA's default in a way that changes what the adapter computes.
UNSUPPORTED_WITH_GRALORA: dict[str, tuple[Any, str]] = {
    "use_bdlora": (lambda v: v is not None, "BD-LoRA is another block structure; use one or the other"),
    "arrow_config": (lambda v: v is not None, "Arrow routes between plain LoRA experts"),
    "alora_invocation_tokens": (lambda v: v is not None, "aLoRA is not implemented for GraLoRA"),
    "velora_config": (lambda v: v is not None, "VeLoRA is not implemented for GraLoRA"),
    "monteclora_config": (lambda v: v is not None, "MonteCLoRA is not implemented for GraLoRA"),
    "kasa_config": (lambda v: v is not None, "KaSA is not implemented for GraLoRA"),
    "use_qalora": (bool, "QA-LoRA pools the input and has no GraLoRA form"),
    "megatron_config": (lambda v: v is not None, "Megatron tensor-parallel layers are not supported"),
    "target_parameters": (bool, "GraLoRA targets nn.Linear / Conv1D modules only; use target_modules"),
}

# init_lora_weights values GraLoRA supports: they only set the random init of A and zero B.
SUPPORTED_INITS = (True, False, "gaussian")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_gralora_config(config: Any) -> None:
    """Check a ``LoraConfig`` that has ``use_gralora=True``; a no-op otherwise.

    Raises:
        ValueError: naming the bad value and how to fix it.
    """
    if not getattr(config, "use_gralora", False):
        return
    k = config.gralora_k
    h = config.hybrid_r
    if not _is_int(k) or k < 1:
        raise ValueError(f"gralora_k must be an integer >= 1, got {k!r}.")
    if not _is_int(h) or h < 0:
        raise ValueError(f"hybrid_r must be an integer >= 0, got {h!r}.")
    ranks = {"r": config.r}
    for pattern, rank in (config.rank_pattern or {}).items():
        ranks[f"rank_pattern[{pattern!r}]"] = rank
    for where, r in ranks.items():
        _check_rank(where, r, k, h)
    for option, (is_on, why) in UNSUPPORTED_WITH_GRALORA.items():
        if is_on(getattr(config, option, None)):
            raise ValueError(
                f"use_gralora=True cannot be combined with {option}={getattr(config, option)!r}: {why}. "
                f"Unset {option} or set use_gralora=False."
            )
    init = config.init_lora_weights
    if not any(init is v or init == v for v in SUPPORTED_INITS):
        raise ValueError(
            f"use_gralora=True supports init_lora_weights in {SUPPORTED_INITS}, got {init!r}: data-driven inits "
            "(PiSSA, OLoRA, CorDA, LoftQ, EVA, LoRA-GA, MiCA, orthogonal) compute plain LoRA factors. "
            "Use init_lora_weights=True (or 'gaussian'), or set use_gralora=False."
        )


def _check_rank(where: str, r: Any, k: int, h: int) -> None:
    if not _is_int(r) or r < 1:
        raise ValueError(f"{where} must be a positive integer, got {r!r}.")
    if h >= r:
        raise ValueError(
            f"hybrid_r={h} must be smaller than {where}={r} (r is the total rank, GraLoRA rank = r - hybrid_r). "
            f"Lower hybrid_r or raise {where}."
        )
    if (r - h) % k:
        raise ValueError(
            f"The GraLoRA rank {where} - hybrid_r = {r - h} must be divisible by gralora_k={k}. "
            f"Choose {where} so that {where} - hybrid_r is a multiple of {k}, "
            f"e.g. {where}={h + k * max(1, (r - h) // k)}."
        )


def validate_gralora_layer(
    module_name: str, in_features: int, out_features: int, r: int, k: int, hybrid_r: int
) -> None:
    """Check that a targeted module can hold a GraLoRA adapter of rank ``r``.

    Raises:
        ValueError: naming the module and its shape.
    """
    _check_rank(f"r of module {module_name!r}", r, k, hybrid_r)
    if in_features % k or out_features % k:
        raise ValueError(
            f"GraLoRA needs in_features and out_features divisible by gralora_k={k}, but module {module_name!r} has "
            f"in_features={in_features}, out_features={out_features}. Pick a gralora_k that divides both, or leave "
            "this module out of target_modules."
        )
