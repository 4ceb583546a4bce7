"""``gralora_forward`` / ``gralora_add_forward``: check the operands once, then pick the implementation."""

from __future__ import annotations

import torch

from .compile_ops import COMPILE_OPS
from .composed import _gralora_composed
from .inference import _grid_no_grad
from .shapes import _check_input, _checked_rank
from .training import _fused_forward, _GraloraFunction


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
