"""A GraLoRA adapter file carries its layout in the safetensors header, and a load whose config contradicts it is
refused.

``PeftModel.save_pretrained`` writes ``use_gralora``, ``gralora_k``, ``hybrid_r`` and ``r`` (strings) next to peft's
``format`` entry, for GraLoRA adapters only (a plain LoRA file stays byte-identical to plain peft's). On load, the
header of a local (or Hub-cached) ``adapter_model.safetensors`` is compared with the config the weights are about to
be loaded under: ``PeftModel.from_pretrained(base, dir, config=<another k, or plain LoRA>)`` is refused before the
base model is touched, and every other peft load path (``load_adapter``, ``hotswap_adapter``) before any weight is
set. Files without these entries (older saves, other tools) load as before.

What cannot be checked: in-memory state dicts (``set_peft_model_state_dict(model, tensors)``) carry no layout, and a
plain LoRA file (no entries) cannot tell that a GraLoRA config was not meant for it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import weakref
from collections.abc import Callable
from typing import Any

from ..convert import AdapterConversionError
from ._targets import modules_binding
from .patch import Patch

__all__ = ["patches", "layout_metadata", "AdapterLayoutError", "check_layout"]

LAYOUT_KEYS = ("use_gralora", "gralora_k", "hybrid_r", "r")
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterLayoutError(AdapterConversionError):
    """The config an adapter is loaded under contradicts the GraLoRA layout recorded in its safetensors file."""


def layout_metadata(config: Any) -> dict[str, str]:
    """The safetensors header entries for a GraLoRA ``config`` (empty for anything else)."""
    if not getattr(config, "use_gralora", False):
        return {}
    return {
        "use_gralora": "true",
        "gralora_k": str(config.gralora_k),
        "hybrid_r": str(config.hybrid_r),
        "r": str(config.r),
    }


def _config_layout(config: Any) -> dict[str, str]:
    if getattr(config, "use_gralora", False):
        return layout_metadata(config)
    return {"use_gralora": "false"}


def check_layout(recorded: dict[str, str], config: Any, where: str) -> None:
    """Refuse ``config`` when it contradicts the layout ``recorded`` in a file's header (no entries: nothing to check).

    Raises:
        AdapterLayoutError: naming both layouts and the fix.
    """
    saved = {key: recorded[key] for key in LAYOUT_KEYS if key in recorded}
    if saved.get("use_gralora") != "true":
        return
    wanted = _config_layout(config)
    if all(wanted.get(key) == value for key, value in saved.items()):
        return
    said = ", ".join(f"{key}={value}" for key, value in saved.items())
    given = ", ".join(f"{key}={value}" for key, value in wanted.items())
    raise AdapterLayoutError(
        f"{where} was saved as a GraLoRA adapter ({said}, recorded in its safetensors header), but it is being "
        f"loaded under a config with {given}: its weights would compute another function. Load it with its own "
        "adapter_config.json (leave out config=), or pass a LoraConfig with the recorded values."
    )


def _header(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _saved_file(model_id: Any, subfolder: str | None = None, **hub: Any) -> str | None:
    """The adapter's safetensors file if it is on disk (a local folder, or already in the Hub cache), else None."""
    model_id = os.fspath(model_id) if isinstance(model_id, os.PathLike) else model_id
    if not isinstance(model_id, str):
        return None
    local = os.path.join(model_id, subfolder or "", WEIGHTS_NAME)
    if os.path.isfile(local):
        return local
    if os.path.isdir(model_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        name = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
        found = try_to_load_from_cache(model_id, name, cache_dir=hub.get("cache_dir"), revision=hub.get("revision"))
    except Exception:  # not a repo id, or no cache: nothing recorded to check
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


# --- save ---

# absolute output directory -> GraLoRA header entries, for the save_pretrained call in progress
_SAVING: contextvars.ContextVar[dict[str, dict[str, str]] | None] = contextvars.ContextVar("gralora_saving")


def _make_save_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        dirs = {}
        for name, config in getattr(self, "peft_config", {}).items():
            entries = layout_metadata(config)
            if entries:
                out = save_directory if name == "default" else os.path.join(save_directory, name)
                dirs[os.path.abspath(out)] = entries
        token = _SAVING.set(dirs)
        try:
            return original(self, save_directory, *args, **kwargs)
        finally:
            _SAVING.reset(token)

    return save_pretrained


def _sort_header_metadata(filename: str) -> None:
    """Rewrite the ``__metadata__`` of a safetensors file with its keys sorted, in place (same length).

    safetensors writes the metadata from a Rust ``HashMap``: with more than one key their order, and so the file's
    bytes, change from process to process. Sorted, the same adapter saves to the same bytes.
    """
    import json
    import struct

    with open(filename, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        text = raw.decode("utf-8")
        header = json.loads(text)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        body = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
        old = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
        start = text.find(old)
        if start < 0 or len(body) != len(old):  # not the compact form we expect: leave the file as written
            return
        fixed = (text[:start] + body + text[start + len(old) :]).encode("utf-8")
        if len(fixed) == len(raw):
            f.seek(8)
            f.write(fixed)


def _make_safe_save_file(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_file(tensors, filename, metadata=None, *args: Any, **kwargs: Any):
        entries = (_SAVING.get(None) or {}).get(os.path.abspath(os.path.dirname(os.fspath(filename))))
        if not entries:
            return original(tensors, filename, metadata, *args, **kwargs)
        result = original(tensors, filename, {**(metadata or {}), **entries}, *args, **kwargs)
        _sort_header_metadata(os.fspath(filename))
        return result

    return save_file


# --- load ---

# (weak reference to one tensor load_peft_weights returned, the file, its header entries) of the last GraLoRA file
# loaded: where the weights enter the model, a state dict holding that very tensor (peft renames keys, keeps tensors)
# is checked against the config it is set under
_LOADED: contextvars.ContextVar[tuple[weakref.ref, str, dict[str, str]] | None] = contextvars.ContextVar(
    "gralora_loaded", default=None
)


def _make_load_peft_weights(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_peft_weights(model_id, *args: Any, **kwargs: Any):
        result = original(model_id, *args, **kwargs)
        path = _saved_file(model_id, **kwargs)
        entries = {k: v for k, v in _header(path).items() if k in LAYOUT_KEYS} if path is not None else {}
        sample = next(iter(result.values()), None) if isinstance(result, dict) else None
        if entries.get("use_gralora") == "true" and sample is not None:
            _LOADED.set((weakref.ref(sample), path, entries))
        return result

    return load_peft_weights


def check_loaded_state_dict(state_dict: Any, config: Any) -> None:
    """Called where the weights enter the model: compare with the header of the file they were read from, if any.

    Raises:
        AdapterLayoutError: the config contradicts the recorded layout.
    """
    loaded = _LOADED.get()
    if loaded is None or not isinstance(state_dict, dict):
        return
    sample = loaded[0]()
    if sample is None:
        _LOADED.set(None)
        return
    if not any(value is sample for value in state_dict.values()):
        return
    _LOADED.set(None)
    check_layout(loaded[2], config, f"The adapter file {loaded[1]!r}")


def _make_from_pretrained(original: Any) -> classmethod:
    func = original.__func__
    signature = inspect.signature(func)

    @functools.wraps(func)
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        bound = signature.bind_partial(cls, *args, **kwargs)
        config = bound.arguments.get("config")
        model_id = bound.arguments.get("model_id")
        if config is not None and model_id is not None:
            hub = {**bound.arguments.get("kwargs", {})}
            path = _saved_file(model_id, hub.get("subfolder"), **hub)
            if path is not None:
                check_layout(_header(path), config, f"The adapter file {path!r}")
        return func(cls, *args, **kwargs)

    return classmethod(from_pretrained)


def patches() -> list[Patch]:
    """The patch rows of the layout entries in adapter files."""
    from peft import PeftModel, peft_model

    loaders = modules_binding("peft.utils.save_and_load", "load_peft_weights")
    return [
        Patch(
            PeftModel,
            "save_pretrained",
            _make_save_pretrained,
            "tells the file writer below which output folders hold GraLoRA adapters, and their layout",
        ),
        Patch(
            peft_model,
            "safe_save_file",
            _make_safe_save_file,
            "writes use_gralora / gralora_k / hybrid_r / r into the safetensors header of GraLoRA adapters (plain "
            "LoRA files unchanged), so that a load under a contradicting config can be refused",
        ),
        Patch(
            PeftModel,
            "from_pretrained",
            _make_from_pretrained,
            "refuses config= that contradicts the layout recorded in the file's header, before the base model is "
            "touched",
        ),
        *[
            Patch(
                module,
                "load_peft_weights",
                _make_load_peft_weights,
                "reads the layout recorded in the file's header, checked against the adapter's config where the "
                "weights are set (set_peft_model_state_dict)",
            )
            for module in loaders
        ],
    ]
