"""Import hook run from ``peft_gralora.pth`` at interpreter start: installs GraLoRA the moment peft is imported.

It never makes ``import peft`` fail: outside the supported peft range it warns once and leaves peft as it is, except
that ``LoraConfig(use_gralora=True)`` then raises a clear error (see ``integration.auto_install``).

Costs microseconds: it imports nothing but ``os``, ``sys`` (both already loaded) and the tiny
:mod:`peft_gralora._post_import`, and registers a finder that only answers for the module name ``peft``.
``PEFT_GRALORA_DISABLE=1`` turns it off: then the finder only wraps peft's config loading so that loading a GraLoRA
adapter warns once that it loads as plain LoRA (:mod:`peft_gralora._disabled_notice`).
"""

import os
import sys

from peft_gralora._post_import import PostImportFinder

_DISABLE_VALUES = ("1", "true", "yes")


def disabled() -> bool:
    """Whether the user turned auto-activation off with ``PEFT_GRALORA_DISABLE``."""
    return os.environ.get("PEFT_GRALORA_DISABLE", "").lower() in _DISABLE_VALUES


def _install(_peft_module) -> None:
    from peft_gralora.integration import auto_install

    auto_install()


def _notice(_peft_module) -> None:
    from peft_gralora._disabled_notice import apply

    apply()


class PeftImportFinder(PostImportFinder):
    """The finder that installs GraLoRA (or, when disabled, the warning) when ``peft`` is imported, once."""

    def __init__(self, callback=_install) -> None:
        super().__init__({"peft"}, callback)


def register() -> None:
    """Arrange for GraLoRA to be installed when peft is first imported (or now, if it already is).

    With ``PEFT_GRALORA_DISABLE=1`` nothing of GraLoRA is installed; only the warning for GraLoRA adapters loaded as
    plain LoRA is."""
    callback = _notice if disabled() else _install
    if "peft" in sys.modules:
        callback(sys.modules["peft"])
        return
    if not any(isinstance(f, PeftImportFinder) for f in sys.meta_path):
        PeftImportFinder(callback).register()


def unregister() -> None:
    """Remove the finder (peft then imports unpatched)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PeftImportFinder)]


register()
disabled() or __import__("peft_gralora.axolotl._import_hook")  # guards axolotl's plain-LoRA paths (axolotl/guards.py)
