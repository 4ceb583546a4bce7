"""Quality in the paper's regime: several epochs, ranks up to 128, each method at its own best learning rate.

The paper's claim (arXiv 2505.20355, HumanEval+ on LLaMA-3.1-8B): LoRA stalls or drops past r = 32-64 after full
multi-epoch training while GraLoRA keeps improving with rank. This mode asks that question of SmolLM2-135M-Instruct on
the project's built-in instruction data (the same model, data, tokenization and loss as ``benchmarks.quality``'s
fixed-step benchmark; shared helpers in ``benchmarks.quality_common``):

1. learning-rate grid: every method at r = 64 (``--grid-rank``), seed 0, each rate of ``--lrs``;
2. each method's best rate (lowest held-out loss after the last epoch) is then used for the rank sweep over ``--ranks``
   and ``--seeds``; a sweep run whose settings equal a grid run (seed 0, r = 64, the chosen rate) is that grid run.

Everything but the method and the rate is identical between runs of one seed: the adapter init seed, the data order
(a fresh permutation of the training set every epoch from ``random.Random(seed)``, the last partial batch dropped),
the schedule (linear warm-up over 10 % of the steps, cosine decay to 0, AdamW, no weight decay, gradient clipping at
1), dropout 0, lora_alpha = 2r. After every epoch the held-out loss and next-token accuracy on the response tokens
are recorded. Methods: LoRA, GraLoRA (k = 2 for r <= 32, 4 above) and hybrid GraLoRA (h = r/4), all-linear.

Note: the rate is chosen on the same 24 held-out examples the sweep reports (the built-in data has no third split);
the grid is reported in full so the choice can be checked.

    python -m benchmarks.quality_epochs --epochs 3 --quick    # 64 training examples, r 16/128, 1 seed, one rate
    python -m benchmarks.quality_epochs --epochs 3 --resume   # the full grid + sweep, run by run into the JSON
    python -m benchmarks.quality_epochs --epochs 3 --device cuda --dtype bfloat16 [--model /path/to/hf-model]

Cost, measured on the 2-core CPU (bf16 autocast, max 128 tokens, batch 8): idle, 2 torch threads, one optimizer step
takes 2.6 s, so one 3-epoch run of the full mode (93 steps + 3 evaluations) about 4.5 min and its 24 runs (9 grid +
15 sweep) about 110 min. Shared with other jobs (load 4-9) two OpenMP threads stall at every barrier (a step took over
25 s); one thread per run does 7-8 s a step alone, and ``--workers 2 --threads 1`` trains two runs at once (7-16 min an
epoch each at that load, so the full mode takes 6-8 hours there); on the quiet machine the same two-at-once runs took
6.5-7.6 min each. ``--quick`` with its defaults (2 threads, one run at a time) took 5.8 min wall on the quiet machine
(34.7 min at load 4-5 with one thread). Each run's ``seconds`` and the JSON's ``elapsed_s`` say what a run really
took.

Every finished run is written to the JSON (and its table and plot) at once; ``--resume`` skips runs already there and
refuses a JSON made with other settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import random
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from . import quality_common
from .common import RESULTS_DIR, environment

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_epochs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, required=True, help="passes over the training set per run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", default=None, help="comma-separated sweep ranks (default: 16,128 quick; 16,64,128)")
    p.add_argument("--seeds", default=None, help="comma-separated sweep seeds (default: 0 quick; 0,1)")
    p.add_argument("--methods", default=",".join(quality_common.METHODS))
    p.add_argument("--lrs", default=None, help="learning-rate grid (default: 1e-3 quick, no grid; 1e-4,3e-4,1e-3)")
    p.add_argument("--grid-rank", type=int, default=64, help="rank of the learning-rate grid")
    p.add_argument("--grid-seed", type=int, default=0, help="seed of the learning-rate grid")
    p.add_argument("--train-examples", type=int, default=None, help="first N training examples (default: 64 quick)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128, help="token cutoff")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="base weights (bf16 under autocast)")
    p.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (default: SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument(
        "--workers", type=int, default=1, help="runs trained at once in forked processes (1: in this process)"
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default=None, help="result file stem (default: quality_epochs[_quick])")
    p.add_argument("--resume", action="store_true", help="skip runs already in the output JSON")
    p.add_argument("--render", action="store_true", help="only rewrite the table and plot from the output JSON")
    args = p.parse_args(argv)
    if args.render:
        args.resume = True
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    args.ranks = _ints(args.ranks or ("16,128" if args.quick else "16,64,128"))
    args.seeds = _ints(args.seeds or ("0" if args.quick else "0,1"))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(quality_common.METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(quality_common.METHODS)}")
    args.lrs = [float(x) for x in (args.lrs or ("1e-3" if args.quick else "1e-4,3e-4,1e-3")).split(",")]
    if args.train_examples is None and args.quick:
        args.train_examples = 64
    args.name = args.name or ("quality_epochs_quick" if args.quick else "quality_epochs")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two invocations' runs comparable (a resumed JSON must have been made with the same)."""
    keep = ("epochs", "methods", "lrs", "grid_rank", "grid_seed", "train_examples", "batch_size", "max_len")
    return {k: getattr(args, k) for k in keep} | {
        "warmup_fraction": args.warmup_fraction,
        "device": args.device,
        "dtype": args.dtype,
        "model": args.model or "SmolLM2-135M-Instruct",
    }


