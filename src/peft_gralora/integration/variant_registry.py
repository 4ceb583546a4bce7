"""Names in ``peft.tuners.lora.variants``: the GraLoRA variant classes live where peft keeps its LoRA variants.

``from peft.tuners.lora.variants import GraLoraLinearVariant`` (and ``GraLoraDoraLinearVariant``) works while the
package is installed, as the GraLoRA fork's users write it; ``uninstall()`` removes both names again.
"""

from __future__ import annotations

from ..dora import GraLoraDoraLinearVariant
from ..variant import GraLoraLinearVariant
from ._targets import adds
from .patch import Patch

__all__ = ["patches"]


def patches() -> list[Patch]:
    """The patch rows: two names peft's variants module does not have."""
    from peft.tuners.lora import variants

    why = "adds the GraLoRA variant class where peft keeps its LoRA variants (removed by uninstall())"
    return [
        Patch(variants, "GraLoraLinearVariant", adds(GraLoraLinearVariant), why),
        Patch(variants, "GraLoraDoraLinearVariant", adds(GraLoraDoraLinearVariant), why),
    ]
