"""The docs site builds with ``mkdocs build --strict`` (no broken link, anchor or API reference), and every relative
link of README.md and of the docs pages resolves in the repository (as they read on GitHub)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from .docs_snippets import ROOT, pages

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed: pip install -e '.[docs]' (scripts/setup.sh installs them)",
)
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings (not just the headings)
    assert "gralora_forward" in api and "Raises" in api


def _slugs(path) -> set[str]:
    # Python-Markdown's toc slugs (GitHub's agree for these headings: no two separators in a row)
    headings = re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def _broken_links(page) -> list[str]:
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _slugs(resolved):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", pages(), ids=[p.name for p in pages()])
def test_relative_links_resolve_in_the_repository(page):
    # README.md and the pages as they read on GitHub (the site is checked by the strict build)
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"
