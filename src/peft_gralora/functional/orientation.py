"""Which way round the products with an ``r``-sized side run, by dtype and device (a measured choice, not math)."""

from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)


def _rows_first(t: torch.Tensor) -> bool:
    """Compute the products with an ``r``-sized side as ``(N, c) @ (c, r)`` (token rows first) rather than
    ``(r, c) @ (c, N)``: so in bfloat16 on CPU. There bmm copies every strided batch into a contiguous one
    before oneDNN runs, and the ``r``-first form makes that a transposing copy of the token-sized operand: at
    SmolLM2-135M's shapes in bf16 (256 tokens, r=32, k=2) ``z`` cost 85 us that way against 45 us rows first, the
    gradient of the latent 83 against 37 (LoRA's GEMMs: 30-40 us), and the bf16 inference kernel at 2048 tokens,
    1536 -> 576, 5.8 ms against 0.93 ms (LoRA 0.92). In float32 on CPU (MKL) the ``r``-first form is the fast one
    (outputs with few columns are slow there); float16 on CPU measured the same both ways (its GEMMs are ~10x slower
    than bf16's on CPUs without fp16 units); GPUs read either layout without copies and keep it."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"
