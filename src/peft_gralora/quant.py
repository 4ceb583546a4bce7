"""Reading quantized base weights correctly, including bitsandbytes' CPU-packed 4-bit layout (no peft import).

The hazard this module exists for: on CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Params4bit`` weight in
place the first time its ``Linear4bit`` runs an eval-mode forward on an input that does not require grad
(``bitsandbytes.nn.Linear4bit.forward`` -> ``bitsandbytes.functional._convert_weight_packed_for_cpu``):

- ``weight.data`` becomes ``(N, K/2)`` uint8 in a tiled nibble order (blocks of 32 output rows, pairs of columns);
- ``quant_state.absmax`` is de-nested (double quantization undone), transposed to ``(K/blocksize, N)`` and cast to
  bf16; ``quant_state.packing_format_for_cpu`` is set.

``bitsandbytes.functional.dequantize_4bit`` knows nothing of this layout and returns garbage for such a weight, so
anything that dequantizes it (peft's LoRA / DoRA merge, DoRA's forward) silently computes with a wrong base weight.
bitsandbytes' own inverse (``_convert_weight_packed_for_cpu_inverse``) restores the nibbles, but without double
quantization it leaves ``absmax`` transposed and in bf16, which is wrong whenever ``K > blocksize``.

Here the layout is undone from first principles:

    packed row block (32 bytes) <- 64 codes ordered (n in 0..31, k-pair member e in 0..1): low nibble = codes 0..31,
    high nibble = codes 32..63;  absmax_packed[kb, n] = absmax[n * (K / blocksize) + kb]

and the weight the packed kernel computes with (codes x bf16 absmax) is recovered exactly.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "is_cpu_packed_4bit",
    "cpu_packed_to_canonical",
    "restore_canonical_4bit_",
    "dequantize_4bit_weight",
    "dequantize_base_weight",
]

# bitsandbytes' CPU tile: 32 output rows, and 32 low + 32 high nibbles per group of 32 packed bytes
_BLOCK_N = 32


def is_cpu_packed_4bit(weight: Any) -> bool:
    """Whether a bitsandbytes ``Params4bit`` has been rewritten into the CPU-packed layout."""
    state = getattr(weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack_cpu_codes(packed: torch.Tensor, n_out: int, k_in: int) -> torch.Tensor:
    """4-bit codes ``(N, K)`` (uint8 in 0..15) from the CPU-packed ``(N, K/2)`` bytes."""
    groups = packed.reshape(-1, _BLOCK_N)  # (N/32 * K/2 * 2 / 64 ... , 32): one tile row of 32 bytes
    tile = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # (G, 64): low nibbles are codes 0..31, high 32..63
    tile = tile.reshape(n_out // _BLOCK_N, k_in // 2, _BLOCK_N, 2)  # (N/32, K/2, n within tile, k-pair member)
    return tile.transpose(1, 2).reshape(n_out, k_in)  # (N/32, 32, K/2, 2) -> (N, K)


def cpu_packed_to_canonical(packed: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical bitsandbytes 4-bit storage of a CPU-packed weight, without changing the inputs.

    Args:
        packed: ``(N, K/2)`` uint8, the packed ``weight.data``.
        quant_state: its ``QuantState`` (``packing_format_for_cpu`` set, ``absmax`` ``(K/blocksize, N)`` bf16).

    Returns:
        ``qweight`` in the original storage shape and dtype (two codes per byte, the first in the high nibble, in
        row-major ``(N, K)`` order) and ``absmax`` ``(N * K / blocksize,)`` float32, not nested.
    """
    n_out, k_in = (int(d) for d in quant_state.shape)
    codes = _unpack_cpu_codes(packed.view(torch.uint8), n_out, k_in).reshape(-1)  # (N*K,)
    qweight = (codes[0::2] << 4) | codes[1::2]  # (N*K/2,) canonical byte order
    qweight = qweight.reshape(getattr(quant_state, "original_qshape", (qweight.numel(), 1)))
    storage = getattr(quant_state, "original_storage_type", None)
    if storage is not None and storage != torch.uint8:
        qweight = qweight.view(storage)
    absmax = quant_state.absmax.T.reshape(-1).float().contiguous()  # (K/bs, N) -> (N, K/bs) -> flat
    return qweight, absmax


def restore_canonical_4bit_(weight: Any) -> bool:
    """Undo bitsandbytes' CPU packing of a ``Params4bit`` in place (a no-op for a canonical weight).

    Afterwards ``dequantize_4bit`` returns exactly the weight the packed kernel computed with; the next eval forward
    packs it again. Double quantization is not redone (``absmax`` stays float32): the dequantized values are the same.

    Returns:
        Whether the weight was packed.
    """
    if not is_cpu_packed_4bit(weight):
        return False
    state = weight.quant_state
    qweight, absmax = cpu_packed_to_canonical(weight.data, state)
    weight.data = qweight
    state.absmax = absmax
    state.nested = False
    state.offset = None
    state.state2 = None
    state.dtype = getattr(state, "original_dtype", state.dtype)
    state.packing_format_for_cpu = False
    return True


def dequantize_4bit_weight(weight: Any) -> torch.Tensor:
    """Dequantize a ``Params4bit`` to ``(N, K)`` in its quant_state dtype, canonical or CPU-packed (not modified)."""
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if not is_cpu_packed_4bit(weight):
        return bnbf.dequantize_4bit(weight.data, state)
    qweight, absmax = cpu_packed_to_canonical(weight.data, state)
    canonical = bnbf.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(state, "original_dtype", state.dtype),
    )
    return bnbf.dequantize_4bit(qweight, canonical)


def dequantize_base_weight(base_layer: Any) -> torch.Tensor:
    """The base layer's weight as a dense tensor in its stored layout, never modifying the layer.

    Handles plain weights, bitsandbytes ``Params4bit`` (canonical or CPU-packed) and ``Int8Params``
    (``int8 * SCB / 127`` per output row).
    """
    weight = base_layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        return dequantize_4bit_weight(weight)
    if kind == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = base_layer.state.SCB
        return weight.data.float() * (scb.float().view(-1, 1) / 127.0)
    return weight
