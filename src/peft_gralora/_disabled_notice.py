"""With ``PEFT_GRALORA_DISABLE=1``: one warning when a GraLoRA adapter is loaded as plain LoRA.

GraLoRA is off, so peft reads a GraLoRA ``adapter_config.json`` as plain LoRA and only says "Unexpected keyword
arguments [...] upgrade the PEFT version", which points the wrong way. This wraps peft's config loading (two
classmethods of ``PeftConfigMixin``; results unchanged) to say instead, once per adapter, that it is GraLoRA, which
adapter, and the fix. Applied by the import hook after peft is imported; removed by ``install()``.
"""

from __future__ import annotations

import contextvars
import functools
import warnings
from typing import Any

__all__ = ["apply", "remove", "GraloraDisabledWarning"]


class GraloraDisabledWarning(UserWarning):
    """A GraLoRA adapter is being loaded as plain LoRA because PEFT_GRALORA_DISABLE turned GraLoRA off."""


_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("gralora_config_source", default=None)
_warned: set[str] = set()
_originals: dict[str, Any] = {}


def _message(source: str, kwargs: dict[str, Any]) -> str:
    fields = ", ".join(f"{name}={kwargs.get(name)!r}" for name in ("gralora_k", "hybrid_r", "r") if name in kwargs)
    return (
        f"peft-gralora: adapter {source} is a GraLoRA adapter (use_gralora=True, {fields}), but "
        "PEFT_GRALORA_DISABLE=1 turned GraLoRA off in this process, so peft loads it as plain LoRA and it computes "
        "a different function. Unset PEFT_GRALORA_DISABLE (or call peft_gralora.install() before loading) to load "
        "it as GraLoRA, or convert it with `peft-gralora export-lora` for readers without GraLoRA."
    )


def _wrap_from_pretrained(func: Any) -> classmethod:
    @functools.wraps(func)
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        where = f"{pretrained_model_name_or_path!s}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        token = _source.set(where)
        try:
            return func(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        finally:
            _source.reset(token)

    return classmethod(from_pretrained)


def _wrap_from_peft_type(func: Any) -> classmethod:
    @functools.wraps(func)
    def from_peft_type(cls, **kwargs):
        if not kwargs.get("use_gralora") or "use_gralora" in getattr(cls, "__dataclass_fields__", {}):
            return func(cls, **kwargs)  # not GraLoRA, or GraLoRA is installed after all
        source = _source.get() or "(from a config dict)"
        if source not in _warned:
            _warned.add(source)
            warnings.warn(_message(repr(source), kwargs), GraloraDisabledWarning, stacklevel=3)
        with warnings.catch_warnings():
            # peft's own text for the same keys ("upgrade the PEFT version") points the wrong way
            warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \[.*'use_gralora'")
            return func(cls, **kwargs)

    return classmethod(from_peft_type)


def apply(_peft_module: Any = None) -> None:
    """Wrap ``PeftConfigMixin.from_pretrained`` / ``from_peft_type`` (once)."""
    from peft.config import PeftConfigMixin

    if _originals:
        return
    wrappers = {"from_pretrained": _wrap_from_pretrained, "from_peft_type": _wrap_from_peft_type}
    for name, wrap in wrappers.items():
        original = PeftConfigMixin.__dict__[name]
        _originals[name] = original
        setattr(PeftConfigMixin, name, wrap(original.__func__))


def remove() -> None:
    """Put peft's two classmethods back (``install()`` does, before installing GraLoRA)."""
    if not _originals:
        return
    from peft.config import PeftConfigMixin

    for name, original in _originals.items():
        setattr(PeftConfigMixin, name, original)
    _originals.clear()
