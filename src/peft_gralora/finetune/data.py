"""Data for the fine-tuning example: the built-in stdlib code dataset, local/hub loaders, formats and tokenization.

Every source ends up as a list of records in one of three normalised shapes, checked before any model loads:

* ``{"messages": [{"role": ..., "content": ...}, ...]}``  (instruction data becomes a user turn + an assistant turn)
* ``{"text": "..."}``                                      (plain text, loss on every token)

Tokenization turns a record into ``input_ids`` and ``labels``; prompt tokens get label ``-100`` (ignored by the loss)
unless ``train_on_inputs``; an EOS token closes every example; everything is cut at ``cutoff_len``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib
import inspect
import json
import os
import textwrap
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    "PLAIN_TEMPLATE",
]

BUILTIN = "builtin"
IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """The data cannot be used: unreadable file, unknown columns or a malformed record. Raised before model load."""


# ---------------------------------------------------------------------------------------------------------------------
# The built-in dataset: Python standard library functions, signature + docstring -> implementation
# ---------------------------------------------------------------------------------------------------------------------

# Pure-Python stdlib modules present (and not deprecated) on CPython 3.10-3.13. The functions they define are the
# dataset; their sources vary a little between Python versions, the split rule below does not.
BUILTIN_MODULES = (
    "argparse",
    "ast",
    "base64",
    "calendar",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "email.utils",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "genericpath",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hmac",
    "html",
    "inspect",
    "ipaddress",
    "json",
    "json.encoder",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "mimetypes",
    "ntpath",
    "pkgutil",
    "platform",
    "plistlib",
    "posixpath",
    "pprint",
    "quopri",
    "reprlib",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "urllib.parse",
    "uuid",
    "warnings",
    "wsgiref.util",
    "xml.sax.saxutils",
    "zipfile",
)

BUILTIN_INSTRUCTION = (
    "Implement `{module}.{name}` from the Python standard library. Reply with the function definition, without the "
    "docstring."
)


def _held_out(key: str, held_out_percent: int) -> bool:
    # a hash of the qualified name, not a random draw: the split never depends on which other functions exist
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < held_out_percent


def _function_example(module_name: str, name: str, func: Any, max_chars: int) -> dict | None:
    """One record for ``module.name``, or None if the function does not make a clean example."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    if len(source) > max_chars:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
        return None
    doc_node = node.body[0]
    if not (isinstance(doc_node, ast.Expr) and isinstance(getattr(doc_node, "value", None), ast.Constant)):
        return None
    if not isinstance(doc_node.value.value, str) or doc_node.lineno <= node.lineno:
        return None
    lines = source.splitlines()
    # ast line numbers are 1-based; the docstring occupies lines doc_node.lineno .. doc_node.end_lineno
    header = lines[: doc_node.lineno - 1]
    docstring = lines[doc_node.lineno - 1 : doc_node.end_lineno]
    body = lines[doc_node.end_lineno :]
    if not any(line.strip() and not line.strip().startswith("#") for line in body):
        return None
    return {
        "id": f"{module_name}.{name}",
        "instruction": BUILTIN_INSTRUCTION.format(name=name, module=module_name),
        "input": "\n".join(header + docstring),
        "output": "\n".join(header + body),
    }


