"""The fine-tuning run: data -> tokenizer -> model -> Trainer -> atomic save -> metrics, plot, reload check, sample.

``run(args) -> dict`` is the one entry point; the scripts, the tests and the benchmarks all call it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

from .cli import parse_args
from .data import (
    PadCollator,
    TokenizedDataset,
    TokenizeOptions,
    load_splits,
    tokenize_records,
)
from .modeling import (
    EMBEDDED_MODEL,
    build_lora_config,
    load_base_model,
    load_tokenizer,
    lora_param_count,
    resolve_base_model,
)

__all__ = ["run", "latest_checkpoint", "atomic_save", "adapter_fingerprint", "heldout_loss"]

# fault-injection for the resume test: seconds to sleep after every optimizer step (never set it otherwise)
STEP_DELAY_ENV = "PEFT_GRALORA_FT_STEP_DELAY"
ADAPTER_FILES_LAST = ("adapter_config.json", "adapter_model.safetensors")  # moved last, in this order


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _log(msg: str) -> None:
    if _dist()[0] == 0:
        print(msg, flush=True)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest *complete* ``checkpoint-N`` in ``output_dir`` (Trainer writes ``trainer_state.json`` last)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if not (name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit() and os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, ValueError):
            continue  # killed while this checkpoint was being written
        found.append((int(name[len("checkpoint-") :]), path))
    return max(found)[1] if found else None


def atomic_save(output_dir: str, write: Any) -> None:
    """Call ``write(tmp_dir)``, then move its files into ``output_dir``, adapter weights last.

    Everything is written to a temporary folder first; each file then replaces its counterpart with an atomic
    ``os.replace``. A previous adapter is removed before the new files land and ``adapter_model.safetensors`` lands
    last, so the folder never holds a half-written or mixed adapter: it is complete once that file exists.
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".tmp-save-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        for name in reversed(ADAPTER_FILES_LAST):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        names = sorted(os.listdir(tmp), key=_landing_order)
        for name in names:
            src, dst = os.path.join(tmp, name), os.path.join(output_dir, name)
            if os.path.isdir(dst) and not os.path.isdir(src):
                shutil.rmtree(dst)
            if os.path.isdir(src):
                _replace_dir(src, dst)
            else:
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _landing_order(name: str) -> tuple[int, str]:
    return (1 + ADAPTER_FILES_LAST.index(name), name) if name in ADAPTER_FILES_LAST else (0, name)


def _replace_dir(src: str, dst: str) -> None:
    # a folder cannot replace a non-empty folder atomically: move the old one aside first, then drop it
    old = f"{dst}.old-{os.getpid()}"
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def adapter_fingerprint(model: Any) -> str:
    """sha256 over the trainable (adapter) tensors, by name: equal on every rank after a correct DDP run."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _loss_curve(log_history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([x for x, _ in train], [y for _, y in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([x for x, _ in evals], [y for _, y in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _logits(model: Any, batch: dict) -> Any:
    """The model's float logits on ``batch`` ``(batch, seq, vocab)``, without gradients."""
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _max_diff(a: Any, b: Any, batch: dict) -> float:
    """Largest absolute difference of two logits tensors over ``batch``'s real (unpadded) tokens."""
    mask = batch["attention_mask"].bool()
    return float((a - b).abs()[mask].max())


def _generate(model: Any, tokenizer: Any, record: dict, opts: TokenizeOptions, max_new_tokens: int) -> dict:
    import torch

    from .data import PLAIN_TEMPLATE, _use_chat

    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_msgs, reference = messages[:last], messages[last]["content"]
    if _use_chat(tokenizer, opts.prompt_template):
        prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        prompt = "".join(PLAIN_TEMPLATE[m["role"]].format(content=m["content"]) for m in prompt_msgs)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return {"prompt": prompt_msgs[-1]["content"], "answer": answer, "reference": reference}


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


