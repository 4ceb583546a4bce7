"""Packaging: a wheel, an sdist and an editable install each install a working import hook; uninstall removes it.

Each artifact is built from a copy of the source tree (so the checkout stays clean), installed into a fresh virtual
environment and checked in a fresh interpreter: ``LoraConfig(use_gralora=True)`` must work without any import of
peft_gralora (only ``site`` reading ``peft_gralora.pth`` at start-up can have installed GraLoRA), the package must come
from what was installed, and ``pip uninstall`` must take the ``.pth`` away with the rest.

Fast and offline: the fresh environments have no pip and no packages of their own. A path-only ``.pth`` line puts
the running environment's site-packages on their ``sys.path`` (torch, peft and setuptools come from there; that
directory's own ``.pth`` files, this repository's install included, are not executed), and the running environment's
pip installs into them with ``--python``, ``--no-deps``, ``--no-build-isolation`` and ``--no-index``.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two builds and three fresh environments: about 30 s of CPU in all

REPO = Path(__file__).resolve().parent.parent
PTH = "peft_gralora.pth"
# what the build needs from the repository (the package, the hook, the metadata and the texts it points at)
SOURCES = ["src", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"]
# a fresh interpreter that activates GraLoRA through peft only, then says where peft_gralora came from
HOOK_CHECK = (
    "import sys; from peft import LoraConfig; c = LoraConfig(r=4, use_gralora=True, gralora_k=2); "
    "assert c.use_gralora and c.gralora_k == 2; import peft_gralora; print(peft_gralora.__file__)"
)


def _env() -> dict[str, str]:
    """The environment for child processes: nothing that would find this checkout's package or turn the hook off."""
    drop = {"PYTHONPATH", "PEFT_GRALORA_DISABLE", "PYTHONNOUSERSITE", "PIP_REQUIRE_VIRTUALENV"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(*command: str | Path, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_sources(dest: Path, without: tuple[str, ...] = ()) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", *without)
    for name in SOURCES:
        src = REPO / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))
    return dest


def _build(source: Path, outdir: Path) -> subprocess.CompletedProcess:
    # without --sdist/--wheel: the sdist first, then the wheel built from that sdist (so the sdist must be complete)
    return _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", outdir, source, cwd=source, ok=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """``{"source": copied tree, "wheel": ..., "sdist": ...}``."""
    pytest.importorskip("build")
    root = tmp_path_factory.mktemp("packaging")
    source = _copy_sources(root / "source")
    proc = _build(source, root / "dist")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (root / "dist").glob("*.whl")
    (sdist,) = (root / "dist").glob("*.tar.gz")
    return {"source": source, "wheel": wheel, "sdist": sdist}


def _fresh_venv(path: Path) -> Path:
    """A virtual environment without pip that sees the running environment's packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = _site_packages(python, path)
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # '_' sorts before 'p': site reads this line (a path, nothing executed) before peft_gralora.pth
    (purelib / "_shared_site_packages.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    return python


def _pip(python: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "pip", "--python", python, *args, cwd=cwd)


def _site_packages(python: Path, cwd: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run(python, "-c", code, cwd=cwd).stdout.strip())


def test_wheel_and_sdist_contents_and_metadata(built):
    import peft_gralora

    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        recorded = {line.split(",")[0] for line in whl.read(record).decode().splitlines()}
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(whl.read(metadata_name))
    # the hook at the root of the wheel (so in site-packages) and in RECORD (so uninstall removes it)
    assert PTH in names and PTH in recorded
    assert (REPO / "src" / PTH).read_bytes() == zipfile.ZipFile(built["wheel"]).read(PTH)
    # every module of the package, whoever added it (a folder without __init__.py would be left out)
    package = REPO / "src" / "peft_gralora"
    sources = {
        f"peft_gralora/{p.relative_to(package).as_posix()}"
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert sources and sources <= names, sorted(sources - names)
    assert metadata["Version"] == peft_gralora.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata.get_all("Classifier") and metadata.get_all("Project-URL")
    assert metadata["Description-Content-Type"] == "text/markdown"
    with tarfile.open(built["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        members = {n.removeprefix(f"{top}/") for n in sdist.getnames()}
    assert {"setup.py", "pyproject.toml", f"src/{PTH}", "LICENSE", "CHANGELOG.md", "README.md"} <= members
    assert "src/peft_gralora/__init__.py" in members


def test_twine_check_passes_on_wheel_and_sdist(built):
    pytest.importorskip("twine")
    artifacts = [built["wheel"], built["sdist"]]
    proc = _run(sys.executable, "-m", "twine", "check", "--strict", *artifacts, cwd=built["source"])
    assert proc.stdout.count("PASSED") == 2, proc.stdout


@pytest.mark.parametrize("kind", ["wheel", "sdist", "editable"])
def test_install_gives_a_working_hook_and_uninstall_removes_it(built, kind, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    site_packages = _site_packages(python, tmp_path)
    target = ["-e", built["source"]] if kind == "editable" else [built[kind]]
    _pip(python, "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--force-reinstall", *target,
         cwd=tmp_path)  # fmt: skip
    assert (site_packages / PTH).read_bytes() == (REPO / "src" / PTH).read_bytes()

    where = Path(_run(python, "-c", HOOK_CHECK, cwd=tmp_path).stdout.strip().splitlines()[-1])
    # the package that was installed: in the venv, or (editable) in the tree it was installed from
    expected_root = built["source"] / "src" if kind == "editable" else site_packages
    assert where == expected_root / "peft_gralora" / "__init__.py"

    _pip(python, "uninstall", "-y", "-q", "peft-gralora", cwd=tmp_path)
    assert not (site_packages / PTH).exists()
    left = sorted(p.name for p in site_packages.iterdir() if "gralora" in p.name.lower())
    assert left == [], left
    proc = _run(python, "-c", "import peft_gralora", cwd=tmp_path, ok=False)
    assert proc.returncode != 0 and "No module named 'peft_gralora'" in proc.stderr


def test_build_without_the_hook_file_fails_clearly(tmp_path):
    """A tree without src/peft_gralora.pth must not build a wheel that silently lacks the hook."""
    pytest.importorskip("build")
    source = _copy_sources(tmp_path / "source", without=(PTH,))
    proc = _build(source, tmp_path / "dist")
    assert proc.returncode != 0
    assert "src/peft_gralora.pth is missing: the package would install without its import hook" in (
        proc.stdout + proc.stderr
    )
    assert not list((tmp_path / "dist").glob("*.whl"))
