"""GraLoRA math on plain tensors (no peft import).

GraLoRA (Granular Low-Rank Adaptation, https://arxiv.org/abs/2505.20355) splits the input features into ``k``
blocks ``x_1..x_k`` of width ``in/k`` and the output features into ``k`` blocks of height ``out/k``, and gives every
pair (output block ``i``, input block ``j``) its own rank-``s`` adapter ``B_ij A_ij``::

    y_i = W_i x + scaling * ( sum_j B_ij A_ij x_j  +  [B_h A_h x]_i )

with ``g = r - hybrid_r`` the GraLoRA rank, ``s = g / k`` the rank of one sub-block and ``B_h A_h`` an optional plain
LoRA ("hybrid") branch of rank ``hybrid_r``.

Storage (the LoRA weights of peft, read blockwise)::

    weight_A = lora_A.weight  (r, in):   weight_A[0:g, cols_j]  = [A_1j; ...; A_kj]   (row index i*s + t)
                                         weight_A[g:r, :]       = A_h
    weight_B = lora_B.weight  (out, r):  weight_B[rows_i, 0:g]  = [B_i1 ... B_ik]     (column index j*s + t)
                                         weight_B[:, g:r]       = B_h

Every function here takes these two matrices, ``k`` and ``hybrid_r``; none applies ``scaling`` unless asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "GraloraShape",
    "gralora_shape",
    "gralora_forward",
    "gralora_delta_weight",
    "gralora_effective_rank",
    "init_gralora_A_",
    "export_lora_factors",
    "upstream_to_variant",
    "variant_to_upstream",
]


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
    if weight_A.dim() != 2 or weight_B.dim() != 2 or weight_A.shape[0] != weight_B.shape[1]:
        raise ValueError(
            f"GraLoRA factors must be weight_A (r, in) and weight_B (out, r), got {tuple(weight_A.shape)} and "
            f"{tuple(weight_B.shape)}."
        )
    r, in_features = weight_A.shape
    out_features = weight_B.shape[0]
    if k < 1 or not 0 <= hybrid_r < r or (r - hybrid_r) % k or in_features % k or out_features % k:
        raise ValueError(
            f"Invalid GraLoRA adapter: r={r}, gralora_k={k}, hybrid_r={hybrid_r}, in_features={in_features}, "
            f"out_features={out_features}. Need k >= 1, 0 <= hybrid_r < r, (r - hybrid_r) % k == 0 and both "
            "feature sizes divisible by k."
        )
    return GraloraShape(in_features, out_features, r, k, hybrid_r)


def _blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k * c)`` -> ``(k, N, c)``: the k column blocks of a matrix as a batch, a strided view (no copy)."""
    return t.unflatten(-1, (k, -1)).transpose(0, 1)


