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
    "gralora_add_forward",
    "register_compile_ops",
    "gralora_delta_weight",
    "gralora_add_delta_",
    "gralora_effective_rank",
    "init_gralora_A_",
    "export_lora_factors",
    "upstream_to_variant",
    "variant_to_upstream",
    "GraloraPieces",
    "gralora_pieces",
    "gralora_assemble",
    "gralora_fit_factors",
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
    """The adapter in plain differentiable ops: ``(N, in) -> (N, out)``. Used under autocast (whose casts out= and
    in-place writes would escape) and to differentiate :class:`_GraloraFunction` a second time."""
    u = _grid_latent(x2, weight_A[:g], k)  # (k_i, N, g)
    y = torch.bmm(u, weight_B[:, :g].unflatten(0, (k, -1)).transpose(1, 2))  # (k_i, N, g) @ (k_i, g, m)
    y = y.transpose(0, 1).reshape(x2.shape[0], weight_B.shape[0])  # (N, out)
    if g < weight_A.shape[0]:
        y = y + F.linear(F.linear(x2, weight_A[g:]), weight_B[:, g:])  # (N, out) + (N, h) @ (h, out)
    return y


def _fused_forward(
    x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :class:`_GraloraFunction` (hybrid rows inside the grid's GEMMs): ``y (N, out)`` and the latent
    ``u (k_i, N, r)`` that backward needs. Writes ``y`` in place through column-block views (eager mode only)."""
    # x2 (N, in), weight_A (r, in), weight_B (out, r); latent rows [0, g) are the grid's, [g, r) the hybrid's
    n_tok, r, s = x2.shape[0], weight_A.shape[0], g // k
    a_blocks = weight_A.unflatten(1, (k, -1)).transpose(0, 1)  # (k_j, r, n): column block j of A
    z_t = torch.bmm(a_blocks, _blocks(x2, k).transpose(1, 2))  # (k_j, r, n) @ (k_j, n, N) = (k_j, r, N)
    u = z_t.new_empty(k, n_tok, r)  # (k_i, N, r): [A_i1 x_1; ...; A_ik x_k; A_h x] per output block i
    # u[i, :, (j, t)] = z_t[j, (i, t), :]: the transpose of the k x k grid of s-chunks
    u[..., :g].unflatten(-1, (k, s)).copy_(z_t[:, :g].unflatten(1, (k, s)).permute(1, 3, 0, 2))
    if g < r:
        u[..., g:].copy_(z_t[:, g:].sum(0).t())  # (N, h): A_h x = sum_j A_h[:, block j] x_j, for every i
    del z_t  # peak memory: gone before y exists
    b_t = weight_B.unflatten(0, (k, -1)).transpose(1, 2)  # (k_i, r, m): row block i of B, transposed
    y = u.new_empty(n_tok, weight_B.shape[0])  # (N, out)
    torch.bmm(u, b_t, out=_blocks(y, k))  # (k_i, N, r) @ (k_i, r, m) -> output block i of y, in place
    return y, u


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
    strides (any layout), two batched GEMMs with the ``r``-sized side first, one copy of the ``k r``-per-token latent,
    and the scaled add of ``result`` done by the second GEMM.
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
      BLAS is up to ~50x slower on outputs with few columns;
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
        grad_b_t = torch.bmm(u.transpose(1, 2), g_blocks)  # (k_i, r, N) @ (k_i, N, m) = (k_i, r, m)
        grad_B = grad_b_t.transpose(1, 2).reshape(weight_B.shape)  # (k_i, m, r) = (out, r): B's size
    if need_x or need_a:
        b_blocks = weight_B.unflatten(0, (k, -1))  # (k_i, m, r)
        grad_u_t = torch.bmm(b_blocks.transpose(1, 2), g_blocks.transpose(1, 2))  # (k_i, r, m) @ (k_i, m, N)
        grad_z_t = grad_u_t.new_empty(k, r, n_tok)  # (k_j, r, N): gradient of z_t
        grad_z_t[:, :g].unflatten(1, (k, s)).copy_(grad_u_t[:, :g].unflatten(1, (k, s)).transpose(0, 1))
        if g < r:
            grad_z_t[:, g:].copy_(grad_u_t[:, g:].sum(0))  # (h, N): every block j gets the whole hybrid grad
        del grad_u_t  # peak memory: gone before grad x exists
        if need_a:
            grad_a = torch.bmm(grad_z_t, _blocks(x2, k))  # (k_j, r, N) @ (k_j, N, n) = (k_j, r, n)
            grad_A = grad_a.transpose(0, 1).reshape(weight_A.shape)  # (r, k_j, n) = (r, in): A's size
        if need_x:
            a_blocks = weight_A.unflatten(1, (k, -1)).transpose(0, 1)  # (k_j, r, n)
            grad_x = grad_z_t.new_empty(x2.shape)  # (N, in)
            torch.bmm(grad_z_t.transpose(1, 2), a_blocks, out=_blocks(grad_x, k))  # (k_j, N, r) @ (k_j, r, n)
    return grad_x, grad_A, grad_B


# Under torch.compile the fused kernels run as custom ops: dynamo traces them as one node each (no graph break at
# their out= writes), inductor generates no code for the adapter's internals (compile time stays near LoRA's), and
# compiled numbers are the eager kernels' numbers. Their fake (meta) rules give the real outputs' shapes and strides.
def _fused_forward_impl(
    x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_forward(x2, weight_A, weight_B, k, g)


def _fused_forward_fake(x2, weight_A, weight_B, k, g):
    n_tok = x2.shape[0]
    return x2.new_empty(n_tok, weight_B.shape[0]), x2.new_empty(k, n_tok, weight_A.shape[0])  # y, u


def _fused_backward_impl(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _fused_backward(grad_y.contiguous(), x2, weight_A, weight_B, u, k, g, need_x, need_a, need_b)
    # a custom op returns tensors: a gradient not asked for is an empty one (each its own: outputs may not alias)
    return tuple(grad if grad is not None else grad_y.new_empty(0) for grad in grads)


def _fused_backward_fake(grad_y, x2, weight_A, weight_B, u, k, g, need_x, need_a, need_b):
    return tuple(
        t.new_empty(t.shape) if need else grad_y.new_empty(0)
        for t, need in ((x2, need_x), (weight_A, need_a), (weight_B, need_b))
    )


def _fused_op_setup_context(ctx, inputs, output) -> None:
    x2, weight_A, weight_B, k, g = inputs
    ctx.save_for_backward(x2, weight_A, weight_B, output[1])
    ctx.k, ctx.g = k, g


def _fused_op_backward(ctx, grad_y, grad_u):
    x2, weight_A, weight_B, u = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = COMPILE_OPS[1](grad_y, x2, weight_A, weight_B, u, ctx.k, ctx.g, *needs)
    return (*(grad if need else None for grad, need in zip(grads, needs, strict=True)), None, None)


# explicit schemas: schema inference from annotations varies across torch releases (postponed annotations here)
_FORWARD_SCHEMA = "(Tensor x2, Tensor weight_A, Tensor weight_B, int k, int g) -> (Tensor, Tensor)"
_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x2, Tensor weight_A, Tensor weight_B, Tensor u, int k, int g, bool need_x, bool need_a, "
    "bool need_b) -> (Tensor, Tensor, Tensor)"
)
COMPILE_OPS: list = []  # [peft_gralora::fused_forward, peft_gralora::fused_backward] once registered


def register_compile_ops() -> list:
    """Register the custom ops that torch.compile traces (idempotent; returns them). Registering costs ~6 ms, so it
    happens when the first GraLoRA adapter is created rather than at import; a compiled :func:`gralora_forward`
    without them runs as plain ops (also one graph, just more for inductor to compile)."""
    if not COMPILE_OPS:
        forward_op = torch.library.custom_op(
            "peft_gralora::fused_forward", _fused_forward_impl, mutates_args=(), schema=_FORWARD_SCHEMA
        )
        forward_op.register_fake(_fused_forward_fake)
        backward_op = torch.library.custom_op(
            "peft_gralora::fused_backward", _fused_backward_impl, mutates_args=(), schema=_BACKWARD_SCHEMA
        )
        backward_op.register_fake(_fused_backward_fake)
        forward_op.register_autograd(_fused_op_backward, setup_context=_fused_op_setup_context)
        # the OpOverloads themselves: dynamo puts them in the graph in one step, where it would trace the Python
        # wrapper of a CustomOpDef call line by line
        COMPILE_OPS[:] = [torch.ops.peft_gralora.fused_forward.default, torch.ops.peft_gralora.fused_backward.default]
    return COMPILE_OPS


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


def _any_requires_grad(*tensors: torch.Tensor) -> bool:
    return any(t.requires_grad for t in tensors)


# one call for every device type (torch.is_autocast_enabled(device_type) builds a device object per call)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _needs_plain_ops(x2: torch.Tensor) -> bool:
    """Eager mode under autocast: its casts would escape out= and in-place writes, so :func:`_gralora_composed`."""
    if _any_autocast is None:
        return torch.is_autocast_enabled(x2.device.type)
    return _any_autocast()


def _adapter_2d(x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """``(N, in) -> (N, out)``, choosing the implementation: plain ops (autocast), the custom op (torch.compile),
    the autograd function (a gradient is needed), or the inference kernels (no autograd at all)."""
    if torch.compiler.is_compiling():
        if COMPILE_OPS and not torch.is_autocast_enabled(x2.device.type):
            return COMPILE_OPS[0](x2, weight_A, weight_B, k, g)[0]
        return _gralora_composed(x2, weight_A, weight_B, k, g)
    if _needs_plain_ops(x2):
        return _gralora_composed(x2, weight_A, weight_B, k, g)
    if torch.is_grad_enabled() and _any_requires_grad(x2, weight_A, weight_B):
        return _GraloraFunction.apply(x2, weight_A, weight_B, k, g)
    if g == weight_A.shape[0]:
        return _grid_no_grad(x2, weight_A, weight_B, k)
    return _fused_forward(x2, weight_A, weight_B, k, g)[0]


def gralora_forward(
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adapter's output ``sum_j B_ij A_ij x_j + [B_h A_h x]_i (+ bias_B)``, without scaling.

    Two batched matmuls and one regrouping of the latent: FLOPs equal those of a rank-``r`` LoRA. With a gradient
    needed it runs as one autograd function with a hand-written backward; without (``no_grad``, ``inference_mode``,
    frozen weights and input) as plain kernels with no autograd at all; under ``torch.compile`` and autocast as
    ordinary differentiable ops.

    Args:
        x: input of shape ``(..., in)``.
        weight_A: ``(r, in)``, the ``lora_A`` weight.
        weight_B: ``(out, r)``, the ``lora_B`` weight.
        k: number of blocks per side.
        hybrid_r: rank of the plain LoRA branch (the last ``hybrid_r`` rows of ``weight_A``).
        bias_B: optional ``(out,)`` bias of ``lora_B``.

    Returns:
        Tensor of shape ``(..., out)``.

    Raises:
        ValueError: if the factors do not form a valid GraLoRA adapter (see :func:`gralora_shape`).
    """
    g = _checked_rank(weight_A, weight_B, k, hybrid_r)
    _check_input(x, weight_A)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight_A.shape[1])  # (N, in): a view whenever the leading dims of x merge
    y = _adapter_2d(x2, weight_A, weight_B, k, g)  # (N, out)
    if bias_B is not None:
        y = y + bias_B
    return y.view(*lead, weight_B.shape[0])  # (..., out)


def gralora_add_forward(
    result: torch.Tensor,
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    scaling: float,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``result + scaling * gralora_forward(x, ...)``: a layer's output with the adapter added, as a new tensor.

    The hot path of an unmerged adapter. Without a gradient, without hybrid branch or bias and with one dtype
    throughout, the scaled add is done by the second GEMM (no ``(N, out)`` temporaries at all).

    Args:
        result: ``(..., out)``, the base layer's output for ``x``.
        x: ``(..., in)``.
        scaling: the adapter's scale (``lora_alpha / r``).

    Returns:
        Tensor of shape ``(..., out)``.
    """
    if torch.compiler.is_compiling():  # the fused add below is eager-only: dynamo skips tracing its tests
        return result + gralora_forward(x, weight_A, weight_B, k, hybrid_r, bias_B) * scaling
    g = _checked_rank(weight_A, weight_B, k, hybrid_r)
    _check_input(x, weight_A)
    # cheapest tests first: at one token each of them costs a noticeable share of the call
    if (
        bias_B is None
        and g == weight_A.shape[0]
        and not (
            torch.is_grad_enabled()
            and (result.requires_grad or x.requires_grad or weight_A.requires_grad or weight_B.requires_grad)
        )
        and result.dtype == x.dtype == weight_A.dtype == weight_B.dtype
        and not _needs_plain_ops(x)
        and result.shape == (*x.shape[:-1], weight_B.shape[0])
    ):
        return _grid_no_grad(x, weight_A, weight_B, k, result, scaling)  # (..., out)
    return result + gralora_forward(x, weight_A, weight_B, k, hybrid_r, bias_B) * scaling


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


# ---------------------------------------------------------------------------------------------------------------------
# Layout surgery: moving an adapter exactly into another GraLoRA (or plain LoRA) layout
#
# A plain LoRA adapter of rank p is the layout (k=1, hybrid_r=0). Two facts make every move below exact:
# - a grid of k' blocks fits a finer grid of k = q k' blocks: fine block (I, J) lies inside coarse block
#   (I // q, J // q), so fine row I of A is coarse row I // q (all columns) and fine column J of B is coarse column
#   J // q (all rows): a ``repeat_interleave`` by q along the block index;
# - a plain LoRA ``B_p A_p`` of rank p is the k = 1 case: in a grid of k blocks it takes sub-block rank p.
# Zero rows of A / columns of B contribute nothing, so unused room anywhere is padding.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GraloraPieces:
    """An adapter cut into parts that each fit a GraLoRA layout of ``k`` blocks; the sum of their deltas is its delta.

    Attributes:
        k: the block count of the grid pieces.
        grid: ``(A3, B3)`` pairs, ``A3 (k, s_p, in)`` (output block i, sub-rank t, input features) and
            ``B3 (out, k, s_p)`` (output features, input block j, sub-rank t); block ``(i, j)`` of the piece's delta
            is ``B3[rows_i, j] @ A3[i, :, cols_j]``.
        plain: plain LoRA pairs ``(A (p, in), B (out, p))``, delta ``B @ A``.
    """

    k: int
    grid: list[tuple[torch.Tensor, torch.Tensor]]
    plain: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def grid_rank(self) -> int:
        """Sub-block rank the grid pieces need, side by side."""
        return sum(a3.shape[1] for a3, _ in self.grid)

    @property
    def plain_rank(self) -> int:
        """Total rank of the plain pieces."""
        return sum(a.shape[0] for a, _ in self.plain)


def gralora_pieces(
    weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, hybrid_r: int, target_k: int, embed: bool = True
) -> GraloraPieces:
    """Cut an adapter (GraLoRA ``(k, hybrid_r)``; plain LoRA is ``k=1, hybrid_r=0``) into pieces for ``target_k``.

    - the hybrid branch, and a ``k == 1`` grid, are plain pieces;
    - a grid with ``k == target_k`` is one grid piece (a view of the factors);
    - a grid with ``k`` dividing ``target_k`` is one grid piece of the same sub-block rank when ``embed``;
    - a grid with ``target_k`` dividing ``k = q * target_k`` is one grid piece of sub-block rank ``q^2 s`` when
      ``embed`` (each coarse block holds ``q x q`` fine blocks of rank ``s``);
    - any other grid becomes a plain piece of rank ``k * g`` through the exact :func:`export_lora_factors`.

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Raises:
        ValueError: if the factors are not a valid ``(k, hybrid_r)`` adapter, or the features are not divisible by
            ``target_k``.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    if target_k < 1 or shp.in_features % target_k or shp.out_features % target_k:
        raise ValueError(
            f"gralora_k={target_k} does not divide in_features={shp.in_features} and out_features={shp.out_features}."
        )
    g, s = shp.g, shp.s
    pieces = GraloraPieces(target_k, [], [])
    if k == 1:
        pieces.plain.append((weight_A[:g], weight_B[:, :g]))
    elif target_k % k == 0 and (embed or k == target_k):
        q = target_k // k
        a3 = weight_A[:g].reshape(k, s, shp.in_features)  # (i, t, in): rows (i, t) of the grid
        b3 = weight_B[:, :g].reshape(shp.out_features, k, s)  # (out, j, t): columns (j, t) of the grid
        if q > 1:  # fine block I lies in coarse block I // q
            a3, b3 = a3.repeat_interleave(q, dim=0), b3.repeat_interleave(q, dim=1)
        pieces.grid.append((a3, b3))
    elif embed and k % target_k == 0:
        pieces.grid.append(_coarsened(weight_A[:g], weight_B[:, :g], k, k // target_k))
    else:
        a_plain, b_plain = export_lora_factors(weight_A[:g], weight_B[:, :g], k, 0)  # (k g, in), (out, k g)
        pieces.plain.append((a_plain, b_plain))
    if hybrid_r:
        pieces.plain.append((weight_A[g:], weight_B[:, g:]))
    return pieces


def _coarsened(a_grid: torch.Tensor, b_grid: torch.Tensor, k: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grid of ``k = q * kc`` blocks as one grid piece of ``kc`` blocks and sub-block rank ``q^2 s``.

    Sub-ranks ``(a, b, t)``: fine block ``(q I + a, q J + b)`` of coarse block ``(I, J)``, its sub-rank ``t``. Row
    ``(I, (a, b, t))`` of the piece's ``A`` is row ``t`` of ``A_{qI+a, j}`` on the fine column blocks ``j = b (mod
    q)``, zero elsewhere; column ``(J, (a, b, t))`` of its ``B`` is column ``t`` of ``B_{i, qJ+b}`` on the fine row
    blocks ``i = a (mod q)``, zero elsewhere.

    Args:
        a_grid: ``(g, in)``, rows ``(i, t)``.
        b_grid: ``(out, g)``, columns ``(j, t)``.

    Returns:
        ``A3 (kc, q*q*s, in)`` and ``B3 (out, kc, q*q*s)``.
    """
    g, in_features = a_grid.shape
    out_features = b_grid.shape[0]
    kc, s = k // q, g // k
    a4 = a_grid.reshape(kc, q, s, kc, q, in_features // k)  # (I, a, t, J', b', c): fine i = qI+a, j = qJ'+b'
    b4 = b_grid.reshape(kc, q, out_features // k, kc, q, s)  # (I', a', row, J, b, t): fine i = qI'+a', j = qJ+b
    eye = torch.eye(q, dtype=a_grid.dtype, device=a_grid.device)
    # A3[I, a, b, t, J', b', c] = a4[I, a, t, J', b', c] * [b' == b]
    a3 = torch.einsum("iatjyc,by->iabtjyc", a4, eye).reshape(kc, q * q * s, in_features)
    # B3[I', a', row, J, a, b, t] = b4[I', a', row, J, b, t] * [a' == a]
    b3 = torch.einsum("ixrjbt,xa->ixrjabt", b4, eye).reshape(out_features, kc, q * q * s)
    return a3, b3


def gralora_assemble(
    pieces: list[GraloraPieces],
    target_r: int,
    target_hybrid_r: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write pieces side by side into one adapter of layout ``(r=target_r, k, hybrid_r=target_hybrid_r)``.

    Grid pieces take consecutive sub-ranks of every block, in order; plain pieces fill the hybrid branch in order and,
    once it is full, continue in the grid (sub-block rank ``p`` for rank ``p``). Whatever is left is zero. Checked
    before anything is allocated.

    Args:
        pieces: all cut for the same ``k`` (:func:`gralora_pieces`), factors of one dtype.
        dtype: of the result; defaults to the first factor's.

    Returns:
        ``weight_A (target_r, in)`` and ``weight_B (out, target_r)`` with delta the sum of the pieces' deltas.

    Raises:
        ValueError: when the pieces do not fit, naming the room needed and the room there is.
    """
    k = pieces[0].k
    if any(p.k != k for p in pieces):
        raise ValueError(f"gralora_assemble: pieces cut for different k: {[p.k for p in pieces]}.")
    g = target_r - target_hybrid_r
    if not 0 <= target_hybrid_r < target_r or g % k:
        raise ValueError(f"Invalid target layout r={target_r}, gralora_k={k}, hybrid_r={target_hybrid_r}.")
    s = g // k
    grid_need = sum(p.grid_rank for p in pieces)
    plain_need = sum(p.plain_rank for p in pieces)
    overflow = max(0, plain_need - target_hybrid_r)
    if grid_need + overflow > s:
        raise ValueError(
            f"does not fit: it needs sub-block rank {grid_need} for its grid plus rank {plain_need} of plain LoRA "
            f"(hybrid), but the layout r={target_r}, gralora_k={k}, hybrid_r={target_hybrid_r} has sub-block rank "
            f"{s} and hybrid rank {target_hybrid_r} (plain rank beyond the hybrid costs sub-block rank one for one)."
        )
    first = pieces[0].grid[0][0] if pieces[0].grid else pieces[0].plain[0][0]
    dtype = dtype or first.dtype
    weight_A = torch.zeros(target_r, in_features, dtype=dtype, device=first.device)
    weight_B = torch.zeros(out_features, target_r, dtype=dtype, device=first.device)
    a3 = weight_A[:g].view(k, s, in_features)  # (i, t, in)
    b3 = weight_B[:, :g].view(out_features, k, s)  # (out, j, t)
    off = 0
    for piece in pieces:
        for pa, pb in piece.grid:
            width = pa.shape[1]
            a3[:, off : off + width] = pa
            b3[:, :, off : off + width] = pb
            off += width
    h_off = 0
    for piece in pieces:
        for pa, pb in piece.plain:
            take = min(pa.shape[0], target_hybrid_r - h_off)
            weight_A[g + h_off : g + h_off + take] = pa[:take]
            weight_B[:, g + h_off : g + h_off + take] = pb[:, :take]
            h_off += take
            rest = pa.shape[0] - take
            if rest:  # a plain LoRA in the grid: the same rows for every output block, columns for every input block
                a3[:, off : off + rest] = pa[take:]  # (rest, in) broadcast over i
                b3[:, :, off : off + rest] = pb[:, take:].unsqueeze(1)  # (out, 1, rest) broadcast over j
                off += rest
    return weight_A, weight_B


def gralora_fit_factors(
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    k: int,
    hybrid_r: int,
    target_k: int,
    target_hybrid_r: int,
    target_r: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same adapter, exactly, in another layout: GraLoRA ``(k, hybrid_r)`` -> ``(target_r, target_k,
    target_hybrid_r)``; plain LoRA on either side is ``k=1, hybrid_r=0``.

    Used to pad an adapter to a larger rank (zero sub-ranks in every block, zero hybrid rows) and to move an adapter
    into a resident layout (hotswap). Tries the grid embedding first (refined when ``k`` divides ``target_k``,
    coarsened when ``target_k`` divides ``k``), then the plain export of the grid.

    Args:
        weight_A: ``(r, in)``.
        weight_B: ``(out, r)``.

    Returns:
        ``weight_A (target_r, in)``, ``weight_B (out, target_r)`` with the same delta as the input.

    Raises:
        ValueError: when the adapter cannot be represented in the target layout (too little room), saying why.
    """
    shp = gralora_shape(weight_A, weight_B, k, hybrid_r)
    error: ValueError | None = None
    for embed in (True, False):
        pieces = gralora_pieces(weight_A, weight_B, k, hybrid_r, target_k, embed=embed)
        try:
            return gralora_assemble([pieces], target_r, target_hybrid_r, shp.in_features, shp.out_features)
        except ValueError as exc:
            error = error or exc
        if k in (1, target_k) or (target_k % k and k % target_k):  # the second try would cut the same pieces
            break
    raise error
