"""Loaded by the package's import hook at interpreter start: guards axolotl's modules the moment they are imported.

Imports nothing but the tiny :mod:`peft_gralora._post_import` (axolotl is not imported, nor is it required): a
finder that answers only for the module names below, and hands each executed module to :mod:`.guards`.
"""

from .._post_import import PostImportFinder

__all__ = ["WATCHED", "AxolotlGuardFinder", "register", "apply"]

# the axolotl modules whose attributes .guards wraps (kept in step with guards._GUARDS by a test)
WATCHED = (
    "axolotl.cli.config",
    "axolotl.utils.config",
    "axolotl.cli.utils.lora_merge",
    "axolotl.cli.merge_lora",
    "axolotl.monkeypatch.lora_kernels",
    "axolotl.monkeypatch.relora",
    "axolotl.core.trainers.grpo.async_trainer",
)


def _guard(module) -> None:
    from .guards import guard_module

    guard_module(module)


class AxolotlGuardFinder(PostImportFinder):
    """Runs :func:`.guards.guard_module` right after each watched axolotl module executes."""

    def __init__(self, names=WATCHED) -> None:
        super().__init__(names, _guard)


def register(names=WATCHED) -> None:
    """Put the finder on ``sys.meta_path`` for ``names`` (once; a finder already there keeps its names)."""
    import sys

    if not any(isinstance(f, AxolotlGuardFinder) for f in sys.meta_path):
        AxolotlGuardFinder(names).register()


def apply() -> None:
    """Guard the watched modules already imported now, the others when they are (idempotent)."""
    import sys

    from .guards import guard_module

    pending = []
    for name in WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            guard_module(module)
        else:
            pending.append(name)
    if pending:
        register(pending)


register()
