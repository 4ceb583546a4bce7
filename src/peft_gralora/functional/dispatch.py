"""``gralora_forward`` / ``gralora_add_forward``: check the operands once, then pick the implementation."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad

from .compile_ops import COMPILE_OPS
from .composed import _gralora_composed
from .inference import _grid_no_grad
from .orientation import _HALF
from .shapes import _check_input, _checked_rank
from .training import _fused_forward, _GraloraFunction


def _any_requires_grad(*tensors: torch.Tensor) -> bool:
    return any(t.requires_grad for t in tensors)


# one call for every device type (torch.is_autocast_enabled(device_type) builds a device object per call)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_functorch_stack = torch._C._functorch.peek_interpreter_stack  # None unless a torch.func transform is running


def _needs_plain_ops(x2: torch.Tensor) -> bool:
    """A torch.func transform (``vmap``, ``grad``, ``jvp``, ``jacrev`` ...) or a forward-mode AD level is active.

    The fused kernels write through ``out=`` and in-place copies, which have no batching rule, and their autograd
    function has no ``setup_context`` / ``jvp``: :func:`_gralora_composed`, made of ordinary differentiable ops,
    carries batch dimensions, tangents and nested gradients through every transform. Two C-level reads (~0.1 us).
    """
    return _functorch_stack() is not None or _forward_ad._current_level >= 0


_FEW_TOKENS = 16


def _few_half_tokens_on_cpu(x: torch.Tensor) -> bool:
    """Decode-sized half-precision input on CPU: the inference kernels then compute in float32 (the operands upcast,
    the result rounded once). CPU half-precision GEMMs with one or a few rows cost ~3x their float32 form (measured:
    a 1-token bf16 call 46 us, upcast 18 us, LoRA's two bf16 ``Linear`` 32 us); from ~64 tokens on the bf16 units
    win."""
    return x.dtype in _HALF and x.device.type == "cpu" and x.numel() <= _FEW_TOKENS * x.shape[-1]


def _autocast_dtype(x2: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``x2``'s device, or None when autocast is off there."""
    # the common case in eager mode: one C call (dynamo traces the public query below instead)
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return None
    device_type = x2.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Autocast's own rule for a matmul operand: floating tensors other than float64 go to ``dtype``; the cast is
    differentiable, so gradients arrive in the operand's own dtype (fp32 parameters get fp32 gradients)."""
    if t.dtype == dtype or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _adapter_2d(x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """``(N, in) -> (N, out)``, choosing the implementation: plain ops (torch.func transforms, forward AD), the
    custom op (torch.compile), the autograd function (a gradient is needed), or the inference kernels (no autograd).

    Under autocast (eager) the fused kernels still run: their operands are cast here, as autocast casts the operands of
    LoRA's ``Linear`` calls (to its dtype, differentiably), so every GEMM inside runs in that dtype and writes tensors
    of that dtype (no cast escapes an ``out=`` or in-place write)."""
    if torch.compiler.is_compiling():
        # compiled under autocast, the plain ops let inductor fuse the casts into the GEMMs: the compiled bf16-autocast
        # step measured 1.06x LoRA that way against 1.18x through the custom op with cast operands
        # (benchmarks/results/precision.md); the custom op keeps compile time low elsewhere
        if COMPILE_OPS and _autocast_dtype(x2) is None:
            return COMPILE_OPS[0](x2, weight_A, weight_B, k, g)[0]
        return _gralora_composed(x2, weight_A, weight_B, k, g)
    if _needs_plain_ops(x2):
        return _gralora_composed(x2, weight_A, weight_B, k, g)
    dtype = _autocast_dtype(x2)
    if dtype is not None:
        x2, weight_A, weight_B = (_autocast_cast(t, dtype) for t in (x2, weight_A, weight_B))
    if torch.is_grad_enabled() and _any_requires_grad(x2, weight_A, weight_B):
        return _GraloraFunction.apply(x2, weight_A, weight_B, k, g)
    if _few_half_tokens_on_cpu(x2):
        if dtype is None:
            return _no_grad_kernels(x2.float(), weight_A.float(), weight_B.float(), k, g).to(x2.dtype)
        with torch.autocast("cpu", enabled=False):  # float32 kernels: autocast must not cast their GEMMs back
            return _no_grad_kernels(x2.float(), weight_A.float(), weight_B.float(), k, g).to(x2.dtype)
    return _no_grad_kernels(x2, weight_A, weight_B, k, g)


def _no_grad_kernels(x2: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """The inference kernel without hybrid branch, the fused forward with it: ``(N, in) -> (N, out)``."""
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
    frozen weights and input) as plain kernels with no autograd at all; under ``torch.compile`` as custom ops around
    the same kernels. Under autocast the kernels compute in autocast's dtype (operands cast as LoRA's ``Linear``
    operands are); under torch.func transforms and forward-mode AD as ordinary differentiable ops.

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
        dtype = _autocast_dtype(x2)  # autocast: LoRA's lora_B adds its bias in the autocast dtype too
        y = y + (bias_B if dtype is None else _autocast_cast(bias_B, dtype))
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
    throughout (or a half-precision ``result`` with float32 adapters and input: the sum is then float32, as LoRA's),
    the scaled add is done by the second GEMM (no ``(N, out)`` temporaries at all).

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
        and x.dtype == weight_A.dtype == weight_B.dtype
        and (result.dtype == x.dtype or (x.dtype == torch.float32 and result.dtype in _HALF))
        and not _needs_plain_ops(x)
        and _autocast_dtype(x) is None
        and result.shape == (*x.shape[:-1], weight_B.shape[0])
    ):
        if result.dtype != x.dtype:
            # a half-precision base with float32 adapters (peft's default autocast_adapter_dtype): the sum is float32,
            # as LoRA's ``result + lora_B(lora_A(x)) * scaling`` promotes it; the GEMM adds the upcast result itself
            # (one call: ~5 us less per decode step than a separate scale and add)
            return _grid_no_grad(x, weight_A, weight_B, k, result.to(x.dtype), scaling)
        if _few_half_tokens_on_cpu(x):
            y = _grid_no_grad(x.float(), weight_A.float(), weight_B.float(), k, result.float(), scaling)
            return y.to(result.dtype)
        return _grid_no_grad(x, weight_A, weight_B, k, result, scaling)  # (..., out)
    return result + gralora_forward(x, weight_A, weight_B, k, hybrid_r, bias_B) * scaling
