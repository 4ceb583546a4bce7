"""With PEFT_GRALORA_DISABLE=1, loading a GraLoRA adapter warns once, naming GraLoRA, the adapter and the fix."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import peft_gralora
from tests.gralora_mlp_reference import gralora_mlp

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(peft_gralora.__file__).resolve().parents[1]

LOAD = """
import sys, warnings
warnings.simplefilter("always")
{imports}
from peft import PeftModel, PeftConfig
from tests.models import TinyMLP
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    PeftModel.from_pretrained(TinyMLP(), sys.argv[1])
    PeftConfig.from_pretrained(sys.argv[1])
for w in caught:
    print("WARNING", type(w.message).__name__, str(w.message).replace(chr(10), " "))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gralora_adapter")
    gralora_mlp(k=2, hybrid_r=2, r=6).save_pretrained(path)
    return path


def _run(imports: str, path: Path, *flags: str) -> list[str]:
    env = {k: v for k, v in os.environ.items()}
    env["PEFT_GRALORA_DISABLE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT), *site.getsitepackages()])
    proc = subprocess.run(
        [sys.executable, *flags, "-c", LOAD.format(imports=imports), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]


@pytest.mark.parametrize("imports", ["import peft_gralora\nimport peft", "import peft\nimport peft_gralora"])
def test_disabled_load_warns_once_with_the_fix(saved, imports):
    warnings = _run(imports, saved, "-S")
    ours = [w for w in warnings if "GraloraDisabledWarning" in w]
    assert len(ours) == 1, warnings  # two loads of the same adapter: one warning
    text = ours[0]
    for part in ("GraLoRA adapter", str(saved), "gralora_k=2", "hybrid_r=2", "PEFT_GRALORA_DISABLE", "export-lora"):
        assert part in text, (part, text)
    # peft's misleading "upgrade the PEFT version" text is replaced, not added to
    assert not any("upgrade the PEFT version" in w for w in warnings), warnings


def test_disabled_plain_lora_load_is_silent(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from tests.models import TinyMLP

    torch.manual_seed(0)
    get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"])).save_pretrained(tmp_path)
    assert _run("import peft_gralora\nimport peft", tmp_path, "-S") == []


def test_install_removes_the_notice():
    from peft.config import PeftConfigMixin

    from peft_gralora import _disabled_notice
    from peft_gralora.integration import install, is_installed, uninstall

    originals = {name: PeftConfigMixin.__dict__[name] for name in ("from_pretrained", "from_peft_type")}
    was = is_installed()
    uninstall()
    try:
        _disabled_notice.apply()
        assert PeftConfigMixin.__dict__["from_peft_type"] is not originals["from_peft_type"]
        install()
        assert all(PeftConfigMixin.__dict__[name] is original for name, original in originals.items())
    finally:
        _disabled_notice.remove()
        if was:
            install()
        else:
            uninstall()