def build_builtin_dataset(
    max_chars: int = 500,
    held_out_percent: int = 10,
    modules: Sequence[str] = BUILTIN_MODULES,
) -> dict[str, list[dict]]:
    """The built-in instruction dataset: public, documented stdlib functions -> their implementation.

    Each record has ``id`` (``module.function``), ``instruction``, ``input`` (the ``def`` line(s) and the docstring)
    and ``output`` (the function's source without its docstring). Records are sorted by ``id``; a record is held out
    when a hash of its ``id`` falls in the first ``held_out_percent`` of 100 buckets, so the split is fixed.

    Args:
        max_chars: skip functions whose source is longer (keeps examples short enough for CPU training).
        held_out_percent: share of functions (0-100) in the held-out split.
        modules: stdlib modules to draw from; those that fail to import are skipped.

    Returns:
        ``{"train": [...], "test": [...]}``.
    """
    if not 0 <= held_out_percent <= 100:
        raise ValueError(f"held_out_percent must be in 0..100, got {held_out_percent}")
    records: dict[str, dict] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                    continue
                record = _function_example(module_name, name, obj, max_chars)
                if record is not None:
                    records.setdefault(record["id"], record)
    ordered = [records[key] for key in sorted(records)]
    return {
        "train": [r for r in ordered if not _held_out(r["id"], held_out_percent)],
        "test": [r for r in ordered if _held_out(r["id"], held_out_percent)],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Loading local files, folders and hub datasets
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------------

SCHEMAS = (
    "instruction/input/output",
    "instruction/response (input or context optional)",
    "messages (a list of {role, content})",
    "text",
)


def _detect_schema(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "instruction/output"
    if "instruction" in keys and "response" in keys:
        return "instruction/response"
    if "text" in keys:
        return "text"
    return None


def _need_str(value: Any, what: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: {what} is empty")
    return value


def normalise_records(records: Iterable[dict], source: str = "data") -> tuple[list[dict], str]:
    """Check records and bring them to ``{"messages": [...]}`` or ``{"text": ...}``; returns ``(records, schema)``.

    The schema is detected from the first record's keys and every record must follow it.

    Raises:
        DataFormatError: no known fields, or a record whose fields have the wrong type / are empty.
    """
    records = list(records)
    if not records:
        raise DataFormatError(f"{source}: no records")
    schema = _detect_schema(set(records[0]))
    if schema is None:
        raise DataFormatError(
            f"{source}: unrecognised record fields {sorted(records[0])}; expected one of: {'; '.join(SCHEMAS)}"
        )
    out = []
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if schema == "text":
            out.append({"text": _need_str(rec.get("text"), "'text'", where)})
            continue
        if schema == "messages":
            out.append({"messages": _check_messages(rec.get("messages"), where)})
            continue
        answer_key = "output" if schema == "instruction/output" else "response"
        instruction = _need_str(rec.get("instruction"), "'instruction'", where)
        answer = _need_str(rec.get(answer_key), f"{answer_key!r}", where)
        extra = rec.get("input", rec.get("context"))
        if extra is not None:
            extra = _need_str(extra, "'input'", where, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return out, schema


def _check_messages(messages: Any, where: str) -> list[dict]:
    if isinstance(messages, str):
        try:  # CSV cells hold JSON text
            messages = json.loads(messages)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: 'messages' is a string that is not JSON") from err
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataFormatError(f"{where}: message {j} needs a 'role' in {ROLES}, got {m!r:.80}")
        out.append({"role": m["role"], "content": _need_str(m.get("content"), f"message {j} 'content'", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(f"{where}: 'messages' has no assistant turn to learn from")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization with prompt masking
# ---------------------------------------------------------------------------------------------------------------------

# used for messages when the tokenizer has no chat template (or with --prompt_template plain)
PLAIN_TEMPLATE = {
    "system": "### System:\n{content}\n\n",
    "user": "### Instruction:\n{content}\n\n### Response:\n",
    "assistant": "{content}",
    "between": "\n\n",
}


def _plain_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        text = PLAIN_TEMPLATE[m["role"]].format(content=m["content"])
        if m["role"] == "assistant" and i + 1 < len(messages):
            segments.append((text, True))
            segments.append((PLAIN_TEMPLATE["between"], False))
        else:
            segments.append((text, m["role"] == "assistant"))
    return segments


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, is_assistant) pieces, by rendering growing prefixes."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return _chat_segments_last_turn(tokenizer, messages)
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = _render(tokenizer, messages, False)
    if not rest.startswith(done):
        return _chat_segments_last_turn(tokenizer, messages)
    if len(rest) > len(done):
        segments.append((rest[len(done) :], False))
    return [s for s in segments if s[0]]


def _chat_segments_last_turn(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    # templates that rewrite earlier turns (e.g. drop past reasoning): learn only the last assistant turn
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _render(tokenizer, messages[:last], True)
    full = _render(tokenizer, messages[: last + 1], False)
    if not full.startswith(prompt):
        raise DataFormatError(
            "the tokenizer's chat template does not render the prompt as a prefix of the conversation, so prompt "
            "tokens cannot be masked; use --prompt_template plain or --train_on_inputs"
        )
    return [(prompt, False), (full[len(prompt) :], True)]


@dataclass
class TokenizeOptions:
    cutoff_len: int = 256
    train_on_inputs: bool = False
    prompt_template: str = "auto"  # auto | chat | plain
    stats: dict = field(default_factory=lambda: {"dropped_no_target": 0, "truncated": 0})


def _use_chat(tokenizer: Any, prompt_template: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_template == "chat" and not has_template:
        raise DataFormatError("--prompt_template chat: the tokenizer has no chat template")
    return prompt_template == "chat" or (prompt_template == "auto" and has_template)


def tokenize_record(record: dict, tokenizer: Any, opts: TokenizeOptions) -> dict | None:
    """``{"input_ids", "labels"}`` of one normalised record, or None when no target token survives truncation."""
    chat = _use_chat(tokenizer, opts.prompt_template)
    if "text" in record:
        segments, chat = [(record["text"], True)], False
    elif chat:
        segments = _chat_segments(tokenizer, record["messages"])
    else:
        segments = _plain_segments(record["messages"])
    # the closing EOS: trailing whitespace after the template's own end-of-turn token would hide it
    text, trainable = segments[-1]
    segments[-1] = (text.rstrip(), trainable)
    eos_id = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for n, (text, trainable) in enumerate(segments):
        if not text:
            continue
        # chat templates write their own BOS; plain text gets the tokenizer's usual special tokens up front
        piece = tokenizer(text, add_special_tokens=(n == 0 and not chat))["input_ids"]
        if n == 0 and not chat and eos_id is not None and len(piece) > 1 and piece[-1] == eos_id:
            piece = piece[:-1]  # tokenizers that append EOS themselves
        ids += piece
        labels += piece if (trainable or opts.train_on_inputs) else [IGNORE_INDEX] * len(piece)
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        labels.append(eos_id if (segments[-1][1] or opts.train_on_inputs) else IGNORE_INDEX)
    if len(ids) > opts.cutoff_len:
        opts.stats["truncated"] += 1
        ids, labels = ids[: opts.cutoff_len], labels[: opts.cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        opts.stats["dropped_no_target"] += 1
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_records(records: Sequence[dict], tokenizer: Any, opts: TokenizeOptions) -> list[dict]:
    """Tokenize every record, dropping those left with no target token (counted in ``opts.stats``)."""
    out = [t for t in (tokenize_record(r, tokenizer, opts) for r in records) if t is not None]
    return out


class TokenizedDataset:
    """A map-style dataset over tokenized examples (what ``Trainer`` and its samplers need)."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class PadCollator:
    """Right-pads a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, plus ``attention_mask``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
