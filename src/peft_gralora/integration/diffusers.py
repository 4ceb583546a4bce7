"""Patches of diffusers' LoRA save / load / hotswap paths, and of peft's ``get_peft_model_state_dict`` that feeds them.

A GraLoRA adapter's tensors are LoRA's ``lora_A`` / ``lora_B`` with LoRA's shapes: nothing in a saved file tells the
two apart except the adapter metadata. diffusers writes that metadata only when the caller passes
``<component>_lora_adapter_metadata`` to ``save_lora_weights``; without it, ``load_lora_weights`` builds a plain
``LoraConfig`` from the shapes and computes plain LoRA on GraLoRA weights, without a word. So:

- ``get_peft_model_state_dict`` remembers (weakly) which GraLoRA config the tensors it returns belong to. The tensors
  survive diffusers' key conversions (``convert_state_dict_to_diffusers`` renames keys, keeps tensors).
- ``LoraBaseMixin._save_lora_weights`` (every pipeline's ``save_lora_weights`` ends there) writes that config as the
  component's adapter metadata when the caller passed none, and refuses metadata that contradicts it, a state dict
  that mixes GraLoRA tensors with unknown ones, and ``safe_serialization=False`` (torch.save files carry no metadata).
- ``PeftAdapterMixin.save_lora_adapter`` refuses ``safe_serialization=False`` for a GraLoRA adapter (same reason).
- ``_create_lora_config`` (where ``load_lora_adapter`` / the text-encoder loader turn a state dict into a config)
  takes the remembered config for an in-memory GraLoRA state dict passed without metadata, refuses metadata that
  contradicts it, and, for ``hotswap=True`` with a GraLoRA adapter on either side, runs peft's (GraLoRA-exact)
  hotswap before diffusers' hotswap ``try`` block, whose error handler deletes the resident adapter: a refused swap
  then leaves the resident adapter as it was.

Copies of the tensors (``.to(torch.bfloat16)``, ``.clone()``) are recognised by a sample of their values while the
model they came from lives. What cannot be known: a file written without metadata by other code, or in another
process, is indistinguishable from a plain LoRA file and loads as plain LoRA.

diffusers' loader modules are usually imported after peft (and so after :func:`peft_gralora.integration.install`):
their rows are applied by a post-import finder the moment each module has finished executing.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib.util
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .._post_import import PostImportFinder
from ..config import GRALORA_FIELDS
from .patch import Patch

__all__ = ["patches", "deferred_modules", "register_deferred", "unregister_deferred", "gralora_metadata_of"]

LORA_BASE = "diffusers.loaders.lora_base"
LOADERS_PEFT = "diffusers.loaders.peft"
_FIELD_DEFAULTS = {name: default for name, (_, default, _) in GRALORA_FIELDS.items()}

# --- which GraLoRA config a tensor came from ---

# id(tensor) -> (weakref to the tensor, config dict); and the same keyed by the tensor's memory, for tensors that share
# it (``.detach()``, a ``.to()`` that copies nothing). A live entry keeps its tensor's storage alive, so an address
# match with a live entry cannot be a reused address.
_BY_ID: dict[int, tuple[weakref.ref, dict]] = {}
_BY_MEMORY: dict[tuple, tuple[weakref.ref, dict]] = {}


def _memory_key(tensor: torch.Tensor) -> tuple | None:
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / sparse / wrapper tensors
        return None
    if not ptr:
        return None
    return (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)


def _remember(tensor: torch.Tensor, meta: dict) -> None:
    keys = [(_BY_ID, id(tensor)), (_BY_MEMORY, _memory_key(tensor))]

    def forget(ref: weakref.ref) -> None:
        for table, key in keys:
            if key is not None and table.get(key, (None,))[0] is ref:
                del table[key]

    ref = weakref.ref(tensor, forget)
    for table, key in keys:
        if key is not None:
            table[key] = (ref, meta)


# Copies (``.to(torch.bfloat16)``, ``.clone()``, ``.cpu()`` of a GPU tensor) have neither identity nor memory in
# common with what get_peft_model_state_dict returned: they are recognised by value, for as long as the model lives.
# A copy's values are exactly the original's cast to the copy's dtype, so the comparison is exact: another adapter's
# tensor (even one trained from the same initialisation) does not pass for it.
# shape -> {(id(model), adapter, key): (weakref to the model, sample of values, config dict)}
_BY_VALUES: dict[tuple, dict[tuple, tuple[weakref.ref, torch.Tensor, dict]]] = {}
_SAMPLE_SIZE = 32


def _sample(tensor: torch.Tensor) -> torch.Tensor | None:
    """``_SAMPLE_SIZE`` evenly spaced values (own dtype, on CPU), or None for an empty / all-zero / meta tensor."""
    if tensor.is_meta or tensor.numel() == 0 or not tensor.is_floating_point():
        return None
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(_SAMPLE_SIZE, flat.numel()), device=flat.device).long()
    sample = flat[index].cpu()
    # zeros say nothing about where a tensor came from (an untrained lora_B of any adapter is zero)
    return sample if bool(sample.abs().max() > 0) else None


def _remember_values(model: Any, adapter_name: str, key: str, tensor: torch.Tensor, meta: dict) -> None:
    sample = _sample(tensor)
    if sample is None:
        return
    table = _BY_VALUES.setdefault(tuple(tensor.shape), {})
    slot = (id(model), adapter_name, key)

    def forget(ref: weakref.ref) -> None:
        if table.get(slot, (None,))[0] is ref:
            del table[slot]

    try:
        ref = weakref.ref(model, forget)
    except TypeError:  # not weak-referenceable: no recognition of copies
        return
    table[slot] = (ref, sample, meta)


def _by_values(tensor: torch.Tensor) -> dict | None:
    candidates = _BY_VALUES.get(tuple(tensor.shape))
    sample = _sample(tensor) if candidates else None
    if sample is None:
        return None
    for ref, known, meta in list(candidates.values()):
        if ref() is not None and torch.equal(sample, known.to(sample.dtype)):
            return meta
    return None


def gralora_metadata_of(tensor: Any) -> dict | None:
    """The config dict of the GraLoRA adapter ``tensor`` was returned for by ``get_peft_model_state_dict`` (or a
    tensor sharing its memory, or a copy of it while its model lives), else None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    entry = _BY_ID.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        return entry[1]
    key = _memory_key(tensor)
    entry = _BY_MEMORY.get(key) if key is not None else None
    if entry is not None and entry[0]() is not None:
        return entry[1]
    return _by_values(tensor)


