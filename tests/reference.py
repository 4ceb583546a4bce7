"""Independent references for the tests: the block formula of docs/design.md ("The math") written out densely,
block by block.

Every function here is differentiable (autograd flows back to the arguments, whatever their dtype) and computes in
float64. Nothing here calls peft_gralora, so a bug there cannot hide in the reference. Tests that need the formula
import it from here instead of writing it again.

Layouts (this package's): ``weight_A`` is lora_A.weight ``(r, in)``, ``weight_B`` is lora_B.weight ``(out, r)``,
``r = k * s + hybrid_r``. Block ``(i, j)`` of delta W (output block i, input block j) is ``B_ij @ A_ij`` with
``A_ij = A[i*s:(i+1)*s, j*n:(j+1)*n]`` ``(s, in/k)`` and ``B_ij = B[i*m:(i+1)*m, j*s:(j+1)*s]`` ``(out/k, s)``;
the hybrid branch adds the dense ``B[:, g:] @ A[g:]``.
"""

from __future__ import annotations

import torch


def block(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int, i: int, j: int) -> torch.Tensor:
    """Block (i, j) of the grid part of delta W, ``B_ij @ A_ij``: float64 ``(out/k, in/k)``."""
    r, in_f = weight_A.shape
    g = r - hybrid_r
    s, n, m = g // k, in_f // k, weight_B.shape[0] // k
    A_ij = weight_A[i * s : (i + 1) * s, j * n : (j + 1) * n].double()  # (s, in/k)
    B_ij = weight_B[i * m : (i + 1) * m, j * s : (j + 1) * s].double()  # (out/k, s)
    return B_ij @ A_ij


def dense_delta(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> torch.Tensor:
    """delta W, float64 ``(out, in)``: the k x k grid of blocks ``B_ij A_ij`` plus the hybrid ``B_h A_h``."""
    g = weight_A.shape[0] - hybrid_r
    rows = [torch.cat([block(weight_A, weight_B, k, hybrid_r, i, j) for j in range(k)], dim=1) for i in range(k)]
    delta = torch.cat(rows, dim=0)
    if hybrid_r:
        delta = delta + weight_B[:, g:].double() @ weight_A[g:].double()
    return delta


def dense_output(x: torch.Tensor, weight_A, weight_B, k: int, hybrid_r: int, bias_B=None) -> torch.Tensor:
    """The adapter's unscaled output for x ``(..., in)``: float64 ``(..., out)``, through the dense delta."""
    y = x.double() @ dense_delta(weight_A, weight_B, k, hybrid_r).T
    if bias_B is not None:
        y = y + bias_B.double()
    return y


def upstream_dense_delta(gralora_A, gralora_B, general_A=None, general_B=None) -> torch.Tensor:
    """delta W, float64 ``(out, in)``, from upstream peft's ``GraloraConfig`` layout: ``gralora_A (k, in/k, g)``
    indexed by input block, ``gralora_B (k, g, out/k)`` indexed by output block, hybrid ``general_A (h, in)``,
    ``general_B (out, h)``. Upstream's block (output j, input c) is ``gralora_B[j, c-th s columns].T @
    gralora_A[c, :, j-th s columns].T``."""
    k, _, g = gralora_A.shape
    s = g // k
    rows = [
        torch.cat(
            [
                gralora_B[j, c * s : (c + 1) * s, :].double().T @ gralora_A[c, :, j * s : (j + 1) * s].double().T
                for c in range(k)
            ],
            dim=1,
        )
        for j in range(k)
    ]
    delta = torch.cat(rows, dim=0)
    if general_A is not None:
        delta = delta + general_B.double() @ general_A.double()
    return delta


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """DoRA's adapted weight, float64 ``(out, in)``: ``diag(m / ||W0 + dW||_row) (W + dW)``, ``W0 = norm_weight``.

    ``weight`` and ``delta`` (already scaled) are ``(out, in)``, ``magnitude`` ``(out,)``. ``norm_weight`` defaults to
    ``weight``; with several DoRA adapters applied in turn, ``weight`` is what the earlier ones left and the norm is
    still taken with the base weight (``norm_weight``), as peft's forward rescales. The row norm is a constant for
    autograd, as in DoRA (and peft): gradients do not flow through it.
    """
    norm_weight = weight if norm_weight is None else norm_weight
    norm = torch.linalg.norm(norm_weight.double() + delta.double(), dim=1).detach()
    return (magnitude.double() / norm)[:, None] * (weight.double() + delta.double())
