"""How the run is launched: this process's rank, the engine that shards the weights (checked before anything heavy
loads), the accelerator, and the helpers that depend on them."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any

__all__ = ["STEP_DELAY_ENV"]

# fault-injection for the resume test: seconds to sleep after every optimizer step (never set it otherwise)
STEP_DELAY_ENV = "PEFT_GRALORA_FT_STEP_DELAY"


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _log(msg: str) -> None:
    if _dist()[0] == 0:
        print(msg, flush=True)


def _sharding(args: Namespace) -> str | None:
    """Which engine shards the weights: ``"fsdp"``, ``"zero3"``, ``"zero2"`` or None (DDP / one process).

    GraLoRA trains under all of them (peft's FSDP wrap policy is made GraLoRA-aware by this package; ZeRO-3 gathers
    the factors GraLoRA reads inside a forward). Checked before anything heavy loads.

    Raises:
        ValueError: an unreadable DeepSpeed config, ``--fsdp`` together with ``--deepspeed``, or a 4-/8-bit base with
            FSDP / ZeRO-3 (see the README's "Scaling out").
    """
    stage = None
    if args.deepspeed:
        try:
            with open(args.deepspeed, encoding="utf-8") as fh:
                stage = json.load(fh).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError) as err:
            raise ValueError(f"--deepspeed {args.deepspeed}: cannot read the DeepSpeed JSON config ({err})") from err
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp and (args.deepspeed or stage is not None):
        raise ValueError("--fsdp and --deepspeed both shard the model: choose one")
    engine = "fsdp" if fsdp else {"3": "zero3", "2": "zero2"}.get(str(stage))
    if engine == "zero3" and (args.merge or args.push_to_hub):
        raise ValueError(
            "--merge / --push_to_hub with DeepSpeed ZeRO-3: every model this script loads is partitioned then, so "
            "rank 0 cannot merge or upload it alone. Train without them, then merge in one process: "
            "PeftModel.from_pretrained(base, OUTPUT_DIR).merge_and_unload()."
        )
    if engine in ("fsdp", "zero3") and (args.load_in_4bit or args.load_in_8bit):
        raise ValueError(
            f"--load_in_4bit / --load_in_8bit with {'FSDP' if fsdp else 'DeepSpeed ZeRO-3'} is not supported by this "
            "script: bitsandbytes' quantized weights cannot be sharded here. Use DDP (torchrun / accelerate launch "
            "--multi_gpu) or DeepSpeed ZeRO-2 for QGraLoRA."
        )
    return engine


def _fsdp_units(model: Any) -> list[str]:
    """Names of the FSDP2 units in ``model`` ("" for the root): where the Trainer really sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _push_saved(folder: str, repo_id: str) -> None:
    """Upload the adapter files written to ``folder`` (the trained model is sharded: push what was saved)."""
    from huggingface_hub import HfApi

    HfApi().upload_folder(folder_path=folder, repo_id=repo_id, allow_patterns=["adapter_*", "tokenizer*", "*.md"])


def _has_accelerator() -> bool:
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()
