"""The training kernels: fused forward / backward (six strided batched GEMMs) and their autograd function."""

from __future__ import annotations

import torch

from .composed import _blocks, _gralora_composed
from .orientation import _HALF, _rows_first

_LOOP_ELEMENTS = 1 << 18  # operands + output of one block from which the copies cost more than k mm calls


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.bmm(a, b, out=out)`` over the k blocks, for the block views of the kernels below.

    In half precision on CPU, bmm hands strided batches to oneDNN only after copying every operand (and the output)
    into contiguous batches: at 2048 tokens x 1024 features that is most of the adapter's time (measured: 142 of 190
    ms of bmm in a 4-layer bf16 autocast step). One ``mm`` per block reads the same views as 2-D operands with
    leading dimensions (no copy); below ~256k elements per block the copies are cheaper than k calls. Elsewhere
    (float32, GPUs) one batched call is cheapest.
    """
    if (
        a.dtype not in _HALF
        or a.device.type != "cpu"
        or a.shape[1] * b.shape[2] + a.shape[1] * a.shape[2] + b.shape[1] * b.shape[2] < _LOOP_ELEMENTS
    ):
        return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)
    if out is None:
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


def _regroup_rows(z: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """``(k_p, N, r) -> (k_q, N, r)`` for token-rows-first latents: the grid columns ``[0, g)`` swap their two block
    indices (``out[q, :, (p, t)] = z[p, :, (q, t)]``, its own inverse, so the forward's latent and the backward's
    gradient of it use the same call); each hybrid column ``[g, r)`` becomes the sum over ``p``, for every ``q``
    (``A_h x = sum_j A_h[:, block j] x_j``, and likewise every block gets the whole hybrid gradient)."""
    n_tok, r, s = z.shape[1], z.shape[2], g // k
    out = z.new_empty(k, n_tok, r)
    out[..., :g].unflatten(-1, (k, s)).copy_(z[..., :g].unflatten(-1, (k, s)).permute(2, 1, 0, 3))
    if g < r:
        out[..., g:].copy_(z[..., g:].sum(0))  # (N, h), broadcast over q
    return out


def _fused_forward(
    x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :class:`_GraloraFunction` (hybrid rows inside the grid's GEMMs): ``y (N, out)`` and the latent
    ``u (k_i, N, r)`` that backward needs. Writes ``y`` in place through column-block views (eager mode only)."""
    # x2 (N, in), weight_A (r, in), weight_B (out, r); latent rows [0, g) are the grid's, [g, r) the hybrid's
    n_tok, r, s = x2.shape[0], weight_A.shape[0], g // k
    a_blocks = weight_A.unflatten(1, (k, -1)).transpose(0, 1)  # (k_j, r, n): column block j of A
    if _rows_first(x2):
        # (k_j, N, n) @ (k_j, n, r) = (k_j, N, r), regrouped; the product is freed before y exists (peak memory)
        u = _regroup_rows(_bmm(_blocks(x2, k), a_blocks.transpose(1, 2)), k, g)
    else:
        u = x2.new_empty(k, n_tok, r)  # (k_i, N, r): [A_i1 x_1; ...; A_ik x_k; A_h x] per output block i
        z_t = _bmm(a_blocks, _blocks(x2, k).transpose(1, 2))  # (k_j, r, n) @ (k_j, n, N) = (k_j, r, N)
        # u[i, :, (j, t)] = z_t[j, (i, t), :]: the transpose of the k x k grid of s-chunks
        u[..., :g].unflatten(-1, (k, s)).copy_(z_t[:, :g].unflatten(1, (k, s)).permute(1, 3, 0, 2))
        if g < r:
            u[..., g:].copy_(z_t[:, g:].sum(0).t())  # (N, h): A_h x = sum_j A_h[:, block j] x_j, for every i
        del z_t  # peak memory: gone before y exists
    b_t = weight_B.unflatten(0, (k, -1)).transpose(1, 2)  # (k_i, r, m): row block i of B, transposed
    y = u.new_empty(n_tok, weight_B.shape[0])  # (N, out)
    _bmm(u, b_t, out=_blocks(y, k))  # (k_i, N, r) @ (k_i, r, m) -> output block i of y, in place
    return y, u


