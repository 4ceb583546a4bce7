"""Names in ``peft.tuners.lora.variants``: the GraLoRA variant classes live where peft keeps its LoRA variants.

``from peft.tuners.lora.variants import GraLoraLinearVariant`` (and ``GraLoraDoraLinearVariant``) works while the
package is installed, as the GraLoRA fork's users write it; ``uninstall()`` removes both names again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..dora import GraLoraDoraLinearVariant
from ..variant import GraLoraLinearVariant
from ._targets import adds

__all__ = ["patches"]


def patches() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make_replacement(original))``: two names peft's variants module does not have."""
    from peft.tuners.lora import variants

    return [
        (variants, "GraLoraLinearVariant", adds(GraLoraLinearVariant)),
        (variants, "GraLoraDoraLinearVariant", adds(GraLoraDoraLinearVariant)),
    ]
