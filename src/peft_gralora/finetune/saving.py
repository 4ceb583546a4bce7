"""Saving without half-written results: atomic adapter saves (weights land last) and the newest complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

__all__ = ["atomic_save", "latest_checkpoint", "ADAPTER_FILES_LAST"]

ADAPTER_FILES_LAST = ("adapter_config.json", "adapter_model.safetensors")  # moved last, in this order


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest *complete* ``checkpoint-N`` in ``output_dir`` (Trainer writes ``trainer_state.json`` last)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if not (name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit() and os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, ValueError):
            continue  # killed while this checkpoint was being written
        found.append((int(name[len("checkpoint-") :]), path))
    return max(found)[1] if found else None


def atomic_save(output_dir: str, write: Any) -> None:
    """Call ``write(tmp_dir)``, then move its files into ``output_dir``, adapter weights last.

    Everything is written to a temporary folder first; each file then replaces its counterpart with an atomic
    ``os.replace``. A previous adapter is removed before the new files land and ``adapter_model.safetensors`` lands
    last, so the folder never holds a half-written or mixed adapter: it is complete once that file exists.
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".tmp-save-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        for name in reversed(ADAPTER_FILES_LAST):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        names = sorted(os.listdir(tmp), key=_landing_order)
        for name in names:
            src, dst = os.path.join(tmp, name), os.path.join(output_dir, name)
            if os.path.isdir(dst) and not os.path.isdir(src):
                shutil.rmtree(dst)
            if os.path.isdir(src):
                _replace_dir(src, dst)
            else:
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _landing_order(name: str) -> tuple[int, str]:
    return (1 + ADAPTER_FILES_LAST.index(name), name) if name in ADAPTER_FILES_LAST else (0, name)


def _replace_dir(src: str, dst: str) -> None:
    # a folder cannot replace a non-empty folder atomically: move the old one aside first, then drop it
    old = f"{dst}.old-{os.getpid()}"
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)
