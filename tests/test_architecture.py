"""The layers of docs/design.md ("Architecture"), enforced: imports point down only; no two files import each other.

    math (functional)  <-  core (config, variant, dora, quant, sharding, convert)  <-  integration (the only code
    that touches peft / transformers / diffusers internals)  <-  applications (cli, finetune, axolotl, benchmarks)

Every ``import`` / ``from ... import`` in every file under ``src/peft_gralora`` and ``benchmarks`` counts, at any depth
(inside functions, under ``if TYPE_CHECKING``), as do ``importlib.import_module("<literal>")`` calls. A new module gets
its layer from :data:`LAYERS` (the longest matching module name wins); a module no entry covers fails
:func:`test_every_module_has_a_layer`, so each new file is placed on purpose.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = {"peft_gralora": ROOT / "src" / "peft_gralora", "benchmarks": ROOT / "benchmarks"}

MATH, CORE, INTEGRATION, APPLICATION = 1, 2, 3, 4
LAYER_NAMES = {MATH: "math", CORE: "core", INTEGRATION: "integration", APPLICATION: "application"}

# module -> layer, for the module and everything below it (the longest matching name wins)
LAYERS: dict[str, int] = {
    "peft_gralora.functional": MATH,
    "peft_gralora.config": CORE,
    "peft_gralora.variant": CORE,
    "peft_gralora.dora": CORE,
    "peft_gralora.quant": CORE,
    "peft_gralora.sharding": CORE,
    "peft_gralora.convert": CORE,
    "peft_gralora._post_import": CORE,  # a generic "run this after that module is imported" finder; no peft
    "peft_gralora._hook": INTEGRATION,  # the .pth hook: installs the integration when peft is imported
    # wraps peft's config loading with PEFT_GRALORA_DISABLE=1; outside integration/ so that the disabled hook does not
    # import the integration package
    "peft_gralora._disabled_notice": INTEGRATION,
    "peft_gralora.integration": INTEGRATION,
    "peft_gralora.cli": APPLICATION,
    "peft_gralora.finetune": APPLICATION,
    "peft_gralora.axolotl": APPLICATION,
    "benchmarks": APPLICATION,
}
# package roots, for themselves only (not their submodules). The root of peft_gralora is the public facade: importing
# it activates GraLoRA (it imports the tiny _hook, which installs the integration once peft is imported), so it sits
# with the integration; ``from peft_gralora import name`` is resolved to the module its lazy table (_LAZY) loads the
# name from
PACKAGE_ROOTS: dict[str, int] = {"peft_gralora": INTEGRATION}
# host libraries whose internals only the integration layer may touch (applications use their public API)
HOSTS = ("peft", "transformers", "diffusers", "accelerate", "trl", "deepspeed", "axolotl")
FORBIDDEN_EXTERNAL: dict[int, tuple[str, ...]] = {MATH: HOSTS, CORE: HOSTS}


@dataclass(frozen=True)
class Source:
    """One file: its module name, its text, and whether it is a package's ``__init__``."""

    module: str
    text: str
    is_package: bool = False
    path: str = ""


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str  # an internal module name, or the top-level name of an external one
    line: int
    internal: bool


def collect_sources() -> list[Source]:
    """Every ``.py`` file of the scanned trees as a :class:`Source`."""
    sources = []
    for top, folder in SCANNED.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            module = ".".join((top, *parts[:-1])) if is_package else ".".join((top, *parts))
            text = path.read_text(encoding="utf-8")
            sources.append(Source(module, text, is_package, str(path.relative_to(ROOT))))
    return sources


