"""Patches of ``LoraConfig``: the three GraLoRA fields, their validation, ``to_dict`` / ``__repr__`` / ``__eq__``.

A GraLoRA config also carries the three fields in its own ``__dataclass_fields__`` (see :func:`_carry_fields`), so
that ``to_dict()`` / ``save_pretrained`` write them whatever the patch state when it is saved: a model built inside
``with gralora_installed():`` and saved after the block, or after ``uninstall()``, still computes GraLoRA and must
save a config that reloads as GraLoRA.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..config import GRALORA_FIELDS, validate_gralora_config
from ._targets import peft_targets
from .patch import Patch

__all__ = ["patches", "gralora_fields", "check_fields_need_gralora"]

_DEFAULTS = {name: default for name, (_, default, _) in GRALORA_FIELDS.items()}


def check_fields_need_gralora(use_gralora: Any, values: dict[str, Any]) -> None:
    """Refuse ``gralora_k`` / ``hybrid_r`` set to anything but their defaults while ``use_gralora`` is false.

    Without ``use_gralora=True`` the two fields do nothing: peft trains plain LoRA and the saved config drops them.

    Raises:
        ValueError: naming the fields and ``use_gralora=True`` as the fix.
    """
    if use_gralora:
        return
    slips = {name: value for name, value in values.items() if name != "use_gralora" and value != _DEFAULTS[name]}
    if slips:
        given = ", ".join(f"{name}={value!r}" for name, value in slips.items())
        raise ValueError(
            f"LoraConfig got {given} but use_gralora={use_gralora!r}: these fields only take effect for GraLoRA, so "
            "this config would train plain LoRA and save without them. Add use_gralora=True to use GraLoRA, or "
            f"remove {', '.join(slips)} for plain LoRA."
        )


@functools.cache
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


class _CarriedFields(dict):
    """A GraLoRA config's own ``__dataclass_fields__``: its class's fields plus the three GraLoRA ones.

    Pickled and deep-copied as a recipe, not as ``Field`` objects: an unpickled ``Field`` would lose the identity of
    dataclasses' internal markers, and ``dataclasses.fields`` would then see no field at all.
    """

    def __init__(self, klass: type) -> None:
        own = {name: f for name, f in klass.__dataclass_fields__.items() if name not in GRALORA_FIELDS}
        super().__init__({**own, **gralora_fields()})
        self.klass = klass

    def __reduce__(self) -> tuple:
        return (_CarriedFields, (self.klass,))


def _carry_fields(config: Any) -> None:
    """Give a GraLoRA config its own ``__dataclass_fields__`` with the three fields.

    peft's ``to_dict`` is ``dataclasses.asdict``, which reads ``__dataclass_fields__`` through the instance: the
    fields stay in ``to_dict()`` (and in ``save_pretrained``, diffusers' adapter metadata, ``dataclasses.replace``)
    after ``uninstall()`` has taken them off the class, as the layers built from the config keep computing GraLoRA.
    """
    if config.__dict__.get("__dataclass_fields__") is None:
        object.__setattr__(config, "__dataclass_fields__", _CarriedFields(type(config)))


def _make_config_init(original: Callable) -> Callable:
    defaults = _DEFAULTS

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        values = {name: kwargs.pop(name, default) for name, default in defaults.items()}
        check_fields_need_gralora(values["use_gralora"], values)
        for name, value in values.items():
            # set before the original __init__ so that its __post_init__ already sees them
            object.__setattr__(self, name, value)
        original(self, *args, **kwargs)
        validate_gralora_config(self)
        if self.use_gralora:
            _carry_fields(self)

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


def patches() -> list[Patch]:
    """The patch rows of ``LoraConfig``; the fields' defaults are constants. ``install()`` also adds the three fields
    to ``LoraConfig.__dataclass_fields__`` (:func:`gralora_fields`), so that ``asdict`` / ``replace`` / peft's variant
    resolver (``is_lora_variant``) see them."""
    cfg = peft_targets()["LoraConfig"]
    defaults = {name: (lambda _orig, d=default: d) for name, (_, default, _) in GRALORA_FIELDS.items()}
    return [
        Patch(
            cfg,
            "__init__",
            _make_config_init,
            "accepts the three fields, validates GraLoRA configs, refuses gralora_k / hybrid_r without "
            "use_gralora=True, and gives GraLoRA configs their own copy of the fields (saved whatever the patch "
            "state at save time)",
        ),
        Patch(
            cfg,
            "to_dict",
            _make_config_to_dict,
            "writes the three fields only for GraLoRA configs, so plain LoRA adapters saved with this package "
            "installed stay byte-identical for vanilla peft",
        ),
        Patch(cfg, "__repr__", _make_config_repr, "shows the three fields of GraLoRA configs"),
        Patch(
            cfg,
            "__eq__",
            _make_config_eq,
            "the dataclass __eq__ was generated before the three fields existed: also compares them, so a GraLoRA "
            "config never equals the plain LoRA one",
        ),
        *[Patch(cfg, name, make, "class-level default of the GraLoRA field") for name, make in defaults.items()],
    ]
