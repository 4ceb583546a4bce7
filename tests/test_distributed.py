"""DDP with 2 CPU processes (gloo) on a tiny model, started by torchrun and by `accelerate launch`: both ranks end with
identical adapter weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune_helpers import save_tiny_model, task_records, write_jsonl

SCRIPT = str(Path(__file__).resolve().parents[1] / "example_gralora_finetuning.py")


# accelerate starts CPU-only multi-process runs through torch.distributed too when asked for --multi_gpu; the script
# itself falls back to CPU (gloo) when there is no GPU
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ],
}  # fmt: skip


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes(tmp_path, launcher):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_gralora.finetune.train import adapter_fingerprint

    model_dir = save_tiny_model(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "d.jsonl"), task_records(40))
    out = tmp_path / "out"
    cmd = [
        sys.executable, *LAUNCHERS[launcher], SCRIPT,
        "--base_model", model_dir, "--data_path", data, "--output_dir", str(out), "--max_steps", "4",
        "--batch_size", "4", "--micro_batch_size", "1", "--lora_r", "8", "--gralora_k", "2", "--val_set_size", "4",
        "--cutoff_len", "48", "--learning_rate", "1e-2", "--save_steps", "0", "--gen_max_new_tokens", "0",
        "--lora_dropout", "0.1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    # each rank hashed its own trainable tensors after training; DDP must have kept them identical
    shas = metrics["rank_adapter_sha256"]
    assert len(shas) == 2 and shas[0] == shas[1] and metrics["ranks_in_sync"] is True
    # ... and equal to the adapter that was saved, which is not the untrained init
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    saved = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    assert adapter_fingerprint(saved) == shas[0]
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out), is_trainable=True)
    for name, p in fresh.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    assert adapter_fingerprint(fresh) != shas[0]
    assert "2 process(es)" in proc.stdout and "x 2 accumulation" in proc.stdout


DS_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_two_cpu_processes_sharded(tmp_path, engine):
    """The script under DeepSpeed ZeRO-2 / ZeRO-3 (the shipped configs; DeepSpeed runs on CPU) and --fsdp, through the
    Trainer: it trains, saves the full adapter from the sharded model, and the saved adapter is the trained one."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    model_dir = save_tiny_model(str(tmp_path / "model"))
    data = write_jsonl(str(tmp_path / "d.jsonl"), task_records(40))
    out = tmp_path / "out"
    flags = ["--fsdp"] if engine == "fsdp" else ["--deepspeed", str(DS_CONFIGS / f"ds_{engine}.json")]
    cmd = [
        sys.executable, *LAUNCHERS["torchrun"], SCRIPT,
        "--base_model", model_dir, "--data_path", data, "--output_dir", str(out), "--max_steps", "3",
        "--batch_size", "4", "--micro_batch_size", "1", "--lora_r", "8", "--gralora_k", "2", "--hybrid_r", "2",
        "--val_set_size", "4", "--cutoff_len", "48", "--learning_rate", "1e-2", "--save_steps", "0",
        "--gen_max_new_tokens", "0", *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3 and metrics["sharding"] == engine
    # ZeRO-3: the saved tensors equal the trained ones gathered from the partitions; otherwise the reloaded adapter
    # reproduces the trained model's logits. Either way the adapter moved the outputs
    assert metrics["reload_ok"] and metrics["reload_max_abs_diff"] <= 1e-5
    assert metrics["adapter_effect_max_abs"] > 1e-3
    if engine == "fsdp" and not metrics["fsdp_units"]:
        # accelerate runs FSDP on accelerators only: on CPU the Trainer falls back to DDP, and the script says so
        assert "accelerate did not shard" in proc.stdout
