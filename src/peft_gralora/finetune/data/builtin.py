"""The built-in dataset: Python standard library functions, signature + docstring -> implementation."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["BUILTIN", "BUILTIN_MODULES", "build_builtin_dataset"]

BUILTIN = "builtin"

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
