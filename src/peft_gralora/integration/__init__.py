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
                                      error (never plain-LoRA math on GraLoRA weights); ``cat`` is exact for every
                                      mix of GraLoRA / plain LoRA adapters (block by block, hybrid side by side)
``peft.utils.hotswap``                pads GraLoRA adapters inside their layout (zero sub-ranks per block, zero
``.prepare_model_for_compiled_hotswap``  hybrid rows) and keeps the layer's ``hybrid_r`` and the configs in step
``peft.utils.hotswap``                moves each incoming layer exactly into the resident layer's layout (GraLoRA or
``.hotswap_adapter_from_state_dict``  plain), or raises ``ValueError`` before any weight changes; ``hotswap_adapter``
                                      and diffusers' hotswap call it through the module
``peft.get_peft_model_state_dict``    remembers (weakly) which GraLoRA config the returned tensors belong to, so
(and ``peft.utils``, ``.save_and_load``)  diffusers' save can write it (the tensors look like plain LoRA)
``diffusers LoraBaseMixin``           every pipeline's ``save_lora_weights`` ends here: writes the remembered GraLoRA
``._save_lora_weights``               config as the component's adapter metadata when none is given; refuses
                                      contradicting metadata, mixed state dicts and ``safe_serialization=False``
``diffusers PeftAdapterMixin``        refuses ``safe_serialization=False`` for a GraLoRA adapter (torch.save files
``.save_lora_adapter``                carry no metadata and would load as plain LoRA)
``diffusers PeftAdapterMixin``        tells ``_create_lora_config`` which model loads and whether it hotswaps
``.load_lora_adapter``
``diffusers PeftAdapterMixin``        also accepts ``target_hybrid_r`` (passed on to peft's
``.enable_lora_hotswap``              ``prepare_model_for_compiled_hotswap``): room for larger hybrid branches
``diffusers.loaders.peft`` /          (by-name imports of ``diffusers.utils.peft_utils._create_lora_config``) takes the
``.lora_base._create_lora_config``    remembered config for a GraLoRA state dict passed without metadata, refuses
                                      contradicting metadata; runs a GraLoRA hotswap before diffusers' hotswap block,
                                      whose error handler would delete the resident adapter on a refusal. diffusers'
                                      loader modules imported after peft are patched by a post-import finder
``replace_lora_weights_loftq``,       refuse GraLoRA adapters before changing anything: each writes or reads the
``reduce_intruder_dimension``,        factors as a plain ``B @ A`` (patched in every peft module that binds them;
``create_lorafa_optimizer``,          :mod:`.helpers`); plain LoRA goes to peft's function
``create_riemannian_optimizer``,
``create_arrow_model``,
``LoraModel.subtract_mutated_init``
``set_peft_model_state_dict`` in      every peft load path ends here: a state dict saved by the GraLoRA PEFT fork
every peft module holding it          (``gralora_A`` / ``gralora_B`` keys) is converted exactly to our layout, a
                                      partial or mixed one refused (:mod:`.loading`)
``PeftModel.load_adapter``            a refused fork file leaves no half-added adapter behind (peft adds the adapter
                                      before it reads the weights)
``PeftAdapterMixin.load_adapter``     transformers 5 loads adapter files without peft: a fork-layout GraLoRA adapter
(transformers)                        is handed over converted (its ``adapter_state_dict`` argument)
``peft.tuners.lora.variants``         adds ``GraLoraLinearVariant`` / ``GraLoraDoraLinearVariant`` where peft keeps its
``.GraLoRa*LinearVariant`` (x2)       LoRA variants (removed by ``uninstall()``)
``peft.utils.other``                  the FSDP auto-wrap policy transformers' Trainer applies to PEFT models makes
``.fsdp_auto_wrap_policy``            every trainable Linear its own unit, which GraLoRA (reading the weights without
                                      calling the module) would never unshard: keeps GraLoRA's factors in the
                                      enclosing unit (:mod:`.distributed`); peft's policy unchanged otherwise
====================================  =================================================================================

