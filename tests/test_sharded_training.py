"""Sharded training with 2 gloo CPU processes: GraLoRA under FSDP2 (decoder-layer units, and units around every
lora_A / lora_B as peft's wrap policy asks), FSDP1 with peft's (patched) policy, DeepSpeed ZeRO-2 and ZeRO-3.

Every case of ``tests/distributed_worker.py`` compares, on both ranks, the full adapter gradients before each of 3
AdamW steps and the weights after them with one process training on the whole batch (tolerance 1e-5), the eval
logits between steps where asked, and the adapter file saved from the sharded model (byte-identical before training,
equal tensors after). QLoRA + FSDP2 cases load an NF4 base (bnb_4bit_quant_storage float32 / uint8); two of them
measure bitsandbytes' CPU repack hazard (GraLoRA and plain LoRA alike), which must stay wrong while the README says
so. One torchrun launch runs the whole matrix, to pay the start-up (torch, transformers, deepspeed imports) once:
50-80 s for the 27 cases on 2 busy CPU cores. Alone:

    pytest tests/test_sharded_training.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_worker import CASES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")


def _available(case: str) -> bool:
    if CASES[case]["engine"].startswith("zero"):
        return importlib.util.find_spec("deepspeed") is not None
    return True


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sharded") / "results.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "distributed_worker.py"), str(out), *filter(_available, CASES),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    results: dict[str, list[dict]] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            results.setdefault(row["case"], []).append(row)
    if proc.returncode != 0 and not results:
        pytest.fail(f"torchrun failed before any case ran:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_one_process(matrix, case):
    if not _available(case):
        pytest.skip("deepspeed is not installed")
    rows = matrix.get(case)
    assert rows is not None and len(rows) == 2, f"{case}: no result from both ranks (a rank hung or crashed)"
    for row in rows:
        assert row["ok"], json.dumps(row, indent=1)
