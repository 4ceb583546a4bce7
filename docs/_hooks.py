"""mkdocs hook: publish benchmarks/results/ (tables, plots, raw data) under results/ in the site.

The results live beside the benchmarks that write them, not in docs/. The pages link to them as
``../benchmarks/results/<file>`` (so the links also work where the markdown is read as it is, e.g. on GitHub); in the
site those links point to the published copies.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((BENCHMARKS / "results").rglob("*")):
        if path.is_file():
            # src_dir/src_uri = benchmarks/results/<file>: published as results/<file>
            uri = path.relative_to(BENCHMARKS).as_posix()
            files.append(
                File(
                    uri,
                    src_dir=str(BENCHMARKS),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    # every page sits at the top of docs/, so ../benchmarks/results/ is results/ in the site
    return markdown.replace("](../benchmarks/results/", "](results/")


# Sphinx roles in the docstrings (``:func:`install```) reach the page as ":func: <code>install</code>"
_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):\s*(<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return _ROLE.sub(r"\1", html)
