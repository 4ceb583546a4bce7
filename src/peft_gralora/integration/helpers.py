"""Patches of peft's other public helpers that read or write LoRA factors as ``B @ A``: each refuses GraLoRA
adapters clearly, before it changes anything (plain LoRA adapters go straight to peft's function).

The helpers that are already right for GraLoRA (they go through ``get_delta_weight``, move whole tensors, or cast
dtypes) are not patched; the README's table lists every helper with its status and test.

- ``replace_lora_weights_loftq`` writes a plain rank-``r`` SVD of the quantization error into ``lora_A`` / ``lora_B``;
- ``reduce_intruder_dimension`` writes a plain rank-``r`` SVD into a copy of the adapter's (GraLoRA) config;
- ``create_lorafa_optimizer`` / ``create_riemannian_optimizer`` precondition the gradients with ``(A A^T)^-1`` /
  ``(B^T B)^-1``, the metric of ``delta W = B @ A``;
- ``create_arrow_model`` builds its router from each expert's plain ``B @ A``;
- ``LoraModel.subtract_mutated_init`` (``save_pretrained(path_initial_model_for_weight_conversion=...)``) stacks the
  trained and the initial factors as one plain LoRA adapter of rank ``2 r``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..variant import is_gralora_adapter
from .patch import Patch

__all__ = ["patches"]

_EXPORT_HINT = (
    "Export the GraLoRA adapter to its exact plain LoRA form first (peft_gralora.export_lora, or peft's "
    "convert_to_lora / save_as_lora at rank gralora_k * (r - hybrid_r) + hybrid_r), then use {what} on that."
)


def _refusal(what: str, adapters: Any, why: str) -> ValueError:
    return ValueError(
        f"{what} does not support GraLoRA adapters ({adapters}): {why}, which is not how a GraLoRA adapter reads "
        f"its lora_A / lora_B weights, so the result would be silently wrong. " + _EXPORT_HINT.format(what=what)
    )


def _gralora_adapters(model: Any, trainable_only: bool = False) -> list[str]:
    """Names of the GraLoRA adapters on ``model``'s LoRA layers (those with trainable factors if asked)."""
    from peft.tuners.lora import LoraLayer

    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                if is_gralora_adapter(module, name) and (
                    not trainable_only or module.lora_A[name].weight.requires_grad
                ):
                    names[name] = None
    return list(names)


def _config_is_gralora(model: Any, adapter_name: str) -> bool:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    return bool(getattr(config, "use_gralora", False))


def _make_replace_lora_weights_loftq(original: Callable) -> Callable:
    @functools.wraps(original)
    def replace_lora_weights_loftq(peft_model, model_path=None, adapter_name="default", callback=None):
        if _config_is_gralora(peft_model, adapter_name):
            raise _refusal(
                "replace_lora_weights_loftq",
                adapter_name,
                "it writes a plain rank-r SVD of the quantization error into lora_A / lora_B",
            )
        return original(peft_model, model_path=model_path, adapter_name=adapter_name, callback=callback)

    return replace_lora_weights_loftq


def _make_reduce_intruder_dimension(original: Callable) -> Callable:
    @functools.wraps(original)
    def reduce_intruder_dimension(peft_model, old_adapter_name="default", *args, **kwargs):
        if _config_is_gralora(peft_model, old_adapter_name):
            raise _refusal(
                "reduce_intruder_dimension",
                old_adapter_name,
                "it writes a plain rank-r SVD of the mitigated delta into an adapter with the same (GraLoRA) config, "
                "and a rank-r SVD cannot hold a GraLoRA delta of rank up to gralora_k * r",
            )
        return original(peft_model, old_adapter_name, *args, **kwargs)

    return reduce_intruder_dimension


def _make_optimizer_factory(name: str) -> Callable[[Callable], Callable]:
    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def create_optimizer(model, *args, **kwargs):
            found = _gralora_adapters(model, trainable_only=True)
            if found:
                raise _refusal(
                    name,
                    found,
                    "its update preconditions the lora_A / lora_B gradients with the metric of delta W = B @ A",
                )
            return original(model, *args, **kwargs)

        return create_optimizer

    return make


def _make_create_arrow_model(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_arrow_model(base_model, task_specific_adapter_paths, arrow_config, general_adapter_paths=None, **kw):
        from peft import PeftConfig
        from peft.tuners.lora.arrow import _resolve_adapter_source

        found = []
        for path in [*(task_specific_adapter_paths or []), *(general_adapter_paths or [])]:
            model_id, subfolder = _resolve_adapter_source(path)
            extra = {"subfolder": subfolder} if subfolder is not None else {}
            if getattr(PeftConfig.from_pretrained(model_id, **extra), "use_gralora", False):
                found.append(path)
        if found:
            raise _refusal("create_arrow_model", found, "Arrow routes with prototypes taken from each expert's B @ A")
        return original(base_model, task_specific_adapter_paths, arrow_config, general_adapter_paths, **kw)

    return create_arrow_model


def _make_subtract_mutated_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def subtract_mutated_init(self, output_state_dict, adapter_name, kwargs=None):
        if _config_is_gralora(self, adapter_name):
            raise ValueError(
                "save_pretrained(path_initial_model_for_weight_conversion=...) / subtract_mutated_init does not "
                f"support GraLoRA adapters ({adapter_name!r}): it stacks the trained and the initial factors as one "
                "plain LoRA adapter of rank 2r, which misplaces GraLoRA blocks. GraLoRA adapters start from zero "
                "(init_lora_weights=True / 'gaussian' / False never change the base model), so save without "
                "path_initial_model_for_weight_conversion."
            )
        return original(self, output_state_dict, adapter_name, kwargs)

    return subtract_mutated_init


_WHY = (
    "refuses GraLoRA adapters before changing anything: it writes or reads the factors as a plain B @ A (patched in "
    "every peft module that binds it); plain LoRA goes to peft's function"
)


def patches() -> list[Patch]:
    """The patch rows of every module that binds a refused helper (users import them from ``peft``, ``peft.utils``,
    ``peft.optimizers``, ...)."""
    import importlib.util

    from ._targets import modules_binding, peft_targets

    rows: list[Patch] = []
    table = [
        (
            "replace_lora_weights_loftq",
            "peft.utils.loftq_utils",
            _make_replace_lora_weights_loftq,
        ),
        ("reduce_intruder_dimension", "peft.tuners.lora.intruders", _make_reduce_intruder_dimension),
        (
            "create_lorafa_optimizer",
            "peft.optimizers.lorafa",
            _make_optimizer_factory("create_lorafa_optimizer"),
        ),
        (
            "create_riemannian_optimizer",
            "peft.optimizers.riemannian",
            _make_optimizer_factory("create_riemannian_optimizer"),
        ),
        (
            "create_arrow_model",
            "peft.tuners.lora.arrow",
            _make_create_arrow_model,
        ),
    ]
    for name, defining, make in table:
        # a helper this peft does not have yet (peft 0.20 has no Riemannian optimizer) has nothing to refuse
        if importlib.util.find_spec(defining) is not None:
            rows.extend(Patch(owner, name, make, _WHY) for owner in modules_binding(defining, name))
    rows.append(Patch(peft_targets()["LoraModel"], "subtract_mutated_init", _make_subtract_mutated_init, _WHY))
    return rows
