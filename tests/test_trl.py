"""TRL: SFTTrainer(..., peft_config=LoraConfig(use_gralora=True, ...)) trains a GraLoRA adapter on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.finetune_helpers import save_tiny_model, task_records
from tests.reference import dense_output

trl = pytest.importorskip("trl")


def test_sft_trainer_with_gralora_lora_config(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_gralora.variant import GraLoraLinearVariant

    model_dir = save_tiny_model(str(tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = [f"{r['instruction']} : {r['input']} # {r['output']}" for r in task_records(32)]
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_gralora=True, gralora_k=2, hybrid_r=2,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=config,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_length=32,
            per_device_train_batch_size=8,
            max_steps=6,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
        ),  # fmt: skip
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_variant["default"], GraLoraLinearVariant) for m in layers)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainable == sum(8 * (m.in_features + m.out_features) for m in layers)  # LoRA's count at r=8
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: training moved it

    trainer.model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_gralora"], saved["gralora_k"], saved["hybrid_r"]) == (True, 2, 2)
    # the saved file holds exactly the trained weights (comparing logits would need accelerate's autocast wrapper,
    # which stays on trainer.model's forward after training)
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved_weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    trained = get_peft_model_state_dict(trainer.model)
    assert saved_weights.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(saved_weights[key], value.cpu()), key
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "adapter"))
    layers = [m for m in reloaded.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_variant["default"], GraLoraLinearVariant) for m in layers)


def test_hybrid_forward_under_cpu_autocast():
    """Regression: SFTTrainer trains under bf16 autocast on CPU; the hybrid branch must follow autocast's casts.

    The reference is the dense block formula (tests/reference.py) in float64 on the bf16-rounded operands; what is
    left is bf16 rounding of the latent and of the output, bounded by a few units of roundoff (2^-8) times the same
    formula on absolute values (the standard bound for a product chain; measured worst 1.5 over 1000 seeds)."""
    from peft_gralora.functional import gralora_forward

    gen = torch.Generator().manual_seed(0)
    x, weight_A, weight_B = (
        torch.randn(3, 8, generator=gen),
        torch.randn(6, 8, generator=gen),
        torch.randn(8, 6, generator=gen),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gralora_forward(x, weight_A, weight_B, 2, 2)
    assert y.dtype == torch.bfloat16
    operands = [t.bfloat16() for t in (x, weight_A, weight_B)]
    expected = dense_output(*operands, 2, 2)
    bound = 2**-8 * dense_output(*(t.abs() for t in operands), 2, 2)
    error = (y.double() - expected).abs()
    assert (error <= 3 * bound).all(), (error / bound).max()