def schedule(n_train: int, args: argparse.Namespace) -> tuple[int, int, int]:
    """Steps per epoch (last partial batch dropped), total steps, warm-up steps."""
    per_epoch = n_train // args.batch_size
    if per_epoch < 1:
        raise ValueError(f"{n_train} training examples make no batch of {args.batch_size}; lower --batch-size")
    total = per_epoch * args.epochs
    return per_epoch, total, max(1, round(total * args.warmup_fraction))


def run_key(method: str, r: int, seed: int, lr: float) -> tuple[str, int, int, float]:
    return (method, r, seed, lr)


def _autocast(args: argparse.Namespace):
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(causal_lm, examples: list[dict], pad_id: int, args: argparse.Namespace) -> dict[str, float]:
    """Held-out loss (token-weighted mean) and top-1 accuracy over the response tokens of ``examples``."""
    causal_lm.eval()
    total_loss = 0.0
    total = correct = 0
    with torch.no_grad(), _autocast(args):
        for i in range(0, len(examples), 8):
            batch = _to(quality_common.collate(examples[i : i + 8], pad_id), args.device)
            loss, n, c = quality_common.response_loss(causal_lm, batch)
            total_loss += float(loss) * n
            total += n
            correct += c
    causal_lm.train()
    return {"loss": total_loss / total, "token_acc": correct / total, "tokens": total}


def train_run(
    base, method: str, r: int, seed: int, lr: float, train: list[dict], test: list[dict], pad_id: int, args
) -> dict[str, Any]:
    """One adapter trained for ``args.epochs`` epochs; held-out numbers after every epoch."""
    from peft import get_peft_model

    per_epoch, total, warmup = schedule(len(train), args)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), quality_common.config_for(method, r))
    # adapters and optimizer state in fp32 whatever the base dtype (peft keeps adapter weights fp32 by default)
    causal_lm = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order_rng = random.Random(seed)
    epochs = []
    step = 0
    t_run = time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = list(range(len(train)))
        order_rng.shuffle(perm)
        losses = []
        for b in range(per_epoch):
            batch = _to(
                quality_common.collate(
                    [train[i] for i in perm[b * args.batch_size : (b + 1) * args.batch_size]], pad_id
                ),
                args.device,
            )
            for group in opt.param_groups:
                group["lr"] = quality_common.lr_at(step, total, lr, warmup)
            with _autocast(args):
                loss, _, _ = quality_common.response_loss(causal_lm, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        train_s = time.perf_counter() - t0
        held_out = evaluate(causal_lm, test, pad_id, args)
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": statistics.mean(losses),
                "eval_loss": held_out["loss"],
                "eval_token_acc": held_out["token_acc"],
                "train_seconds": train_s,
            }
        )
        print(
            f"[quality-epochs]   {method} r={r} seed={seed} lr={lr:g} epoch {epoch}: "
            f"train {epochs[-1]['train_loss']:.4f} held-out {held_out['loss']:.4f} "
            f"acc {held_out['token_acc']:.4f} ({train_s:.0f}s)",
            flush=True,
        )
    return {
        "method": method,
        "r": r,
        "k": None if method == "lora" else quality_common.k_for_rank(r),
        "hybrid_r": r // 4 if method == "hybrid" else 0,
        "seed": seed,
        "lr": lr,
        "steps": total,
        "trainable_params": sum(p.numel() for p in params),
        "epochs": epochs,
        "eval_tokens": held_out["tokens"],
        "seconds": time.perf_counter() - t_run,
    }


def final_loss(run: dict[str, Any]) -> float:
    return run["epochs"][-1]["eval_loss"]