class _GraloraFunction(torch.autograd.Function):
    """The whole adapter ``y_i = sum_j B_ij A_ij x_j + [B_h A_h x]_i`` on 2-D operands, with a hand-written backward.

    Layout: column block ``j`` of ``weight_A`` is ``[A_1j; ...; A_kj; A_h[:, block j]]`` ``(r, in/k)`` and row block
    ``i`` of ``weight_B`` is ``[B_i1 ... B_ik  B_h[block i]]`` ``(out/k, r)``, both plain views. So the hybrid branch
    rides along inside the grid's GEMMs as ``h`` extra latent rows (its latent is the sum over ``j`` of the partial
    products ``A_h[:, block j] x_j``, and the same for its gradient), and the whole adapter is six strided batched
    GEMMs over the k blocks, as LoRA is six GEMMs:

    - each reads ``x`` / ``grad y`` and writes ``y`` / ``grad x`` once, in place through column-block views: nothing
      of size ``(N, in)`` or ``(N, out)`` is ever copied or added twice; the only copies are of the latent
      (``k r`` numbers per token) and of the weight-sized gradients;
    - every product whose output has an ``r``-sized side is computed with that side first (``z^T = A x^T``): CPU
      BLAS is up to ~50x slower on outputs with few columns in float32; in bfloat16 on CPU the token rows come
      first instead (``z = x A^T``, :func:`_rows_first`), where bmm's copies of strided batches are cheapest;
    - saved for backward: ``x`` (a view of the caller's input, like LoRA's) and the latent ``(k, N, r)``.

    ``create_graph=True`` differentiates :func:`_gralora_composed` instead, so higher-order gradients are exact too.
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int) -> torch.Tensor:
        y, u = _fused_forward(x2, weight_A, weight_B, k, g)
        ctx.save_for_backward(x2, weight_A, weight_B, u)
        ctx.k, ctx.g = k, g
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, weight_A, weight_B, u = ctx.saved_tensors
        k, g = ctx.k, ctx.g
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: let autograd record a differentiable backward
            inputs = [t for t, need in zip((x2, weight_A, weight_B), needs, strict=True) if need]
            y = _gralora_composed(x2, weight_A, weight_B, k, g)
            grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None, None)
        return (*_fused_backward(grad_y, x2, weight_A, weight_B, u, k, g, *needs), None, None)


def _fused_backward(
    grad_y: torch.Tensor,
    x2: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    u: torch.Tensor,
    k: int,
    g: int,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of :class:`_GraloraFunction`: ``grad x (N, in)``, ``grad weight_A (r, in)``, ``grad weight_B
    (out, r)`` from ``grad y (N, out)`` and the saved latent ``u (k_i, N, r)``; None where not needed."""
    n_tok, r, s = x2.shape[0], weight_A.shape[0], g // k
    g_blocks = _blocks(grad_y, k)  # (k_i, N, m)
    grad_x = grad_A = grad_B = None
    if need_b:
        grad_b_t = _bmm(u.transpose(1, 2), g_blocks)  # (k_i, r, N) @ (k_i, N, m) = (k_i, r, m)
        grad_B = grad_b_t.transpose(1, 2).reshape(weight_B.shape)  # (k_i, m, r) = (out, r): B's size
    if need_x or need_a:
        b_blocks = weight_B.unflatten(0, (k, -1))  # (k_i, m, r)
        if _rows_first(grad_y):
            # (k_i, N, m) @ (k_i, m, r) = (k_i, N, r), regrouped into the gradient of z (k_j, N, r), then viewed
            grad_z_t = _regroup_rows(_bmm(g_blocks, b_blocks), k, g).transpose(1, 2)  # (k_j, r, N)
        else:
            grad_u_t = _bmm(b_blocks.transpose(1, 2), g_blocks.transpose(1, 2))  # (k_i, r, m) @ (k_i, m, N)
            grad_z_t = grad_u_t.new_empty(k, r, n_tok)  # (k_j, r, N): gradient of z_t
            grad_z_t[:, :g].unflatten(1, (k, s)).copy_(grad_u_t[:, :g].unflatten(1, (k, s)).transpose(0, 1))
            if g < r:
                grad_z_t[:, g:].copy_(grad_u_t[:, g:].sum(0))  # (h, N): every block j gets the whole hybrid grad
            del grad_u_t  # peak memory: gone before grad x exists
        if need_a:
            grad_a = _bmm(grad_z_t, _blocks(x2, k))  # (k_j, r, N) @ (k_j, N, n) = (k_j, r, n)
            grad_A = grad_a.transpose(0, 1).reshape(weight_A.shape)  # (r, k_j, n) = (r, in): A's size
        if need_x:
            a_blocks = weight_A.unflatten(1, (k, -1)).transpose(0, 1)  # (k_j, r, n)
            grad_x = grad_z_t.new_empty(x2.shape)  # (N, in)
            _bmm(grad_z_t.transpose(1, 2), a_blocks, out=_blocks(grad_x, k))  # (k_j, N, r) @ (k_j, r, n)
    return grad_x, grad_A, grad_B