def _regroup(z: torch.Tensor, k: int) -> torch.Tensor:
    """Swap the two block indices of the latent: ``(k_p, N, (q, t)) -> (k_q, N, (p, t))``; its own inverse.

    The one copy of the forward (and of the backward), on the latent only: ``k * g`` numbers per token.
    """
    _, n_tok, g = z.shape
    return z.view(k, n_tok, k, g // k).permute(2, 1, 0, 3).reshape(k, n_tok, g)  # (q, N, p, t) -> (k_q, N, g)


def _grid_latent(x2: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """The latent ``u (k_i, N, g)``, row ``i`` = ``[A_i1 x_1; ...; A_ik x_k]``, from ``x2 (N, in)``, ``a (g, in)``."""
    a_t = a.unflatten(1, (k, -1)).permute(1, 2, 0)  # (g, k_j, n) -> (k_j, n, g): [A_1j; ...; A_kj]^T
    z = torch.bmm(_blocks(x2, k), a_t)  # (k_j, N, n) @ (k_j, n, g) = (k_j, N, (i, t))
    return _regroup(z, k)  # (k_i, N, (j, t))


class _GraloraGrid(torch.autograd.Function):
    """The block grid ``y_i = sum_j B_ij A_ij x_j`` on 2-D operands, with a hand-written backward.

    Why not plain autograd: every GEMM here is one strided batched matmul over the k blocks that reads ``x`` and
    writes ``y`` (and, in backward, ``grad x``) in place through column-block views, so nothing of size
    ``(N, in)`` or ``(N, out)`` is ever copied; the only copies are of the latent. Autograd of the composed ops
    instead copies ``y`` and ``grad x`` out of transposed ``(k, N, .)`` layouts. Saved for backward: ``x`` (a view of
    the caller's input, like LoRA's) and the latent ``u`` ``(k, N, g)``; nothing else.

    Under ``create_graph=True`` the backward rebuilds the latent with recorded ops, so higher-order gradients are
    exact too.
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
        # x2 (N, in), a = weight_A[:g] (g, in), b = weight_B[:, :g] (out, g)
        u = _grid_latent(x2, a, k)  # (k_i, N, g)
        b_t = b.unflatten(0, (k, -1)).transpose(1, 2)  # (k_i, m, g) -> (k_i, g, m): [B_i1 ... B_ik]^T
        y = u.new_empty(x2.shape[0], b.shape[0])  # (N, out)
        torch.bmm(u, b_t, out=_blocks(y, k))  # (k_i, N, g) @ (k_i, g, m) -> output block i of y, in place
        ctx.save_for_backward(x2, a, b, u)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, a, b, u = ctx.saved_tensors
        k = ctx.k
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        # create_graph=True: no out= writes (autograd cannot record them) and a latent that is a function of x and A
        recorded = torch.is_grad_enabled()
        if recorded:
            u = _grid_latent(x2, a, k)
        g_blocks = _blocks(grad_y, k)  # (k_i, N, m)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = torch.bmm(g_blocks.transpose(1, 2), u).reshape(b.shape)  # (k_i, m, N) @ (k_i, N, g) = (out, g)
        if need_x or need_a:
            grad_u = torch.bmm(g_blocks, b.unflatten(0, (k, -1)))  # (k_i, N, m) @ (k_i, m, g) = (k_i, N, (j, t))
            grad_z = _regroup(grad_u, k)  # (k_j, N, (i, t))
            if need_a:
                grad_a = torch.bmm(grad_z.transpose(1, 2), _blocks(x2, k))  # (k_j, g, N) @ (k_j, N, n) = (k_j, g, n)
                grad_a = grad_a.transpose(0, 1).reshape(a.shape)  # (g, k_j, n) = (g, in): a copy of A's size
            if need_x:
                a_blocks = a.unflatten(1, (k, -1)).transpose(0, 1)  # (k_j, g, n)
                if recorded:
                    grad_x = torch.bmm(grad_z, a_blocks).transpose(0, 1).reshape(x2.shape)  # (N, in)
                else:
                    grad_x = grad_z.new_empty(x2.shape)  # (N, in)
                    torch.bmm(grad_z, a_blocks, out=_blocks(grad_x, k))  # (k_j, N, g) @ (k_j, g, n), in place
        return grad_x, grad_a, grad_b, None


def _gralora_grid_composed(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """:class:`_GraloraGrid` in plain differentiable ops, for autocast (whose casts out= writes cannot take)."""
    u = _grid_latent(x2, a, k)  # (k_i, N, g)
    y = torch.bmm(u, b.unflatten(0, (k, -1)).transpose(1, 2))  # (k_i, N, g) @ (k_i, g, m) = (k_i, N, m)
    return y.transpose(0, 1).reshape(x2.shape[0], b.shape[0])  # (N, out)


def gralora_forward(
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adapter's output ``sum_j B_ij A_ij x_j + [B_h A_h x]_i (+ bias_B)``, without scaling.

    Two batched matmuls and one regrouping of the latent: FLOPs equal those of a rank-``r`` LoRA.

    Args:
        x: input of shape ``(..., in)``.
        weight_A: ``(r, in)``, the ``lora_A`` weight.
        weight_B: ``(out, r)``, the ``lora_B`` weight.
        k: number of blocks per side.
        hybrid_r: rank of the plain LoRA branch (the last ``hybrid_r`` rows of ``weight_A``).
        bias_B: optional ``(out,)`` bias of ``lora_B``.

    Returns:
        Tensor of shape ``(..., out)``.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    g = shp.g
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shp.in_features)  # (N, in): a view whenever the leading dims of x merge
    if torch.is_autocast_enabled(x.device.type):
        y = _gralora_grid_composed(x2, weight_A[:g], weight_B[:, :g], k)  # (N, out)
    else:
        y = _GraloraGrid.apply(x2, weight_A[:g], weight_B[:, :g], k)  # (N, out)
    if hybrid_r and torch.is_autocast_enabled(x.device.type):
        # in-place addmm_ escapes autocast's casts (y is half, weight_B float): (N, out) + (N, h) @ (h, out)
        y = y + F.linear(F.linear(x2, weight_A[g:]), weight_B[:, g:])
    elif hybrid_r:
        # (N, out) += (N, h) @ (h, out), accumulated into y in the same GEMM (y is our own fresh tensor)
        y = y.addmm_(F.linear(x2, weight_A[g:]), weight_B[:, g:].t())
    if bias_B is not None:
        y = y + bias_B
    return y.view(*lead, shp.out_features)  # (..., out)


def gralora_delta_weight(weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int) -> torch.Tensor:
    """The dense update ``delta W`` of shape ``(out, in)`` (without scaling): block ``(i, j)`` is ``B_ij A_ij``.

    The one function that merge, unmerge, ``get_delta_weight`` and the exports rely on.

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Returns:
        ``(out, in)`` tensor with ``delta W @ x == gralora_forward(x, ...)`` (bias aside).
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    g, s, n, m = shp.g, shp.s, shp.n, shp.m
    a4 = weight_A[:g].reshape(k, s, k, n)  # (i, t, j, c)
    b4 = weight_B[:, :g].reshape(k, m, k, s)  # (i, row, j, t)
    delta = torch.einsum("imjt,itjc->imjc", b4, a4).reshape(shp.out_features, shp.in_features)
    if hybrid_r:
        delta = delta + weight_B[:, g:] @ weight_A[g:]
    return delta


def gralora_effective_rank(in_features: int, out_features: int, r: int, k: int, hybrid_r: int) -> int:
    """Generic rank of ``delta W``: ``min(k * (r - hybrid_r) + hybrid_r, in, out)``."""
    return min(k * (r - hybrid_r) + hybrid_r, in_features, out_features)


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
