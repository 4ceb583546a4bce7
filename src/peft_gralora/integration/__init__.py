"""The only package that touches peft internals: installs GraLoRA into the released peft, and takes it out again.

Each module of this package patches one host area and lists its patches in ``patches()``; :func:`patch_table`
joins them into the one list that :func:`install` applies. Every patch point, and why (each patch calls through to
peft's original for everything that is not GraLoRA):

====================================  =================================================================================
patch point                           why
====================================  =================================================================================
``LoraConfig.__dataclass_fields__``   adds ``use_gralora`` / ``gralora_k`` / ``hybrid_r`` as dataclass fields, so
                                      ``asdict``/``replace``/peft's variant resolver (``is_lora_variant``) see them
``LoraConfig.<field>`` (x3)           class-level defaults of the three fields
``LoraConfig.__init__``               accepts the three fields and validates GraLoRA configs
``LoraConfig.to_dict``                writes the three fields only for GraLoRA configs, so plain LoRA adapters saved
                                      with this package installed stay byte-identical for vanilla peft
``LoraConfig.__repr__``               shows the three fields of GraLoRA configs
``LoraConfig.__eq__``                 the dataclass ``__eq__`` was generated before the three fields existed: also
                                      compares them, so a GraLoRA config never equals the plain LoRA one
``lora.Linear.lora_variants``         maps ``("use_gralora",)`` to :class:`GraLoraLinearVariant` and
                                      ``("use_dora", "use_gralora")`` to :class:`GraLoraDoraLinearVariant`
``bnb.Linear4bit/8bitLt``             their hand-written resolvers ignore ``use_gralora``: return the GraLoRA (or
``.resolve_lora_variant``             GraLoRA + DoRA) variant for GraLoRA configs, peft's resolver otherwise
``bnb.Linear4bit/8bitLt``             same as ``lora.Linear.get_delta_weight``: the GraLoRA delta for GraLoRA
``.get_delta_weight``                 adapters (the bnb classes override it with plain ``B @ A``)
``bnb.Linear4bit.merge`` / ``unmerge`` bitsandbytes repacks 4-bit weights for its CPU kernel on eval forwards, after
                                      which ``dequantize_4bit`` returns garbage: undo the packing correctly first
                                      (:mod:`peft_gralora.quant`), then peft's merge. Fixes plain LoRA / DoRA merges
                                      too; a no-op for weights that were never packed
``bnb.Linear4bit._save_to_state_dict``  the same before saving: bitsandbytes' own inverse of the packing (run when the
                                      base layer is saved) leaves ``absmax`` transposed and corrupts the live model
``bnb.Linear4bit.forward``            in training mode, undoes the packing first: a packed weight is computed with a
                                      kernel without autograd, which would cut the gradient through the base layer
``peft.tuners.lora.dora``             module global used by peft's DoRA forward/init: dequantizes a CPU-packed 4-bit
``.dequantize_module_weight``         weight correctly (plain DoRA's eval forward on 4-bit is ~12 % off otherwise);
                                      calls peft's function for everything else
``lora.Linear.get_delta_weight``      returns the GraLoRA delta for GraLoRA adapters (DoRA merges, SVD weighted
                                      adapters, ``convert_to_lora``, intruder reduction all call it)
``LoraModel._create_and_replace``     refuses, before anything changes, modules GraLoRA cannot adapt: wrong shape
                                      for ``gralora_k``, an existing LoRA layer type without GraLoRA, parameters
``LoraModel._create_new_module``      refuses layer types that would otherwise silently train plain LoRA
``LoraModel.inject_adapter``          peft adapts targets one by one: when GraLoRA refuses a later target, takes the
                                      layers already adapted back out, so a refused config leaves the model unchanged
``LoraModel.add_weighted_adapter``    each combination type gives the right result for GraLoRA adapters or a clear
                                      error (never plain-LoRA math on GraLoRA weights)
``peft.utils.other``                  the FSDP auto-wrap policy transformers' Trainer applies to PEFT models makes
``.fsdp_auto_wrap_policy``            every trainable Linear its own unit, which GraLoRA (reading the weights without
                                      calling the module) would never unshard: keeps GraLoRA's factors in the
                                      enclosing unit (:mod:`.distributed`); peft's policy unchanged otherwise
====================================  =================================================================================

Nothing in torch or transformers is rebound. ``install()`` is idempotent; ``uninstall()`` puts back every original
object (``is``-identical) and removes what was added.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import GRALORA_FIELDS
from . import config as _config
from . import distributed as _distributed
from . import layers as _layers
from . import model as _model
from ._targets import peft_targets

__all__ = [
    "SUPPORTED_PEFT",
    "UnsupportedPeftVersionError",
    "check_peft_version",
    "install",
    "uninstall",
    "is_installed",
    "gralora_installed",
    "patch_table",
]

SUPPORTED_PEFT = ">=0.21.0,<0.22"
_MISSING = object()
_lock = threading.RLock()
# (owner, attribute) -> the owner's own ``__dict__`` entry before install (_MISSING if it had none)
_originals: dict[tuple[Any, str], Any] = {}
_added_fields: list[str] = []


class UnsupportedPeftVersionError(ImportError):
    """peft is outside the range this package was written and tested against."""


def check_peft_version(version: str | None = None) -> str:
    """Return peft's version, or raise if it is outside :data:`SUPPORTED_PEFT`.

    Raises:
        UnsupportedPeftVersionError: naming the installed version, the supported range and the fix.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import peft

        version = peft.__version__
    if Version(version) not in SpecifierSet(SUPPORTED_PEFT):
        raise UnsupportedPeftVersionError(
            f"peft-gralora supports peft{SUPPORTED_PEFT}, but peft {version} is installed. "
            f"Install a supported peft (pip install 'peft{SUPPORTED_PEFT}') or set PEFT_GRALORA_DISABLE=1 to run "
            "without GraLoRA."
        )
    return version


