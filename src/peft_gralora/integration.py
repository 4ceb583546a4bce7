"""The only module that touches peft internals: installs GraLoRA into the released peft, and takes it out again.

What is patched, and why (each patch calls through to peft's original for everything that is not GraLoRA):

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
====================================  =================================================================================

Nothing in torch or transformers is rebound. ``install()`` is idempotent; ``uninstall()`` puts back every original
object (``is``-identical) and removes what was added.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .config import GRALORA_FIELDS, validate_gralora_config, validate_gralora_layer
from .dora import GraLoraDoraLinearVariant
from .quant import dequantize_4bit_weight, is_cpu_packed_4bit, restore_canonical_4bit_
from .variant import GraLoraLinearVariant, gralora_delta, is_gralora_adapter

__all__ = [
    "SUPPORTED_PEFT",
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


def _peft_targets() -> dict[str, Any]:
    from peft.tuners.lora import LoraConfig, LoraModel
    from peft.tuners.lora import dora as lora_dora
    from peft.tuners.lora import layer as lora_layer

    return {"LoraConfig": LoraConfig, "LoraModel": LoraModel, "Linear": lora_layer.Linear, "dora": lora_dora}


def _bnb_targets() -> dict[str, type]:
    """peft's bitsandbytes LoRA layers that exist in this environment (none without bitsandbytes)."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    found = {}
    if is_bnb_available():
        try:
            from peft.tuners.lora import bnb as lora_bnb
        except (ImportError, OSError, RuntimeError):
            # a bitsandbytes that is installed but cannot load (no binary for this platform): peft cannot build
            # its layers either, so there is nothing to patch, and peft itself must stay importable
            return found
        found["Linear8bitLt"] = lora_bnb.Linear8bitLt
        if is_bnb_4bit_available():
            found["Linear4bit"] = lora_bnb.Linear4bit
    return found


# ---------------------------------------------------------------------------------------------------------------------
# LoraConfig
# ---------------------------------------------------------------------------------------------------------------------


def _gralora_fields() -> dict[str, dataclasses.Field]:
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


# ---------------------------------------------------------------------------------------------------------------------
# LoRA layers
# ---------------------------------------------------------------------------------------------------------------------


def _make_lora_variants(original: property) -> property:
    def lora_variants(self) -> dict:
        table = dict(original.fget(self))
        table[("use_gralora",)] = GraLoraLinearVariant
        table[("use_dora", "use_gralora")] = GraLoraDoraLinearVariant
        return table

    return property(lora_variants, doc=original.__doc__)


