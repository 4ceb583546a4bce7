"""The fused kernels as torch custom ops, so that torch.compile traces each as one node."""

from __future__ import annotations

import torch

from .training import _fused_backward, _fused_forward


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
