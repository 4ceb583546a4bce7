"""``GraLoraPlugin``: axolotl's plugin API wired to GraLoRA (needs axolotl).

In the YAML::

    plugins:
      - peft_gralora.axolotl.GraLoraPlugin
    adapter: lora            # or qlora
    lora_r: 16
    use_gralora: true
    gralora_k: 2             # optional (default 2)
    hybrid_r: 0              # optional (default 0)

``register`` (the raw config, before axolotl validates) checks the config and switches off what computes plain LoRA
(the fused LoRA kernels; ``merge_method: memory_efficient``); :class:`.args.GraLoraArgs` repeats the checks inside
axolotl's validation; ``get_lora_config_kwargs`` passes the three fields to ``LoraConfig``; ``post_lora_load``
checks that the model really holds the GraLoRA adapter the YAML asks for (``lora_model_dir`` loads the saved one).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from . import _import_hook
from .checks import GraLoraAxolotlError, apply_defaults, check_config, lora_config_kwargs

__all__ = ["GraLoraPlugin"]

LOG = get_logger("axolotl.integrations.peft_gralora")  # axolotl configures its own namespace only


class GraLoraPlugin(BasePlugin):
    """GraLoRA (Granular Low-Rank Adaptation) for ``adapter: lora`` / ``qlora``; see docs/axolotl.md."""

    def get_input_args(self) -> str:
        return "peft_gralora.axolotl.args.GraLoraArgs"

    def register(self, cfg: dict) -> None:
        _import_hook.apply()  # also where the import hook is off (PEFT_GRALORA_DISABLE) or axolotl came first
        check_config(cfg)
        if cfg.get("use_gralora"):
            # the plugin line is an explicit request: install GraLoRA into peft even where the import hook is off
            from .. import install

            install()
            for line in apply_defaults(cfg):
                LOG.info(line)

    def get_lora_config_kwargs(self, cfg: Any) -> dict:
        return lora_config_kwargs(cfg)

    def post_lora_load(self, cfg: Any, model: Any) -> None:
        if not cfg.use_gralora:
            return
        want = lora_config_kwargs(cfg)
        configs = getattr(model, "peft_config", None) or {}
        for name, config in configs.items():
            have = {key: getattr(config, key, None) for key in want}
            if have != want:
                raise GraLoraAxolotlError(
                    f"The loaded adapter {name!r} has {have}, but the config asks for {want} (lora_model_dir loads "
                    "the saved adapter as it is). Make the YAML match the adapter."
                )
        if not configs:
            raise GraLoraAxolotlError("use_gralora is set but the loaded model has no LoRA adapter.")
