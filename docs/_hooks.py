"""mkdocs hook: publish benchmarks/results/ (tables, plots, raw data) under results/ and examples/ under examples/ in
the site.

The results live beside the benchmarks that write them, the examples at the top of the repository, not in docs/. The
pages link to them as ``../benchmarks/results/<file>`` and ``../examples/<file>`` (so the links also work where the
markdown is read as it is, e.g. on GitHub); in the site those links point to the published copies.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# (folder published, the folder its site path is relative to): benchmarks/results/<file> -> results/<file>,
# examples/<file> -> examples/<file>
PUBLISHED = ((BENCHMARKS / "results", BENCHMARKS), (ROOT / "examples", ROOT))


def on_files(files: Files, config: Any) -> Files:
    for folder, base in PUBLISHED:
        for path in sorted(folder.rglob("*")):
            # markdown under examples/ would become pages of the site, with links into the repository: left out
            if path.is_file() and "__pycache__" not in path.parts and not (base == ROOT and path.suffix == ".md"):
                files.append(
                    File(
                        path.relative_to(base).as_posix(),
                        src_dir=str(base),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    # every page sits at the top of docs/, so ../benchmarks/results/ is results/ and ../examples/ examples/ in the site
    return markdown.replace("](../benchmarks/results/", "](results/").replace("](../examples/", "](examples/")


# Sphinx roles in the docstrings (``:func:`install```) reach the page as ":func: <code>install</code>"
_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):\s*(<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return _ROLE.sub(r"\1", html)