Outside :data:`SUPPORTED_PEFT` (or if installing fails), the import hook's :func:`auto_install` patches one point
only, ``LoraConfig.__init__``, so that ``LoraConfig(use_gralora=True)`` (and loading a GraLoRA adapter) raises
:class:`UnsupportedPeftVersionError` naming the installed peft, the range and the fix; plain LoRA and ``import peft``
are untouched, and one warning names the range.

Nothing in torch is rebound, and in transformers one method only, ``PeftAdapterMixin.load_adapter`` (its adapter
loader bypasses peft in transformers 5), which calls transformers' own for everything but fork-layout GraLoRA
adapters. ``install()`` is idempotent; ``uninstall()`` puts back every original
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
from . import diffusers as _diffusers
from . import distributed as _distributed
from . import helpers as _helpers
from . import hotswap as _hotswap
from . import layers as _layers
from . import loading as _loading
from . import model as _model
from . import variants as _variants
from ._targets import peft_targets

__all__ = [
    "SUPPORTED_PEFT",
    "UnsupportedPeftVersionError",
    "check_peft_version",
    "install",
    "auto_install",
    "uninstall",
    "is_installed",
    "gralora_installed",
    "patch_table",
]

SUPPORTED_PEFT = ">=0.20.0,<0.22"
_MISSING = object()
_lock = threading.RLock()
# (owner, attribute) -> the owner's own ``__dict__`` entry before install (_MISSING if it had none)
_originals: dict[tuple[Any, str], Any] = {}
_added_fields: list[str] = []
# True while only the refusal (auto_install outside the supported range) is in place
_refusing = False


class UnsupportedPeftVersionError(ImportError):
    """peft is outside the range this package was written and tested against."""


def _unsupported_message(version: str) -> str:
    return (
        f"peft-gralora supports peft{SUPPORTED_PEFT}, but peft {version} is installed. Install a supported peft "
        f"(pip install 'peft{SUPPORTED_PEFT}') or set PEFT_GRALORA_DISABLE=1 to run without GraLoRA."
    )


def _in_supported_range(version: str) -> bool:
    """``version`` in :data:`SUPPORTED_PEFT` (comma-joined ``>=``/``>``/``<=``/``<``/``==``/``!=`` clauses)."""
    # packaging.version is already loaded by peft; packaging.specifiers would cost ~30 ms of regex compilation at
    # every `import peft`
    import operator

    from packaging.version import InvalidVersion, Version

    ops = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
    ops.update({">": operator.gt, "<": operator.lt})  # after the two-character ones: matched in this order
    try:
        v = Version(version)
    except InvalidVersion:
        return False
    # pre-releases and dev builds are outside (0.22.0.dev0 sorts below 0.22 but is peft's next minor in the making)
    if v.is_prerelease or v.is_devrelease:
        return False
    for clause in SUPPORTED_PEFT.split(","):
        clause = clause.strip()
        op = next(o for o in ops if clause.startswith(o))
        if not ops[op](v, Version(clause[len(op) :])):
            return False
    return True


def check_peft_version(version: str | None = None) -> str:
    """Return peft's version, or raise if it is outside :data:`SUPPORTED_PEFT`.

    Raises:
        UnsupportedPeftVersionError: naming the installed version, the supported range and the fix.
    """
    if version is None:
        import peft

        version = peft.__version__
    if not _in_supported_range(version):
        raise UnsupportedPeftVersionError(_unsupported_message(version))
    return version


