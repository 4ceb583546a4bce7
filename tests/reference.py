"""Independent references for the tests: the block formula of docs/design.md ("The math") written out densely, loop
by loop.

Nothing here calls peft_gralora.functional, so a bug there cannot hide in the reference.
"""

from __future__ import annotations

import torch


def dense_delta(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> torch.Tensor:
    """delta W (out, in) from lora_A.weight (r, in) and lora_B.weight (out, r), block (i, j) = B_ij A_ij."""
    r, in_f = weight_A.shape
    out_f = weight_B.shape[0]
    g = r - hybrid_r
    s, n, m = g // k, in_f // k, out_f // k
    delta = torch.zeros(out_f, in_f, dtype=torch.float64)
    A = weight_A.detach().double()
    B = weight_B.detach().double()
    for i in range(k):
        for j in range(k):
            A_ij = A[i * s : (i + 1) * s, j * n : (j + 1) * n]  # (s, in/k)
            B_ij = B[i * m : (i + 1) * m, j * s : (j + 1) * s]  # (out/k, s)
            delta[i * m : (i + 1) * m, j * n : (j + 1) * n] = B_ij @ A_ij
    if hybrid_r:
        delta += B[:, g:] @ A[g:]
    return delta


def dense_output(x: torch.Tensor, weight_A, weight_B, k: int, hybrid_r: int, bias_B=None) -> torch.Tensor:
    """The adapter's unscaled output for x (..., in), through the dense delta."""
    y = x.double() @ dense_delta(weight_A, weight_B, k, hybrid_r).T
    if bias_B is not None:
        y = y + bias_B.detach().double()
    return y
