"""``import peft_gralora`` activates GraLoRA where ``.pth`` files are not processed (issue 18 item 1).

Each case runs in a fresh ``python -S`` interpreter: no site-packages processing, so the ``.pth`` hook never runs and
only ``PYTHONPATH`` (this checkout's ``src``, the repository root for ``tests``, and site-packages) finds the code.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_gralora
from tests.gralora_mlp_reference import base_of, factors_of, gralora_mlp, reference_output

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(peft_gralora.__file__).resolve().parents[1]  # the checkout under test (PYTHONPATH may name another)

LOAD = """
import json, sys, torch
{imports}
from peft import LoraConfig, PeftModel
from tests.models import TinyMLP
import peft_gralora
base = TinyMLP()
base.load_state_dict(torch.load(sys.argv[1] + "/base.pt"))
model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
x = torch.load(sys.argv[1] + "/x.pt")
with torch.no_grad():
    out = model(x).tolist()
cfg = LoraConfig(r=4, use_gralora=True, gralora_k=2)
print(json.dumps({{"out": out, "installed": peft_gralora.is_installed(), "cfg": [cfg.use_gralora, cfg.gralora_k]}}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PEFT_GRALORA_DISABLE"}
    paths = [str(SRC), str(ROOT), *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", "-c", code, *args], capture_output=True, text=True, env=_env(**env), timeout=300
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved GraLoRA adapter (k=2, hybrid_r=2, r=6), its base weights, an input and the reference output."""
    path = tmp_path_factory.mktemp("gralora_adapter")
    model = gralora_mlp(k=2, hybrid_r=2, r=6)
    base = base_of(model)
    torch.save(base.state_dict(), path / "base.pt")
    x = torch.randn(3, 16)
    torch.save(x, path / "x.pt")
    model.save_pretrained(path)
    expected = reference_output(base, factors_of(model), x, 2, 2, scaling=8 / 6)
    plain = reference_output(base, factors_of(model), x, 1, 0, scaling=8 / 6)  # what plain LoRA would compute
    assert (expected - plain).abs().max() > 0.1  # the test can tell GraLoRA from plain LoRA
    return path, expected


@pytest.mark.parametrize("order", ["peft_gralora_first", "peft_first"])
def test_import_activates_without_pth(saved, order):
    path, expected = saved
    first, second = ("peft_gralora", "peft") if order == "peft_gralora_first" else ("peft", "peft_gralora")
    imports = f"import {first}\nimport {second}"
    proc = _run(LOAD.format(imports=imports), str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["installed"] is True
    assert result["cfg"] == [True, 2]
    torch.testing.assert_close(torch.tensor(result["out"], dtype=torch.float64), expected, atol=1e-5, rtol=1e-5)


def test_no_site_really_skips_the_pth_hook():
    # without `import peft_gralora`, python -S leaves peft vanilla: the cases above test the import, not the hook
    proc = _run("import sys, peft; from peft import LoraConfig; print('peft_gralora' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_import_honours_disable():
    code = (
        "import peft_gralora, peft\nfrom peft import LoraConfig\n"
        "try:\n    LoraConfig(r=4, use_gralora=True)\nexcept TypeError as e:\n    print('refused', e)\n"
        "print(peft_gralora.is_installed())"
    )
    proc = _run(code, PEFT_GRALORA_DISABLE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("refused") and "use_gralora" in lines[0]
    assert lines[-1] == "False"


def test_import_stays_cheap():
    # the package import must not pull in peft or torch (it runs at interpreter start through the .pth hook)
    code = "import sys, peft_gralora; print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
