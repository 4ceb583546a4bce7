"""The three ways to start the fine-tuning run: ``example_gralora_finetuning.py``, ``python -m peft_gralora.finetune``
and ``peft-gralora finetune``: the same flags and defaults, the same code, and a tiny real run through each new one."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peft_gralora import cli
from peft_gralora.finetune import build_parser, parse_args, train
from tests.finetune_helpers import save_tiny_model, task_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("peft-gralora", path=str(Path(sys.executable).parent))
CONSOLE = [SCRIPT] if SCRIPT else [sys.executable, "-m", "peft_gralora.cli"]
MODULE = [sys.executable, "-m", "peft_gralora.finetune"]
FLAGS = ["--lora_r", "32", "--gralora_k", "4", "--hybrid_r", "4", "--no-use_gralora", "--eval_step", "3"]


def _help_body(text: str) -> str:
    """The help text after its usage block (which names the program), with line wrapping undone."""
    return " ".join(text.split("\n\n", 1)[1].split())


@pytest.mark.parametrize(
    "command, prog",
    [(CONSOLE + ["finetune"], "peft-gralora finetune"), (MODULE, "python -m peft_gralora.finetune")],
    ids=["peft-gralora finetune", "python -m"],
)
def test_help_lists_the_example_scripts_flags(command, prog):
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {prog} ")
    assert _help_body(proc.stdout) == _help_body(build_parser().format_help())
    assert "(default: outputs/gralora_finetuning)" in _help_body(proc.stdout)


def test_console_help_lists_the_finetune_subcommand():
    proc = subprocess.run([*CONSOLE, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "finetune" in proc.stdout and "example_gralora_finetuning.py" in " ".join(proc.stdout.split())


@pytest.fixture
def captured(monkeypatch):
    """Replaces the run by a recorder of the namespace each entry point hands it."""
    seen = []

    def fake_run(args, **overrides):
        seen.append(vars(args))
        return {"reload_ok": True}

    monkeypatch.setattr(train, "run", fake_run)
    return seen


@pytest.mark.parametrize("flags", [[], FLAGS], ids=["defaults", "flags"])
def test_every_entry_point_hands_the_same_options_to_the_same_run(captured, monkeypatch, flags):
    assert cli.main(["finetune", *flags]) == 0
    monkeypatch.setattr(sys, "argv", ["python -m peft_gralora.finetune", *flags])
    with pytest.raises(SystemExit) as exit_module:
        runpy.run_module("peft_gralora.finetune", run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["example_gralora_finetuning.py", *flags])
    with pytest.raises(SystemExit) as exit_script:
        runpy.run_path(str(ROOT / "example_gralora_finetuning.py"), run_name="__main__")
    assert exit_module.value.code == exit_script.value.code == 0
    expected = vars(parse_args(flags))
    assert captured == [expected, expected, expected]
    if flags:  # the flags arrived (the defaults differ)
        assert (expected["lora_r"], expected["use_gralora"], expected["eval_steps"]) == (32, False, 3)


def test_a_failed_reload_check_is_a_failing_exit_status(monkeypatch):
    monkeypatch.setattr(train, "run", lambda args, **_: {"reload_ok": False})
    assert cli.main(["finetune"]) == 1


def test_bad_flags_are_usage_errors_naming_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--bf16", "--fp16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "peft-gralora finetune: error: --bf16 and --fp16 exclude each other" in err


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    model_dir = save_tiny_model(str(root / "model"))
    data = write_jsonl(str(root / "data.jsonl"), task_records(16))
    return root, model_dir, data


def _tiny_flags(model_dir: str, data: str, out: Path) -> list[str]:
    return [
        "--base_model", model_dir, "--data_path", data, "--output_dir", str(out), "--max_steps", "2",
        "--lora_r", "8", "--val_set_size", "4", "--cutoff_len", "48", "--save_steps", "0", "--gen_max_new_tokens", "0",
        "--learning_rate", "1e-2",
    ]  # fmt: skip


def _check_output(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["use_gralora"], cfg["r"], metrics["global_step"]) == (True, 8, 2)
    assert metrics["reload_ok"] is True and metrics["adapter_effect_max_abs"] > 0
    return metrics


def test_tiny_run_through_the_console_subcommand(tiny_setup):
    root, model_dir, data = tiny_setup
    assert cli.main(["finetune", *_tiny_flags(model_dir, data, root / "console")]) == 0
    _check_output(root / "console")


def test_tiny_run_through_python_dash_m(tiny_setup):
    root, model_dir, data = tiny_setup
    proc = subprocess.run(
        [*MODULE, *_tiny_flags(model_dir, data, root / "module")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(root / "module")
    assert "reload check" in proc.stdout
