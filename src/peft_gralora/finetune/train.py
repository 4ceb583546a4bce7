"""The fine-tuning run: data -> tokenizer -> model -> Trainer -> atomic save -> metrics, plot, reload check, sample.

``run(args) -> dict`` is the one entry point; the scripts, the tests and the benchmarks all call it. It walks through
named steps: :func:`_prepare_data`, :func:`_build_model`, :func:`_build_trainer`, :func:`_train`,
:func:`_check_ranks` and :func:`_probe_trained`, :func:`_save_final`, :func:`_check_reload`, :func:`_merge`,
:func:`_sample_answer`, :func:`_report`.
"""

from __future__ import annotations

import functools
import os
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any

from .arguments import SCRIPT_NAME, method_label, parse_args
from .data import PadCollator, TokenizedDataset, TokenizedSplits, TokenizeOptions, load_splits, tokenize_records
from .evaluation import adapter_fingerprint, heldout_loss
from .finish import (
    _check_ranks,
    _check_reload,
    _gather_sharded,
    _merge,
    _probe_trained,
    _report,
    _sample_answer,
    _save_final,
)
from .launch import STEP_DELAY_ENV, _dist, _has_accelerator, _log, _push_saved, _sharding
from .modeling import (
    EMBEDDED_MODEL,
    build_lora_config,
    load_base_model,
    load_tokenizer,
    lora_param_count,
    resolve_base_model,
)
from .saving import atomic_save, latest_checkpoint

__all__ = ["run", "main", "latest_checkpoint", "atomic_save", "adapter_fingerprint", "heldout_loss"]


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
    from transformers import set_seed

    args = _namespace(args, overrides)
    wall_start = time.time()
    _, world_size = _dist()
    set_seed(args.seed)

    data, sharding, model_dir, gguf_file = _prepare_data(args)
    model, load_base, metrics = _build_model(args, data, model_dir, gguf_file, world_size)
    trainer, collator = _build_trainer(args, model, data, world_size)
    _train(args, trainer, data, collator, metrics)

    sharded = sharding in ("fsdp", "zero3")
    _check_ranks(trainer, sharding, world_size, metrics)
    model = trainer.model
    probe, trained_logits, base_logits = _probe_trained(trainer, data)
    staging = os.path.join(args.output_dir, ".sharded-save")
    trained_adapter = _gather_sharded(trainer, sharding, staging)
    if _dist()[0] != 0:
        trainer.accelerator.wait_for_everyone()
        return metrics

    _save_final(args, trainer, data.tokenizer, sharded, staging, metrics)
    fresh, reloaded, diff = _check_reload(
        args, model, load_base, probe, trained_logits, base_logits, trained_adapter, metrics
    )
    # the model that generates and is pushed: the trained one, or its reloaded copy when the trained one is sharded
    # (generating on one rank is no collective). Under ZeRO-3 there is no such copy (--merge / --push_to_hub are
    # refused up front, generation is skipped)
    served = reloaded if sharded else model
    if args.merge:
        merged = _merge(args, reloaded, data.tokenizer, metrics)
        served = merged if sharded else model
    _sample_answer(args, served, data, sharding, metrics)
    if args.push_to_hub:
        # the adapter, not a merged model: reloaded from output_dir when the trained model is sharded
        model.push_to_hub(args.hub_model_id) if not sharded else _push_saved(args.output_dir, args.hub_model_id)
    del reloaded, fresh
    metrics["wall_time_s"] = round(time.time() - wall_start, 2)
    _report(args, metrics)
    trainer.accelerator.wait_for_everyone()
    if not metrics["reload_ok"]:
        raise RuntimeError(
            f"the saved adapter in {args.output_dir} does not reproduce the trained model "
            f"(max logit difference {diff:.3e})"
        )
    return metrics


def main(argv: Sequence[str] | None = None, prog: str = SCRIPT_NAME) -> int:
    """Command-line entry point: parse, run, print where the results went; returns the exit status."""
    metrics = run(parse_args(argv, prog=prog))
    return 0 if metrics.get("reload_ok", True) else 1


