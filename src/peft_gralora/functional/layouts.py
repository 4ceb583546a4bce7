"""Exact conversions between factor layouts: GraLoRA -> plain LoRA factors, this package <-> upstream peft."""

from __future__ import annotations

import torch

from .shapes import gralora_shape


def export_lora_factors(
    weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact plain-LoRA factors of a GraLoRA adapter, no SVD: ``B_plain @ A_plain == gralora_delta_weight(...)``.

    The plain latent is ordered (output block i, input block j, t): row ``(i, j, t)`` of ``A_plain`` is row ``t``
    of ``A_ij`` placed in column block ``j``; ``B_plain`` is block diagonal with blocks ``[B_i1 ... B_ik]``.
    The hybrid branch is appended unchanged.

    Returns:
        ``A_plain`` of shape ``(k*g + h, in)`` and ``B_plain`` of shape ``(out, k*g + h)``.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    g, s, n, m = shp.g, shp.s, shp.n, shp.m
    a4 = weight_A[:g].reshape(k, s, k, n)  # (i, t, j, c)
    a_plain = weight_A.new_zeros(k, k, s, k, n)  # (i, j, t, j', c), non-zero only for j == j'
    b_blocks = weight_B[:, :g].reshape(k, m, g)  # (i, row, (j, t))
    b_plain = weight_B.new_zeros(k, m, k, g)  # (i, row, i', (j, t)), non-zero only for i == i'
    for j in range(k):
        a_plain[:, j, :, j, :] = a4[:, :, j, :]
    for i in range(k):
        b_plain[i, :, i, :] = b_blocks[i]
    a_plain = a_plain.reshape(k * g, shp.in_features)
    b_plain = b_plain.reshape(shp.out_features, k * g)
    if hybrid_r:
        a_plain = torch.cat([a_plain, weight_A[g:]], dim=0)
        b_plain = torch.cat([b_plain, weight_B[:, g:]], dim=1)
    return a_plain, b_plain


def upstream_to_variant(
    gralora_A: torch.Tensor,
    gralora_B: torch.Tensor,
    general_A: torch.Tensor | None = None,
    general_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``GraloraConfig`` weights -> this package's ``lora_A``/``lora_B`` weights (a pure reshape).

    Args:
        gralora_A: upstream ``(k, in/k, g)``, indexed by input block.
        gralora_B: upstream ``(k, g, out/k)``, indexed by output block.
        general_A: upstream hybrid ``(h, in)`` or None.
        general_B: upstream hybrid ``(out, h)`` or None.

    Returns:
        ``weight_A (g + h, in)`` and ``weight_B (out, g + h)``.
    """
    k, n, g = gralora_A.shape
    if gralora_B.dim() != 3 or gralora_B.shape[0] != k or gralora_B.shape[1] != g:
        raise ValueError(f"Upstream gralora_B must have shape (k={k}, g={g}, out/k), got {tuple(gralora_B.shape)}.")
    m = gralora_B.shape[2]
    weight_A = gralora_A.permute(2, 0, 1).reshape(g, k * n)  # (g, in), rows (i, t), cols (j, c)
    weight_B = gralora_B.permute(0, 2, 1).reshape(k * m, g)  # (out, g), rows (i, row), cols (j, t)
    if general_A is not None and general_B is not None and general_A.shape[0]:
        weight_A = torch.cat([weight_A, general_A], dim=0)
        weight_B = torch.cat([weight_B, general_B], dim=1)
    return weight_A.contiguous(), weight_B.contiguous()


def variant_to_upstream(
    weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of :func:`upstream_to_variant`.

    Returns:
        ``gralora_A (k, in/k, g)``, ``gralora_B (k, g, out/k)``, and the hybrid ``(h, in)``, ``(out, h)`` factors
        (None when ``hybrid_r == 0``).
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    g, n, m = shp.g, shp.n, shp.m
    gralora_A = weight_A[:g].reshape(g, k, n).permute(1, 2, 0).contiguous()  # (k_j, n, g)
    gralora_B = weight_B[:, :g].reshape(k, m, g).permute(0, 2, 1).contiguous()  # (k_i, g, m)
    if hybrid_r:
        return gralora_A, gralora_B, weight_A[g:].contiguous(), weight_B[:, g:].contiguous()
    return gralora_A, gralora_B, None, None