def patch_table() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))`` for every patched attribute (fields aside), all modules."""
    return [*_config.patches(), *_layers.patches(), *_model.patches(), *_distributed.patches()]


def _resolve_original(owner: Any, attr: str) -> Any:
    """What ``owner.attr`` resolves to today, as the raw descriptor (property / staticmethod / function)."""
    if isinstance(owner, types.ModuleType):
        return owner.__dict__[attr]
    for klass in owner.__mro__:
        if attr in klass.__dict__:
            raw = klass.__dict__[attr]
            return raw.__func__ if isinstance(raw, staticmethod) else raw
    raise AttributeError(f"{owner.__name__} has no attribute {attr!r}")


def is_installed() -> bool:
    """Whether GraLoRA is currently installed into peft."""
    return bool(_originals)


def install() -> None:
    """Install GraLoRA into the imported peft (idempotent).

    Raises:
        UnsupportedPeftVersionError: outside :data:`SUPPORTED_PEFT`; nothing is patched then.
    """
    with _lock:
        if _originals:
            return
        check_peft_version()
        table = patch_table()
        cfg = peft_targets()["LoraConfig"]
        fields = _config.gralora_fields()
        # build every replacement before touching anything: an error here leaves peft as it was
        replacements = []
        for owner, attr, make in table:
            current = _resolve_original(owner, attr) if attr not in GRALORA_FIELDS else None
            replacements.append((owner, attr, make(current)))
        for owner, attr, new in replacements:
            _originals[(owner, attr)] = owner.__dict__.get(attr, _MISSING)
            setattr(owner, attr, new)
        for name, field in fields.items():
            if name not in cfg.__dataclass_fields__:
                cfg.__dataclass_fields__[name] = field
                _added_fields.append(name)


def uninstall() -> None:
    """Restore peft exactly as it was before :func:`install` (a no-op when not installed)."""
    with _lock:
        if not _originals:
            return
        cfg = peft_targets()["LoraConfig"]
        for name in _added_fields:
            cfg.__dataclass_fields__.pop(name, None)
        _added_fields.clear()
        for (owner, attr), original in reversed(list(_originals.items())):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        _originals.clear()


@contextmanager
def gralora_installed() -> Iterator[None]:
    """Context manager: GraLoRA installed inside, the previous state restored on exit."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
