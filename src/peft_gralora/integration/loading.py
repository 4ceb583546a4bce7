"""Patches of adapter loading: adapters saved by the GraLoRA PEFT fork load exactly, on every path.

The GraLoRA PEFT fork saves ``LoraConfig(use_gralora=True)`` adapters whose trained weights are ``gralora_A`` /
``gralora_B`` [/ ``gralora_{A,B}_general``] (upstream ``GraloraConfig``'s layout) next to ``lora_A`` / ``lora_B``
weights its forward never reads (``lora_B`` stays zero). Loaded as they are, peft would read those dead weights as
GraLoRA's and drop the real ones: the base model's outputs, without a word. Here such a state dict is recognised by
its keys (never by shapes), converted in memory by :func:`peft_gralora.convert.fork_to_variant_state_dict` (a pure
reshape: exact) and announced in one log line; a partial or mixed file is refused before any weight is loaded.

Two choke points cover every load path:

- ``set_peft_model_state_dict``: where every peft path puts saved adapter weights into a model
  (``PeftModel.from_pretrained`` and ``load_adapter``, with ``low_cpu_mem_usage`` / ``is_trainable`` too; transformers
  4's ``model.load_adapter``; diffusers' and xlora's loaders). peft's modules import it by name, so each module of peft
  that holds peft's function gets the wrapper (``peft.utils.save_and_load``, ``peft.utils``, ``peft``,
  ``peft.peft_model``, ``peft.functional``, ...); callers that import it at call time find the patched attribute.
- transformers' ``PeftAdapterMixin.load_adapter``: transformers 5 reads adapter files with its own weight loader, not
  through peft (``model.load_adapter`` and ``AutoModelFor*.from_pretrained(adapter_dir)``). For a GraLoRA config whose
  weights are in the fork's layout, the wrapper hands transformers the converted state dict (its own
  ``peft_config`` / ``adapter_state_dict`` arguments); everything else goes to transformers untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from ..convert import AdapterConversionError, fork_to_variant_state_dict, has_fork_layout
from ._targets import modules_binding
from .model import _remove_injected
from .patch import Patch
from .saved_layout import check_loaded_state_dict

__all__ = ["patches", "convert_fork_state_dict"]

logger = logging.getLogger("peft_gralora")

# hub arguments that peft's PeftConfig.from_pretrained / load_peft_weights understand
_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


def _is_lora(config: Any) -> bool:
    return str(getattr(config, "peft_type", "")) in ("LORA", "PeftType.LORA")


def convert_fork_state_dict(config: Any, state_dict: dict[str, Any], adapter_name: str) -> dict[str, Any]:
    """``state_dict`` in this package's layout if it is in the GraLoRA fork's, else ``state_dict`` itself.

    Args:
        config: the adapter's peft config (anything else than a ``LoraConfig`` passes through).
        state_dict: the saved adapter weights (keys without the adapter name).
        adapter_name: for the messages.

    Raises:
        AdapterConversionError: (a ``ValueError``) fork-layout weights under a plain LoRA config (they would load as
            the base model), or a fork state dict that is partial, mixed or inconsistent (naming the module). Raised
            before any weight is loaded.
    """
    if not _is_lora(config) or not has_fork_layout(state_dict):
        return state_dict
    if not getattr(config, "use_gralora", False):
        example = next(key for key in state_dict if "gralora_" in key)
        raise AdapterConversionError(
            f"The weights of adapter {adapter_name!r} are GraLoRA weights saved by the GraLoRA PEFT fork (e.g. "
            f"{example!r}), but its LoraConfig has use_gralora=False, so they would load as plain LoRA (the base "
            "model's outputs). Load it with the adapter's own adapter_config.json (use_gralora: true), or pass a "
            "LoraConfig(use_gralora=True, gralora_k=..., hybrid_r=...) matching it."
        )
    result = fork_to_variant_state_dict(
        state_dict,
        gralora_k=config.gralora_k,
        hybrid_r=config.hybrid_r,
        lora_bias=bool(getattr(config, "lora_bias", False)),
        use_dora=bool(getattr(config, "use_dora", False)),
        init_lora_weights=getattr(config, "init_lora_weights", True),
    )
    note = ""
    if result.ignored_bias:
        note = (
            f"; the non-zero lora_B biases of {result.ignored_bias} were never used by the fork's forward and load as "
            "zeros"
        )
    logger.warning(
        "peft-gralora: adapter %r was saved by the GraLoRA PEFT fork (gralora_A / gralora_B weights, %d modules); "
        "converted exactly to this package's layout, its unused lora_A / lora_B dropped%s. save_pretrained now "
        "writes this package's layout.",
        adapter_name,
        len(result.modules),
        note,
    )
    return result.tensors


def _make_set_peft_model_state_dict(original: Callable) -> Callable:
    @functools.wraps(original)
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args: Any, **kwargs: Any):
        configs = getattr(model, "peft_config", None)
        config = configs.get(adapter_name) if isinstance(configs, dict) else None
        check_loaded_state_dict(peft_model_state_dict, config)
        state_dict = convert_fork_state_dict(config, peft_model_state_dict, adapter_name)
        return original(model, state_dict, adapter_name, *args, **kwargs)

    return set_peft_model_state_dict


def _make_peft_load_adapter(original: Callable) -> Callable:
    """``PeftModel.load_adapter`` adds the new adapter before it reads the weights: when they are refused, take it out
    again (layers it wrapped unwrapped, its config dropped), so that a refused file leaves the model as it was."""

    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args: Any, **kwargs: Any):
        from peft.tuners.tuners_utils import BaseTunerLayer

        existed = adapter_name in self.peft_config
        layers = {name: m for name, m in self.named_modules() if isinstance(m, BaseTunerLayer)}
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except AdapterConversionError:
            if not existed and adapter_name in self.peft_config:
                _remove_injected(self, adapter_name, layers)
                del self.peft_config[adapter_name]
            raise

    return load_adapter


# ---------------------------------------------------------------------------------------------------------------------
# transformers' own adapter loader
# ---------------------------------------------------------------------------------------------------------------------


def _hub_kwargs(arguments: dict[str, Any]) -> dict[str, Any]:
    """The download arguments transformers' ``load_adapter`` was given, in the names peft's readers take."""
    found: dict[str, Any] = {}
    load_config = arguments.get("load_config")
    sources = [
        getattr(load_config, "download_kwargs", None) or {},
        arguments.get("kwargs") or {},
        {name: arguments[name] for name in _HUB_KWARGS if arguments.get(name) is not None},
        arguments.get("adapter_kwargs") or {},
    ]
    for source in sources:
        found.update({name: value for name, value in source.items() if name in _HUB_KWARGS and value is not None})
    if not found.get("subfolder"):
        found.pop("subfolder", None)
    return found


def _read_config(model_id: str, hub: dict[str, Any]) -> Any:
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(model_id, **hub)
    except (ValueError, OSError):
        return None  # not an adapter (transformers raises its own error for that)


def _local_weights_file(model_id: str, hub: dict[str, Any]) -> str | None:
    path = os.path.join(model_id, hub.get("subfolder", ""), "adapter_model.safetensors")
    return path if os.path.isfile(path) else None


def _may_hold_fork_weights(model_id: str, hub: dict[str, Any]) -> bool:
    """Cheap answer for local safetensors files (their header only); True where only reading them can tell."""
    path = _local_weights_file(model_id, hub)
    if path is None:
        return True
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return has_fork_layout(f.keys())


def _fork_arguments(arguments: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """``(peft_config, converted state dict)`` when ``load_adapter`` is about to load a fork-layout GraLoRA adapter."""
    config, state_dict = arguments.get("peft_config"), arguments.get("adapter_state_dict")
    load_config = arguments.get("load_config")
    model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
    hub = _hub_kwargs(arguments)
    if config is None:
        if model_id is None:
            return None
        config = _read_config(model_id, hub)
    if not _is_lora(config) or not getattr(config, "use_gralora", False):
        return None
    if state_dict is None:
        if model_id is None or not _may_hold_fork_weights(model_id, hub):
            return None
        from peft.utils import load_peft_weights

        state_dict = load_peft_weights(model_id, device="cpu", **hub)
    if not has_fork_layout(state_dict):
        return None
    adapter_name = arguments.get("adapter_name") or "default"
    return config, convert_fork_state_dict(config, state_dict, adapter_name)


def _make_load_adapter(original: Callable) -> Callable:
    import transformers

    signature = inspect.signature(original)
    # transformers 4 reads the file again whenever it has a peft_model_id, even next to an adapter_state_dict
    rereads_file = int(transformers.__version__.split(".")[0]) < 5

    @functools.wraps(original)
    def load_adapter(self, *args: Any, **kwargs: Any):
        bound = signature.bind(self, *args, **kwargs)
        fork = _fork_arguments(bound.arguments)
        if fork is not None:
            bound.arguments["peft_config"], bound.arguments["adapter_state_dict"] = fork
            if rereads_file:
                bound.arguments["peft_model_id"] = None
        return original(*bound.args, **bound.kwargs)

    return load_adapter


def patches() -> list[Patch]:
    """The patch rows of adapter loading."""
    from peft import PeftModel
    from transformers.integrations.peft import PeftAdapterMixin

    holders = modules_binding("peft.utils.save_and_load", "set_peft_model_state_dict")
    return [
        *[
            Patch(
                module,
                "set_peft_model_state_dict",
                _make_set_peft_model_state_dict,
                "every peft load path ends here: a state dict saved by the GraLoRA PEFT fork (gralora_A / gralora_B "
                "keys) is converted exactly to this package's layout, a partial or mixed one refused",
            )
            for module in holders
        ],
        Patch(
            PeftModel,
            "load_adapter",
            _make_peft_load_adapter,
            "a refused file leaves no half-added adapter behind (peft adds the adapter before it reads the weights)",
        ),
        Patch(
            PeftAdapterMixin,
            "load_adapter",
            _make_load_adapter,
            "transformers 5 loads adapter files without peft: a fork-layout GraLoRA adapter is handed over converted "
            "(its adapter_state_dict argument); everything else goes to transformers untouched",
        ),
    ]
