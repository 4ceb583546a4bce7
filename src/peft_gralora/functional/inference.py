"""The inference kernel: no autograd, fewest dispatched ops, any memory layout (``as_strided`` block views)."""

from __future__ import annotations

import torch

from .composed import _regroup
from .orientation import _rows_first


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t (..., c)`` as rows: ``(t or a 2-D copy, N, row stride, column stride)``, with no op for contiguous ``t``."""
    if t.is_contiguous():
        width = t.shape[-1]
        return t, t.numel() // width, width, 1
    t2 = t.reshape(-1, t.shape[-1])
    return (t2, t2.shape[0], *t2.stride())


def _grid_no_grad(
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    result: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Inference kernel for adapters without hybrid branch: ``result + scaling * y``, or ``y`` alone, ``(..., out)``.

    ``x`` is ``(..., in)`` and ``result`` has the same leading dims. No autograd and the fewest dispatched ops (a
    decode step is all framework overhead): every block view is one ``as_strided`` built from the operands' own
    strides (any layout), two batched GEMMs (the ``r``-sized side first, or token rows first where that is faster:
    :func:`_rows_first`), one copy of the ``k r``-per-token latent, and the scaled add of ``result`` done by the
    second GEMM.
    """
    out_features, g = weight_B.shape
    in_features = weight_A.shape[1]
    out_shape = (*x.shape[:-1], out_features)
    if x.is_contiguous():  # the common case, without a call
        n_tok, xr, xc = x.numel() // in_features, in_features, 1
    else:
        x, n_tok, xr, xc = _rows(x)
    n, m, s = in_features // k, out_features // k, g // k
    ar, ac = weight_A.stride()
    br, bc = weight_B.stride()
    if _rows_first(x):
        x_b = x.as_strided((k, n_tok, n), (n * xc, xr, xc))  # (k_j, N, n): x_j
        a_t = weight_A.as_strided((k, n, g), (n * ac, ac, ar))  # (k_j, n, g): [A_1j; ...; A_kj]^T
        u = _regroup(torch.bmm(x_b, a_t), k)  # (k_j, N, (i, t)) -> (k_i, N, (j, t)): the one copy
    else:
        x_t = x.as_strided((k, n, n_tok), (n * xc, xc, xr))  # (k_j, n, N): x_j^T
        a_b = weight_A.as_strided((k, g, n), (n * ac, ar, ac))  # (k_j, g, n): [A_1j; ...; A_kj]
        z_t = torch.bmm(a_b, x_t)  # (k_j, (i, t), N), contiguous
        # u[i, :, (j, t)] = z_t[j, (i, t), :]: the transpose of the k x k grid of s-chunks (the one copy)
        u = z_t.as_strided((k, n_tok, k, s), (s * n_tok, 1, g * n_tok, n_tok)).reshape(k, n_tok, g)  # (k_i, N, g)
    b_t = weight_B.as_strided((k, g, m), (m * br, bc, br))  # (k_i, g, m): [B_i1 ... B_ik]^T
    if result is None:  # y alone (scaling is not applied)
        if n_tok == 1:  # (k_i, 1, m) is laid out as (1, out): no transpose needed
            return torch.bmm(u, b_t).view(out_shape)
        y = u.new_empty(out_shape)
        torch.bmm(u, b_t, out=y.view(n_tok, k, m).transpose(0, 1))  # (k_i, N, m): output block i, in place
        return y
    if result.is_contiguous():
        result2, rr, rc = result, out_features, 1
    else:
        result2, _, rr, rc = _rows(result)
    r_b = result2.as_strided((k, n_tok, m), (m * rc, rr, rc))  # (k_i, N, m): output block i of result
    if n_tok == 1:  # result has out_shape (checked by the caller); view_as is cheaper than view(shape)
        return torch.baddbmm(r_b, u, b_t, alpha=scaling).view_as(result)
    y = u.new_empty(out_shape)
    torch.baddbmm(r_b, u, b_t, alpha=scaling, out=y.view(n_tok, k, m).transpose(0, 1))  # result + scaling * u b_t
    return y
