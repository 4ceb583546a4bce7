"""Faults: SIGKILL the fine-tuning script mid-training, rerun with --resume_from_checkpoint auto, same final step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.finetune_helpers import save_tiny_model, task_records, write_jsonl

SCRIPT = str(Path(__file__).resolve().parents[1] / "example_gralora_finetuning.py")
MAX_STEPS = 10


def _argv(model_dir: str, data: str, out: str) -> list[str]:
    return [
        sys.executable, SCRIPT, "--base_model", model_dir, "--data_path", data, "--output_dir", out,
        "--max_steps", str(MAX_STEPS), "--save_steps", "2", "--save_total_limit", "3", "--batch_size", "4",
        "--micro_batch_size", "2", "--lora_r", "8", "--val_set_size", "4", "--cutoff_len", "48",
        "--learning_rate", "5e-3", "--gen_max_new_tokens", "0", "--resume_from_checkpoint", "auto",
    ]  # fmt: skip


def test_sigkill_then_resume_auto(tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "d.jsonl"), task_records(32))
    out = str(tmp_path / "out")
    env = {**os.environ, "PEFT_GRALORA_FT_STEP_DELAY": "0.4", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_argv(model_dir, data, out), env=env, stdout=log, stderr=subprocess.STDOUT)
    target = Path(out) / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    log.close()

    # killed mid-training: checkpoints exist, the final adapter and metrics do not
    done = sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*"))
    assert done and max(done) < MAX_STEPS
    assert not (Path(out) / "adapter_model.safetensors").exists()
    assert not (Path(out) / "metrics.json").exists()

    env.pop("PEFT_GRALORA_FT_STEP_DELAY")
    second = subprocess.run(_argv(model_dir, data, out), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    resumed = int(Path(metrics["resumed_from"]).name.split("-")[1])
    assert 4 <= resumed < MAX_STEPS
    assert metrics["global_step"] == MAX_STEPS
    state = json.loads((Path(out) / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    # the resumed run logged only the steps after the checkpoint it resumed from
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[-1] == MAX_STEPS and all(s in steps for s in range(resumed + 1, MAX_STEPS + 1))
    assert metrics["reload_ok"] and (Path(out) / "adapter_model.safetensors").exists()