def heldout_loss(model: Any, dataset: TokenizedDataset, collator: PadCollator, batch_size: int) -> float:
    """Mean cross-entropy over every target token of ``dataset`` (token-weighted, dropout off).

    Computed here rather than with ``Trainer.evaluate``: evaluating before ``train()`` marks the model as prepared
    by accelerate, which then skips the DDP wrap in ``train()`` and leaves every rank training alone.
    """
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # position t predicts token t + 1: (batch, seq - 1, vocab) against (batch, seq - 1)
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _namespace(args: Namespace | Sequence[str] | dict | None, overrides: dict) -> Namespace:
    if args is None or isinstance(args, (list, tuple)):
        return parse_args(args or [], **overrides)
    if isinstance(args, dict):
        return parse_args([], **{**args, **overrides})
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def run(args: Namespace | Sequence[str] | dict | None = None, **overrides: Any) -> dict:
    """Fine-tune, save, check and report; returns the metrics (also written to ``OUTPUT_DIR/metrics.json``).

    Args:
        args: a parsed namespace (:func:`parse_args`), a command line as a list of strings, or a dict of options;
            None means all defaults (the offline SmolLM2 demo).
        overrides: option values replacing those in ``args``.

    Returns:
        ``eval_loss_before``, ``eval_loss_after``, ``train_runtime_s``, ``trainable_params``, ``lora_params_same_r``,
        ``global_step``, ``reload_max_abs_diff``, ``reload_ok``, ... On ranks other than 0 of a distributed run, only
        what that rank knows.

    Raises:
        DataFormatError: bad data, before the model loads.
        RuntimeError: the reloaded adapter does not reproduce the trained model.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    args = _namespace(args, overrides)
    wall_start = time.time()
    rank, world_size = _dist()
    is_main = rank == 0
    set_seed(args.seed)

    # 1. data, checked before anything heavy loads
    train_recs, eval_recs, schema = load_splits(
        args.data_path,
        args.data_name,
        val_set_size=args.val_set_size,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        builtin_max_chars=args.builtin_max_chars,
        train_split=args.train_split,
        eval_split=args.eval_split,
    )
    sharding = _sharding(args)
    model_dir, gguf_file = resolve_base_model(args.base_model, args.gguf_file)
    tokenizer = load_tokenizer(model_dir, gguf_file)
    opts = TokenizeOptions(
        cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs, prompt_template=args.prompt_template
    )
    train_ds = TokenizedDataset(tokenize_records(train_recs, tokenizer, opts))
    eval_ds = TokenizedDataset(tokenize_records(eval_recs, tokenizer, opts))
    if len(train_ds) == 0:
        raise ValueError(f"no training example keeps a target token within --cutoff_len {args.cutoff_len}")
    n_tokens = sum(len(e["input_ids"]) for e in train_ds.examples)
    grad_accum = max(1, args.batch_size // args.micro_batch_size // world_size)

    # 2. model and adapter
    model_name = EMBEDDED_MODEL if args.base_model is None else args.base_model
    device_map = None
    if (args.load_in_4bit or args.load_in_8bit) and world_size > 1:
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    # the trained base and, at the end, the fresh one for the reload check: loaded the same way
    load_base = functools.partial(
        load_base_model,
        model_dir,
        gguf_file,
        bf16=args.bf16,
        fp16=args.fp16,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        device_map=device_map,
    )
    base = load_base()
    base.config.use_cache = False
    from peft import get_peft_model

    peft_config = build_lora_config(args)
    model = get_peft_model(base, peft_config)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora_same_r = lora_param_count(model)

    schedule = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_epochs} epochs"
    cut = any(opts.stats.values())
    method = f"GraLoRA (k={args.gralora_k}, hybrid_r={args.hybrid_r})" if args.use_gralora else "plain LoRA"
    _log(
        "\n".join(
            [
                "=" * 78,
                f"model        {model_name}",
                f"data         {args.data_path} [{schema}]: {len(train_ds)} train / {len(eval_ds)} held-out "
                f"examples, {n_tokens} train tokens, cutoff_len {args.cutoff_len}"
                + (f" ({opts.stats['truncated']} cut, {opts.stats['dropped_no_target']} dropped)" if cut else ""),
                f"adapter      {method}, r={args.lora_r}, alpha={args.lora_alpha}, "
                f"targets={peft_config.target_modules}",
                f"parameters   {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); plain LoRA "
                f"at r={args.lora_r} on the same modules: {lora_same_r:,}",
                f"schedule     {schedule}, batch {args.batch_size} = {args.micro_batch_size} micro x "
                f"{grad_accum} accumulation x {world_size} process(es), lr {args.learning_rate} "
                f"({args.lr_scheduler_type})",
                f"output       {os.path.abspath(args.output_dir)}",
                "=" * 78,
            ]
        )
    )

    # 3. trainer
    report_to: Any = "none"
    if args.use_wandb or args.wandb_project:
        if args.wandb_project:
            os.environ["WANDB_PROJECT"] = args.wandb_project
        report_to = "wandb"
    has_eval = len(eval_ds) > 0
    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if (has_eval and args.eval_steps > 0) else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        bf16=args.bf16,
        fp16=args.fp16,
        seed=args.seed,
        data_seed=args.seed,
        report_to=report_to,
        run_name=args.wandb_run_name,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        deepspeed=args.deepspeed,
        # FSDP2; the Trainer wraps PEFT models with peft's auto-wrap policy, which this package makes GraLoRA-aware
        fsdp=True if args.fsdp else None,
        fsdp_config={"version": 2} if args.fsdp else None,
        # accelerate runs DDP over gloo only with use_cpu; on a machine without an accelerator that is the only choice
        use_cpu=args.device == "cpu" or (args.device == "auto" and not _has_accelerator()),
        ddp_find_unused_parameters=False if world_size > 1 else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )

    class StepDelay(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            time.sleep(float(os.environ[STEP_DELAY_ENV]))

    callbacks = [StepDelay()] if os.environ.get(STEP_DELAY_ENV) else []
    collator = PadCollator(tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        data_collator=collator,
        callbacks=callbacks,
    )

    # 4. held-out loss before, training (resumable), held-out loss after
    metrics: dict[str, Any] = {
        "base_model": model_name,
        "data_path": args.data_path,
        "method": "gralora" if args.use_gralora else "lora",
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "gralora_k": args.gralora_k if args.use_gralora else None,
        "hybrid_r": args.hybrid_r if args.use_gralora else None,
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "train_tokens": n_tokens,
        "trainable_params": trainable,
        "lora_params_same_r": lora_same_r,
        "total_params": total,
        "world_size": world_size,
        "eval_loss_before": None,
        "eval_loss_after": None,
    }
    if has_eval:
        _log("held-out loss before training ...")
        metrics["eval_loss_before"] = heldout_loss(model, eval_ds, collator, args.micro_batch_size)
        _log(f"  eval_loss_before = {metrics['eval_loss_before']:.4f}")
    checkpoint = args.resume_from_checkpoint
    if checkpoint == "auto":
        checkpoint = latest_checkpoint(args.output_dir)
        _log(f"resume: {'from ' + checkpoint if checkpoint else 'no complete checkpoint yet, starting fresh'}")
    elif checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such folder (or pass 'auto')")
    metrics["resumed_from"] = checkpoint
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=checkpoint)
    metrics["train_runtime_s"] = round(time.time() - t0, 2)
    metrics["train_loss"] = train_out.training_loss
    metrics["global_step"] = trainer.state.global_step
    if has_eval:
        metrics["eval_loss_after"] = heldout_loss(trainer.model, eval_ds, collator, args.micro_batch_size)
        _log(f"  eval_loss_after  = {metrics['eval_loss_after']:.4f}  (before {metrics['eval_loss_before']:.4f})")

    # 5. DDP / ZeRO-2: every rank fingerprints its own (full) adapter, which must be identical everywhere. FSDP /
    # ZeRO-3 ranks hold shards: they save through the Trainer, which gathers the full adapter (a collective)
    model = trainer.model
    sharded = sharding in ("fsdp", "zero3")
    metrics["sharding"] = sharding
    metrics["fsdp_units"] = _fsdp_units(trainer.model_wrapped)
    if sharding == "fsdp" and not metrics["fsdp_units"]:
        _log("note: --fsdp was asked, but accelerate did not shard the model (it runs FSDP on accelerators only): DDP")
    if sharded:
        metrics["rank_adapter_sha256"] = None
    else:
        fingerprint = adapter_fingerprint(model)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, fingerprint)
            metrics["rank_adapter_sha256"] = gathered
            metrics["ranks_in_sync"] = len(set(gathered)) == 1
        else:
            metrics["rank_adapter_sha256"] = [fingerprint]
    # the trained model's logits on a probe batch, with and without the adapter, for the reload check (a forward of a
    # sharded model is a collective: every rank runs it)
    model.eval()
    probe = PadCollator(tokenizer.pad_token_id)((eval_ds.examples or train_ds.examples)[:2])
    probe = {k: v.to(model.device) for k, v in probe.items()}
    trained_logits = _logits(model, probe)
    with trainer.accelerator.unwrap_model(model).disable_adapter():
        base_logits = _logits(model, probe)
    staging = os.path.join(args.output_dir, ".sharded-save")
    from peft import PeftModel

    trained_adapter = None
    if sharded:
        trainer.save_model(staging)  # every rank: the full state dict is gathered, rank 0 writes
        trainer.accelerator.wait_for_everyone()
    if sharding == "zero3":
        # every model loaded now is partitioned by deepspeed.zero.Init, and rank 0 cannot run one alone: check the
        # saved file against the trained adapter weights instead, gathered on every rank (small)
        import deepspeed
        from peft import get_peft_model_state_dict

        unwrapped = trainer.accelerator.unwrap_model(model)
        with deepspeed.zero.GatheredParameters([p for p in unwrapped.parameters() if p.requires_grad]):
            trained_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrapped).items()}
    if not is_main:
        trainer.accelerator.wait_for_everyone()
        return metrics

    # 6. the final adapter and tokenizer, atomically
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
        f"{method} r={args.lora_r} on {os.path.basename(str(args.data_path))}",
    )
    metrics["loss_curve"] = plot_path

    # 7. reload into a fresh base: it must reproduce the trained model
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

    # the model that generates and is pushed: the trained one, or its reloaded copy when the trained one is sharded
    # (generating on one rank is no collective). merge_and_unload merges into that copy: it still computes the same.
    # Under ZeRO-3 there is no such copy (--merge / --push_to_hub are refused up front, generation is skipped)
    served = reloaded if sharded else model
    if args.merge:
        merged = reloaded.merge_and_unload()
        served = merged if sharded else model
        atomic_save(
            os.path.join(args.output_dir, "merged"),
            lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
        )
        metrics["merged_dir"] = os.path.join(args.output_dir, "merged")
        _log(f"saved merged model to {metrics['merged_dir']}")

    # 8. one held-out answer
    if args.gen_max_new_tokens > 0 and sharding == "zero3":
        _log("generation skipped: under ZeRO-3 every model is partitioned, and rank 0 generates alone")
    elif args.gen_max_new_tokens > 0:
        sample_rec = (eval_recs or train_recs)[0]
        if "messages" in sample_rec:
            served.config.use_cache = True
            metrics["generation"] = _generate(served, tokenizer, sample_rec, opts, args.gen_max_new_tokens)
            _log(
                f"\nheld-out prompt:\n{metrics['generation']['prompt']}\n\nanswer after fine-tuning:\n"
                f"{metrics['generation']['answer']}\n"
            )

    if args.push_to_hub:
        # the adapter, not a merged model: reloaded from output_dir when the trained model is sharded
        model.push_to_hub(args.hub_model_id) if not sharded else _push_saved(args.output_dir, args.hub_model_id)
    del reloaded, fresh
    metrics["wall_time_s"] = round(time.time() - wall_start, 2)
    _write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    _log(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "eval_loss_before",
                    "eval_loss_after",
                    "train_runtime_s",
                    "trainable_params",
                    "global_step",
                    "reload_ok",
                    "wall_time_s",
                )
            }
        )
    )
    trainer.accelerator.wait_for_everyone()
    if not metrics["reload_ok"]:
        raise RuntimeError(
            f"the saved adapter in {args.output_dir} does not reproduce the trained model "
            f"(max logit difference {diff:.3e})"
        )
    return metrics


def _eval_points(metrics: dict, last_step: int) -> list[dict]:
    points = []
    if metrics.get("eval_loss_before") is not None:
        points.append({"step": 0, "eval_loss": metrics["eval_loss_before"]})
    if metrics.get("eval_loss_after") is not None:
        points.append({"step": last_step, "eval_loss": metrics["eval_loss_after"]})
    return points