def best_lrs(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """Each method's rate with the lowest last-epoch held-out loss in the grid; a method whose grid is unfinished has
    none (its sweep waits). With one rate there is no grid: that rate is every method's."""
    if len(args.lrs) == 1:
        return {m: args.lrs[0] for m in args.methods}
    chosen = {}
    for method in args.methods:
        grid = [
            x
            for x in runs
            if (x["method"], x["r"], x["seed"]) == (method, args.grid_rank, args.grid_seed) and x["lr"] in args.lrs
        ]
        if len({x["lr"] for x in grid}) == len(args.lrs):
            chosen[method] = min(grid, key=final_loss)["lr"]
    return chosen


def plan(args: argparse.Namespace, chosen: dict[str, float]) -> list[tuple[str, int, int, float]]:
    """Every run still wanted, in the order they run: the grid, then the sweep seed by seed, rank by rank."""
    wanted = []
    if len(args.lrs) > 1:
        wanted += [run_key(m, args.grid_rank, args.grid_seed, lr) for lr in args.lrs for m in args.methods]
    for seed in args.seeds:
        for r in args.ranks:
            wanted += [run_key(m, r, seed, chosen[m]) for m in args.methods if m in chosen]
    return list(dict.fromkeys(wanted))


def load_model(args: argparse.Namespace):
    from .model import load_smollm2, load_smollm2_tokenizer

    dtype = DTYPES[args.dtype]
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        tokenizer = load_smollm2_tokenizer()
        base = load_smollm2(dtype)
    base.config.use_cache = False
    return base.to(args.device), tokenizer


_SHARED: dict[str, Any] = {}  # what forked workers read: the base model, the data, the arguments


def _run_in_worker(key: tuple[str, int, int, float]) -> dict[str, Any]:
    shared = _SHARED
    torch.set_num_threads(shared["args"].threads)
    return train_run(shared["base"], *key, shared["train"], shared["test"], shared["pad_id"], shared["args"])


def main(argv: list[str] | None = None, *, base=None, tokenizer=None) -> dict[str, Any]:
    """Runs the grid and the sweep. ``base`` and ``tokenizer`` replace the default model (tests pass tiny ones)."""
    from peft_gralora.finetune.data import build_builtin_dataset

    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    settings = settings_of(args)
    previous = json.loads(path.read_text()) if (args.resume and path.exists()) else None
    if previous is not None and previous.get("settings") != settings:
        raise SystemExit(
            f"--resume: {path} was made with other settings {previous.get('settings')}, now {settings}; "
            "rerun with those settings or write elsewhere (--out/--name)"
        )
    runs: list[dict[str, Any]] = previous["runs"] if previous else []
    if args.render:
        if previous is None:
            raise SystemExit(f"--render: no {path} to render")
        write(previous, path, args)
        return previous

    if base is None:
        base, tokenizer = load_model(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = build_builtin_dataset(**quality_common.DATA_KWARGS)
    train = quality_common.tokenize(data["train"], tokenizer, args.max_len)[: args.train_examples]
    test = quality_common.tokenize(data["test"], tokenizer, args.max_len)
    per_epoch, total, warmup = schedule(len(train), args)
    data_sizes = {"train_examples": len(train), "test_examples": len(test), **quality_common.DATA_KWARGS}
    if previous is not None and previous["data"] != data_sizes:
        raise SystemExit(f"--resume: {path} was made on other data {previous['data']}, now {data_sizes}")
    zero_shot = previous["zero_shot"] if previous else evaluate(base, test, pad_id, args)
    payload: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "settings": settings,
        "schedule": {"steps_per_epoch": per_epoch, "steps": total, "warmup_steps": warmup},
        "environment": environment(args.threads),
        "data": data_sizes,
        "zero_shot": zero_shot,
        "runs": runs,
        # wall time of every invocation that added runs (a resumed sweep adds its own)
        "elapsed_s": previous.get("elapsed_s", 0.0) if previous else 0.0,
    }
    elapsed_before = payload["elapsed_s"]
    last_plot = time.perf_counter()
    print(f"[quality-epochs] zero-shot held-out loss {zero_shot['loss']:.4f} acc {zero_shot['token_acc']:.4f}")
    print(f"[quality-epochs] {len(train)} train examples, {per_epoch} steps/epoch, {total} steps", flush=True)
    pending: dict[Any, tuple[str, int, int, float]] = {}  # future -> run key, with --workers > 1
    pool = None
    if args.workers > 1:
        # forked workers inherit the base model and the data; each trains whole runs, the parent writes the JSON
        _SHARED.update(base=base, train=train, test=test, pad_id=pad_id, args=args)
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork"))
    try:
        while True:
            done = {run_key(x["method"], x["r"], x["seed"], x["lr"]) for x in runs}
            in_flight = set(pending.values())
            todo = [key for key in plan(args, best_lrs(runs, args)) if key not in done and key not in in_flight]
            if pool is None:
                if not todo:
                    break
                finished = [(todo[0], train_run(base, *todo[0], train, test, pad_id, args))]
            else:
                for key in todo[: args.workers - len(pending)]:
                    pending[pool.submit(_run_in_worker, key)] = key
                if not pending:
                    break
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                finished = [(pending.pop(f), f.result()) for f in ready]
            for (method, r, seed, lr), res in finished:
                runs.append(res)
                done.add(run_key(method, r, seed, lr))
                left = sum(key not in done for key in plan(args, best_lrs(runs, args)))  # in flight included
                payload["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                # the plot costs a second or two: redrawn after a run only every minute (a long sweep's plot stays
                # current, a tiny test sweep draws it once), the JSON and table after every run
                replot = time.perf_counter() - last_plot > 60
                write(payload, path, args, replot=replot)
                last_plot = time.perf_counter() if replot else last_plot
                print(
                    f"[quality-epochs] {method} r={r} seed={seed} lr={lr:g}: held-out {final_loss(res):.4f} "
                    f"({res['seconds']:.0f}s; {left} runs planned so far left)",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    payload["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
    write(payload, path, args)
    return payload


def write(payload: dict[str, Any], path: Path, args: argparse.Namespace, replot: bool = True) -> None:
    payload["best_lr"] = best_lrs(payload["runs"], args)
    payload["grid"] = grid_table(payload["runs"], args)
    payload["table"] = sweep_table(payload["runs"], args, payload["best_lr"])
    path.write_text(json.dumps(payload, indent=1) + "\n")
    stem = path.with_suffix("")
    stem.with_suffix(".md").write_text(markdown(payload))
    if replot and payload["runs"]:
        plot(payload, stem.with_suffix(".png"))


def grid_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    if len(args.lrs) == 1:
        return []
    rows = []
    for method in args.methods:
        for lr in args.lrs:
            for x in runs:
                if (x["method"], x["r"], x["seed"], x["lr"]) == (method, args.grid_rank, args.grid_seed, lr):
                    rows.append({"method": method, "lr": lr, "eval_loss": [e["eval_loss"] for e in x["epochs"]]})
    return rows


def sweep_table(runs: list[dict[str, Any]], args: argparse.Namespace, chosen: dict[str, float]) -> list[dict]:
    """Per (method, r) at the method's chosen rate: mean over seeds of each epoch's held-out numbers, +- half range."""
    rows = []
    for method in args.methods:
        if method not in chosen:
            continue
        for r in sorted(set(args.ranks)):
            sel = [
                x
                for x in runs
                if (x["method"], x["r"], x["lr"]) == (method, r, chosen[method]) and x["seed"] in args.seeds
            ]
            if not sel:
                continue
            per_epoch = []
            for e in range(args.epochs):
                losses = [x["epochs"][e]["eval_loss"] for x in sel]
                accs = [x["epochs"][e]["eval_token_acc"] for x in sel]
                per_epoch.append(
                    {
                        "eval_loss": statistics.mean(losses),
                        "eval_loss_spread": (max(losses) - min(losses)) / 2,
                        "eval_token_acc": statistics.mean(accs),
                        "eval_token_acc_spread": (max(accs) - min(accs)) / 2,
                        "train_loss": statistics.mean(x["epochs"][e]["train_loss"] for x in sel),
                    }
                )
            rows.append(
                {
                    "method": method,
                    "r": r,
                    "k": sel[0]["k"],
                    "hybrid_r": sel[0]["hybrid_r"],
                    "lr": chosen[method],
                    "seeds": sorted(x["seed"] for x in sel),
                    "epochs": per_epoch,
                }
            )
    return rows


LABELS = {"lora": "LoRA", "gralora": "GraLoRA", "hybrid": "Hybrid GraLoRA"}
COLORS = {"lora": "tab:gray", "gralora": "tab:blue", "hybrid": "tab:green"}


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    z = payload["zero_shot"]
    sch = payload["schedule"]
    n_epochs = s["epochs"]
    autocast = " under autocast, fp32 adapters" if s["dtype"] == "bfloat16" else ""
    lines = [
        f"# Quality over {n_epochs} epochs ({payload['mode']})",
        "",
        f"{s['model']} ({s['device']}, {s['dtype']} base{autocast}), "
        f"built-in instruction data ({payload['data']['train_examples']} train / {payload['data']['test_examples']} "
        f"held-out examples), all-linear adapters, lora_alpha = 2r, dropout 0. {n_epochs} epochs of "
        f"{sch['steps_per_epoch']} AdamW steps of batch {s['batch_size']} ({sch['steps']} steps, warm-up "
        f"{sch['warmup_steps']}, cosine to 0), max {s['max_len']} tokens. Held-out loss and top-1 accuracy on the "
        "response tokens after each epoch.",
        "",
        f"Zero-shot base model: held-out loss {z['loss']:.4f}, token accuracy {z['token_acc']:.4f}. "
        f"{len(payload['runs'])} runs, wall time {payload.get('elapsed_s', 0.0) / 60:.1f} min "
        f"({payload['environment'].get('torch_threads', '?')} threads).",
        "",
    ]
    if payload["grid"]:
        lines += [
            f"## Learning-rate grid (r = {s['grid_rank']}, seed {s['grid_seed']})",
            "",
            "Held-out loss after each epoch; **bold**: the rate each method uses in the sweep (lowest last-epoch "
            "loss).",
            "",
            "| method | lr | " + " | ".join(f"epoch {e + 1}" for e in range(n_epochs)) + " |",
            "|---|---|" + "---|" * n_epochs,
        ]
        for row in payload["grid"]:
            mark = "**" if payload["best_lr"].get(row["method"]) == row["lr"] else ""
            cells = " | ".join(f"{v:.4f}" for v in row["eval_loss"])
            lines.append(f"| {row['method']} | {mark}{row['lr']:g}{mark} | {cells} |")
        lines.append("")
    if payload["table"]:
        lines += [
            "## Rank sweep (each method at its rate)",
            "",
            "Held-out loss after each epoch, mean over seeds +- half the range; token accuracy after the last epoch.",
            "",
            "| method | r | k | h | lr | seeds | "
            + " | ".join(f"loss epoch {e + 1}" for e in range(n_epochs))
            + " | token acc | train loss (last epoch) |",
            "|---|---|---|---|---|---|" + "---|" * (n_epochs + 2),
        ]
        for row in payload["table"]:
            one = len(row["seeds"]) == 1  # no spread to show
            cells = " | ".join(
                f"{e['eval_loss']:.4f}" + ("" if one else f" +- {e['eval_loss_spread']:.4f}") for e in row["epochs"]
            )
            last = row["epochs"][-1]
            acc = f"{last['eval_token_acc']:.4f}" + ("" if one else f" +- {last['eval_token_acc_spread']:.4f}")
            lines.append(
                f"| {row['method']} | {row['r']} | {row['k'] or '-'} | {row['hybrid_r']} | {row['lr']:g} | "
                f"{','.join(map(str, row['seeds']))} | {cells} | {acc} | {last['train_loss']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    """One panel per sweep rank (held-out loss vs epoch, seed spread as error bars), plus the grid panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({row["r"] for row in payload["table"]})
    panels = len(ranks) + (1 if payload["grid"] else 0)
    if panels == 0:
        return
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.8), squeeze=False, sharey=True)
    axes = list(axes[0])
    z = payload["zero_shot"]["loss"]
    for ax, r in zip(axes, ranks, strict=False):
        for row in (x for x in payload["table"] if x["r"] == r):
            xs = list(range(1, len(row["epochs"]) + 1))
            ys = [e["eval_loss"] for e in row["epochs"]]
            err = [e["eval_loss_spread"] for e in row["epochs"]]
            label = f"{LABELS[row['method']]} (lr {row['lr']:g}, {len(row['seeds'])} seeds)"
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=COLORS[row["method"]], label=label)
        ax.set_title(f"r = {r}")
    if payload["grid"]:
        ax = axes[-1]
        styles = dict(zip(sorted({row["lr"] for row in payload["grid"]}), ("-", "--", ":", "-."), strict=False))
        for row in payload["grid"]:
            xs = list(range(1, len(row["eval_loss"]) + 1))
            ax.plot(xs, row["eval_loss"], ls=styles.get(row["lr"], "-"), marker=".", color=COLORS[row["method"]],
                    label=f"{LABELS[row['method']]} lr {row['lr']:g}")  # fmt: skip
        s = payload["settings"]
        ax.set_title(f"LR grid, r = {s['grid_rank']}, seed {s['grid_seed']}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_xticks(range(1, payload["settings"]["epochs"] + 1))
        ax.legend(fontsize=6)
    axes[0].set_ylabel("held-out loss (response tokens)")
    fig.suptitle(f"Held-out loss per epoch ({payload['mode']}; zero-shot {z:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