def _make_get_delta_weight(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_delta_weight(self, adapter, *args: Any, **kwargs: Any):
        if is_gralora_adapter(self, adapter):
            return gralora_delta(self, adapter)
        return original(self, adapter, *args, **kwargs)

    return get_delta_weight


def _make_bnb_resolve_lora_variant(original: Callable) -> Callable:
    @functools.wraps(original)
    def resolve_lora_variant(self, *, config: Any, **kwargs: Any):
        if getattr(config, "use_gralora", False):
            # other variants next to use_gralora are refused at config time; DoRA is the one combination
            return GraLoraDoraLinearVariant() if config.use_dora else GraLoraLinearVariant()
        return original(self, config=config, **kwargs)

    return resolve_lora_variant


def _make_restore_4bit_first(original: Callable) -> Callable:
    """Wrap ``bnb.Linear4bit.merge`` / ``unmerge``: put a CPU-packed base weight back into bitsandbytes' canonical
    layout before peft dequantizes it (it is re-quantized by the merge anyway)."""

    @functools.wraps(original)
    def merge_or_unmerge(self, *args: Any, **kwargs: Any):
        restore_canonical_4bit_(self.get_base_layer().weight)
        return original(self, *args, **kwargs)

    return merge_or_unmerge


def _make_restore_4bit_when_training(original: Callable) -> Callable:
    """Wrap ``bnb.Linear4bit.forward``: bitsandbytes computes with a CPU-packed weight through a kernel without
    autograd, so a layer that was packed by an eval forward and then trained would cut the gradient through its base
    weight. In training mode, put the weight back first (bitsandbytes only packs in eval mode)."""

    @functools.wraps(original)
    def forward(self, x, *args: Any, **kwargs: Any):
        if self.training:
            restore_canonical_4bit_(self.get_base_layer().weight)
        return original(self, x, *args, **kwargs)

    return forward


def _make_dequantize_module_weight(original: Callable) -> Callable:
    """Wrap ``peft.tuners.lora.dora.dequantize_module_weight``: read a CPU-packed 4-bit weight correctly (DoRA's
    forward and init dequantize the base weight; on a packed weight peft's path returns garbage)."""

    @functools.wraps(original)
    def dequantize_module_weight(module: Any):
        weight = getattr(module, "weight", None)
        if is_cpu_packed_4bit(weight):
            return dequantize_4bit_weight(weight)
        return original(module)

    return dequantize_module_weight


def _gralora_layer_classes() -> tuple[type, ...]:
    """LoRA layer classes whose GraLoRA support is implemented and tested (exact types, not subclasses)."""
    return (_peft_targets()["Linear"], *_bnb_targets().values())


def _unsupported_layer_error(layer: Any, module_name: str) -> ValueError:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    supported = ", ".join(f"lora.{c.__name__}" for c in _gralora_layer_classes())
    becomes = f" (LoRA layer {type(layer).__name__})" if layer is not base else ""
    return ValueError(
        f"use_gralora=True cannot adapt module {module_name!r}: its layer type {type(base).__name__}{becomes} has "
        f"no GraLoRA implementation (supported LoRA layers: {supported}, i.e. torch.nn.Linear, transformers Conv1D "
        "and bitsandbytes 4-bit / 8-bit Linear). Remove the module from target_modules (or use exclude_modules), or "
        "set use_gralora=False for plain LoRA."
    )


def _may_hold_gralora(base: Any) -> bool:
    """Whether a base layer is of a kind GraLoRA can adapt (checked before peft dispatches it, so that a layer's own
    errors, e.g. "does not support DoRA", do not hide the real reason). ``nn.Linear`` subclasses that a third-party
    dispatcher claims are caught after dispatch by type."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    # torchao keeps nn.Linear but swaps the weight for a quantized tensor subclass (peft checks it the same way)
    if type(getattr(base, "weight", None)).__module__.startswith("torchao."):
        return False
    return isinstance(base, (nn.Linear, Conv1D))


# ---------------------------------------------------------------------------------------------------------------------
# LoraModel
# ---------------------------------------------------------------------------------------------------------------------


def _in_out_features(layer: Any) -> tuple[int | None, int | None]:
    from peft.tuners.tuners_utils import _get_in_out_features

    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return _get_in_out_features(base)


def _make_create_and_replace(original: Callable) -> Callable:
    @functools.wraps(original)
    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if getattr(lora_config, "use_gralora", False):
            from peft.tuners.lora.layer import LoraLayer
            from peft.utils.other import get_pattern_key

            if kwargs.get("parameter_name") is not None:
                raise ValueError(
                    f"use_gralora=True cannot target the parameter {kwargs['parameter_name']!r} of {current_key!r}: "
                    "GraLoRA adapts nn.Linear / Conv1D modules only. Use target_modules instead of target_parameters."
                )
            # the layer type first: a shape error would be misleading for a type GraLoRA cannot adapt anyway
            if isinstance(target, LoraLayer):
                if type(target) not in _gralora_layer_classes():
                    raise _unsupported_layer_error(target, current_key)
            elif not _may_hold_gralora(target):
                raise _unsupported_layer_error(target, current_key)
            r_key = get_pattern_key(lora_config.rank_pattern.keys(), current_key)
            r = lora_config.rank_pattern.get(r_key, lora_config.r)
            in_f, out_f = _in_out_features(target)
            if in_f is not None and out_f is not None:
                validate_gralora_layer(current_key, in_f, out_f, r, lora_config.gralora_k, lora_config.hybrid_r)
        return original(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    return _create_and_replace


def _make_create_new_module(original: Callable) -> Callable:
    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if not getattr(lora_config, "use_gralora", False):
            return original(lora_config, adapter_name, target, **kwargs)
        name = kwargs.get("target_name", "<unknown>")
        try:
            new_module = original(lora_config, adapter_name, target, **kwargs)
        except ValueError as exc:
            # layers with a variant table but no GraLoRA entry (Embedding, Conv, MHA, ...) end up here
            if "use_gralora" in str(exc):
                raise _unsupported_layer_error(target, name) from exc
            raise
        # layers with a hand-written variant resolver ignore use_gralora: refuse instead of training plain LoRA
        if type(new_module) not in _gralora_layer_classes() or not is_gralora_adapter(new_module, adapter_name):
            raise _unsupported_layer_error(new_module, name)
        return new_module

    return staticmethod(_create_new_module)


def _make_inject_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if not getattr(self.peft_config.get(adapter_name), "use_gralora", False):
            return original(self, model, adapter_name, *args, **kwargs)
        from peft.tuners.tuners_utils import BaseTunerLayer

        existing = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        try:
            return original(self, model, adapter_name, *args, **kwargs)
        except Exception:
            _remove_injected(model, adapter_name, existing)
            raise

    return inject_adapter


def _remove_injected(model: Any, adapter_name: str, existing: dict[str, Any]) -> None:
    """Undo a failed injection: unwrap layers created for it, drop the adapter from layers that existed before."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import _get_submodules

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if existing.get(name) is module:
            module.delete_adapter(adapter_name)
        else:
            parent, _, target_name = _get_submodules(model, name)
            setattr(parent, target_name, module.get_base_layer())


_LINEAR_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _make_add_weighted_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
        configs = [self.peft_config[a] for a in adapters if a in self.peft_config]
        gralora = [bool(getattr(c, "use_gralora", False)) for c in configs]
        if not any(gralora) or adapter_name in self.peft_config:
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        effective = "linear" if len(adapters) == 1 else combination_type
        if effective == "cat":
            raise ValueError(
                "add_weighted_adapter(combination_type='cat') concatenates plain LoRA factors, which misplaces "
                "GraLoRA blocks. Use combination_type='svd' (dense delta, re-factorised), or export the adapters "
                "to exact plain LoRA with peft_gralora.export_lora first."
            )
        if effective in _LINEAR_COMBINATIONS:
            layouts = {
                (g, getattr(c, "gralora_k", None), getattr(c, "hybrid_r", None))
                for g, c in zip(gralora, configs, strict=True)
            }
            if len(layouts) != 1:
                raise ValueError(
                    f"add_weighted_adapter(combination_type={effective!r}) mixes the A and B factors entry by entry, "
                    "which is only meaningful when every adapter has the same layout; got (use_gralora, gralora_k, "
                    f"hybrid_r) = {sorted(layouts, key=str)}. Use combination_type='svd' instead."
                )
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        # SVD family: the dense deltas come from the GraLoRA-aware get_delta_weight and the result is a plain LoRA
        # factorisation, so the new adapter must be plain LoRA.
        first = adapters[0]
        saved = self.peft_config[first]
        self.peft_config[first] = dataclasses.replace(saved, use_gralora=False, gralora_k=2, hybrid_r=0)
        try:
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        finally:
            self.peft_config[first] = saved

    return add_weighted_adapter


# ---------------------------------------------------------------------------------------------------------------------
# install / uninstall
# ---------------------------------------------------------------------------------------------------------------------


def patch_table() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))`` for every patched attribute (fields aside)."""
    t = _peft_targets()
    cfg, model, linear = t["LoraConfig"], t["LoraModel"], t["Linear"]
    bnb = _bnb_targets()
    bnb_4bit = [bnb["Linear4bit"]] if "Linear4bit" in bnb else []
    defaults = {name: (lambda _orig, d=default: d) for name, (_, default, _) in GRALORA_FIELDS.items()}
    return [
        (cfg, "__init__", _make_config_init),
        (cfg, "to_dict", _make_config_to_dict),
        (cfg, "__repr__", _make_config_repr),
        (cfg, "__eq__", _make_config_eq),
        *[(cfg, name, make) for name, make in defaults.items()],
        (linear, "lora_variants", _make_lora_variants),
        (linear, "get_delta_weight", _make_get_delta_weight),
        *[(bnb_cls, "resolve_lora_variant", _make_bnb_resolve_lora_variant) for bnb_cls in bnb.values()],
        *[(bnb_cls, "get_delta_weight", _make_get_delta_weight) for bnb_cls in bnb.values()],
        # _save_to_state_dict runs before the base layer's own, whose inverse of the packing corrupts absmax
        *[
            (bnb4, attr, _make_restore_4bit_first)
            for bnb4 in bnb_4bit
            for attr in ("merge", "unmerge", "_save_to_state_dict")
        ],
        *[(bnb4, "forward", _make_restore_4bit_when_training) for bnb4 in bnb_4bit],
        # only where bitsandbytes 4-bit exists: nothing can be CPU-packed otherwise
        *([(t["dora"], "dequantize_module_weight", _make_dequantize_module_weight)] if bnb_4bit else []),
        (model, "_create_and_replace", _make_create_and_replace),
        (model, "_create_new_module", _make_create_new_module),
        (model, "inject_adapter", _make_inject_adapter),
        (model, "add_weighted_adapter", _make_add_weighted_adapter),
    ]


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
        cfg = _peft_targets()["LoraConfig"]
        fields = _gralora_fields()
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
        cfg = _peft_targets()["LoraConfig"]
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
