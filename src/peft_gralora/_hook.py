"""Import hook run from ``peft_gralora.pth`` at interpreter start: installs GraLoRA the moment peft is imported.

It never makes ``import peft`` fail: outside the supported peft range it warns once and leaves peft as it is, except
that ``LoraConfig(use_gralora=True)`` then raises a clear error (see ``integration.auto_install``).

Costs microseconds: it imports nothing but ``os`` and ``sys`` (both already loaded) and registers a finder that only
answers for the module name ``peft``. ``PEFT_GRALORA_DISABLE=1`` turns it off.
"""

import os
import sys

_DISABLE_VALUES = ("1", "true", "yes")


def disabled() -> bool:
    """Whether the user turned auto-activation off with ``PEFT_GRALORA_DISABLE``."""
    return os.environ.get("PEFT_GRALORA_DISABLE", "").lower() in _DISABLE_VALUES


class _LoaderWithInstall:
    """Runs peft's own loader, then installs GraLoRA into the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        unregister()  # one shot: peft is being imported for real now
        self._loader.exec_module(module)
        # hand importlib's bookkeeping back to peft's real loader: nothing of ours stays on the module
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        from peft_gralora.integration import auto_install

        auto_install()


class PeftImportFinder:
    """A ``sys.meta_path`` finder that wraps the loader of ``peft`` (and nothing else), once."""

    _searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._searching:
            return None
        # Not one-shot here: importlib.util.find_spec("peft") (transformers' is_peft_available) only probes and
        # never executes the spec, so the finder must stay until exec_module. The flag keeps the lookup below
        # from finding us again.
        self._searching = True
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _LoaderWithInstall(spec.loader)
                    return spec
            return None
        finally:
            self._searching = False


def register() -> None:
    """Arrange for GraLoRA to be installed when peft is first imported (or now, if it already is)."""
    if disabled():
        return
    if "peft" in sys.modules:
        from peft_gralora.integration import auto_install

        auto_install()
        return
    if not any(isinstance(f, PeftImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftImportFinder())


def unregister() -> None:
    """Remove the finder (peft then imports unpatched)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PeftImportFinder)]


register()
