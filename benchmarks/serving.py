"""Serving and compiled training: unmerged decode (plain and mixed-batch ``adapter_names``), prefill, the eager and
the ``torch.compile``d training step, compile time and graph breaks, for LoRA, this GraLoRA and upstream's
``GraloraConfig``.

    python -m benchmarks.serving                                  # CPU, fp32, 1 thread (the committed results)
    python -m benchmarks.serving --device cuda --dtype bfloat16   # the same on a GPU
    python -m benchmarks.serving --only decode,mixed --rounds 5   # a subset
    python -m benchmarks.serving --regime bf16-autocast           # fp32 weights under bf16 autocast (or bf16)

The model is a random-init Llama (hidden 512, 4 layers, MLP 1536, vocabulary 2048) with every Linear adapted at
r=16 (GraLoRA k=2). Decode = ``generate`` of 64 new tokens, greedy, batch 1, after a 16-token prompt; mixed = the same
with a batch of 3 rows served by two adapters and the base model (``adapter_names``; upstream's tuner has no such
path); prefill = one forward of 512 tokens with the KV cache; step = forward + backward + AdamW on 2 x 128 tokens.
All methods run in interleaved rounds; ratios are medians of per-round ratios. Results go to
``benchmarks/results/serving.{json,md}`` (``--tag`` appends to the name).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from .common import (
    DTYPES,
    REGIMES,
    RESULTS_DIR,
    child_json,
    environment,
    interleaved_times,
    peft_config,
    randomize_adapters,
    regime_context,
    set_clock,
    set_regime,
    summarize,
    sync,
)
from .common import write_json as _write_json

PARTS = ("decode", "mixed", "prefill", "step", "compiled")
PROMPT, NEW_TOKENS, PREFILL, STEP_BATCH, STEP_SEQ = 16, 64, 512, 2, 128


def llama(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def adapted(base, method: str, r: int, k: int, extra_adapter: bool = False):
    """``base`` (copied) with one adapter of ``method`` on every Linear, or two (``default``, ``other``)."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_config(method, r, k, 0, "all-linear"))
    if extra_adapter:
        model.add_adapter("other", peft_config(method, r, k, 0, "all-linear"))
    randomize_adapters(model)
    return model


def bench_decode(base, methods: list[str], r: int, k: int, rounds: int, device: str, mixed: bool = False):
    """Unmerged greedy generation of ``NEW_TOKENS`` tokens; ``mixed``: 3 rows, adapters default / other / base."""
    models = {m: adapted(base, m, r, k, extra_adapter=mixed).eval() for m in methods}
    batch = 3 if mixed else 1
    ids = torch.randint(0, base.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    kwargs: dict[str, Any] = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if mixed:
        kwargs["adapter_names"] = ["default", "other", "__base__"]
    outputs = {}

    def run(m: str) -> None:
        with torch.inference_mode():
            outputs[m] = models[m].generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)

    res = summarize(interleaved_times({m: (lambda m=m: run(m)) for m in methods}, rounds))
    res["new_tokens"] = int(outputs[methods[0]].shape[1] - PROMPT)
    return res


