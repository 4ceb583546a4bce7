"""scripts/gpu-check.sh cannot rot: its dry run (CPU, tiny sizes, the same plumbing as on a GPU) runs here, and its
refusals say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
FILES = {"env.json", "layer.json", "train.json", "decode.json", "compile.json", "gpu.md", "tests.log", "run.log"}


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("PEFT_GRALORA_TEST_DEVICE", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # ~2-3 minutes on an idle 2-core machine (it runs the CUDA tests on CPU, then every part)
def test_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gpu"
    proc = _run("--dry-run", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files, no folders: what a device call returns

    tests_log = (out / "tests.log").read_text()
    assert " passed" in tests_log and " failed" not in tests_log and "error" not in tests_log.splitlines()[-1]
    assert "test_forward_and_gradients_match_the_reference" in tests_log  # the cases ran (on CPU), not skipped

    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["device"] == "cpu" and env["peft_gralora_from"] == str(ROOT / "src" / "peft_gralora")
    regimes = {"autocast", "bf16"}
    for part, methods in (("layer", {"lora", "gralora", "upstream"}), ("train", {"lora", "gralora", "upstream"})):
        cases = json.loads((out / f"{part}.json").read_text())["cases"]
        assert {c["regime"] for c in cases} == regimes
        for c in cases:
            assert set(c["median_s"]) == methods and all(v > 0 for v in c["median_s"].values()), (part, c)
            assert c["gralora/lora"] > 0 and not any(k.endswith("error") for k in c), (part, c)
    train = json.loads((out / "train.json").read_text())["cases"]
    assert all(c["peak total gralora/lora"] > 0 and c["trainable_params"]["gralora"] > 0 for c in train)
    decode = json.loads((out / "decode.json").read_text())["cases"]
    assert {(c["regime"], c["batch"]) for c in decode} == {(r, b) for r in regimes for b in ("1", "mixed 3")}
    assert all(c["ms_per_token"]["gralora"] > 0 for c in decode)
    compiled = json.loads((out / "compile.json").read_text())["cases"]
    assert {c["method"] for c in compiled} == {"lora", "gralora"}
    assert all(c["graphs"] >= 1 and c["compile_cold_s"] > 0 and "error" not in c for c in compiled)

    report = (out / "gpu.md").read_text()
    for heading in ("One adapted layer", "Training step", "Unmerged decode", "Compiled training step"):
        assert heading in report
    assert "DRY RUN" in report and "Parts without results" not in report
    run_log = (out / "run.log").read_text()
    assert "] OK" in run_log.splitlines()[-1] and "TIMED OUT" not in run_log


def test_unknown_argument_is_refused():
    proc = _run("--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a CUDA device"
)
def test_gpu_mode_without_a_gpu_is_refused_before_writing_results(tmp_path):
    proc = _run("--out", str(tmp_path / "gpu"), timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu").exists()


def test_benchmark_refuses_cuda_without_a_device():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    from benchmarks import gpu

    with pytest.raises(SystemExit):
        gpu.parse_args(["--part", "layer", "--out", "x"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--part", "layer,nonsense", "--out", "x", "--dry-run"])
    assert gpu.parse_args(["--part", "env,layer", "--out", "x", "--dry-run"]).parts == ["env", "layer"]


def test_wheels_script_parses_and_documents_itself():
    """scripts/gpu-wheels.sh needs a package index, so CI only checks that it parses and refuses bad arguments."""
    script = ROOT / "scripts" / "gpu-wheels.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    help_ = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--no-bnb" in help_.stdout
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
