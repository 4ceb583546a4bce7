"""The benchmarks' precision axis: every timed and memory-measured call runs in the chosen regime, and the CLIs
record it (tiny shapes)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import precision, run
from benchmarks.common import REGIMES, interleaved_times, peak_alloc_bytes, set_regime


@pytest.fixture(autouse=True)
def _back_to_fp32():
    yield
    set_regime("fp32")


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_timed_and_measured_calls_run_in_the_regime(regime):
    weights = set_regime(regime)
    assert weights == REGIMES[regime][0]
    seen = []

    def probe():
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.ones(64, 64) @ torch.ones(64, 64)

    interleaved_times({"a": probe, "b": probe}, rounds=2, warmup=1)
    peak_alloc_bytes(probe)
    autocast = REGIMES[regime][1]
    assert len(seen) == 7
    assert all(enabled == (autocast is not None) for enabled, _ in seen)
    if autocast is not None:
        assert all(dtype == autocast for _, dtype in seen)


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="unknown regime 'bf8'"):
        set_regime("bf8")
    with pytest.raises(SystemExit):
        run.parse_args(["--regime", "bf8"])


def test_run_records_the_regime_and_its_weight_dtype(tmp_path):
    args = ["--only", "layer", "--quick", "--dims", "32", "--tokens", "8", "--ranks", "4", "--ks", "2"]
    args += ["--hybrid", "0", "--rounds", "1", "--layer-budget", "0.2", "--regime", "bf16", "--out", str(tmp_path)]
    run.main(args)
    env = json.loads((tmp_path / "layer.json").read_text())["environment"]
    assert (env["regime"], env["dtype"]) == ("bf16", "bfloat16")
    assert "bf16 on cpu" in (tmp_path / "layer.md").read_text()


def test_precision_stack_part_and_table(tmp_path, monkeypatch):
    """The stack part on a narrow stack under bf16 autocast, through the CLI, and its markdown row."""
    monkeypatch.setattr(precision, "bench_stack", _narrow(precision.bench_stack))
    payload = precision.main(
        ["--regimes", "bf16-autocast", "--parts", "stack", "--rounds", "2", "--r", "8", "--out", str(tmp_path)]
    )
    res = payload["results"]["bf16-autocast"]["stack"]
    assert set(res["median_s"]) == {"lora", "gralora", "upstream"} and res["rounds"] == 2
    assert res["peak gralora/lora"] > 0
    md = (tmp_path / "precision.md").read_text()
    assert "| bf16-autocast | stack |" in md and "Command: `python -m benchmarks.precision" in md


def _narrow(bench_stack):
    def narrow(dtype, r, k, rounds, tokens=2048):
        return bench_stack(dtype, r, k, rounds, tokens=16, width=64, depth=2)

    return narrow
