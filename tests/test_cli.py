"""The ``peft-gralora`` console script, run as users run it (a subprocess), one case per subcommand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_gralora.convert import adapter_info, convert_adapter, export_lora
from tests.convert_cases import Case, save_trained

SCRIPT = shutil.which("peft-gralora", path=str(Path(sys.executable).parent))


def cli(*args: str) -> subprocess.CompletedProcess:
    # the installed console script; `python -m peft_gralora.cli` where the package is not installed with scripts
    cmd = [SCRIPT] if SCRIPT else [sys.executable, "-m", "peft_gralora.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)


def _same_files(a: Path, b: Path) -> None:
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    case = Case("cli", "mlp", dict(r=6, lora_alpha=8, gralora_k=2, hybrid_r=2, target_modules=["lin0", "lin1"]))
    return save_trained(case, tmp_path_factory.mktemp("cli"))[0]


@pytest.mark.parametrize(
    "sub", [[], ["export-lora"], ["convert"], ["info"]], ids=["top", "export-lora", "convert", "info"]
)
def test_help(sub):
    proc = cli(*sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: peft-gralora")
    expected = {"export-lora": "k*(r - hybrid_r) + hybrid_r", "convert": "--to", "info": "effective rank"}
    assert (expected[sub[0]] if sub else "export-lora") in " ".join(proc.stdout.split())


def test_export_lora(adapter, tmp_path):
    proc = cli("export-lora", adapter, tmp_path / "plain")
    assert proc.returncode == 0, proc.stderr
    assert "r=10" in proc.stdout  # 2 * (6 - 2) + 2
    _same_files(tmp_path / "plain", export_lora(adapter, tmp_path / "api"))


def test_convert(adapter, tmp_path):
    proc = cli("convert", adapter, tmp_path / "up", "--to", "upstream")
    assert proc.returncode == 0, proc.stderr
    _same_files(tmp_path / "up", convert_adapter(adapter, tmp_path / "api", to="upstream"))


def test_info_json(adapter):
    proc = cli("info", adapter, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info == json.loads(json.dumps(adapter_info(adapter)))
    assert (info["type"], info["r"], info["gralora_k"], info["hybrid_r"], info["effective_rank"]) == (
        "gralora",
        6,
        2,
        2,
        10,
    )


def test_failure_is_one_line_and_dst_untouched(adapter, tmp_path):
    proc = cli("convert", adapter, tmp_path / "dst", "--to", "variant")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-gralora: error: Cannot convert"), proc.stderr
    assert not (tmp_path / "dst").exists()


def test_usage_error_exit_code(adapter, tmp_path):
    from peft_gralora.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", str(adapter), str(tmp_path / "dst")])  # --to is required
    assert exc.value.code == 2


def test_info_text(adapter, capsys):
    from peft_gralora.cli import main

    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "gralora adapter (peft_type LORA)" in out
    assert "r=6, gralora_k=2, hybrid_r=2" in out
    assert "lin0: 16 -> 24, r=6, effective rank 10" in out and "lin1: 24 -> 8, r=6, effective rank 8" in out
