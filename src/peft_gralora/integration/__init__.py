"""The only package that touches peft internals: installs GraLoRA into the released peft, and takes it out again.

Each module of this package patches one host area and lists its patch rows in ``patches()``: a
:class:`~.patch.Patch` record of owner, attribute, replacement and the reason (``why``), next to the code it concerns.
:func:`patch_table` joins them into the one list that :func:`install` applies; :func:`patch_table_markdown` renders
the table users read (every patch point and why) from those rows. Each patch calls through to peft's original for
everything that is not GraLoRA.

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
from . import diffusers as _diffusers
from . import distributed as _distributed
from . import helpers as _helpers
from . import hotswap as _hotswap
from . import layers as _layers
from . import loading as _loading
from . import lora_config as _lora_config
from . import model as _model
from . import model_card as _model_card
from . import saved_layout as _saved_layout
from . import variant_registry as _variant_registry
from ._targets import peft_targets
from .patch import Patch, render_markdown

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
    "patch_table_markdown",
    "Patch",
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


def patch_table() -> list[Patch]:
    """Every patch row (fields aside) of every module, for the peft / diffusers imported now."""
    return [
        *_lora_config.patches(),
        *_layers.patches(),
        *_model.patches(),
        *_hotswap.patches(),
        *_helpers.patches(),
        *_diffusers.patches(),
        *_loading.patches(),
        *_variant_registry.patches(),
        *_distributed.patches(),
        *_model_card.patches(),
        *_saved_layout.patches(),
    ]


def patch_table_markdown(include_diffusers: bool = True) -> str:
    """The patch table as markdown (``patch point | why``), generated from :func:`patch_table`'s rows.

    Args:
        include_diffusers: also import diffusers' loader modules (when diffusers is installed) so that their rows,
            normally applied when diffusers is imported, are listed too.
    """
    import importlib
    import importlib.util

    if include_diffusers and importlib.util.find_spec("diffusers") is not None:
        for name in _diffusers.deferred_modules():
            importlib.import_module(name)
    rows = patch_table()
    extra = (
        "\n``LoraConfig.__dataclass_fields__`` also gets the three fields ``use_gralora`` / ``gralora_k`` / "
        "``hybrid_r``, so that ``asdict`` / ``replace`` / peft's variant resolver see them. Outside the supported "
        "peft range only ``LoraConfig.__init__`` is patched (a GraLoRA config raises), and with "
        "``PEFT_GRALORA_DISABLE=1`` only ``PeftConfigMixin.from_pretrained`` and ``from_peft_type`` (a GraLoRA "
        "adapter loaded as plain LoRA warns).\n"
    )
    return render_markdown(rows) + extra


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
        # the refusal of auto_install, if in place: its __init__ must not be taken for peft's own; the warning of
        # PEFT_GRALORA_DISABLE=1, if in place: GraLoRA adapters load as GraLoRA from now on
        uninstall()
        from .._disabled_notice import remove as remove_disabled_notice

        remove_disabled_notice()
        table = patch_table()
        cfg = peft_targets()["LoraConfig"]
        fields = _lora_config.gralora_fields()
        _apply(table)
        for name, field in fields.items():
            if name not in cfg.__dataclass_fields__:
                cfg.__dataclass_fields__[name] = field
                _added_fields.append(name)
        # diffusers' loader modules are usually imported after peft: their rows are applied when they are
        _diffusers.register_deferred(_apply_deferred)


def _apply(table: list[Patch]) -> None:
    """Build every replacement of ``table`` (rows already applied skipped), then set them all."""
    # build every replacement before touching anything: an error here leaves peft as it was
    seen: set[tuple[int, str]] = set()
    replacements = []
    for owner, attr, make, _why in table:
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


def _apply_deferred(table: list[Patch]) -> None:
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
        _lora_config.check_fields_need_gralora(False, wanted)
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
    """Context manager: GraLoRA installed inside, the previous state restored on exit.

    Models built inside keep computing GraLoRA after the block; their configs keep the three fields, so
    ``save_pretrained`` after the block still writes a config that reloads as GraLoRA (the model card and the
    safetensors layout entries are written only while installed).
    """
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
