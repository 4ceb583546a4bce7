"""Sizes of a GraLoRA adapter and their checks: ``GraloraShape``, the cached rank check of the hot path."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraloraShape:
    """The sizes of one GraLoRA adapter: ``in_features = k * n``, ``out_features = k * m``, ``r = k * s + h``."""

    in_features: int
    out_features: int
    r: int
    k: int
    hybrid_r: int

    @property
    def g(self) -> int:
        """GraLoRA rank ``r - hybrid_r``."""
        return self.r - self.hybrid_r

    @property
    def s(self) -> int:
        """Rank of one of the ``k x k`` sub-blocks."""
        return self.g // self.k

    @property
    def n(self) -> int:
        """Width of one input block."""
        return self.in_features // self.k

    @property
    def m(self) -> int:
        """Height of one output block."""
        return self.out_features // self.k


def gralora_shape(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> GraloraShape:
    """Read and check the sizes of an adapter stored as ``weight_A (r, in)`` and ``weight_B (out, r)``.

    Raises:
        ValueError: if the factors do not form a valid GraLoRA adapter for this ``k`` and ``hybrid_r``.
    """
    _gralora_rank(weight_A, weight_B, k, hybrid_r)
    r, in_features = weight_A.shape
    return GraloraShape(in_features, weight_B.shape[0], r, k, hybrid_r)


def _gralora_rank(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> int:
    """:func:`gralora_shape`'s check, returning the GraLoRA rank ``g`` alone: plain integers only, so that dynamo
    traces it in a few bytecodes (no dataclass is built while compiling)."""
    shape_A, shape_B = weight_A.shape, weight_B.shape
    if len(shape_A) != 2 or len(shape_B) != 2 or shape_A[0] != shape_B[1]:
        raise ValueError(
            f"GraLoRA factors must be weight_A (r, in) and weight_B (out, r), got {tuple(shape_A)} and "
            f"{tuple(shape_B)}."
        )
    r, in_features = shape_A
    out_features = shape_B[0]
    if k < 1 or not 0 <= hybrid_r < r or (r - hybrid_r) % k or in_features % k or out_features % k:
        raise ValueError(
            f"Invalid GraLoRA adapter: r={r}, gralora_k={k}, hybrid_r={hybrid_r}, in_features={in_features}, "
            f"out_features={out_features}. Need k >= 1, 0 <= hybrid_r < r, (r - hybrid_r) % k == 0 and both "
            "feature sizes divisible by k."
        )
    return r - hybrid_r


_RANKS: dict[tuple, int] = {}  # (shape_A, shape_B, k, hybrid_r) -> g, for shapes already validated


def _checked_rank(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> int:
    """:func:`gralora_shape`'s check and ``g``, computed once per distinct shape: it depends on nothing else."""
    if torch.compiler.is_compiling():  # traced once into the graph's guards: free at run time
        return _gralora_rank(weight_A, weight_B, k, hybrid_r)
    key = (weight_A.shape, weight_B.shape, k, hybrid_r)
    g = _RANKS.get(key)
    if g is None:
        g = _gralora_rank(weight_A, weight_B, k, hybrid_r)  # raises for invalid adapters: never cached
        if len(_RANKS) >= 4096:
            _RANKS.clear()
        _RANKS[key] = g
    return g


def _check_input(x: torch.Tensor, weight_A: torch.Tensor) -> None:
    # the kernels read x through strides computed from in_features: a wrong width must not get that far
    if x.dim() == 0 or x.shape[-1] != weight_A.shape[1]:
        raise ValueError(
            f"GraLoRA input must have shape (..., in_features={weight_A.shape[1]}), got {tuple(x.shape)}."
        )


def gralora_effective_rank(in_features: int, out_features: int, r: int, k: int, hybrid_r: int) -> int:
    """Generic rank of ``delta W``: ``min(k * (r - hybrid_r) + hybrid_r, in, out)``."""
    return min(k * (r - hybrid_r) + hybrid_r, in_features, out_features)