def _lazy_table(source: Source) -> dict[str, str]:
    """A package ``__init__``'s module-level ``_LAZY = {"name": "submodule", ...}`` (names it loads on access)."""
    for node in ast.parse(source.text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return {k: f"{source.module}.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


def import_edges(sources: list[Source]) -> list[Edge]:
    """Every import of every source, resolved to the internal module it loads (or the external top-level name)."""
    known = {s.module for s in sources}
    tops = {m.split(".")[0] for m in known}
    lazy = {s.module: _lazy_table(s) for s in sources if s.is_package}

    def internal(name: str) -> str:
        # an internal name that is not a module of its own (a function, a class): the closest enclosing module
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    def edge(importer: str, name: str, line: int) -> Edge:
        if name.split(".")[0] in tops:
            return Edge(importer, internal(name), line, True)
        return Edge(importer, name.split(".")[0], line, False)

    edges = []
    for src in sources:
        package = src.module if src.is_package else src.module.rpartition(".")[0]
        for node in ast.walk(ast.parse(src.text)):
            if isinstance(node, ast.Import):
                edges += [edge(src.module, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:  # `from package import submodule`
                        edges.append(edge(src.module, f"{base}.{alias.name}", node.lineno))
                    elif alias.name in lazy.get(base, {}):  # `from peft_gralora import install`
                        edges.append(edge(src.module, lazy[base][alias.name], node.lineno))
                    else:
                        edges.append(edge(src.module, base, node.lineno))
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                edges.append(edge(src.module, node.args[0].value, node.lineno))
    return [e for e in edges if e.imported != e.importer]


def layer_of(module: str) -> int | None:
    if module in PACKAGE_ROOTS:
        return PACKAGE_ROOTS[module]
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def layer_violations(edges: list[Edge]) -> list[str]:
    """Imports that point up a layer, or into a host library's internals from math / core."""
    found = []
    for e in edges:
        here = layer_of(e.importer)
        if here is None:
            continue  # reported by test_every_module_has_a_layer
        if e.internal:
            there = layer_of(e.imported)
            if there is not None and there > here:
                found.append(
                    f"{e.importer}:{e.line} ({LAYER_NAMES[here]}) imports {e.imported} ({LAYER_NAMES[there]}): "
                    "imports must point down (math <- core <- integration <- application)"
                )
        elif e.imported in FORBIDDEN_EXTERNAL.get(here, ()):
            found.append(
                f"{e.importer}:{e.line} ({LAYER_NAMES[here]}) imports {e.imported}: only the integration layer "
                "touches the host libraries"
            )
    return found


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """Groups of files that import each other, directly or around a loop (strongly connected components > 1)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.internal:
            graph.setdefault(e.importer, set()).add(e.imported)
            graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# ---- the repository -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo_edges() -> list[Edge]:
    return import_edges(collect_sources())


def test_every_module_has_a_layer():
    unplaced = [s.path for s in collect_sources() if layer_of(s.module) is None]
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_imports_point_down_the_layers(repo_edges):
    assert not layer_violations(repo_edges), "\n".join(layer_violations(repo_edges))


def test_no_two_files_import_each_other(repo_edges):
    assert not import_cycles(repo_edges), import_cycles(repo_edges)


def test_the_scan_sees_the_package(repo_edges):
    # the checks above pass trivially on an empty or unresolved graph: pin a few edges that exist
    pairs = {(e.importer, e.imported) for e in repo_edges}
    assert ("peft_gralora.variant", "peft_gralora.sharding") in pairs
    assert ("peft_gralora.integration.layers", "peft_gralora.variant") in pairs
    assert any(i == "peft_gralora.cli" and m.startswith("peft_gralora.convert") for i, m in pairs)  # in a function
    assert len({e.importer for e in repo_edges}) > 20


# ---- the checker fails on bad graphs --------------------------------------------------------------------------------


def _edges(**files: str) -> list[Edge]:
    """Edges of made-up files: ``pkg__sub="text"`` is module ``pkg.sub``; ``pkg__sub__init`` a package."""
    sources = []
    for key, text in files.items():
        parts = key.split("__")
        is_package = parts[-1] == "init"
        sources.append(Source(".".join(parts[:-1] if is_package else parts), text, is_package))
    return import_edges(sources)


def test_a_core_module_importing_the_integration_in_a_function_is_refused():
    edges = _edges(
        peft_gralora__variant="import torch\n\ndef f():\n    from .integration.distributed import full_weight\n",
        peft_gralora__integration__init="",
        peft_gralora__integration__distributed="from ..variant import is_gralora_adapter\n",
    )
    (problem,) = layer_violations(edges)
    assert problem.startswith("peft_gralora.variant:4 (core) imports peft_gralora.integration.distributed")
    assert import_cycles(edges) == [["peft_gralora.integration.distributed", "peft_gralora.variant"]]


def test_math_importing_core_and_core_importing_peft_are_refused():
    edges = _edges(
        peft_gralora__functional__init="from . import ops\n",
        peft_gralora__functional__ops="from peft_gralora.config import GRALORA_FIELDS\n",
        peft_gralora__config="from peft.tuners.lora import LoraConfig\n",
    )
    problems = layer_violations(edges)
    assert len(problems) == 2
    assert "peft_gralora.functional.ops:1 (math) imports peft_gralora.config (core)" in problems[0]
    assert "peft_gralora.config:1 (core) imports peft: only the integration layer" in problems[1]


def test_lazy_names_and_import_module_resolve_to_the_module_they_load():
    edges = _edges(
        peft_gralora__init='_LAZY = {"install": "integration"}\n',
        peft_gralora__integration__init="",
        peft_gralora__dora="from peft_gralora import install\n",
        peft_gralora__quant='import importlib\nm = importlib.import_module("peft_gralora.cli")\n',
        peft_gralora__cli="",
    )
    assert [p.split(" imports ")[1].split(" ")[0] for p in layer_violations(edges)] == [
        "peft_gralora.integration",
        "peft_gralora.cli",
    ]


def test_a_cycle_through_three_files_and_a_package_init_is_found():
    edges = _edges(
        benchmarks__init="",
        benchmarks__quality="from . import quality_epochs\n",
        benchmarks__quality_epochs="from .common import x\n",
        benchmarks__common="def f():\n    from benchmarks.quality import y\n",
        peft_gralora__finetune__init="from .train import run\n",
        peft_gralora__finetune__train="from . import run\n",  # a name of the package's __init__
    )
    assert import_cycles(edges) == [
        ["benchmarks.common", "benchmarks.quality", "benchmarks.quality_epochs"],
        ["peft_gralora.finetune", "peft_gralora.finetune.train"],
    ]
    assert not layer_violations(edges)


def test_a_file_outside_the_layer_map_is_reported():
    assert layer_of("peft_gralora.new_thing") is None
    assert layer_of("peft_gralora") == INTEGRATION and layer_of("peft_gralora.functional.ops") == MATH
    assert layer_of("peft_gralora.integration.loading") == INTEGRATION
