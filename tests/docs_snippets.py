"""The Python code blocks of README.md and docs/*.md, as the docs tests run them.

A block is a fenced code block opened by a line that is exactly three backticks and ``python``. Blocks of one page
run in order in one namespace, so a block may use what an earlier block of its page defined. A block that cannot run
in the test suite is marked in the page source, visibly, by an HTML comment on the line right before its fence::

    <!-- skip-test: needs a CUDA GPU -->

The reason is required. Other fences (bash, text, ...) are not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^\n`]*)$")
SKIP = re.compile(r"^<!--\s*skip-test:(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason given in the skip-test marker, or None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The ``python`` blocks of one page, with their skip-test reason.

    Raises:
        ValueError: for an indented ``python`` fence (it would be silently left out) or a skip-test marker that is
            not right before a ``python`` fence or has no reason.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        marker = SKIP.match(lines[i].strip())
        if marker:
            nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not nxt or nxt["info"].strip() != "python" or nxt["indent"]:
                raise ValueError(f"{page}:{i + 1}: a skip-test marker must be the line right before a ```python fence")
            if not marker["reason"].strip():
                raise ValueError(f"{page}:{i + 1}: a skip-test marker needs a reason: <!-- skip-test: why -->")
        if not fence:
            i += 1
            continue
        info, ticks = fence["info"].strip(), fence["ticks"]
        end = i + 1
        while end < len(lines) and not (lines[end].strip() == ticks and lines[end].lstrip().startswith(ticks)):
            end += 1
        if info == "python":
            if fence["indent"]:
                raise ValueError(
                    f"{page}:{i + 1}: indented ```python fences are not run by the docs tests; unindent it"
                )
            previous = SKIP.match(lines[i - 1].strip()) if i else None
            reason = previous["reason"].strip() if previous else None
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1 : end]) + "\n", reason))
        i = end + 1
    return blocks
