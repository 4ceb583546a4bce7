"""A ``sys.meta_path`` finder that calls back right after named modules are imported.

Imports nothing but ``sys``: the import hook loads it at interpreter start. Used for ``peft`` (install GraLoRA) and
for diffusers' loader modules imported after peft (apply their patch rows).
"""

import sys


class _LoaderThenCallback:
    """Runs a module's own loader, gives importlib's bookkeeping back to it, then calls the finder's callback."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._finder.executing(module.__name__)  # one shot per name: the module is being imported for real now
        self._loader.exec_module(module)
        # nothing of ours stays on the module
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._finder.callback(module)


class PostImportFinder:
    """Answers only for ``names``: wraps their real loader so that ``callback(module)`` runs once each has executed.

    Not one-shot at lookup: ``importlib.util.find_spec(name)`` (transformers' ``is_peft_available``) only probes and
    never executes the spec, so a name stays until its module executes; the finder leaves ``sys.meta_path`` when no
    name is left.
    """

    def __init__(self, names, callback):
        self.names = set(names)
        self.callback = callback
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or self._searching:
            return None
        self._searching = True  # keeps the lookup below from finding us again
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None) if finder is not self else None
                spec = find_spec(fullname, path, target) if find_spec else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _LoaderThenCallback(spec.loader, self)
                    return spec
            return None
        finally:
            self._searching = False

    def executing(self, name):
        """``name`` is being executed: answer for it no more, and leave ``sys.meta_path`` once nothing is left."""
        self.names.discard(name)
        if not self.names:
            self.unregister()

    def register(self):
        """Put this finder first on ``sys.meta_path`` (once)."""
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def unregister(self):
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
