"""Run the speed / memory / start-up benchmarks and write JSON, markdown tables and PNG plots.

    python -m benchmarks.run                 # full layer grid, both models, start-up
    python -m benchmarks.run --quick         # a subsampled layer grid, fewer repeats
    python -m benchmarks.run --only layer    # any of: layer, model, startup (comma separated)
    python -m benchmarks.run --device cuda --dtype bfloat16 --only layer,model   # on a GPU
    python -m benchmarks.run --regime bf16-autocast --only layer,model            # fp32 weights under bf16 autocast

Results go to ``benchmarks/results/`` (``--out`` to change): ``layer.json``/``layer.md``/``layer.png``,
``model.json``/``model.md``/``model.png``, ``startup.json``/``startup.md`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from . import layer as layer_bench
from . import model as model_bench
from . import startup as startup_bench
from .common import DTYPES, REGIMES, RESULTS_DIR, environment, set_clock, set_regime, write_json

PARTS = ("layer", "model", "startup")
MODELS = ("smollm2-135m", "wide-tiny-llama")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="subsampled layer grid and fewer repeats")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    p.add_argument("--rounds", type=int, default=None, help="max interleaved rounds per layer case")
    p.add_argument("--layer-budget", type=float, default=None, help="seconds of timing per layer case (soft)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    for axis in ("dims", "tokens", "ranks", "ks", "hybrid"):
        p.add_argument(f"--{axis}", default=None, help=f"comma-separated layer-grid {axis} (overrides the mode's)")
    p.add_argument("--tag", default="", help="suffix of the layer result files (layer<tag>.json ...)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak RSS check of the models")
    p.add_argument("--device", default="cpu", help="cpu or cuda (layer and model parts)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the layer and model parts")
    p.add_argument(
        "--regime",
        default=None,
        choices=sorted(REGIMES),
        help="precision regime (weights dtype + autocast); overrides --dtype: fp32, bf16-autocast (fp32 weights under "
        "bf16 autocast, as Trainer(bf16=True)), bf16 / fp16 (half-precision weights)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="timer: wall, or cpu = process CPU time (steadier on a busy machine); default cpu with 1 thread",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.regime:
        weights = set_regime(args.regime, args.device)
        args.dtype = next(name for name, dt in DTYPES.items() if dt == weights)
    torch.set_num_threads(args.threads)
    set_clock(args.clock or ("cpu" if args.threads == 1 else "wall"))
    torch.manual_seed(0)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    env = environment(args.threads)
    env.update(device=args.device, dtype=args.dtype, regime=args.regime or args.dtype)
    print(f"[run] mode={mode} parts={parts} env={json.dumps(env)}", flush=True)
    results: dict[str, Any] = {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    if "layer" in parts:
        grid = dict(layer_bench.QUICK_GRID if args.quick else layer_bench.FULL_GRID)
        for axis in grid:
            if getattr(args, axis):
                grid[axis] = tuple(int(v) for v in getattr(args, axis).split(","))
        rounds = args.rounds or 15
        budget = args.layer_budget or (8.0 if args.quick else 15.0)
        t0 = time.perf_counter()

        def layer_payload(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "mode": mode,
                "grid": grid,
                "environment": env,
                "elapsed_s": time.perf_counter() - t0,
                "cases_done": f"{len(rows)}/{layer_bench.grid_size(grid)}",
                "memory_method": "torch.profiler allocation events (peak of the running sum) and saved_tensors_hooks",
                "summary": layer_bench.summary(rows),
                "cases": rows,
            }

        def save_layer(rows: list[dict[str, Any]]) -> dict[str, Any]:
            payload = layer_payload(rows)
            write_json(f"layer{args.tag}", payload, out)  # after every case: a cut-short grid keeps what it measured
            (out / f"layer{args.tag}.md").write_text(_layer_md(payload))
            return payload

        rows = layer_bench.run_grid(
            grid,
            rounds=rounds,
            time_budget_s=budget,
            log=log,
            on_result=save_layer,
            device=args.device,
            dtype=DTYPES[args.dtype],
        )
        payload = save_layer(rows)
        layer_bench.plot(rows, out / f"layer{args.tag}.png")
        results["layer"] = payload

    if "model" in parts:
        rows = []
        t0 = time.perf_counter()
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        for name in names:
            res = model_bench.bench_model(
                name,
                rounds=5 if args.quick else 9,
                merge_rounds=2 if args.quick else 3,
                infer_rounds=5 if args.quick else 9,
                log=log,
                device=args.device,
                dtype=DTYPES[args.dtype],
            )
            rows.append(res)
            payload = {"mode": mode, "environment": env, "elapsed_s": time.perf_counter() - t0, "models": rows}
            write_json("model", payload, out)  # after every model, so a cut-short run keeps what it measured
            if not args.no_rss and args.device == "cpu":  # RSS is host memory: CPU runs only
                try:
                    res["rss"] = model_bench.rss_compare(name, 32, 2, res["batch"], res["seq"], args.threads, log=log)
                except (OSError, RuntimeError, subprocess.CalledProcessError, ZeroDivisionError) as exc:
                    res["rss"] = {"error": repr(exc)}
                    log(f"[model {name}] fresh-process RSS check failed: {exc!r}")
                write_json("model", payload, out)
        (out / "model.md").write_text(_model_md(payload))
        model_bench.plot(rows, out / "model.png")
        results["model"] = payload

    if "startup" in parts:
        res = startup_bench.bench_startup(
            repeats=20 if args.quick else 60, peft_repeats=5 if args.quick else 12, log=log
        )
        payload = {"mode": mode, "environment": env, **res}
        write_json("startup", payload, out)
        (out / "startup.md").write_text(_startup_md(payload))
        results["startup"] = payload

    (out / "summary.md").write_text(summary_md(out))
    print(f"[run] wrote {out}", flush=True)
    return results


def _env_line(env: dict[str, Any]) -> str:
    return (
        f"torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, {env['cpu_count']} CPU cores, "
        f"{env['torch_threads']} torch threads, {env.get('clock', 'wall')} clock, load average at start "
        f"{env['loadavg_at_start']}, {env['time_utc']}"
    )


def _where(env: dict[str, Any]) -> str:
    return f"{env.get('regime', env.get('dtype', 'float32'))} on {env.get('device', 'cpu')}"


def _layer_md(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    head = [
        f"# Layer level ({payload['mode']} grid), {_where(payload['environment'])}",
        "",
        _env_line(payload["environment"]),
        "",
        f"Cases measured: {payload.get('cases_done', len(payload['cases']))} in {payload['elapsed_s'] / 60:.0f} min.",
        "",
        "One `nn.Linear(d, d)` adapted by each method at the same total rank r (hybrid: h = r/4); forward + backward "
        "with the input requiring grad; interleaved rounds, medians of per-round ratios (`min` rows: ratio of the "
        "fastest rounds, steadier under background load). Peak = peak of extra CPU tensor bytes during the step "
        "(torch.profiler allocation events); saved = bytes autograd keeps for backward.",
        "",
        "| ratio | r <= 64: median | r <= 64: max | all: median | all: max |",
        "|---|---|---|---|---|",
    ]
    keys = ("gralora/lora", "upstream/lora", "gralora/upstream", "min gralora/lora", "min upstream/lora")
    for key in (*keys, "min gralora/upstream", "peak gralora/lora", "peak upstream/lora"):
        lo, al = s["r<=64"][key], s["all"][key]
        if lo and al:
            head.append(f"| {key} | {lo['median']:.3f} | {lo['max']:.3f} | {al['median']:.3f} | {al['max']:.3f} |")
    head += [
        "",
        f"Cases (r <= 64) over 1.10x LoRA: {s['r<=64']['cases over 1.10x LoRA'] or 'none'}; "
        f"slower than upstream (all r): {s['all']['cases slower than upstream'] or 'none'} "
        "(d, tokens, r, k, h).",
        "",
    ]
    return "\n".join(head) + "\n" + layer_bench.markdown(payload["cases"])


def _model_md(payload: dict[str, Any]) -> str:
    lines = [
        f"# Model level ({payload['mode']}), {_where(payload['environment'])}",
        "",
        _env_line(payload["environment"]),
        "",
        "One training step (forward, backward, AdamW) with every Linear adapted, r=32, k=2, LoRA alpha 64. Peak = "
        "peak extra CPU tensor bytes during a step (torch.profiler); RSS = growth of peak RSS over two steps in a "
        "fresh process per method. Merge = `merge_and_unload()`; inference = batch 1 forward under inference_mode.",
        "",
    ]
    return "\n".join(lines) + "\n" + model_bench.markdown(payload["models"])


def _startup_md(payload: dict[str, Any]) -> str:
    return (
        f"# Cost of activation ({payload['mode']})\n\n{_env_line(payload['environment'])}\n\n"
        + startup_bench.markdown(payload)
    )


def summary_md(out: Path) -> str:
    """The headline numbers of whatever results exist in ``out``."""
    lines = ["# Benchmark summary", ""]
    layer_json = out / "layer.json"
    model_json = out / "model.json"
    startup_json = out / "startup.json"
    if layer_json.exists():
        lay = json.loads(layer_json.read_text())
        s = lay["summary"]["r<=64"]
        lines.append(
            f"- Layer ({lay['mode']}, {len(lay['cases'])} cases, r <= 64): GraLoRA/LoRA time median "
            f"{s['gralora/lora']['median']:.3f} (max {s['gralora/lora']['max']:.3f}); GraLoRA/upstream median "
            f"{s['gralora/upstream']['median']:.3f} (max {s['gralora/upstream']['max']:.3f}); peak memory "
            f"GraLoRA/LoRA median {s['peak gralora/lora']['median']:.3f} (max {s['peak gralora/lora']['max']:.3f})."
        )
    if model_json.exists():
        mod = json.loads(model_json.read_text())
        for res in mod["models"]:
            lines.append(
                f"- {res['model']}: step GraLoRA/LoRA {res['train_step']['gralora/lora']:.3f}, GraLoRA/upstream "
                f"{res['train_step']['gralora/upstream']:.3f}; peak memory GraLoRA/LoRA {res['peak gralora/lora']:.3f}"
                f"; merged inference GraLoRA/LoRA {res['infer_merged']['gralora/lora']:.3f}."
            )
    serving_json = out / "serving.json"
    if serving_json.exists():
        sv = json.loads(serving_json.read_text())
        res = sv["results"]
        parts = [
            f"{label} {res[key]['gralora/lora']:.3f}"
            for key, label in (
                ("decode", "decode"),
                ("mixed", "mixed-batch decode"),
                ("prefill", "prefill"),
                ("step", "step"),
                ("compiled", "compiled step"),
            )
            if key in res
        ]
        if "compiled" in res:
            parts.append(f"compile time (cold) {res['compiled']['compile cold gralora/lora']:.2f}")
        lines.append(f"- Serving / compile ({sv['device']}, {sv['dtype']}), GraLoRA/LoRA: " + "; ".join(parts) + ".")
    if startup_json.exists():
        st = json.loads(startup_json.read_text())
        lines.append(
            f"- Start-up: hook import {st['hook_importtime'].get('median_cumulative_us', float('nan')) / 1e3:.2f} ms "
            f"(-X importtime); `python -c pass` paired wall difference "
            f"{st['bare_interpreter']['median_paired_diff_ms']:.2f} ms."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
