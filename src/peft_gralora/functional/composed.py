"""The adapter in plain differentiable torch ops (block views, the latent regrouping): the path any autograd
feature can trace, and the second differentiation of the fused function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k * c)`` -> ``(k, N, c)``: the k column blocks of a matrix as a batch, a strided view (no copy)."""
    return t.unflatten(-1, (k, -1)).transpose(0, 1)


def _regroup(z: torch.Tensor, k: int) -> torch.Tensor:
    """Swap the two block indices of the latent: ``(k_p, N, (q, t)) -> (k_q, N, (p, t))``; its own inverse."""
    _, n_tok, g = z.shape
    return z.view(k, n_tok, k, g // k).permute(2, 1, 0, 3).reshape(k, n_tok, g)  # (q, N, p, t) -> (k_q, N, g)


def _grid_latent(x2: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """The latent ``u (k_i, N, g)``, row ``i`` = ``[A_i1 x_1; ...; A_ik x_k]``, from ``x2 (N, in)``, ``a (g, in)``."""
    a_t = a.unflatten(1, (k, -1)).permute(1, 2, 0)  # (g, k_j, n) -> (k_j, n, g): [A_1j; ...; A_kj]^T
    z = torch.bmm(_blocks(x2, k), a_t)  # (k_j, N, n) @ (k_j, n, g) = (k_j, N, (i, t))
    return _regroup(z, k)  # (k_i, N, (j, t))


def _gralora_composed(x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int):
    """The adapter in plain differentiable ops: ``(N, in) -> (N, out)``. Used under torch.func transforms and
    forward-mode AD (every op here has batching and forward-derivative rules), by torch.compile without the custom
    ops, and to differentiate :class:`_GraloraFunction` a second time."""
    u = _grid_latent(x2, weight_A[:g], k)  # (k_i, N, g)
    y = torch.bmm(u, weight_B[:, :g].unflatten(0, (k, -1)).transpose(1, 2))  # (k_i, N, g) @ (k_i, g, m)
    y = y.transpose(0, 1).reshape(x2.shape[0], weight_B.shape[0])  # (N, out)
    if g < weight_A.shape[0]:
        y = y + F.linear(F.linear(x2, weight_A[g:]), weight_B[:, g:])  # (N, out) + (N, h) @ (h, out)
    return y
