"""The model card of a saved GraLoRA adapter: says what it is, what reads it, and how to turn it into plain LoRA.

A GraLoRA adapter's files look like a plain LoRA adapter's; a reader without this package (plain peft, vLLM, TGI)
loads it as plain LoRA and computes another function. The card (``README.md``: front matter tags ``gralora`` and
``peft-gralora``, and one delimited section of text) is what a person finds on the Hub. It runs after peft's own card
logic and updates an existing README in place: only the section between the markers is rewritten.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from .patch import Patch

__all__ = ["patches", "write_gralora_model_card", "CARD_TAGS", "SECTION_START", "SECTION_END"]

CARD_TAGS = ("gralora", "peft-gralora")
SECTION_START = "<!-- peft-gralora:start -->"
SECTION_END = "<!-- peft-gralora:end -->"


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def _section(adapters: Mapping[str, Any]) -> str:
    rows = "\n".join(
        f"| `{name}` | {_field(c, 'r')} | {_field(c, 'gralora_k')} | {_field(c, 'hybrid_r')} |"
        for name, c in adapters.items()
    )
    return f"""{SECTION_START}
## GraLoRA adapter

This is a **GraLoRA** adapter (Granular Low-Rank Adaptation, https://arxiv.org/abs/2505.20355), saved as a peft
`LoraConfig(use_gralora=True)` adapter. Its files have plain LoRA's layout, but it computes a block-wise update:
**a reader without GraLoRA support (peft alone, vLLM, TGI, other LoRA loaders) loads it as plain LoRA and computes a
different function, without an error.**

| adapter | r | gralora_k | hybrid_r |
| --- | --- | --- | --- |
{rows}

(`use_gralora: true` for each; the values are also in `adapter_config.json` and in the safetensors header.)

To load it, install the package that adds GraLoRA to peft, then load it as any peft adapter:

```bash
pip install peft-gralora
```

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this adapter>")
```

To serve it with a LoRA-only engine, first turn it into an exactly equivalent plain LoRA adapter (no
approximation; its rank becomes `gralora_k * (r - hybrid_r) + hybrid_r`):

```bash
peft-gralora export-lora <this adapter> <plain-lora-adapter>
```
{SECTION_END}"""


def write_gralora_model_card(directory: str | os.PathLike, adapters: Mapping[str, Any]) -> None:
    """Add the GraLoRA tags and section to ``directory/README.md`` (created when missing, updated otherwise).

    Args:
        directory: the saved adapter's folder.
        adapters: adapter name -> its ``LoraConfig`` (or config dict) for every GraLoRA adapter saved there; nothing
            is written when empty.
    """
    adapters = {name: c for name, c in adapters.items() if _field(c, "use_gralora")}
    if not adapters:
        return
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(os.fspath(directory), "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in CARD_TAGS if tag not in tags]
    text = card.text
    section = _section(adapters)
    if SECTION_START in text and SECTION_END in text:
        before, _, rest = text.partition(SECTION_START)
        _, _, after = rest.partition(SECTION_END)
        text = f"{before}{section}{after}"
    else:
        text = f"\n{section}\n{text}"
    card.text = text
    card.save(path)


def _make_create_or_update_model_card(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str, *args: Any, **kwargs: Any):
        result = original(self, output_dir, *args, **kwargs)
        write_gralora_model_card(output_dir, getattr(self, "peft_config", {}))
        return result

    return create_or_update_model_card


def patches() -> list[Patch]:
    """The patch row of peft's model card."""
    from peft import PeftModel

    return [
        Patch(
            PeftModel,
            "create_or_update_model_card",
            _make_create_or_update_model_card,
            "after peft's own card logic, adds the tags gralora / peft-gralora and a section saying the adapter is "
            "GraLoRA, that it needs pip install peft-gralora (with its r / gralora_k / hybrid_r), how to load it and "
            "how to export it to plain LoRA: readers without the package load it as plain LoRA",
        )
    ]
