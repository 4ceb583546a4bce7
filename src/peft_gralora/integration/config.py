"""Patches of ``LoraConfig``: the three GraLoRA fields, their validation, ``to_dict`` / ``__repr__`` / ``__eq__``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..config import GRALORA_FIELDS, validate_gralora_config
from ._targets import peft_targets

__all__ = ["patches", "gralora_fields"]


def gralora_fields() -> dict[str, dataclasses.Field]:
    """Fully-formed dataclass ``Field`` objects for the three options, built through the public dataclass API."""
    spec = [
        (name, typ, dataclasses.field(default=default, metadata={"help": help_, **_variant_flag(name)}))
        for name, (typ, default, help_) in GRALORA_FIELDS.items()
    ]
    template = dataclasses.make_dataclass("_GraloraFields", spec)
    return {f.name: f for f in dataclasses.fields(template)}


def _variant_flag(name: str) -> dict[str, bool]:
    # only the switch is a variant for peft's resolver; k and hybrid_r are its parameters
    return {"is_lora_variant": True} if name == "use_gralora" else {}


def _make_config_init(original: Callable) -> Callable:
    defaults = {name: default for name, (_, default, _) in GRALORA_FIELDS.items()}

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name, default in defaults.items():
            # set before the original __init__ so that its __post_init__ already sees them
            object.__setattr__(self, name, kwargs.pop(name, default))
        original(self, *args, **kwargs)
        validate_gralora_config(self)

    sig = inspect.signature(original)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=GRALORA_FIELDS[name][0])
        for name, default in defaults.items()
    ]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    # peft filters unknown keys of a saved config through this signature
    __init__.__signature__ = sig.replace(parameters=params)
    return __init__


def _make_config_to_dict(original: Callable) -> Callable:
    @functools.wraps(original)
    def to_dict(self) -> dict:
        out = original(self)
        if not getattr(self, "use_gralora", False):
            for name in GRALORA_FIELDS:
                out.pop(name, None)
        return out

    return to_dict


def _make_config_eq(original: Callable) -> Callable:
    @functools.wraps(original)
    def __eq__(self, other: object) -> bool:
        same = original(self, other)
        if same is not True:  # False, or NotImplemented for other classes
            return same
        return all(getattr(self, name, None) == getattr(other, name, None) for name in GRALORA_FIELDS)

    return __eq__


def _make_config_repr(original: Callable) -> Callable:
    @functools.wraps(original)
    def __repr__(self) -> str:
        text = original(self)
        if getattr(self, "use_gralora", False) and text.endswith(")"):
            extra = ", ".join(f"{name}={getattr(self, name)!r}" for name in GRALORA_FIELDS)
            text = f"{text[:-1]}, {extra})"
        return text

    return __repr__


def patches() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))`` for ``LoraConfig``; the fields' defaults are constants."""
    cfg = peft_targets()["LoraConfig"]
    defaults = {name: (lambda _orig, d=default: d) for name, (_, default, _) in GRALORA_FIELDS.items()}
    return [
        (cfg, "__init__", _make_config_init),
        (cfg, "to_dict", _make_config_to_dict),
        (cfg, "__repr__", _make_config_repr),
        (cfg, "__eq__", _make_config_eq),
        *[(cfg, name, make) for name, make in defaults.items()],
    ]
