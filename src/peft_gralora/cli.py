"""``peft-gralora``: command-line access to the adapter conversions in :mod:`peft_gralora.convert` and to the
fine-tuning run of :mod:`peft_gralora.finetune`.

    peft-gralora export-lora SRC DST             GraLoRA adapter -> exactly equivalent plain LoRA adapter
    peft-gralora convert SRC DST --to upstream   LoraConfig(use_gralora=True) adapter -> upstream GraloraConfig
    peft-gralora convert SRC DST --to variant    upstream GraloraConfig or GraLoRA-fork adapter -> our layout
    peft-gralora info DIR [--json]               what an adapter directory holds
    peft-gralora finetune [FLAGS]                fine-tune with GraLoRA: the flags and defaults of
                                                 example_gralora_finetuning.py (peft-gralora finetune --help)

Exit status 0 on success; on failure 1 and a one-line ``peft-gralora: error: ...`` on stderr (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

PROG = "peft-gralora"
FINETUNE = "finetune"


def _add_io(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="adapter directory to read (adapter_config.json + weights)")
    parser.add_argument("dst", metavar="DST", help="directory to write; must not exist or be empty")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    _add_allow_bin(parser)


def _add_allow_bin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-bin",
        action="store_true",
        help="accept a pickled adapter_model.bin when there is no adapter_model.safetensors (loaded with "
        "torch.load(weights_only=True); only for files you trust)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``peft-gralora`` (three subcommands, each with ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert and inspect GraLoRA adapter directories (no base model needed); fine-tune with GraLoRA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    export = sub.add_parser(
        "export-lora",
        help="write a GraLoRA adapter as an exactly equivalent plain LoRA adapter",
        description="Write a GraLoRA adapter (LoraConfig(use_gralora=True) or upstream GraloraConfig) as a plain LoRA "
        "adapter of rank k*(r - hybrid_r) + hybrid_r computing exactly the same function (no SVD). The result loads "
        "in any peft and in LoRA serving engines, without peft-gralora.",
    )
    _add_io(export)

    convert = sub.add_parser(
        "convert",
        help="convert between upstream GraloraConfig adapters and LoraConfig(use_gralora=True) adapters",
        description="Convert exactly between an upstream peft GraloraConfig adapter and a "
        "LoraConfig(use_gralora=True) adapter (upstream r = our r - hybrid_r, upstream alpha = our lora_alpha). "
        "--to variant also rewrites an adapter saved by the GraLoRA PEFT fork (gralora_A / gralora_B weights) in "
        "this package's layout.",
    )
    _add_io(convert)
    convert.add_argument(
        "--to",
        required=True,
        choices=("variant", "upstream"),
        help="variant: upstream or fork -> LoraConfig(use_gralora=True); upstream: LoraConfig(use_gralora=True) -> "
        "upstream",
    )

    info = sub.add_parser(
        "info",
        help="show what an adapter directory holds",
        description="Show an adapter's type, rank, k, hybrid_r, adapted modules, parameter count and effective rank.",
    )
    info.add_argument("dir", metavar="DIR", help="adapter directory")
    info.add_argument("--json", action="store_true", help="print the full information as JSON")
    _add_allow_bin(info)

    # listed here for the overview; `main` hands everything after the word to the fine-tuning parser itself
    sub.add_parser(
        FINETUNE,
        help="fine-tune a causal LM with GraLoRA (the flags of example_gralora_finetuning.py; "
        f"{PROG} {FINETUNE} --help)",
        add_help=False,
    )
    return parser


def _print_info(info: dict) -> None:
    print(f"{info['path']}: {info['type']} adapter (peft_type {info['peft_type']})")
    rank = f"r={info['r']}"
    if "upstream_r" in info:
        rank += f" (upstream r={info['upstream_r']})"
    print(f"  {rank}, gralora_k={info['gralora_k']}, hybrid_r={info['hybrid_r']}, lora_alpha={info['lora_alpha']}")
    print(
        f"  modules: {info['num_modules']}, parameters: {info['parameter_count']:,} "
        f"(adapter {info['adapter_parameters']:,}, other {info['other_parameters']:,})"
    )
    print(f"  effective rank: {info['effective_rank']} (exported plain LoRA rank: {info['plain_lora_rank']})")
    for row in info["modules"]:
        print(
            f"    {row['name']}: {row['in_features']} -> {row['out_features']}, r={row['r']}, "
            f"effective rank {row['effective_rank']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-gralora``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [FINETUNE]:
        # the fine-tuning run parses its own flags (same parser, same defaults as example_gralora_finetuning.py)
        from .finetune import main as finetune_main

        return finetune_main(argv[1:], prog=f"{PROG} {FINETUNE}")
    args = build_parser().parse_args(argv)
    # imported after parsing: --help must not pay for torch
    from .convert import adapter_info, convert_adapter, export_lora

    try:
        if args.command == "export-lora":
            dst = export_lora(args.src, args.dst, overwrite=args.overwrite, allow_pickle=args.allow_bin)
            print(f"wrote plain LoRA adapter to {dst} (r={adapter_info(dst)['r']})")
        elif args.command == "convert":
            dst = convert_adapter(
                args.src, args.dst, to=args.to, overwrite=args.overwrite, allow_pickle=args.allow_bin
            )
            print(f"wrote {'upstream GraloraConfig' if args.to == 'upstream' else 'GraLoRA-variant'} adapter to {dst}")
        else:
            info = adapter_info(args.dir, allow_pickle=args.allow_bin)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_info(info)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
