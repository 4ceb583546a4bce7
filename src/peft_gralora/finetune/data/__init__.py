"""Data for the fine-tuning example: the built-in stdlib code dataset, local/hub loaders, formats and tokenization.

builtin.py     the built-in dataset (stdlib function signature + docstring -> implementation), fixed split
readers.py     json/jsonl/csv/parquet files and folders, save_to_disk folders, hub datasets -> records
formatting.py  the normalised record shapes (checked before any model loads) and tokenization with prompt masking
"""

from .builtin import BUILTIN, BUILTIN_INSTRUCTION, BUILTIN_MODULES, build_builtin_dataset
from .formatting import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    ROLES,
    SCHEMAS,
    DataFormatError,
    PadCollator,
    TokenizedDataset,
    TokenizedSplits,
    TokenizeOptions,
    _use_chat,
    normalise_records,
    tokenize_record,
    tokenize_records,
)
from .readers import SUPPORTED_EXTENSIONS, load_records, load_splits

__all__ = [
    "BUILTIN",
    "DataFormatError",
    "BUILTIN_MODULES",
    "build_builtin_dataset",
    "load_records",
    "load_splits",
    "normalise_records",
    "tokenize_record",
    "tokenize_records",
    "TokenizedDataset",
    "TokenizeOptions",
    "PadCollator",
    "TokenizedSplits",
    "PLAIN_TEMPLATE",
    "BUILTIN_INSTRUCTION",
    "IGNORE_INDEX",
    "ROLES",
    "SCHEMAS",
    "SUPPORTED_EXTENSIONS",
    "_use_chat",
]
