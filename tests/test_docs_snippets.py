"""Every Python code block of README.md and of the docs pages runs, offline, on CPU, with tiny models.

README.md runs in a fresh interpreter in an empty folder, exactly as a user pastes it after ``bash scripts/setup.sh``
(no import of peft_gralora before peft: the import hook must do it). The docs pages run in this process, one
namespace per page (blocks build on each other), each page in its own empty folder. Blocks marked
``<!-- skip-test: reason -->`` in the page source are reported as skipped with that reason (see docs_snippets.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .docs_snippets import ROOT, Block, pages, python_blocks

# packages of the optional extras: a page whose example imports one that is not installed is skipped, named
OPTIONAL = {"bitsandbytes", "diffusers", "trl", "deepspeed"}

# the docs pages with at least one block to run (pages whose blocks are all marked show up in the skip summary)
PAGES = [p for p in pages() if p.name != "README.md" and any(not b.skip for b in python_blocks(p))]


def _run_blocks(blocks: list[Block]) -> None:
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"{block.where} needs the optional package {err.name}")
            raise


def test_every_page_is_scanned_and_markers_are_well_formed():
    # python_blocks raises on a malformed skip-test marker or an indented python fence
    found = {p.name: python_blocks(p) for p in pages()}
    assert found["README.md"], "README.md must have its quick start as a python block"
    assert not found["README.md"][0].skip, "the README's first python block (the quick start) must run as pasted"


def test_readme_quick_start_runs_as_pasted(tmp_path):
    blocks = python_blocks(ROOT / "README.md")
    runnable = [b for b in blocks if not b.skip]
    env = {k: v for k, v in os.environ.items() if k != "PEFT_GRALORA_DISABLE"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    script = "".join(b.code for b in runnable)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README.md python blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    runnable = [b for b in blocks if not b.skip]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import peft  # noqa: F401  (the import hook installs GraLoRA: the state a user's process starts in)

    import peft_gralora

    was_installed = peft_gralora.is_installed()
    try:
        _run_blocks(runnable)
    finally:  # a page that installs / uninstalls (activation.md) must not change the state for the next tests
        if peft_gralora.is_installed() != was_installed:
            (peft_gralora.install if was_installed else peft_gralora.uninstall)()


SKIPPED = [b for p in pages() for b in python_blocks(p) if b.skip]


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_marked_blocks_are_reported(block):
    # a block marked in its page: listed here, so every one shows up in pytest's skip summary with its reason
    pytest.skip(f"{block.where} marked skip-test: {block.skip}")
