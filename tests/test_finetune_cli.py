"""The fine-tuning CLI end to end on a tiny Llama saved to disk: flags, metrics.json, atomic save, reload check."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft_gralora.finetune import BUILTIN_MAX_STEPS, build_parser, parse_args, run
from peft_gralora.finetune.modeling import parse_target_modules
from peft_gralora.finetune.train import atomic_save, latest_checkpoint
from tests.finetune_helpers import save_tiny_model, task_records, write_jsonl

ISSUE_FLAGS = (
    "--base_model --data_path --data_name --output_dir --use_gralora --no-use_gralora --lora_r --lora_alpha "
    "--lora_dropout --lora_target_modules --gralora_k --hybrid_r --batch_size --micro_batch_size --num_epochs "
    "--num_train_epochs --max_steps --learning_rate --lr_scheduler_type --warmup_ratio --weight_decay --cutoff_len "
    "--val_set_size --eval_steps --save_steps --logging_steps --seed --bf16 --fp16 --gc --load_in_4bit --load_in_8bit "
    "--train_on_inputs --resume_from_checkpoint --merge"
).split()


def test_help_documents_every_flag_with_defaults():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    assert "(default: 16)" in text and "(default: outputs/gralora_finetuning)" in text


def test_flag_aliases_of_the_authors_and_upstream_scripts():
    a = parse_args(
        "--gralora_r 32 --gralora_alpha 64 --gralora_dropout 0.1 --eval_step 5 --save_step 7 --num_train_epochs 3 "
        "--gralora_target_modules q_proj,v_proj".split()
    )
    assert (a.lora_r, a.lora_alpha, a.lora_dropout, a.eval_steps, a.save_steps, a.num_epochs) == (32, 64, 0.1, 5, 7, 3)
    assert parse_target_modules(a.lora_target_modules) == ["q_proj", "v_proj"]
    assert parse_target_modules(["[q_proj,k_proj]"]) == ["q_proj", "k_proj"]
    assert parse_target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert parse_target_modules(["all-linear"]) == "all-linear"
    assert parse_args(["--use_lora"]).use_gralora is False
    assert parse_args(["--no-use_gralora"]).use_gralora is False
    assert parse_args(["--use_gralora"]).use_gralora is True
    assert parse_args(["--assistant_only", "false"]).train_on_inputs is True
    assert parse_args(["--chat_template_name", "alpaca-chat"]).prompt_template == "plain"
    # the authors' --data_name alone names the dataset
    assert parse_args(["--data_name", "x.jsonl", "--data_dir", "d"]).data_path == os.path.join("d", "x.jsonl")
    # the CPU-sized step budget applies to the built-in data only
    assert parse_args([]).max_steps == BUILTIN_MAX_STEPS
    assert parse_args(["--data_path", "x.jsonl"]).max_steps == -1
    with pytest.raises(SystemExit):
        parse_args(["--bf16", "--fp16"])
    with pytest.raises(SystemExit):
        parse_args(["--batch_size", "2", "--micro_batch_size", "4"])


def test_atomic_save_replaces_files_weights_last(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("old weights")
    (out / "adapter_config.json").write_text("old config")
    seen = []

    def write(tmp):
        # while the new adapter is being written, the old one is still whole in output_dir
        seen.append(sorted(os.listdir(out)))
        for name in ("tokenizer.json", "adapter_config.json", "adapter_model.safetensors"):
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write(f"new {name}")

    atomic_save(str(out), write)
    assert "adapter_model.safetensors" in seen[0][0] or "adapter_model.safetensors" in seen[0]
    assert (out / "adapter_model.safetensors").read_text() == "new adapter_model.safetensors"
    assert (out / "adapter_config.json").read_text() == "new adapter_config.json"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]

    def broken(tmp):
        with open(os.path.join(tmp, "adapter_config.json"), "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt  # killed mid-write: nothing of the new adapter lands

    with pytest.raises(KeyboardInterrupt):
        atomic_save(str(out), broken)
    assert (out / "adapter_config.json").read_text() == "new adapter_config.json"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert latest_checkpoint(str(tmp_path / "none")) is None
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text("{trunc")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model_dir = save_tiny_model(str(root / "model"))
    data = write_jsonl(str(root / "data.jsonl"), task_records(48))
    out = str(root / "out")
    argv = [
        "--base_model", model_dir, "--data_path", data, "--output_dir", out, "--val_set_size", "8",
        "--max_steps", "12", "--batch_size", "8", "--micro_batch_size", "4", "--learning_rate", "1e-2",
        "--lora_r", "8", "--gralora_k", "2", "--hybrid_r", "2", "--cutoff_len", "48", "--save_steps", "6",
        "--lora_dropout", "0", "--gen_max_new_tokens", "4", "--merge",
    ]  # fmt: skip
    metrics = run(argv)
    return model_dir, out, metrics


def test_tiny_end_to_end_run(tiny_run):
    model_dir, out, metrics = tiny_run
    saved = json.loads(open(os.path.join(out, "metrics.json")).read())
    for key in ("eval_loss_before", "eval_loss_after", "train_runtime_s", "trainable_params"):
        assert saved[key] == metrics[key]
    assert saved["eval_loss_after"] < saved["eval_loss_before"] - 0.1  # the toy task is learnable
    assert saved["global_step"] == 12 and saved["method"] == "gralora"
    # GraLoRA has exactly LoRA's parameter count: r (in + out) per targeted module
    assert saved["trainable_params"] == saved["lora_params_same_r"] > 0
    assert saved["reload_ok"] is True and saved["reload_max_abs_diff"] < 1e-4
    assert saved["adapter_effect_max_abs"] > 1e-2  # the trained adapter changes the outputs: the check can fail
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss_curve.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert open(os.path.join(out, "loss_curve.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert (cfg["use_gralora"], cfg["gralora_k"], cfg["hybrid_r"], cfg["r"]) == (True, 2, 2, 8)
    assert os.path.isdir(os.path.join(out, "checkpoint-12"))
    assert "answer" in saved["generation"]


def test_saved_adapter_is_gralora_and_reproduces_the_merged_model(tiny_run):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from peft_gralora.variant import GraLoraLinearVariant

    model_dir, out, _ = tiny_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_variant["default"], GraLoraLinearVariant) for m in layers)
    # the trained adapter is not a no-op, and the --merge output equals adapter-on-base
    ids = torch.randint(3, 40, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    with torch.no_grad():
        y_adapter, y_base, y_merged = (m(input_ids=ids).logits for m in (model, base, merged))
    assert (y_adapter - y_base).abs().max() > 1e-2
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-4, rtol=1e-4)


def test_plain_lora_mode_same_parameter_count(tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "model"), chat=True)
    data = write_jsonl(str(tmp_path / "d.jsonl"), task_records(16))
    metrics = run(
        ["--base_model", model_dir, "--data_path", data, "--output_dir", str(tmp_path / "out"), "--no-use_gralora",
         "--max_steps", "2", "--lora_r", "8", "--val_set_size", "4", "--cutoff_len", "48", "--save_steps", "0",
         "--gen_max_new_tokens", "0"]
    )  # fmt: skip
    cfg = json.loads(open(tmp_path / "out" / "adapter_config.json").read())
    assert metrics["method"] == "lora" and "use_gralora" not in cfg
    assert metrics["trainable_params"] == metrics["lora_params_same_r"]
    assert metrics["reload_ok"] and not [n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")]


SHARDING_CHECKS = [
    # (DeepSpeed stage or "fsdp", extra flags, error or None when the launch passes the check)
    (3, [], None),  # ZeRO-3 trains GraLoRA (tests/test_distributed.py runs it)
    (2, ["--load_in_4bit"], None),  # QGraLoRA with ZeRO-2: replicated bases
    ("fsdp", [], None),
    (3, ["--merge"], "--merge / --push_to_hub with DeepSpeed ZeRO-3"),
    (3, ["--load_in_4bit"], "with DeepSpeed ZeRO-3 is not supported by this script"),
    ("fsdp", ["--load_in_8bit"], "with FSDP is not supported by this script"),
    ("fsdp+3", [], "--fsdp and --deepspeed both shard the model"),
]


@pytest.mark.parametrize("engine, flags, error", SHARDING_CHECKS)
def test_sharding_flags_are_checked_before_the_model_loads(tmp_path, monkeypatch, engine, flags, error):
    from peft_gralora.finetune import train

    def no_model(*a, **k):
        raise AssertionError("must fail before loading anything")

    monkeypatch.setattr(train, "load_tokenizer", no_model)
    argv = ["--output_dir", str(tmp_path / "o"), *flags]
    if "fsdp" in str(engine):
        argv.append("--fsdp")
    stage = str(engine).removeprefix("fsdp").removeprefix("+")
    if stage:
        cfg = tmp_path / "ds.json"
        cfg.write_text(json.dumps({"zero_optimization": {"stage": int(stage)}}))
        argv += ["--deepspeed", str(cfg)]
    with pytest.raises(ValueError if error else AssertionError, match=error or "must fail before loading"):
        run(argv)


def test_accelerate_launch_environment_counts_as_sharding(tmp_path, monkeypatch):
    from peft_gralora.finetune import train

    monkeypatch.setattr(train, "load_tokenizer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp`
    with pytest.raises(ValueError, match="with FSDP is not supported by this script"):
        run(["--output_dir", str(tmp_path / "o"), "--load_in_4bit"])