def _gralora_triple(meta: dict | None) -> tuple:
    meta = meta or {}
    return tuple(meta.get(name, default) for name, default in _FIELD_DEFAULTS.items())


def _is_gralora_meta(meta: dict | None) -> bool:
    return bool((meta or {}).get("use_gralora", False))


def _make_get_peft_model_state_dict(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        _apply_finished()
        result = original(model, state_dict, adapter_name, *args, **kwargs)
        config = getattr(model, "peft_config", {}).get(adapter_name)
        if getattr(config, "use_gralora", False):
            meta = _config_dict(config)
            for key, tensor in result.items():
                if ".lora_" in key and isinstance(tensor, torch.Tensor):
                    _remember(tensor, meta)
                    _remember_values(model, adapter_name, key, tensor, meta)
        return result

    return get_peft_model_state_dict


def _config_dict(config: Any) -> dict:
    """``config.to_dict()`` in the JSON-ready form diffusers writes into the file's adapter metadata."""
    meta = copy.deepcopy(config.to_dict())
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


# --- what a state dict says about itself ---


def _lora_tensors(state_dict: dict) -> dict[str, Any]:
    # "lora" anywhere: diffusers' own key formats (``lora.down``, ``lora_linear_layer``) and peft's (``lora_A``)
    return {k: v for k, v in state_dict.items() if "lora" in k and isinstance(v, torch.Tensor)}


def _remembered_config(state_dict: dict, where: str, fix: str, vouched: bool = False) -> dict | None:
    """The one GraLoRA config behind ``state_dict``'s LoRA tensors; None when no tensor is a GraLoRA one.

    Raises:
        ValueError: the tensors come from several GraLoRA configs, or (unless the caller ``vouched`` for the dict by
            passing GraLoRA metadata) mix GraLoRA tensors with unknown ones.
    """
    lora = _lora_tensors(state_dict)
    found = {key: gralora_metadata_of(t) for key, t in lora.items()}
    metas = {id(m): m for m in found.values() if m is not None}
    if not metas:
        return None
    layouts = {repr(sorted(m.items(), key=lambda kv: kv[0])) for m in metas.values()}
    if len(layouts) > 1:
        raise ValueError(
            f"{where}: the LoRA tensors come from {len(layouts)} different GraLoRA adapters (configs), which one "
            f"adapter metadata cannot describe. Save each adapter separately, or {fix}."
        )
    unknown = [key for key, m in found.items() if m is None]
    if unknown and not vouched:
        raise ValueError(
            f"{where}: the state dict mixes tensors of a GraLoRA adapter with {len(unknown)} LoRA tensors of unknown "
            f"origin (e.g. {unknown[0]!r}: a copy, or another adapter), so it is not known whether they are GraLoRA. "
            f"Pass the tensors returned by get_peft_model_state_dict, or {fix}."
        )
    return next(iter(metas.values()))


def _check_consistent(given: dict, remembered: dict, where: str, fix: str) -> None:
    if _gralora_triple(given) != _gralora_triple(remembered):
        names = tuple(_FIELD_DEFAULTS)
        raise ValueError(
            f"{where}: the adapter metadata says {dict(zip(names, _gralora_triple(given), strict=True))}, but the "
            f"tensors belong to a GraLoRA adapter with {dict(zip(names, _gralora_triple(remembered), strict=True))}; "
            f"loading would compute another adapter. {fix}"
        )


# --- save ---


def _module_has_gralora(module: torch.nn.Module) -> bool:
    from ..variant import is_gralora_adapter

    return any(is_gralora_adapter(m, name) for m in module.modules() for name in getattr(m, "lora_variant", {}) or {})


def _metadata_for_save(prefix: str, layers: Any, given: dict | None, safe_serialization: bool) -> dict | None:
    """The adapter metadata to write for one component: ``given``, or the remembered GraLoRA config."""
    arg = f"{prefix}_lora_adapter_metadata"
    where = f"save_lora_weights({prefix}_lora_layers=...)"
    fix = f"pass {arg}=<model>.peft_config[<adapter>].to_dict()"
    if isinstance(layers, torch.nn.Module):
        remembered = None
        if _module_has_gralora(layers) and not _is_gralora_meta(given):
            raise ValueError(
                f"{where}: the module holds GraLoRA adapters, but no GraLoRA adapter metadata was given, so the "
                f"file would load as plain LoRA. {fix[0].upper()}{fix[1:]}."
            )
    else:
        remembered = _remembered_config(layers, where, fix, vouched=_is_gralora_meta(given))
    gralora = remembered is not None or _is_gralora_meta(given)
    if gralora and not safe_serialization:
        raise ValueError(
            f"{where}: GraLoRA adapters need safe_serialization=True. Their layout lives only in the adapter "
            "metadata of the safetensors header; a torch.save file has none and would load as plain LoRA."
        )
    if remembered is None:
        return given
    if not given:
        return copy.deepcopy(remembered)
    _check_consistent(given, remembered, where, f"Pass {arg} of the adapter you save (or none: it is filled in).")
    return given


def _write_card(save_directory: Any, adapters: dict) -> None:
    """The GraLoRA model card next to a diffusers LoRA file (GraLoRA components / adapters only)."""
    from .model_card import write_gralora_model_card

    if isinstance(save_directory, (str, os.PathLike)) and os.path.isdir(save_directory):
        write_gralora_model_card(save_directory, {name: meta for name, meta in adapters.items() if meta})


def _make_save_lora_weights(original: Any) -> classmethod:
    func = original.__func__

    @functools.wraps(func)
    def _save_lora_weights(cls, save_directory, lora_layers, lora_metadata, *args, **kwargs):
        safe = kwargs.get("safe_serialization", args[3] if len(args) > 3 else True)
        lora_metadata = dict(lora_metadata)
        for prefix, layers in lora_layers.items():
            lora_metadata[prefix] = _metadata_for_save(prefix, layers, lora_metadata.get(prefix), safe)
        result = func(cls, save_directory, lora_layers, lora_metadata, *args, **kwargs)
        _write_card(save_directory, lora_metadata)
        return result

    return classmethod(_save_lora_weights)


def _make_save_lora_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_lora_adapter(self, save_directory, adapter_name="default", *args, **kwargs):
        safe = kwargs.get("safe_serialization", args[1] if len(args) > 1 else True)
        if adapter_name is None:
            from diffusers.utils import get_adapter_name

            adapter_name = get_adapter_name(self)
        config = getattr(self, "peft_config", {}).get(adapter_name)
        if getattr(config, "use_gralora", False) and not safe:
            raise ValueError(
                f"save_lora_adapter({adapter_name!r}): GraLoRA adapters need safe_serialization=True. Their layout "
                "lives only in the adapter metadata of the safetensors header; a torch.save file has none and would "
                "load as plain LoRA."
            )
        result = original(self, save_directory, adapter_name, *args, **kwargs)
        if getattr(config, "use_gralora", False):
            _write_card(save_directory, {adapter_name: config})
        return result

    return save_lora_adapter


# --- load and hotswap ---


def _make_enable_lora_hotswap(original: Callable) -> Callable:
    @functools.wraps(original)
    def enable_lora_hotswap(self, *args, target_hybrid_r: int | None = None, **kwargs):
        """diffusers' ``enable_lora_hotswap``, plus ``target_hybrid_r`` (GraLoRA): the hybrid rank the padded GraLoRA
        adapters get, to make room for incoming adapters with a larger hybrid branch (see peft's
        ``prepare_model_for_compiled_hotswap`` as patched by :mod:`.hotswap`)."""
        original(self, *args, **kwargs)
        if target_hybrid_r is not None:
            self._prepare_lora_hotswap_kwargs = {
                **self._prepare_lora_hotswap_kwargs,
                "target_hybrid_r": target_hybrid_r,
            }

    return enable_lora_hotswap


# (model, hotswap) of the load_lora_adapter call in progress: _create_lora_config does not receive them
_LOADING: contextvars.ContextVar[tuple[Any, bool] | None] = contextvars.ContextVar("gralora_diffusers_load")


def _make_load_lora_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        token = _LOADING.set((self, bool(hotswap)))
        try:
            return original(self, pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap, **kwargs)
        finally:
            _LOADING.reset(token)

    return load_lora_adapter


def _hotswap_key(key: str, adapter_name: str) -> str:
    # the keys diffusers' hotswap hands to peft carry the adapter name, as in the model's own state dict
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
        if key.endswith(suffix):
            stem, _, leaf = key.rpartition(".")
            return f"{stem}.{adapter_name}.{leaf}"
    return key


def _hotswap_now(model: Any, adapter_name: str, incoming: Any, state_dict: dict) -> None:
    """Run the hotswap of a GraLoRA adapter (resident or incoming) before diffusers' hotswap block.

    peft's hotswap (made GraLoRA-exact by :mod:`.hotswap`) refuses what it cannot place before any weight changes,
    but diffusers' block around it deletes the resident adapter on any error. Run here, the refusal leaves the
    resident adapter as it was. When it succeeds, diffusers repeats the same swap (same tensors, same result); the
    incoming tensors are cloned here because peft may adopt them (``swap_tensors``) for a larger rank.
    """
    resident = getattr(model, "peft_config", {}).get(adapter_name)
    if resident is None or not (getattr(resident, "use_gralora", False) or getattr(incoming, "use_gralora", False)):
        return  # a missing adapter is diffusers' own error; plain LoRA into plain LoRA is peft's business
    from peft.utils import hotswap as peft_hotswap

    peft_hotswap.check_hotswap_configs_compatible(resident, incoming)
    mapped = {_hotswap_key(key, adapter_name): value.clone() for key, value in state_dict.items()}
    peft_hotswap.hotswap_adapter_from_state_dict(
        model=model, state_dict=mapped, adapter_name=adapter_name, config=incoming
    )


def _make_create_lora_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def _create_lora_config(state_dict, network_alphas, metadata, rank_pattern_dict, *args, **kwargs):
        where = "load_lora_adapter / load_lora_weights"
        fix = "pass metadata=<model>.peft_config[<adapter>].to_dict() (load_lora_adapter) or save with it"
        remembered = _remembered_config(state_dict, where, fix, vouched=_is_gralora_meta(metadata))
        if remembered is not None:
            if metadata is None:
                metadata = copy.deepcopy(remembered)
            else:
                _check_consistent(metadata, remembered, where, "Pass the metadata of the adapter you load, or none.")
        config = original(state_dict, network_alphas, metadata, rank_pattern_dict, *args, **kwargs)
        loading = _LOADING.get(None)
        if loading is not None and loading[1]:
            _hotswap_now(loading[0], kwargs.get("adapter_name"), config, state_dict)
        return config

    return _create_lora_config


# --- patch rows ---


def _peft_rows() -> list[Patch]:
    import peft
    import peft.utils
    from peft.utils import save_and_load

    owners = [save_and_load, peft.utils, peft]
    why = (
        "remembers (weakly) which GraLoRA config the returned tensors belong to, so that diffusers' save can write "
        "it (the tensors look like plain LoRA)"
    )
    return [Patch(owner, "get_peft_model_state_dict", _make_get_peft_model_state_dict, why) for owner in owners]


_WHY_CREATE = (
    "takes the remembered config for a GraLoRA state dict passed without metadata, refuses contradicting metadata; "
    "runs a GraLoRA hotswap before diffusers' hotswap block, whose error handler would delete the resident adapter "
    "on a refusal (patched in both modules that import it by name)"
)


def _module_rows(name: str) -> list[Patch]:
    module = sys.modules[name]
    if name == LORA_BASE:
        return [
            Patch(
                module.LoraBaseMixin,
                "_save_lora_weights",
                _make_save_lora_weights,
                "every pipeline's save_lora_weights ends here: writes the remembered GraLoRA config as the "
                "component's adapter metadata when none is given; refuses contradicting metadata, mixed state dicts "
                "and safe_serialization=False; writes the GraLoRA model card",
            ),
            Patch(module, "_create_lora_config", _make_create_lora_config, _WHY_CREATE),
        ]
    return [
        Patch(
            module.PeftAdapterMixin,
            "load_lora_adapter",
            _make_load_lora_adapter,
            "tells _create_lora_config which model loads and whether it hotswaps",
        ),
        Patch(
            module.PeftAdapterMixin,
            "save_lora_adapter",
            _make_save_lora_adapter,
            "refuses safe_serialization=False for a GraLoRA adapter (torch.save files carry no metadata and would "
            "load as plain LoRA); writes the GraLoRA model card",
        ),
        Patch(
            module.PeftAdapterMixin,
            "enable_lora_hotswap",
            _make_enable_lora_hotswap,
            "also accepts target_hybrid_r (passed on to peft's prepare_model_for_compiled_hotswap): room for larger "
            "hybrid branches",
        ),
        Patch(module, "_create_lora_config", _make_create_lora_config, _WHY_CREATE),
    ]


_MARKERS = {LORA_BASE: "LoraBaseMixin", LOADERS_PEFT: "PeftAdapterMixin"}


def _loaded(name: str) -> bool:
    """Whether diffusers module ``name`` has finished executing (not merely started: it may be importing peft)."""
    return hasattr(sys.modules.get(name), _MARKERS[name])


def patches() -> list[Patch]:
    """The patch rows of peft's state-dict function and of the diffusers loader modules already imported; the others
    come through :func:`register_deferred`."""
    rows = _peft_rows()
    for name in _MARKERS:
        if _loaded(name):
            rows += _module_rows(name)
    return rows


def deferred_modules() -> list[str]:
    """diffusers loader modules not imported yet, whose rows :func:`register_deferred` applies on import."""
    return [name for name in _MARKERS if not _loaded(name)]


# the post-import finder of the loader modules still pending, and what applies their rows (None when none is)
_finder: PostImportFinder | None = None


def _apply_finished() -> None:
    """Apply the rows of pending modules that finished executing without the finder seeing them (a module that was
    already executing when GraLoRA was installed: only possible if it imported peft first)."""
    finder = _finder
    if finder is None:
        return
    finished = [name for name in finder.names if _loaded(name)]
    for name in finished:
        finder.executing(name)
    for name in finished:
        finder.callback(sys.modules[name])


def register_deferred(apply: Callable[[list], None]) -> None:
    """Apply the rows of each diffusers loader module not imported yet, through ``apply``, once it is imported."""
    global _finder
    pending = deferred_modules()
    if not pending or importlib.util.find_spec("diffusers") is None:
        return
    unregister_deferred()
    _finder = PostImportFinder(pending, lambda module: apply(_module_rows(module.__name__)))
    _finder.register()


def unregister_deferred() -> None:
    """Remove the post-import finder (nothing is applied to diffusers modules imported later)."""
    global _finder
    if _finder is not None:
        _finder.unregister()
        _finder = None
