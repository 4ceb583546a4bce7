"""Speed in the precisions users train and serve in: one run, the regimes as an axis, LoRA / GraLoRA / upstream.

    python -m benchmarks.precision                          # all regimes, all parts (CPU, 1 thread, cpu clock)
    python -m benchmarks.precision --regimes bf16 --parts stack --rounds 5
    python -m benchmarks.precision --tag _main              # same run against another checkout (PYTHONPATH)

Regimes (:data:`benchmarks.common.REGIMES`): ``fp32``; ``bf16-autocast`` (fp32 weights, every call under bf16 autocast,
as ``Trainer(bf16=True)`` / accelerate's mixed precision); ``bf16`` (the whole model in bf16). Parts:

- ``stack``: 4 adapted ``nn.Linear(1024)`` in a row, 2048 tokens, forward + backward + AdamW (r=32, k=2 by default);
  the step's peak extra tensor memory (torch.profiler) beside it;
- ``model``: one training step of SmolLM2-135M (every Linear adapted, r=32, k=2, 1 x 256 tokens; ``--model-memory``
  adds its peak memory);
- ``decode`` / ``mixed``: :func:`benchmarks.serving.bench_decode` (unmerged greedy decode of 64 tokens; mixed batch of
  3 rows served by two adapters and the base model), upstream beside in decode;
- ``compiled``: :func:`benchmarks.serving.bench_compiled` (compiled step, cold / warm compile time in fresh processes).

Every part interleaves the methods in rounds (rotating order) in one process; ratios are medians of per-round ratios,
with their min and max. Results: ``benchmarks/results/precision<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import model as model_bench
from . import serving
from .common import (
    METHODS,
    REGIMES,
    RESULTS_DIR,
    environment,
    interleaved_times,
    peak_alloc_bytes,
    peft_config,
    randomize_adapters,
    set_clock,
    set_regime,
    summarize,
    write_json,
)

PARTS = ("stack", "model", "decode", "mixed", "compiled")
DEFAULT_REGIMES = ("fp32", "bf16-autocast", "bf16")


def _stack_models(dtype: torch.dtype, r: int, k: int, width: int = 1024, depth: int = 4):
    """One stack per method, the same base weights (same seed), adapters random and non-zero."""
    from peft import get_peft_model

    targets = [str(i) for i in range(depth)]
    out = {}
    for m in METHODS:
        torch.manual_seed(0)
        base = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).to(dtype)
        out[m] = get_peft_model(base, peft_config(m, r, k, 0, targets))
        randomize_adapters(out[m])
    return out


def bench_stack(
    dtype: torch.dtype, r: int, k: int, rounds: int, tokens: int = 2048, width: int = 1024, depth: int = 4
) -> dict[str, Any]:
    """The layer stack's training step: ``(tokens, width)`` through ``depth`` adapted Linear, forward + backward +
    AdamW."""
    models = _stack_models(dtype, r, k, width, depth)
    opts = {
        m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4) for m, mod in models.items()
    }
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0)).to(dtype)

    def step(m: str) -> None:
        opts[m].zero_grad(set_to_none=True)
        models[m](x).float().square().mean().backward()
        opts[m].step()

    res = summarize(interleaved_times({m: (lambda m=m: step(m)) for m in METHODS}, rounds))
    res["peak_bytes"] = {m: peak_alloc_bytes(lambda m=m: step(m)) for m in METHODS}
    res["peak gralora/lora"] = res["peak_bytes"]["gralora"] / res["peak_bytes"]["lora"]
    return res


def bench_model_step(
    dtype: torch.dtype, rounds: int, r: int = 32, k: int = 2, tokens: int = 256, memory: bool = False
) -> dict[str, Any]:
    """SmolLM2-135M: one training step (batch 1 x ``tokens``), every Linear adapted; its peak memory if ``memory``
    (a profiled step costs several plain ones on one thread)."""
    base = model_bench.build_model("smollm2-135m").to(dtype)
    base.config.use_cache = False
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    models = {m: model_bench.adapted(base, m, r, k) for m in METHODS}
    opts = {
        m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4) for m, mod in models.items()
    }

    def step(m: str) -> None:
        opts[m].zero_grad(set_to_none=True)
        models[m](input_ids=ids, labels=ids).loss.backward()
        opts[m].step()

    res = summarize(interleaved_times({m: (lambda m=m: step(m)) for m in METHODS}, rounds))
    res["tokens"] = tokens
    if memory:
        res["peak_bytes"] = {m: peak_alloc_bytes(lambda m=m: step(m)) for m in METHODS}
        res["peak gralora/lora"] = res["peak_bytes"]["gralora"] / res["peak_bytes"]["lora"]
    return res


def _spread(res: dict[str, Any], method: str) -> tuple[float, float]:
    ratios = [a / b for a, b in zip(res["times_s"][method], res["times_s"]["lora"], strict=True)]
    return min(ratios), max(ratios)


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        f"# Speed by precision regime{payload.get('label', '')}",
        "",
        f"torch {env['torch']}, peft {env['peft']}, {env.get('cpu_model', 'CPU')}, {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread(s), {env.get('clock', 'wall')} clock, load average at start "
        f"{env['loadavg_at_start']}, {env['time_utc']}. Command: `{payload['command']}`.",
        "",
        "Median of per-round ratios to LoRA (min-max over the rounds); methods interleaved in one process. Peak = "
        "peak extra tensor bytes of one step (torch.profiler), GraLoRA / LoRA.",
        "",
        "| regime | part | LoRA ms | GraLoRA / LoRA | upstream / LoRA | peak GraLoRA / LoRA | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for regime, parts in payload["results"].items():
        for part, res in parts.items():
            lo, hi = _spread(res, "gralora")
            up = res.get("upstream/lora")
            up_txt = (
                "" if up is None else f"{up:.3f} ({_spread(res, 'upstream')[0]:.2f}-{_spread(res, 'upstream')[1]:.2f})"
            )
            peak = res.get("peak gralora/lora")
            extra = ""
            if part == "compiled":
                cold, warm = res["compile cold gralora/lora"], res["compile warm gralora/lora"]
                extra = f"; compile cold {cold:.2f}x, warm {warm:.2f}x"
            lines.append(
                f"| {regime} | {part}{extra} | {res['median_s']['lora'] * 1e3:.1f} | {res['gralora/lora']:.3f} "
                f"({lo:.2f}-{hi:.2f}) | {up_txt} | {'' if peak is None else f'{peak:.3f}'} | {res['rounds']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default=",".join(DEFAULT_REGIMES), help=f"comma-separated subset of {sorted(REGIMES)}")
    p.add_argument("--parts", default="stack,model,decode,mixed", help=f"comma-separated subset of {PARTS}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--r", type=int, default=32, help="rank of the stack and model parts (serving: 16)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-tokens", type=int, default=256, help="tokens of the SmolLM2 step")
    p.add_argument("--model-memory", action="store_true", help="also the SmolLM2 step's peak memory (slow)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None, help="default: cpu with 1 thread")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the result files (precision<tag>.json)")
    p.add_argument("--label", default="", help="text appended to the markdown title")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import platform
    import sys

    args = parse_args(argv)
    regimes = [x.strip() for x in args.regimes.split(",") if x.strip()]
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = (set(regimes) - set(REGIMES)) | (set(parts) - set(PARTS))
    if bad:
        raise SystemExit(f"unknown regime(s) / part(s) {sorted(bad)}: regimes {sorted(REGIMES)}, parts {PARTS}")
    torch.set_num_threads(args.threads)
    set_clock(args.clock or ("cpu" if args.threads == 1 else "wall"))
    env = environment(args.threads)
    try:
        env["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        env["cpu_model"] = platform.processor()
    payload: dict[str, Any] = {
        "environment": env,
        "command": "python -m benchmarks.precision " + " ".join(sys.argv[1:]),
    }
    payload["label"] = f" {args.label}" if args.label else ""
    payload["results"] = results = {}
    for regime in regimes:
        dtype = set_regime(regime)
        results[regime] = {}
        for part in parts:
            t0 = time.perf_counter()
            if part == "stack":
                res = bench_stack(dtype, args.r, args.k, args.rounds)
            elif part == "model":
                res = bench_model_step(dtype, args.rounds, args.r, args.k, args.model_tokens, args.model_memory)
            elif part in ("decode", "mixed"):
                base = serving.llama("cpu", dtype)
                methods = list(METHODS) if part == "decode" else ["lora", "gralora"]
                res = serving.bench_decode(base, methods, 16, args.k, args.rounds, "cpu", mixed=part == "mixed")
            else:
                base = serving.llama("cpu", dtype)
                dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
                res = serving.bench_compiled(
                    base, list(METHODS), 16, args.k, args.rounds, "cpu", dtype_name, args.threads, regime
                )
            results[regime][part] = res
            short = {key: round(v, 3) for key, v in res.items() if isinstance(v, float)}
            print(f"[precision] {regime} {part}: {json.dumps(short)} ({time.perf_counter() - t0:.0f}s)", flush=True)
            write_json(f"precision{args.tag}", payload, args.out)  # after every part: a cut-short run keeps its rows
            (args.out / f"precision{args.tag}.md").write_text(markdown(payload))
    set_regime("fp32")
    return payload


if __name__ == "__main__":
    main()
