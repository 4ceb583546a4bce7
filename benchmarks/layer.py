"""Layer level: forward + backward of one adapted ``nn.Linear(d, d)`` for LoRA, this GraLoRA and upstream's tuner.

One case = (d, tokens, r, k, hybrid). The three peft models share the same base weight; the input requires grad
(as inside a network, so the base layer's input-gradient GEMM is part of the step) and backward receives a fixed
random output gradient. Timing is interleaved per round; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from .common import (
    METHODS,
    interleaved_times,
    now,
    peak_alloc_bytes,
    peft_config,
    randomize_adapters,
    saved_bytes,
    sync,
)

FULL_GRID = dict(dims=(1024, 2048, 4096), tokens=(512, 2048, 8192), ranks=(16, 32, 64, 128), ks=(2, 4), hybrid=(0, 1))
QUICK_GRID = dict(dims=(1024, 2048, 4096), tokens=(512, 2048), ranks=(16, 64, 128), ks=(2, 4), hybrid=(0, 1))
TINY_GRID = dict(dims=(64,), tokens=(32,), ranks=(8,), ks=(2,), hybrid=(0, 1))


class _OneLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def hybrid_rank(r: int, hybrid: int) -> int:
    """The hybrid part used when hybrid is on: a quarter of r (keeps r - h divisible by k = 2, 4)."""
    return r // 4 if hybrid else 0


def build_models(
    d: int, r: int, k: int, h: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> dict[str, torch.nn.Module]:
    from peft import get_peft_model

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d, d, generator=gen) / d**0.5
    bias = torch.randn(d, generator=gen) * 0.01
    models = {}
    for method in METHODS:
        model = get_peft_model(_OneLinear(weight, bias), peft_config(method, r, k, h, ["proj"]))
        randomize_adapters(model)
        models[method] = model.to(device=device, dtype=dtype).train()
    return models


def bench_case(
    d: int,
    tokens: int,
    r: int,
    k: int,
    hybrid: int,
    rounds: int = 5,
    time_budget_s: float = 20.0,
    dtype: torch.dtype = torch.float32,
    memory: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time and memory of one case; returns the median times, ratios and memory per method.

    ``rounds`` is the upper bound of interleaved rounds; fewer (at least 3) run when one round would exceed
    ``time_budget_s / rounds``.
    """
    h = hybrid_rank(r, hybrid)
    models = build_models(d, r, k, h, dtype, device)
    seq = min(tokens, 512)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens // seq, seq, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens // seq, seq, d, generator=gen).to(device=device, dtype=dtype)
    params = {m: [p for p in model.parameters() if p.requires_grad] for m, model in models.items()}

    def step(method: str) -> None:
        x.grad = None
        for p in params[method]:
            p.grad = None
        models[method](x).backward(grad_out)
        sync(device)

    fns = {m: (lambda m=m: step(m)) for m in METHODS}
    t0 = now()
    for m in METHODS:  # warm-up round, also the estimate of one round
        fns[m]()
    one_round = now() - t0
    n_rounds = max(3, min(rounds, int(time_budget_s / max(one_round, 1e-9))))
    times = interleaved_times(fns, n_rounds, warmup=0)

    result: dict[str, Any] = dict(d=d, tokens=tokens, r=r, k=k, hybrid_r=h, dtype=str(dtype).replace("torch.", ""))
    result["median_ms"] = {m: 1e3 * sorted(v)[len(v) // 2] for m, v in times.items()}
    result["min_ms"] = {m: 1e3 * min(v) for m, v in times.items()}
    result["rounds"] = n_rounds
    for m in ("gralora", "upstream"):
        result[f"{m}/lora"] = _median_ratio(times[m], times["lora"])
        result[f"min {m}/lora"] = min(times[m]) / min(times["lora"])
    result["gralora/upstream"] = _median_ratio(times["gralora"], times["upstream"])
    # on a loaded machine noise only adds time: the ratio of the fastest runs is the steadier estimate
    result["min gralora/upstream"] = min(times["gralora"]) / min(times["upstream"])
    if memory:
        peak, saved = {}, {}
        for m in METHODS:
            peak[m] = peak_alloc_bytes(lambda m=m: step(m), device)
            saved[m] = saved_bytes(lambda m=m: models[m](x), exclude=list(models[m].parameters()))
        result["peak_bytes"] = peak
        result["saved_bytes"] = saved
        result["peak gralora/lora"] = peak["gralora"] / peak["lora"]
        result["peak upstream/lora"] = peak["upstream"] / peak["lora"]
    return result


def _median_ratio(a: list[float], b: list[float]) -> float:
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    n = len(ratios)
    return ratios[n // 2] if n % 2 else 0.5 * (ratios[n // 2 - 1] + ratios[n // 2])


def grid_size(grid: dict[str, tuple[int, ...]]) -> int:
    """Number of cases in a grid."""
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def run_grid(
    grid: dict[str, tuple[int, ...]],
    rounds: int,
    time_budget_s: float,
    log=print,
    on_result=None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Every case of the grid, smallest first (so a cut-short run still covers the whole shape range).

    ``on_result(results_so_far)`` runs after every case, so a long grid can be saved as it goes.
    """
    cases = list(itertools.product(grid["dims"], grid["tokens"], grid["ranks"], grid["ks"], grid["hybrid"]))
    cases.sort(key=lambda c: c[0] * c[0] * c[1])
    results = []
    for i, (d, tokens, r, k, hybrid) in enumerate(cases):
        t0 = time.perf_counter()
        res = bench_case(
            d, tokens, r, k, hybrid, rounds=rounds, time_budget_s=time_budget_s, dtype=dtype, device=device
        )
        results.append(res)
        log(
            f"[layer {i + 1}/{len(cases)}] d={d} tokens={tokens} r={r} k={k} h={res['hybrid_r']}: "
            f"gralora/lora {res['gralora/lora']:.3f} upstream/lora {res['upstream/lora']:.3f} "
            f"gralora/upstream {res['gralora/upstream']:.3f} (min-based {res['min gralora/lora']:.3f} "
            f"{res['min upstream/lora']:.3f} {res['min gralora/upstream']:.3f}) "
            f"peak gralora/lora {res.get('peak gralora/lora', 0):.3f} "
            f"({time.perf_counter() - t0:.1f}s, {res['rounds']} rounds)"
        )
        if on_result is not None:
            on_result(results)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| d | tokens | r | k | h | LoRA ms | GraLoRA ms | upstream ms | GraLoRA/LoRA | upstream/LoRA | "
        "GraLoRA/upstream | min-based GraLoRA/LoRA | min-based GraLoRA/upstream | peak MiB LoRA | "
        "peak GraLoRA/LoRA | peak upstream/LoRA | saved MiB LoRA / GraLoRA |",
        "|" + "---|" * 17,
    ]
    for res in results:
        ms = res["median_ms"]
        peak = res.get("peak_bytes", {})
        saved = res.get("saved_bytes", {})
        lines.append(
            f"| {res['d']} | {res['tokens']} | {res['r']} | {res['k']} | {res['hybrid_r']} | {ms['lora']:.1f} | "
            f"{ms['gralora']:.1f} | {ms['upstream']:.1f} | {res['gralora/lora']:.3f} | {res['upstream/lora']:.3f} | "
            f"{res['gralora/upstream']:.3f} | {res['min gralora/lora']:.3f} | {res['min gralora/upstream']:.3f} | "
            f"{peak.get('lora', 0) / 2**20:.1f} | "
            f"{res.get('peak gralora/lora', float('nan')):.3f} | {res.get('peak upstream/lora', float('nan')):.3f} | "
            f"{saved.get('lora', 0) / 2**20:.1f} / {saved.get('gralora', 0) / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers: medians and worst cases of the ratios, split at r <= 64 (the target's range)."""

    def stats(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
        vals = sorted(r[key] for r in rows if key in r)
        if not vals:
            return None
        return {"median": vals[len(vals) // 2], "max": vals[-1], "min": vals[0], "n": len(vals)}

    low = [r for r in results if r["r"] <= 64]
    out: dict[str, Any] = {}
    for name, rows in (("r<=64", low), ("all", results)):
        out[name] = {
            key: stats(rows, key)
            for key in (
                "gralora/lora",
                "upstream/lora",
                "gralora/upstream",
                "min gralora/lora",
                "min upstream/lora",
                "min gralora/upstream",
                "peak gralora/lora",
                "peak upstream/lora",
            )
        }
        out[name]["cases over 1.10x LoRA"] = [
            (r["d"], r["tokens"], r["r"], r["k"], r["hybrid_r"]) for r in rows if r["gralora/lora"] > 1.10
        ]
        out[name]["cases slower than upstream"] = [
            (r["d"], r["tokens"], r["r"], r["k"], r["hybrid_r"]) for r in rows if r["gralora/upstream"] > 1.0
        ]
    return out


def plot(results: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['d']}/{r['tokens']}/r{r['r']}/k{r['k']}/h{r['hybrid_r']}" for r in results]
    xs = range(len(results))
    for method, color in (("gralora", "tab:blue"), ("upstream", "tab:orange")):
        axes[0].plot(xs, [r[f"{method}/lora"] for r in results], "o", ms=3, color=color, label=f"{method} / LoRA")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(1.10, color="red", lw=0.8, ls="--", label="target 1.10x (r <= 64)")
    axes[0].set_ylabel("fwd+bwd time ratio to LoRA")
    axes[0].set_title("Layer step time vs LoRA (fp32 CPU)")
    axes[0].legend(fontsize=8)
    if "peak_bytes" in results[0]:
        for method, color in (("gralora", "tab:blue"), ("upstream", "tab:orange")):
            axes[1].plot(xs, [r[f"peak {method}/lora"] for r in results], "o", ms=3, color=color, label=method)
        axes[1].axhline(1.05, color="red", lw=0.8, ls="--", label="target 1.05x")
        axes[1].set_ylabel("peak extra tensor memory ratio to LoRA")
        axes[1].set_title("Layer peak memory vs LoRA")
        axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        ax.set_xlabel("d / tokens / r / k / hybrid_r")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
