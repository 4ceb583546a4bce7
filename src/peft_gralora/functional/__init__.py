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

Modules, one job each (none imports peft)::

    shapes       GraloraShape, gralora_shape, the cached check of the hot path, gralora_effective_rank
    composed     the adapter in plain differentiable ops (any autograd feature can trace them)
    training     fused forward / backward kernels and their autograd function
    inference    the no-autograd kernel of decode and generation
    compile_ops  the fused kernels as custom ops for torch.compile
    dispatch     gralora_forward / gralora_add_forward: checks, then the choice of implementation
    delta        gralora_delta_weight, gralora_add_delta_ (merge), init_gralora_A_
    layouts      export_lora_factors, upstream_to_variant, variant_to_upstream
    pieces       GraloraPieces, gralora_pieces, gralora_assemble, gralora_fit_factors (hotswap, cat)
"""

# private names that the package's tests and benchmarks reach for, kept where they were before the split
from .compile_ops import COMPILE_OPS as COMPILE_OPS
from .compile_ops import register_compile_ops
from .delta import gralora_add_delta_, gralora_delta_weight, init_gralora_A_
from .dispatch import _needs_plain_ops as _needs_plain_ops
from .dispatch import gralora_add_forward, gralora_forward
from .layouts import export_lora_factors, upstream_to_variant, variant_to_upstream
from .pieces import GraloraPieces, gralora_assemble, gralora_fit_factors, gralora_pieces
from .shapes import GraloraShape, gralora_effective_rank, gralora_shape
from .training import _GraloraFunction as _GraloraFunction

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