def patch_table() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))`` for every patched attribute (fields aside), all modules."""
    return [
        *_config.patches(),
        *_layers.patches(),
        *_model.patches(),
        *_hotswap.patches(),
        *_helpers.patches(),
        *_diffusers.patches(),
        *_loading.patches(),
        *_variants.patches(),
        *_distributed.patches(),
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
    """Whether GraLoRA is currently installed into peft (the refusal of :func:`auto_install` does not count)."""
    return bool(_originals) and not _refusing


def install() -> None:
    """Install GraLoRA into the imported peft (idempotent).

    Raises:
        UnsupportedPeftVersionError: outside :data:`SUPPORTED_PEFT`; nothing is patched then.
    """
    with _lock:
        if is_installed():
            return
        check_peft_version()
        # the refusal of auto_install, if in place: its __init__ must not be taken for peft's own
        uninstall()
        table = patch_table()
        cfg = peft_targets()["LoraConfig"]
        fields = _config.gralora_fields()
        _apply(table)
        for name, field in fields.items():
            if name not in cfg.__dataclass_fields__:
                cfg.__dataclass_fields__[name] = field
                _added_fields.append(name)
        # diffusers' loader modules are usually imported after peft: their rows are applied when they are
        _diffusers.register_deferred(_apply_deferred)


def _apply(table: list[tuple[Any, str, Callable[[Any], Any]]]) -> None:
    """Build every replacement of ``table`` (rows already applied skipped), then set them all."""
    # build every replacement before touching anything: an error here leaves peft as it was
    seen: set[tuple[int, str]] = set()
    replacements = []
    for owner, attr, make in table:
        key = (id(owner), attr)
        if key in seen:
            # two rows for one attribute: the second would wrap the first and uninstall() would restore the first
            raise RuntimeError(f"peft-gralora: two patch rows for {getattr(owner, '__name__', owner)}.{attr}")
        seen.add(key)
        if (owner, attr) in _originals:
            continue
        added = attr in GRALORA_FIELDS or getattr(make, "adds_attribute", False)
        current = None if added else _resolve_original(owner, attr)
        replacements.append((owner, attr, make(current)))
    _set(replacements)


def _set(replacements: list[tuple[Any, str, Any]]) -> None:
    for owner, attr, new in replacements:
        _originals[(owner, attr)] = owner.__dict__.get(attr, _MISSING)
        setattr(owner, attr, new)


def _apply_deferred(table: list[tuple[Any, str, Callable[[Any], Any]]]) -> None:
    """Rows of a module imported after :func:`install` (a no-op once uninstalled)."""
    with _lock:
        if _originals:
            _apply(table)


def _make_refusing_init(original: Callable, message: str) -> Callable:
    """``LoraConfig.__init__`` for a peft this package cannot install into: GraLoRA configs raise, plain LoRA runs."""
    import functools
    import inspect

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wanted = {name: kwargs.pop(name) for name in GRALORA_FIELDS if name in kwargs}
        if wanted.get("use_gralora"):
            raise UnsupportedPeftVersionError(f"LoraConfig(use_gralora=True) is not available: {message}")
        original(self, *args, **kwargs)

    # peft passes a saved config's keys through this signature: a GraLoRA adapter must reach the error above
    sig = inspect.signature(original)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in GRALORA_FIELDS]
    var_kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = sig.replace(parameters=params + extra + var_kw)
    return __init__


def auto_install() -> None:
    """What the import hook runs when peft is imported: :func:`install`, and never an exception.

    Where installing fails (peft outside :data:`SUPPORTED_PEFT`, or an error while patching), emits one warning naming
    the supported range and the reason, and patches only ``LoraConfig.__init__`` so that a GraLoRA config raises
    :class:`UnsupportedPeftVersionError` with the fix instead of being dropped or rejected as an unknown argument.
    ``import peft`` and plain LoRA keep working.
    """
    import warnings

    global _refusing
    with _lock:
        try:
            install()
            return
        except Exception as exc:  # whatever went wrong, peft itself must stay importable
            import peft

            if isinstance(exc, UnsupportedPeftVersionError):
                message = str(exc)
            else:
                message = (
                    f"installing GraLoRA into peft {peft.__version__} failed ({type(exc).__name__}: {exc}); "
                    f"{_unsupported_message(peft.__version__)}"
                )
            warnings.warn(f"{message} GraLoRA is disabled; plain peft works as usual.", stacklevel=2)
            if _originals:
                return
            cfg = peft_targets()["LoraConfig"]
            _set([(cfg, "__init__", _make_refusing_init(_resolve_original(cfg, "__init__"), message))])
            _refusing = True


def uninstall() -> None:
    """Restore peft exactly as it was before :func:`install` (a no-op when not installed)."""
    global _refusing
    with _lock:
        _diffusers.unregister_deferred()
        _refusing = False
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
