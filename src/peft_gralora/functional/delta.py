"""The dense update ``delta W`` (differentiable, or added in place block by block) and the factors' init."""

from __future__ import annotations

import math

import torch

from .shapes import gralora_shape


def gralora_delta_weight(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> torch.Tensor:
    """The dense update ``delta W`` of shape ``(out, in)`` (without scaling): block ``(i, j)`` is ``B_ij A_ij``.

    The one definition that merge, unmerge, ``get_delta_weight`` and the exports rely on (:func:`gralora_add_delta_`
    is the in-place form of the same sum).

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Returns:
        ``(out, in)`` tensor with ``delta W @ x == gralora_forward(x, ...)`` (bias aside); differentiable when the
        factors require grad.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    if not (torch.is_grad_enabled() and (weight_A.requires_grad or weight_B.requires_grad)):
        delta = weight_B.new_empty(shp.out_features, shp.in_features)
        return gralora_add_delta_(delta, weight_A, weight_B, k, hybrid_r, overwrite=True)
    g, s, n, m = shp.g, shp.s, shp.n, shp.m
    a4 = weight_A[:g].reshape(k, s, k, n)  # (i, t, j, c)
    b4 = weight_B[:, :g].reshape(k, m, k, s)  # (i, row, j, t)
    delta = torch.einsum("imjt,itjc->imjc", b4, a4).reshape(shp.out_features, shp.in_features)
    if hybrid_r:
        delta = delta + weight_B[:, g:] @ weight_A[g:]
    return delta


@torch.no_grad()
def gralora_add_delta_(
    target: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    alpha: float = 1.0,
    transposed: bool = False,
    overwrite: bool = False,
) -> torch.Tensor:
    """``target += alpha * delta W`` in place, one ``addmm_`` per block: no ``(out, in)`` temporary at all.

    Merging this way reads and writes the weight once, where ``weight + scaling * (B @ A)`` (LoRA's merge) makes
    two weight-sized temporaries; and the blocks' products have ``k`` times fewer FLOPs than a rank-``r`` ``B @ A``.

    Args:
        target: ``(out, in)``, or ``(in, out)`` with ``transposed`` (``Conv1D``'s ``fan_in_fan_out`` layout); same
            dtype and device as the factors.
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.
        alpha: factor of the update (``scaling``, negated to unmerge).
        overwrite: ``target = alpha * delta W`` instead; its old contents are never read (may be uninitialised).

    Returns:
        ``target``.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    g, s, n, m = shp.g, shp.s, shp.n, shp.m
    expected = (shp.in_features, shp.out_features) if transposed else (shp.out_features, shp.in_features)
    if tuple(target.shape) != expected or target.dtype != weight_A.dtype or target.device != weight_A.device:
        raise ValueError(
            f"gralora_add_delta_: target must be {expected} {weight_A.dtype} on {weight_A.device}, got "
            f"{tuple(target.shape)} {target.dtype} on {target.device}."
        )
    beta = 0.0 if overwrite else 1.0  # beta=0 ignores the old contents, NaN included
    for i in range(k):
        rows = slice(i * m, (i + 1) * m)
        for j in range(k):
            cols = slice(j * n, (j + 1) * n)
            b_ij = weight_B[rows, j * s : (j + 1) * s]  # (m, s)
            a_ij = weight_A[i * s : (i + 1) * s, cols]  # (s, n)
            if transposed:  # block (j, i) of delta W^T is A_ij^T B_ij^T
                target[cols, rows].addmm_(a_ij.T, b_ij.T, beta=beta, alpha=alpha)
            else:
                target[rows, cols].addmm_(b_ij, a_ij, beta=beta, alpha=alpha)
    if hybrid_r:
        b_h, a_h = weight_B[:, g:], weight_A[g:]  # (out, h), (h, in)
        if transposed:
            target.addmm_(a_h.T, b_h.T, alpha=alpha)
        else:
            target.addmm_(b_h, a_h, alpha=alpha)
    return target


@torch.no_grad()
def init_gralora_A_(weight_A: torch.Tensor, k: int, hybrid_r: int, generator: torch.Generator | None = None) -> None:
    """Initialise ``weight_A (r, in)`` in place as upstream GraLoRA does.

    Every ``A_ij`` is kaiming-uniform with fan_in ``in/k`` (bound ``1/sqrt(in/k)``); ``A_h`` keeps fan_in ``in``.
    """
    r, in_features = weight_A.shape
    g = r - hybrid_r
    bound_g = 1.0 / math.sqrt(in_features // k)
    bound_h = 1.0 / math.sqrt(in_features)
    weight_A[:g].uniform_(-bound_g, bound_g, generator=generator)
    if hybrid_r:
        weight_A[g:].uniform_(-bound_h, bound_h, generator=generator)
