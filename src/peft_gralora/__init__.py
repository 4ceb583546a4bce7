"""GraLoRA (Granular Low-Rank Adaptation) as a LoRA variant of Hugging Face PEFT.

After ``pip install peft-gralora``, ``from peft import LoraConfig`` accepts ``use_gralora``, ``gralora_k`` and
``hybrid_r`` in every process (an import hook installs the variant when peft is imported). ``import peft_gralora``
does the same where ``.pth`` files are not processed (``python -S``, ``pip install --target`` + ``PYTHONPATH``,
zipapps, embedded interpreters), before or after ``import peft``, honouring ``PEFT_GRALORA_DISABLE=1``. Importing this
package is cheap: everything below loads on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "install": "integration",
    "uninstall": "integration",
    "is_installed": "integration",
    "gralora_installed": "integration",
    "check_peft_version": "integration",
    "SUPPORTED_PEFT": "integration",
    "GraLoraLinearVariant": "variant",
    "gralora_forward": "functional",
    "gralora_delta_weight": "functional",
    "gralora_add_delta_": "functional",
    "export_lora_factors": "functional",
    "export_lora": "convert",
    "convert_adapter": "convert",
    "adapter_info": "convert",
    "AdapterConversionError": "convert",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    # imported here, not at the top: this package is imported at interpreter start by the .pth hook
    from importlib import import_module

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_gralora' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# what the .pth hook runs: registers the peft import finder (or installs now if peft is already imported); a no-op
# when the hook already ran. Imports only os, sys and the tiny _post_import module.
from . import _hook  # noqa: E402, F401
