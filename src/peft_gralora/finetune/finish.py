"""The steps after training: rank checks, the probe batch, the sharded save, the final atomic save and loss curve,
the reload check, ``--merge``, one generated answer, and the metrics file."""

from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from collections.abc import Callable
from typing import Any

from .arguments import method_label
from .data import PadCollator, TokenizedSplits
from .evaluation import _generate, _logits, _loss_curve, _max_diff, adapter_fingerprint
from .launch import _fsdp_units, _log
from .saving import _write_json, atomic_save


def _check_ranks(trainer: Any, sharding: str | None, world_size: int, metrics: dict[str, Any]) -> None:
    """Step 5a: under DDP / ZeRO-2 every rank fingerprints its own (full) adapter, which must be identical everywhere.
    FSDP / ZeRO-3 ranks hold shards: they save through the Trainer, which gathers the full adapter (a collective)."""
    import torch

    metrics["sharding"] = sharding
    metrics["fsdp_units"] = _fsdp_units(trainer.model_wrapped)
    if sharding == "fsdp" and not metrics["fsdp_units"]:
        _log("note: --fsdp was asked, but accelerate did not shard the model (it runs FSDP on accelerators only): DDP")
    if sharding in ("fsdp", "zero3"):
        metrics["rank_adapter_sha256"] = None
        return
    fingerprint = adapter_fingerprint(trainer.model)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, fingerprint)
        metrics["rank_adapter_sha256"] = gathered
        metrics["ranks_in_sync"] = len(set(gathered)) == 1
    else:
        metrics["rank_adapter_sha256"] = [fingerprint]


def _probe_trained(trainer: Any, data: TokenizedSplits) -> tuple[dict, Any, Any]:
    """Step 5b: the trained model's logits on a probe batch, with and without the adapter, for the reload check (a
    forward of a sharded model is a collective: every rank runs it).

    Returns:
        The probe batch, the trained logits and the base logits, each ``(2, seq, vocab)``.
    """
    model = trainer.model
    model.eval()
    probe = PadCollator(data.tokenizer.pad_token_id)((data.eval_ds.examples or data.train_ds.examples)[:2])
    probe = {k: v.to(model.device) for k, v in probe.items()}
    trained_logits = _logits(model, probe)
    with trainer.accelerator.unwrap_model(model).disable_adapter():
        base_logits = _logits(model, probe)
    return probe, trained_logits, base_logits


def _gather_sharded(trainer: Any, sharding: str | None, staging: str) -> dict | None:
    """Step 5c: a sharded model saves through the Trainer into ``staging`` (every rank: the full state dict is
    gathered, rank 0 writes). Under ZeRO-3 every model loaded now is partitioned by deepspeed.zero.Init, and rank 0
    cannot run one alone: the saved file is checked against the trained adapter weights instead, gathered on every
    rank (small) and returned; None otherwise."""
    if sharding not in ("fsdp", "zero3"):
        return None
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if sharding != "zero3":
        return None
    import deepspeed
    from peft import get_peft_model_state_dict

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with deepspeed.zero.GatheredParameters([p for p in unwrapped.parameters() if p.requires_grad]):
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrapped).items()}


