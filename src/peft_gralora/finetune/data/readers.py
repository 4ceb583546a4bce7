"""Loading data: json/jsonl/csv/parquet files and folders, save_to_disk folders, hub datasets, the built-in set."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from .builtin import BUILTIN, build_builtin_dataset
from .formatting import DataFormatError, normalise_records

__all__ = ["SUPPORTED_EXTENSIONS", "load_records", "load_splits"]

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if "Extra data" not in err.msg:
            raise DataFormatError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
            ) from err
        return _read_jsonl(path)  # a .json file written as JSON lines
    if isinstance(data, dict):
        # {"train": [...], ...} or {"data": [...]}: take the single list-valued entry
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFormatError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
    return out


def _read_csv(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    if reader.fieldnames is None:
        raise DataFormatError(f"{path}: empty CSV file (a header row naming the columns is required)")
    for lineno, row in enumerate(rows, 2):
        if None in row:
            raise DataFormatError(f"{path}: row {lineno} has more fields than the header")
    return rows


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataFormatError(f"{path}: cannot read parquet file ({err})") from err


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    reader = _READERS.get(ext)
    if reader is None:
        raise DataFormatError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    records = reader(path)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
    return records


_EVAL_PREFIXES = ("test", "valid", "validation", "val", "eval", "dev")


def _split_of(filename: str) -> str:
    stem = os.path.splitext(os.path.basename(filename))[0].lower()
    return "test" if stem.startswith(_EVAL_PREFIXES) else "train"


def load_records(
    data_path: str, data_name: str | None = None, train_split: str = "train", eval_split: str | None = None
) -> dict[str, list[dict]]:
    """Raw records of a local file, a folder of files, a ``save_to_disk`` folder or a hub dataset.

    A folder's files whose names start with ``test``/``valid``/``val``/``eval``/``dev`` form the held-out split;
    the others the training split. Hub datasets keep their own ``test``/``validation`` split if they have one.

    Returns:
        ``{"train": [...]}``, plus ``"test"`` when the source has its own held-out split.
    """
    if os.path.isfile(data_path):
        return {"train": _read_file(data_path)}
    if os.path.isdir(data_path):
        markers = ("dataset_dict.json", "state.json", "dataset_info.json")
        if any(os.path.exists(os.path.join(data_path, m)) for m in markers):
            return _from_hf_dataset(_hf_load_from_disk(data_path), data_path, train_split, eval_split)
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(data_path)
            for f in names
            if f.lower().endswith(SUPPORTED_EXTENSIONS)
        )
        if not files:
            raise DataFormatError(f"{data_path}: folder holds no {'/'.join(SUPPORTED_EXTENSIONS)} files")
        splits: dict[str, list[dict]] = {}
        for f in files:
            splits.setdefault(_split_of(f), []).extend(_read_file(f))
        if "train" not in splits:
            raise DataFormatError(f"{data_path}: only held-out files found (names starting with test/val/eval/dev)")
        return splits
    if data_path.endswith(SUPPORTED_EXTENSIONS) or data_path.startswith((".", "/", "~")):
        raise DataFormatError(f"{data_path}: no such file or folder")
    return _from_hf_dataset(_hf_load(data_path, data_name), data_path, train_split, eval_split)


def _hf_load_from_disk(path: str) -> Any:
    from datasets import load_from_disk

    return load_from_disk(path)


def _hf_load(name: str, config: str | None) -> Any:
    try:
        from datasets import load_dataset

        return load_dataset(name, config)
    except Exception as err:  # offline, unknown name, gated, ...: one clear message
        raise DataFormatError(
            f"{name!r} is neither a local file/folder nor a loadable hub dataset ({type(err).__name__}: {err}). "
            "Offline, pass a local json/jsonl/csv/parquet file or folder, or use the default --data_path builtin."
        ) from err


def _from_hf_dataset(ds: Any, source: str, train_split: str, eval_split: str | None) -> dict[str, list[dict]]:
    if not hasattr(ds, "keys"):  # a single Dataset
        return {"train": ds.to_list()}
    for name in (train_split, eval_split):
        if name is not None and name not in ds:
            raise DataFormatError(f"{source}: no split {name!r} (found {list(ds.keys())})")
    out = {"train": ds[train_split].to_list()}
    candidates = (eval_split,) if eval_split else ("test", "validation", "valid", "eval", "dev")
    for name in candidates:
        if name in ds and name != train_split:
            out["test"] = ds[name].to_list()
            break
    return out


def load_splits(
    data_path: str,
    data_name: str | None = None,
    val_set_size: float = 40,
    seed: int = 42,
    max_train_samples: int | None = None,
    builtin_max_chars: int = 500,
    train_split: str = "train",
    eval_split: str | None = None,
) -> tuple[list[dict], list[dict], str]:
    """Normalised ``(train, held_out, schema)`` records for a data source (``"builtin"`` for the built-in set).

    ``val_set_size`` caps the held-out split: a count (>= 1) or a fraction (< 1) of the data. Sources without their
    own held-out split are split here, with a seeded shuffle; the built-in set keeps its fixed hash split.

    Raises:
        DataFormatError: unreadable source, unknown columns or a malformed record (before any model loads).
    """
    if data_path == BUILTIN:
        splits = build_builtin_dataset(max_chars=builtin_max_chars)
    else:
        splits = load_records(data_path, data_name, train_split, eval_split)
    train, schema = normalise_records(splits["train"], source=data_path)
    held_out: list[dict] = []
    if "test" in splits:
        held_out, _ = normalise_records(splits["test"], source=f"{data_path} (held-out split)")
    if val_set_size < 0:
        raise ValueError(f"--val_set_size must be >= 0, got {val_set_size}")
    n_total = len(train) + len(held_out)
    n_val = int(val_set_size) if val_set_size >= 1 else int(round(val_set_size * n_total))
    if "test" not in splits and n_val > 0:
        import random

        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        if n_val >= len(train):
            raise DataFormatError(f"{data_path}: --val_set_size {val_set_size} leaves no training data")
        held_out = [train[i] for i in order[:n_val]]
        train = [train[i] for i in sorted(order[n_val:])]
    held_out = held_out[:n_val]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return train, held_out, schema
