"""Build hook of peft-gralora: ships the import hook ``peft_gralora.pth`` at the top of site-packages.

The metadata (name, version, dependencies, extras, scripts) lives in pyproject.toml; this file only adds what
declarative configuration cannot: a file outside the package, installed next to it at the root of the wheel, because
``site`` reads ``*.pth`` files only there, once, at interpreter start (that is how ``LoraConfig(use_gralora=True)``
works without an import of peft_gralora).

- Wheels (``pip install .``, ``python -m build``): ``build_py`` copies the file into ``build_lib``, whose contents
  become the wheel's root (purelib), so it lands in site-packages and in the wheel's RECORD; ``pip uninstall``
  removes it with the rest.
- Editable installs (``pip install -e .``, PEP 660): setuptools runs ``build_py`` in editable mode, keeps nothing of
  ``build_lib`` for a src layout (the editable wheel only holds a path ``.pth``), and points the ``install`` command's
  ``install_lib`` at the unpacked editable wheel (the files it writes there go into the wheel, as scripts and data
  do). The hook goes there, hence into site-packages and RECORD as well; its ``import peft_gralora._hook`` then finds
  the package through setuptools' own ``__editable__.*.pth``, which ``site`` reads first (files are read in name
  order and ``_`` sorts before ``p``).
- sdists carry ``src/peft_gralora.pth`` (MANIFEST.in), so a wheel built from one has the hook too.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft_gralora.pth"
PTH_SOURCE = os.path.join("src", PTH)


class build_py_with_pth(build_py):
    """``build_py`` that also places ``src/peft_gralora.pth`` at the root of the (editable) wheel."""

    def run(self) -> None:
        super().run()
        if not os.path.isfile(PTH_SOURCE):
            raise FileNotFoundError(
                f"{PTH_SOURCE} is missing: the package would install without its import hook. Build from a full "
                "checkout or an sdist that includes it (MANIFEST.in)."
            )
        self.copy_file(PTH_SOURCE, self._pth_target(), preserve_mode=False)

    def _pth_target(self) -> str:
        if self.editable_mode:
            # PEP 660: setuptools' editable_wheel sets install.install_lib to the unpacked editable wheel
            wheel_root = self.get_finalized_command("install").install_lib
            if not wheel_root:
                raise RuntimeError(
                    "editable build: setuptools did not set install.install_lib to the editable wheel's folder, so "
                    f"{PTH} would be left out; this setuptools is not supported for editable installs of peft-gralora "
                    "(use a regular `pip install .`)"
                )
            return os.path.join(wheel_root, PTH)
        return os.path.join(self.build_lib, PTH)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        # the editable wheel gets the file directly, not through build_lib (whose outputs it would try to link)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
