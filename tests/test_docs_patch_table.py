"""docs/design.md's "Patch table" is the output of ``peft_gralora.integration.patch_table_markdown()``, verbatim.

The rows live next to the patches (each module of ``peft_gralora.integration`` declares its own); the page holds a
copy between two markers. When a patch is added, removed or its reason changes, regenerate the copy::

    python -m tests.test_docs_patch_table --write

The table is generated in a fresh process (diffusers' loader modules are imported to list their rows; that import
applies their patches, which must not leak into the other tests).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "design.md"
START = "<!-- patch-table:start -->"
END = "<!-- patch-table:end -->"
REGENERATE = "python -m tests.test_docs_patch_table --write"
GENERATE = "from peft_gralora.integration import patch_table_markdown; print(patch_table_markdown(), end='')"


def generated() -> str:
    """``patch_table_markdown()`` of this checkout's package, from a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PEFT_GRALORA_DISABLE", None)
    done = subprocess.run(
        [sys.executable, "-c", GENERATE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if done.returncode:
        raise RuntimeError(f"generating the patch table failed:\n{done.stderr}")
    return done.stdout.strip() + "\n"


def split_page(text: str) -> tuple[str, str, str]:
    """``(before, table, after)``: the page around and between the two markers (each exactly once)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{PAGE.name} must hold {START} and then {END}, once each")
    before, rest = text.split(START)
    table, after = rest.split(END)
    return before, table.strip("\n") + "\n", after


def write() -> None:
    before, _, after = split_page(PAGE.read_text(encoding="utf-8"))
    PAGE.write_text(f"{before}{START}\n{generated()}{END}{after}", encoding="utf-8")


def test_split_page_finds_the_table_between_the_markers():
    before, table, after = split_page(f"intro\n{START}\n| a | b |\n{END}\nrest\n")
    assert (before, table, after) == ("intro\n", "| a | b |\n", "\nrest\n")
    for broken in (f"{START}\n", f"{END}\n{START}\n", f"{START}{START}{END}"):
        with pytest.raises(ValueError, match="must hold"):
            split_page(broken)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="the generated table lists diffusers' rows")
def test_design_page_patch_table_is_the_generated_one():
    _, on_page, _ = split_page(PAGE.read_text(encoding="utf-8"))
    fresh = generated()
    assert fresh.count("\n| `") >= 20, "the generator returned (almost) no rows: a comparison could not fail"
    assert on_page == fresh, (
        "docs/design.md's patch table differs from peft_gralora.integration.patch_table_markdown(); run "
        f"`{REGENERATE}` and commit docs/design.md"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}")
    write()
    print(f"wrote the patch table into {PAGE.relative_to(ROOT)}")