def _save_final(
    args: Namespace, trainer: Any, tokenizer: Any, sharded: bool, staging: str, metrics: dict[str, Any]
) -> None:
    """Step 6: the final adapter and tokenizer, atomically; the loss curve."""
    model = trainer.model

    def write_adapter(tmp: str) -> None:
        if sharded:
            for name in os.listdir(staging):
                if name.startswith("adapter_") or name == "README.md":
                    shutil.move(os.path.join(staging, name), os.path.join(tmp, name))
            shutil.rmtree(staging, ignore_errors=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_save(args.output_dir, write_adapter)
    _log(f"saved adapter + tokenizer to {args.output_dir}")
    plot_path = os.path.join(args.output_dir, "loss_curve.png")
    _loss_curve(
        trainer.state.log_history + _eval_points(metrics, trainer.state.global_step),
        plot_path,
        f"{method_label(args)} r={args.lora_r} on {os.path.basename(str(args.data_path))}",
    )
    metrics["loss_curve"] = plot_path


def _check_reload(
    args: Namespace,
    model: Any,
    load_base: Callable[[], Any],
    probe: dict,
    trained_logits: Any,
    base_logits: Any,
    trained_adapter: dict | None,
    metrics: dict[str, Any],
) -> tuple[Any, Any, float]:
    """Step 7: reload into a fresh base: it must reproduce the trained model (under ZeRO-3: the saved tensors must
    equal the trained ones).

    Returns:
        The fresh base and the reloaded PEFT model (None under ZeRO-3), and the largest difference found.
    """
    from peft import PeftModel

    if trained_adapter is None:
        fresh = load_base()
        reloaded = PeftModel.from_pretrained(fresh, args.output_dir).to(model.device).eval()
        reloaded_logits = _logits(reloaded, probe)
        diff = _max_diff(trained_logits, reloaded_logits, probe)
        # how far the adapter moved the outputs: the reload check is only meaningful when this is not ~0
        metrics["adapter_effect_max_abs"] = _max_diff(base_logits, reloaded_logits, probe)
    else:
        from safetensors.torch import load_file

        fresh = reloaded = None
        saved = load_file(os.path.join(args.output_dir, "adapter_model.safetensors"))
        if sorted(saved) != sorted(trained_adapter):
            raise RuntimeError(
                f"the adapter saved under ZeRO-3 holds other tensors than the trained one: {sorted(saved)}"
            )
        diff = max(float((saved[k].float() - v.float()).abs().max()) for k, v in trained_adapter.items())
        metrics["adapter_effect_max_abs"] = _max_diff(base_logits, trained_logits, probe)
    tol = 1e-3 if not (args.bf16 or args.fp16 or args.load_in_4bit or args.load_in_8bit) else 5e-2
    metrics["reload_max_abs_diff"] = diff
    metrics["reload_ok"] = bool(diff <= tol)
    what = "saved - trained adapter tensors" if trained_adapter is not None else "logits(trained) - logits(reloaded)"
    _log(f"reload check: max |{what}| = {diff:.2e} ({'OK' if diff <= tol else 'FAILED'})")
    return fresh, reloaded, diff


def _merge(args: Namespace, reloaded: Any, tokenizer: Any, metrics: dict[str, Any]) -> Any:
    """``--merge``: merge the adapter into the reloaded copy (it still computes the same) and save it atomically to
    ``OUTPUT_DIR/merged``; returns the merged model."""
    merged = reloaded.merge_and_unload()
    atomic_save(
        os.path.join(args.output_dir, "merged"),
        lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
    )
    metrics["merged_dir"] = os.path.join(args.output_dir, "merged")
    _log(f"saved merged model to {metrics['merged_dir']}")
    return merged


def _sample_answer(
    args: Namespace, served: Any, data: TokenizedSplits, sharding: str | None, metrics: dict[str, Any]
) -> None:
    """Step 8: one held-out answer (skipped under ZeRO-3, where every model is partitioned)."""
    if args.gen_max_new_tokens > 0 and sharding == "zero3":
        _log("generation skipped: under ZeRO-3 every model is partitioned, and rank 0 generates alone")
    elif args.gen_max_new_tokens > 0:
        sample_rec = (data.eval_recs or data.train_recs)[0]
        if "messages" in sample_rec:
            served.config.use_cache = True
            metrics["generation"] = _generate(served, data.tokenizer, sample_rec, data.opts, args.gen_max_new_tokens)
            _log(
                f"\nheld-out prompt:\n{metrics['generation']['prompt']}\n\nanswer after fine-tuning:\n"
                f"{metrics['generation']['answer']}\n"
            )


def _report(args: Namespace, metrics: dict[str, Any]) -> None:
    """``OUTPUT_DIR/metrics.json`` and a one-line summary."""
    _write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    keys = (
        "eval_loss_before",
        "eval_loss_after",
        "train_runtime_s",
        "trainable_params",
        "global_step",
        "reload_ok",
        "wall_time_s",
    )
    _log(json.dumps({k: metrics[k] for k in keys}))


def _eval_points(metrics: dict, last_step: int) -> list[dict]:
    points = []
    if metrics.get("eval_loss_before") is not None:
        points.append({"step": 0, "eval_loss": metrics["eval_loss_before"]})
    if metrics.get("eval_loss_after") is not None:
        points.append({"step": last_step, "eval_loss": metrics["eval_loss_after"]})
    return points
