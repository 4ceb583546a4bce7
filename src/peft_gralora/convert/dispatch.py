"""Which conversion an adapter needs, by its type: :func:`convert_adapter` and the in-memory view of any GraLoRA
adapter in this package's layout."""

from __future__ import annotations

import os
from pathlib import Path

from .files import _check_destination, _read_adapter, _write_adapter
from .fork import _fork_to_variant
from .layout import AdapterConversionError, _Adapter
from .upstream import _upstream_to_variant, _variant_to_upstream

__all__ = ["convert_adapter"]


def _as_variant(adapter: _Adapter) -> _Adapter:
    """The adapter as a GraLoRA-variant adapter (converting upstream and fork ones in memory)."""
    if adapter.kind in ("gralora-upstream", "gralora-fork"):
        config, tensors = (_upstream_to_variant if adapter.kind == "gralora-upstream" else _fork_to_variant)(adapter)
        return _Adapter(adapter.path, config, tensors)
    return adapter


def convert_adapter(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    to: str = "variant",
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Convert between upstream peft ``GraloraConfig`` adapters and ``LoraConfig(use_gralora=True)`` adapters, and
    from the GraLoRA PEFT fork's layout to this package's.

    Exact in both directions (a reshape of the weights; upstream's ``r`` is ``r - hybrid_r`` here, its ``alpha`` is
    ``lora_alpha``, so the scaling is the same); a round trip returns identical tensors. An adapter saved by the fork
    (``use_gralora=True`` with ``gralora_A`` / ``gralora_B`` weights) converts ``to="variant"``: its config is kept,
    its ``gralora_*`` tensors become ``lora_A`` / ``lora_B`` and its unused ``lora_A`` / ``lora_B`` are dropped (see
    :func:`fork_to_variant_state_dict`).

    Args:
        src_dir: the adapter directory to convert.
        dst_dir: where to write; must not exist or be empty unless ``overwrite``.
        to: ``"variant"`` (upstream or fork -> this package) or ``"upstream"`` (this package -> upstream).
        overwrite: replace a non-empty ``dst_dir``.
        allow_pickle: accept an ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).

    Returns:
        ``dst_dir`` as a ``Path``.

    Raises:
        AdapterConversionError: (a ``ValueError``) for a wrong source type (e.g. a plain LoRA adapter), options the
            target cannot represent (``use_rslora``, ``lora_bias``, per-module ranks for upstream, unknown upstream
            fields), unreadable files or shape mismatches; ``dst_dir`` is left untouched.
    """
    wanted = {"variant": ("gralora-upstream", "gralora-fork"), "upstream": ("gralora",)}
    if to not in wanted:
        raise AdapterConversionError(f"to must be 'variant' or 'upstream', got {to!r}.")
    src, dst = Path(src_dir), Path(dst_dir)
    _check_destination(dst, src, overwrite)
    adapter = _read_adapter(src, allow_pickle)
    if adapter.kind not in wanted[to]:
        hint = {
            "lora": "it is a plain LoRA adapter: only GraLoRA adapters can be converted",
            "gralora": "it is already a LoraConfig(use_gralora=True) adapter",
            "gralora-upstream": "it is already an upstream GraloraConfig adapter",
            "gralora-fork": "it was saved by the GraLoRA PEFT fork; convert it with to='variant' first",
        }[adapter.kind]
        raise AdapterConversionError(f"Cannot convert {str(src)!r} to={to!r}: {hint}.")
    if to == "upstream":
        config, tensors = _variant_to_upstream(adapter)
    else:
        config, tensors = (_upstream_to_variant if adapter.kind == "gralora-upstream" else _fork_to_variant)(adapter)
    _write_adapter(dst, config, tensors)
    return dst
