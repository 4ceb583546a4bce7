"""The GraLoRA fine-tuning example as a library: built-in data, CLI and ``run(args) -> metrics``.

The same program runs as ``python example_gralora_finetuning.py``, ``python -m peft_gralora.finetune`` and
``peft-gralora finetune`` (same flags and defaults).

from peft_gralora.finetune import build_builtin_dataset, parse_args, run
data = build_builtin_dataset()                 # {"train": [...], "test": [...]}, fixed split
metrics = run(["--max_steps", "20", "--output_dir", "outputs/x"])
metrics = run(parse_args([]), use_gralora=False)   # plain LoRA, same everything else
"""

from .arguments import BUILTIN_MAX_STEPS, build_parser, parse_args
from .data import (
    BUILTIN,
    DataFormatError,
    build_builtin_dataset,
    load_splits,
    normalise_records,
    tokenize_records,
)
from .train import latest_checkpoint, main, run

__all__ = [
    "BUILTIN",
    "BUILTIN_MAX_STEPS",
    "DataFormatError",
    "build_builtin_dataset",
    "build_parser",
    "latest_checkpoint",
    "load_splits",
    "main",
    "normalise_records",
    "parse_args",
    "run",
    "tokenize_records",
]
