"""Where peft's patched classes live in this environment (imported lazily: peft is imported by then)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["peft_targets", "bnb_targets", "adds"]


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
