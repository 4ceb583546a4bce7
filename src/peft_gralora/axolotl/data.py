"""Export the package's built-in dataset (stdlib functions: signature + docstring -> code) as axolotl-ready jsonl.

    python -m peft_gralora.axolotl.data DIR [--max-chars 500] [--limit N]

writes ``DIR/train.jsonl`` and ``DIR/test.jsonl``, one ``{"instruction", "input", "output"}`` record a line: axolotl's
``type: alpaca`` dataset format.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

__all__ = ["export_builtin", "main"]

FIELDS = ("instruction", "input", "output")


def export_builtin(out_dir: str, max_chars: int = 500, limit: int | None = None) -> dict[str, int]:
    """Write the built-in train/test splits to ``out_dir`` as jsonl; returns the record count of each file."""
    from ..finetune.data import build_builtin_dataset

    splits = build_builtin_dataset(max_chars=max_chars)
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, records in splits.items():
        records = records[:limit] if limit is not None else records
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({key: record[key] for key in FIELDS}) + "\n")
        counts[split] = len(records)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_gralora.axolotl.data", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--max-chars", type=int, default=500, help="skip functions with longer source")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records per split")
    args = parser.parse_args(argv)
    counts = export_builtin(args.out_dir, args.max_chars, args.limit)
    print(", ".join(f"{os.path.join(args.out_dir, split)}.jsonl: {n} records" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
