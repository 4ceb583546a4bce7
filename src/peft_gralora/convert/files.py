"""Reading and writing adapter directories: ``adapter_config.json`` and the weights (safetensors; a pickled ``.bin``
only when allowed), written into a temporary directory and moved into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .layout import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, AdapterConversionError, _Adapter


def _read_adapter(src_dir: str | os.PathLike, allow_pickle: bool = False) -> _Adapter:
    """Read ``adapter_config.json`` and the weights (safetensors; ``.bin`` only with ``allow_pickle``)."""
    path = Path(src_dir)
    if not path.is_dir():
        raise AdapterConversionError(f"Adapter directory {str(path)!r} does not exist or is not a directory.")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterConversionError(f"{str(path)!r} has no {CONFIG_NAME}: it is not a saved peft adapter.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConversionError(f"Cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterConversionError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    return _Adapter(path, config, _read_tensors(path, allow_pickle))


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safe_file, bin_file = path / SAFETENSORS_NAME, path / BIN_NAME
    if safe_file.is_file():
        try:
            return load_file(safe_file, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterConversionError(f"Cannot read {safe_file} (corrupt or truncated?): {exc}") from exc
    if bin_file.is_file():
        if not allow_pickle:
            raise AdapterConversionError(
                f"{bin_file} is a pickle file, which can run code when loaded, and there is no {SAFETENSORS_NAME}. "
                "If you trust it, pass allow_pickle=True (CLI: --allow-bin); it is then loaded with "
                "torch.load(weights_only=True)."
            )
        try:
            loaded = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
            raise AdapterConversionError(f"Cannot read {bin_file} with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise AdapterConversionError(f"{bin_file} does not hold a state dict (a dict of name -> tensor).")
        # separate, contiguous storage: safetensors refuses tensors that share memory
        return {k: v.detach().clone().contiguous() for k, v in loaded.items()}
    raise AdapterConversionError(f"{str(path)!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}.")


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise AdapterConversionError(f"Destination {str(dst)!r} exists and is not a directory.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise AdapterConversionError(f"Destination {str(dst)!r} is the source directory; choose another one.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise AdapterConversionError(
            f"Destination {str(dst)!r} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
        )


def _write_adapter(dst: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write into a fresh temporary directory beside ``dst``, then move it into place (replacing ``dst``)."""
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    old = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / SAFETENSORS_NAME), {"format": "pt"})
        if dst.exists():
            # rename(2) cannot replace a non-empty directory: move it aside first, put it back if the swap fails
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except OSError:
            if old is not None:
                os.replace(old, dst)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
