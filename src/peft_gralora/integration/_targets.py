"""Where peft's patched classes live in this environment (imported lazily: peft is imported by then)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["peft_targets", "bnb_targets", "modules_binding", "adds"]


def peft_targets() -> dict[str, Any]:
    from peft.tuners.lora import LoraConfig, LoraModel
    from peft.tuners.lora import dora as lora_dora
    from peft.tuners.lora import layer as lora_layer

    return {"LoraConfig": LoraConfig, "LoraModel": LoraModel, "Linear": lora_layer.Linear, "dora": lora_dora}


def bnb_targets() -> dict[str, type]:
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


def adds(value: Any) -> Callable[[Any], Any]:
    """``make_replacement`` of a patch row for an attribute the owner does not have: :func:`install` sets ``value``
    (no original to resolve) and :func:`uninstall` deletes it again."""

    def make(_original: Any) -> Any:
        return value

    make.adds_attribute = True
    return make


def modules_binding(defining_module: str, name: str) -> list[Any]:
    """``defining_module`` (imported if need be) and every loaded peft module whose namespace binds the same function
    under ``name`` (each imported it by name, so patching the defining module alone would miss their callers).

    While installed a binding is our wrapper; it is matched through its ``__wrapped__`` (``functools.wraps``).
    """
    import importlib
    import sys

    owner = importlib.import_module(defining_module)
    target = owner.__dict__[name]
    target = getattr(target, "__wrapped__", target)
    found = [owner]
    for module_name in sorted(n for n in list(sys.modules) if n == "peft" or n.startswith("peft.")):
        module = sys.modules[module_name]
        held = getattr(module, "__dict__", {}).get(name)
        if module is not owner and held is not None and getattr(held, "__wrapped__", held) is target:
            found.append(module)
    return found