def _prepare_data(args: Namespace) -> tuple[TokenizedSplits, str | None, str, str | None]:
    """Step 1: the data, checked before anything heavy loads; the sharding flags; the tokenizer; tokenization.

    Returns:
        The data, the sharding engine (:func:`_sharding`), the base model's folder (or hub id) and GGUF file name.
    """
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
    data = TokenizedSplits(train_recs, eval_recs, schema, tokenizer, opts, train_ds, eval_ds)
    return data, sharding, model_dir, gguf_file


def _grad_accum(args: Namespace, world_size: int) -> int:
    return max(1, args.batch_size // args.micro_batch_size // world_size)


def _build_model(
    args: Namespace, data: TokenizedSplits, model_dir: str, gguf_file: str | None, world_size: int
) -> tuple[Any, Callable[[], Any], dict[str, Any]]:
    """Step 2: the base model and its (Gra)LoRA adapter; prints the plan of the run.

    Returns:
        The PEFT model, a function loading another base the same way (for the reload check), and the metrics so far.
    """
    from peft import get_peft_model

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
    peft_config = build_lora_config(args)
    model = get_peft_model(base, peft_config)
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora_same_r = lora_param_count(model)

    train_ds, eval_ds, opts, n_tokens = data.train_ds, data.eval_ds, data.opts, data.n_tokens
    schedule = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_epochs} epochs"
    cut = any(opts.stats.values())
    _log(
        "\n".join(
            [
                "=" * 78,
                f"model        {model_name}",
                f"data         {args.data_path} [{data.schema}]: {len(train_ds)} train / {len(eval_ds)} held-out "
                f"examples, {n_tokens} train tokens, cutoff_len {args.cutoff_len}"
                + (f" ({opts.stats['truncated']} cut, {opts.stats['dropped_no_target']} dropped)" if cut else ""),
                f"adapter      {method_label(args)}, r={args.lora_r}, alpha={args.lora_alpha}, "
                f"targets={peft_config.target_modules}",
                f"parameters   {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); plain LoRA "
                f"at r={args.lora_r} on the same modules: {lora_same_r:,}",
                f"schedule     {schedule}, batch {args.batch_size} = {args.micro_batch_size} micro x "
                f"{_grad_accum(args, world_size)} accumulation x {world_size} process(es), lr {args.learning_rate} "
                f"({args.lr_scheduler_type})",
                f"output       {os.path.abspath(args.output_dir)}",
                "=" * 78,
            ]
        )
    )
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
    return model, load_base, metrics


def _build_trainer(args: Namespace, model: Any, data: TokenizedSplits, world_size: int) -> tuple[Any, PadCollator]:
    """Step 3: the ``Trainer`` (and the collator it pads batches with)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    report_to: Any = "none"
    if args.use_wandb or args.wandb_project:
        if args.wandb_project:
            os.environ["WANDB_PROJECT"] = args.wandb_project
        report_to = "wandb"
    has_eval = len(data.eval_ds) > 0
    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=_grad_accum(args, world_size),
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
    collator = PadCollator(data.tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data.train_ds,
        eval_dataset=data.eval_ds if has_eval else None,
        data_collator=collator,
        callbacks=callbacks,
    )
    return trainer, collator


def _train(
    args: Namespace, trainer: Any, data: TokenizedSplits, collator: PadCollator, metrics: dict[str, Any]
) -> None:
    """Step 4: held-out loss before, training (resumable), held-out loss after."""
    has_eval = len(data.eval_ds) > 0
    if has_eval:
        _log("held-out loss before training ...")
        metrics["eval_loss_before"] = heldout_loss(trainer.model, data.eval_ds, collator, args.micro_batch_size)
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
        metrics["eval_loss_after"] = heldout_loss(trainer.model, data.eval_ds, collator, args.micro_batch_size)
        _log(f"  eval_loss_after  = {metrics['eval_loss_after']:.4f}  (before {metrics['eval_loss_before']:.4f})")