def bench_prefill(base, methods: list[str], r: int, k: int, rounds: int, device: str):
    models = {m: adapted(base, m, r, k).eval() for m in methods}
    ids = torch.randint(0, base.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def run(m: str) -> None:
        with torch.inference_mode():
            models[m](input_ids=ids, use_cache=True)
        sync(device)

    return summarize(interleaved_times({m: (lambda m=m: run(m)) for m in methods}, rounds))


def _step_fns(base, methods: list[str], r: int, k: int, device: str, compiled: bool):
    ids = torch.randint(0, base.config.vocab_size, (STEP_BATCH, STEP_SEQ), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    fns = {}
    for m in methods:
        model = adapted(base, m, r, k).train()
        model.config.use_cache = False
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        forward = torch.compile(model, fullgraph=False) if compiled else model

        def step(forward=forward, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            forward(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            sync(device)

        fns[m] = step
    return fns


def bench_step(base, methods: list[str], r: int, k: int, rounds: int, device: str):
    return summarize(interleaved_times(_step_fns(base, methods, r, k, device, compiled=False), rounds))


def graph_breaks(base, method: str, r: int, k: int, device: str) -> dict[str, int]:
    """Graphs and graph breaks dynamo makes of a training forward + backward and of an inference forward."""
    import torch._dynamo

    model = adapted(base, method, r, k)
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for mode in ("train", "infer"):
        torch._dynamo.reset()
        model.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            ex = torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(ids)
        out[f"{mode} graphs"], out[f"{mode} breaks"] = ex.graph_count, ex.graph_break_count
    torch._dynamo.reset()
    return out


def compile_child(
    method: str, r: int, k: int, device: str, dtype: str, threads: int, regime: str | None = None
) -> dict[str, Any]:
    """In this (fresh) process, with an empty inductor cache: seconds of the first compiled training step (cold:
    dynamo, AOT autograd, inductor and its C++ compiler), then after ``torch._dynamo.reset()`` of the first step of a
    new compile (warm: inductor's caches hit), and the graph breaks."""
    import torch._dynamo

    torch.set_num_threads(threads)
    if regime:
        set_regime(regime, device)
    base = llama(device, DTYPES[dtype])
    out: dict[str, Any] = {}
    for state in ("cold", "warm"):
        torch._dynamo.reset()
        step = _step_fns(base, [method], r, k, device, compiled=True)[method]
        t0 = time.perf_counter()
        with regime_context(device):
            step()
        out[f"{state}_s"] = time.perf_counter() - t0
    out.update(graph_breaks(base, method, r, k, device))
    return out


def compile_times(
    methods: list[str], r: int, k: int, device: str, dtype: str, threads: int, regime: str | None = None
) -> dict[str, Any]:
    """:func:`compile_child` for each method, each in its own interpreter and inductor cache folder (no method
    profits from kernels another one compiled)."""
    import os
    import tempfile

    out = {}
    for m in methods:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            code = (
                "import json; from benchmarks.serving import compile_child; "
                f"args = ({m!r}, {r}, {k}, {device!r}, {dtype!r}, {threads}, {regime!r}); "
                "print('COMPILE=' + json.dumps(compile_child(*args)))"
            )
            out[m] = child_json(code, "COMPILE", env)
    return out


def bench_compiled(
    base,
    methods: list[str],
    r: int,
    k: int,
    rounds: int,
    device: str,
    dtype: str,
    threads: int,
    regime: str | None = None,
) -> dict[str, Any]:
    """The compiled training step's time (interleaved), then compile times and graph breaks (fresh processes)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fns = _step_fns(base, methods, r, k, device, compiled=True)
    for m in methods:  # compile, then one step at steady state (recompiles would show here)
        with regime_context(device):
            fns[m]()
            fns[m]()
    res = summarize(interleaved_times(fns, rounds, warmup=0))
    res["compile"] = compile_times(methods, r, k, device, dtype, threads, regime)
    for state in ("cold", "warm"):
        res[f"compile {state} gralora/lora"] = (
            res["compile"]["gralora"][f"{state}_s"] / res["compile"]["lora"][f"{state}_s"]
        )
    return res


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        f"# Serving and compiled training ({payload['device']}, {payload.get('regime', payload['dtype'])})",
        "",
        f"torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}, {env['cpu_count']} CPU cores, "
        f"{env['torch_threads']} torch threads, {env['clock']} clock, load average at start "
        f"{env['loadavg_at_start']}, {env['time_utc']}",
        "",
        f"Llama hidden 512 / 4 layers / MLP 1536, every Linear adapted at r={payload['r']} (GraLoRA k={payload['k']}),"
        f" random non-zero adapter weights; {payload['rounds']} interleaved rounds, medians of per-round ratios.",
        "",
        "| measurement | LoRA ms | GraLoRA ms | upstream ms | GraLoRA/LoRA | upstream/LoRA | GraLoRA/upstream |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "decode": f"decode, batch 1, {NEW_TOKENS} tokens (unmerged)",
        "mixed": f"decode, mixed batch of 3 (`adapter_names`), {NEW_TOKENS} tokens",
        "prefill": f"prefill, {PREFILL} tokens",
        "step": f"training step, {STEP_BATCH} x {STEP_SEQ} tokens",
        "compiled": "compiled training step (`torch.compile`)",
    }
    for part, label in labels.items():
        res = payload["results"].get(part)
        if not res:
            continue
        ms = res["median_s"]

        def cell(m: str, ms=ms) -> str:
            return f"{1e3 * ms[m]:.1f}" if m in ms else "-"

        def ratio(key: str, res=res) -> str:
            return f"{res[key]:.3f}" if key in res else "-"

        lines.append(
            f"| {label} | {cell('lora')} | {cell('gralora')} | {cell('upstream')} | {ratio('gralora/lora')} | "
            f"{ratio('upstream/lora')} | {ratio('gralora/upstream')} |"
        )
    comp = payload["results"].get("compiled")
    if comp:
        cs = comp["compile"]
        lines += [
            "",
            "Compile time = the first compiled training step (dynamo, AOT autograd, inductor; forward and backward), "
            "each "
            "method in a fresh process with an empty inductor cache (cold), then recompiled after "
            "`torch._dynamo.reset()` in that process (warm caches). Graph breaks of a training and an inference "
            "forward (`torch._dynamo.explain`):",
            "",
            "| method | cold compile s | vs LoRA | warm compile s | vs LoRA | train graphs / breaks | "
            "inference graphs / breaks |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, c in cs.items():
            lines.append(
                f"| {m} | {c['cold_s']:.1f} | {c['cold_s'] / cs['lora']['cold_s']:.2f} | {c['warm_s']:.1f} | "
                f"{c['warm_s'] / cs['lora']['warm_s']:.2f} | {c['train graphs']} / {c['train breaks']} | "
                f"{c['infer graphs']} / {c['infer breaks']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--regime",
        default=None,
        choices=sorted(REGIMES),
        help="precision regime, overrides --dtype: fp32, bf16-autocast (fp32 weights, bf16 autocast), bf16, fp16",
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None, help="default: cpu with 1 thread on CPU")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="", help="suffix of the result files (serving<tag>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pathlib import Path

    args = parse_args(argv)
    if args.regime:
        weights = set_regime(args.regime, args.device)
        args.dtype = next(name for name, dt in DTYPES.items() if dt == weights)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        raise SystemExit(f"--only: unknown part(s) {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    torch.set_num_threads(args.threads)
    on_cpu = args.device == "cpu"
    set_clock(args.clock or ("cpu" if on_cpu and args.threads == 1 else "wall"))
    dtype = DTYPES[args.dtype]
    base = llama(args.device, dtype)
    out_dir = Path(args.out)
    payload: dict[str, Any] = dict(device=args.device, dtype=args.dtype, r=args.r, k=args.k, rounds=args.rounds)
    payload["regime"] = args.regime or args.dtype
    payload["environment"] = environment(args.threads)
    payload["results"] = results = {}
    everything = ["lora", "gralora", "upstream"]
    for part in parts:
        t0 = time.perf_counter()
        if part in ("decode", "mixed"):
            methods = everything if part == "decode" else ["lora", "gralora"]  # upstream: no adapter_names path
            results[part] = bench_decode(base, methods, args.r, args.k, args.rounds, args.device, part == "mixed")
        elif part == "prefill":
            results[part] = bench_prefill(base, everything, args.r, args.k, args.rounds, args.device)
        elif part == "step":
            results[part] = bench_step(base, everything, args.r, args.k, args.rounds, args.device)
        else:
            results[part] = bench_compiled(
                base, everything, args.r, args.k, args.rounds, args.device, args.dtype, args.threads, args.regime
            )
        short = {key: round(v, 3) for key, v in results[part].items() if isinstance(v, float)}
        print(f"[serving] {part}: {json.dumps(short)} ({time.perf_counter() - t0:.0f}s)", flush=True)
        _write_json(f"serving{args.tag}", payload, out_dir)  # after every part: a cut-short run keeps what it has
        (out_dir / f"serving{args.tag}.md").write_text(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
