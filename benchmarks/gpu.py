"""GPU benchmarks in bf16, one part per process (``scripts/gpu-check.sh`` runs each under its own time guard):
LoRA, this GraLoRA and upstream peft's ``GraloraConfig`` side by side, in the two regimes users run.

    python -m benchmarks.gpu --part layer   --out DIR      # one adapted Linear over a small (d, r, k) grid
    python -m benchmarks.gpu --part train   --out DIR      # training step of a ~1B random-init Llama (all-linear)
    python -m benchmarks.gpu --part decode  --out DIR      # unmerged decode and mixed-batch decode of that model
    python -m benchmarks.gpu --part compile --out DIR      # torch.compile'd step: compile time, step time, memory
    python -m benchmarks.gpu --part report  --out DIR      # DIR/gpu.md from the parts' JSON, and a summary
    ... --dry-run                                          # the same code on CPU with tiny sizes

Regimes: ``autocast``: bf16 base weights, fp32 adapter weights, forward under ``torch.autocast(bfloat16)`` (what the
Trainer's ``bf16=True`` does with a bf16 model); ``bf16``: bf16 base and adapter weights, no autocast.
Timings: interleaved rounds of all methods in one process, medians of per-round ratios (the compiled step: one
fresh process per method and regime, each with an empty inductor cache, so its compile time is cold).
Peak memory: the CUDA caching allocator's peak during one step, above what was allocated before it (``extra``),
and that plus the method's own model, adapter and optimizer tensors (``total``). Every part rewrites its JSON after
each case, so a part cut short by its time guard keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import child_json, environment, interleaved_times, peak_alloc_bytes, peft_config, summarize, sync

PARTS = ("env", "layer", "train", "decode", "compile", "report")
METHODS = ("lora", "gralora", "upstream")
REGIMES = ("autocast", "bf16")

# sizes: the GPU run, and the dry run (CPU, tiny)
SIZES = {
    "gpu": dict(
        layer_dims=(2048, 4096, 8192),
        layer_ranks=(16, 128),
        layer_ks=(2, 4),
        layer_tokens=4096,
        llama=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        compile_layers=1,
        # (regime, method) in order: LoRA and GraLoRA first (the targets), upstream last
        compile_runs=[(reg, m) for reg in REGIMES for m in ("lora", "gralora")]
        + [(reg, "upstream") for reg in REGIMES],
        batch=2,
        seq=1024,
        prompt=32,
        new_tokens=32,
        rounds=7,
        train_rounds=15,  # ~60 ms a step: a steadier median where the target is 1.05x
        decode_rounds=3,
    ),
    "dry": dict(
        layer_dims=(64,),
        layer_ranks=(8,),
        layer_ks=(2,),
        layer_tokens=32,
        llama=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
        compile_layers=1,
        compile_runs=[("bf16", "lora"), ("bf16", "gralora")],  # the plumbing: two fresh processes
        batch=2,
        seq=16,
        prompt=8,
        new_tokens=4,
        rounds=1,
        train_rounds=1,
        decode_rounds=1,
    ),
}
R, K = 32, 2  # the model-level adapters: all-linear, r=32, k=2


# ---------------------------------------------------------------------------------------------------------------------
# set-up shared by the parts
# ---------------------------------------------------------------------------------------------------------------------


def activate() -> None:
    """Make peft GraLoRA-aware in this process: the tree is not pip-installed there, so no ``.pth`` hook ran."""
    import peft_gralora

    peft_gralora.install()


def adapter_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every adapter tensor of LoRA, this GraLoRA (both ``lora_*``) and upstream's tuner (``gralora_*``)."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n or "gralora_" in n]


def adapted(base: torch.nn.Module, method: str, r: int, k: int, regime: str, targets: Any, extra: bool = False):
    """A copy of ``base`` (bf16) with ``method``'s adapter (and an ``other`` one), random non-zero adapter weights in
    the regime's dtype: fp32 for ``autocast``, bf16 for ``bf16``."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_config(method, r, k, 0, targets))
    if extra:
        model.add_adapter("other", peft_config(method, r, k, 0, targets))
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if regime == "autocast" else torch.bfloat16
    with torch.no_grad():
        for _, p in adapter_params(model):  # LoRA's zero B included: no path is trivially zero
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(device=p.device, dtype=dtype)
    return model


def autocast(device: str, regime: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=regime == "autocast")


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def llama(sizes: dict, device: str, layers: int | None = None):
    """A random-init Llama of ``sizes`` in bf16 on ``device`` (initialised there: no host round trip)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(sizes["llama"], max_position_embeddings=4096)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(torch.bfloat16)


def ratios(res: dict[str, Any], values: dict[str, float], key: str) -> None:
    """``res['<key> m/lora']`` for every method ``m`` of ``values`` but LoRA (and GraLoRA / upstream)."""
    for m in values:
        if m != "lora" and "lora" in values and values["lora"]:
            res[f"{key} {m}/lora"] = values[m] / values["lora"]
    if "gralora" in values and values.get("upstream"):
        res[f"{key} gralora/upstream"] = values["gralora"] / values["upstream"]


class Part:
    """One part's JSON file, rewritten after every case."""

    def __init__(self, out: Path, name: str, args: argparse.Namespace) -> None:
        self.path = out / f"{name}.json"
        self.payload: dict[str, Any] = {"part": name, "device": args.device, "dry_run": args.dry_run, "cases": []}
        self.t0 = time.perf_counter()

    def add(self, case: dict[str, Any]) -> None:
        self.payload["cases"].append(case)
        self.save()
        short = {k: round(v, 3) for k, v in case.items() if isinstance(v, float) and "/" in k}
        label = {k: v for k, v in case.items() if isinstance(v, (int, str)) and not isinstance(v, bool)}
        print(f"[gpu] {self.payload['part']} {label}: {json.dumps(short)}", flush=True)

    def save(self) -> None:
        self.payload["elapsed_s"] = time.perf_counter() - self.t0
        self.path.write_text(json.dumps(self.payload, indent=1) + "\n")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


# ---------------------------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------------------------


def part_env(args: argparse.Namespace, sizes: dict) -> None:
    import peft

    import peft_gralora

    env = environment(torch.get_num_threads())
    env.update(
        device=args.device,
        dry_run=args.dry_run,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
        peft_from=os.path.dirname(peft.__file__),
        peft_gralora_from=os.path.dirname(peft_gralora.__file__),
        sizes=sizes,
    )
    for name in ("bitsandbytes", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 -- any import failure means "not usable here"
            env[name] = f"not available ({_error(exc)})"
    (args.out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(f"[gpu] env: {json.dumps({k: env[k] for k in ('gpu', 'torch', 'cuda', 'peft', 'transformers')})}")


def part_layer(args: argparse.Namespace, sizes: dict) -> None:
    """One ``nn.Linear(d, d)`` (bf16) adapted at total rank r; forward + backward with the input requiring grad."""
    part = Part(args.out, "layer", args)
    part.payload["tokens"] = sizes["layer_tokens"]
    for regime in REGIMES:
        for d in sizes["layer_dims"]:
            for r in sizes["layer_ranks"]:
                for k in sizes["layer_ks"]:
                    part.add(_layer_case(args, sizes, regime, d, r, k))


def _layer_case(args: argparse.Namespace, sizes: dict, regime: str, d: int, r: int, k: int) -> dict[str, Any]:
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(d, d, bias=False, device=args.device, dtype=torch.bfloat16))
    models, case = {}, {"regime": regime, "d": d, "r": r, "k": k}
    for m in METHODS:
        try:
            models[m] = adapted(base, m, r, k, regime, ["lin"]).train()
        except Exception as exc:  # noqa: BLE001 -- e.g. a shape upstream refuses: recorded, the others go on
            case[f"{m} error"] = _error(exc)
    gen = torch.Generator().manual_seed(1)
    n = sizes["layer_tokens"]
    x = torch.randn(n, d, generator=gen).to(args.device, torch.bfloat16).requires_grad_(True)  # (tokens, d)
    grad = torch.randn(n, d, generator=gen).to(args.device, torch.bfloat16)

    def step(m: str) -> None:
        with autocast(args.device, regime):
            y = models[m](x)
        y.backward(grad)
        x.grad = None
        for _, p in adapter_params(models[m]):
            p.grad = None
        sync(args.device)

    fns = {m: (lambda m=m: step(m)) for m in models}
    case.update(summarize(interleaved_times(fns, sizes["rounds"], warmup=2)))
    case["peak_bytes"] = {m: peak_alloc_bytes(fns[m], args.device) for m in models}
    ratios(case, case["peak_bytes"], "peak")
    del case["times_s"]
    return case


def _train_step(model, ids: torch.Tensor, opt, device: str, regime: str) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(device, regime):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sync(device)


def _ids(sizes: dict, batch: int, seq: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, sizes["llama"]["vocab_size"], (batch, seq), generator=gen).to(device)


def part_train(args: argparse.Namespace, sizes: dict) -> None:
    """Training step (forward, backward, AdamW) of the ~1B Llama, every Linear adapted (r=32, k=2)."""
    part = Part(args.out, "train", args)
    base = llama(sizes, args.device)
    part.payload.update(model_params=sum(p.numel() for p in base.parameters()), batch=sizes["batch"], seq=sizes["seq"])
    for regime in REGIMES:
        part.add(_train_case(args, sizes, base, regime))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _train_case(args: argparse.Namespace, sizes: dict, base, regime: str) -> dict[str, Any]:
    models, opts, case = {}, {}, {"regime": regime, "r": R, "k": K}
    for m in METHODS:
        try:
            models[m] = adapted(base, m, R, K, regime, "all-linear").train()
            models[m].config.use_cache = False
            opts[m] = torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-5)
        except Exception as exc:  # noqa: BLE001
            case[f"{m} error"] = _error(exc)
    ids = _ids(sizes, sizes["batch"], sizes["seq"], args.device)
    fns = {m: (lambda m=m: _train_step(models[m], ids, opts[m], args.device, regime)) for m in models}
    case.update(summarize(interleaved_times(fns, sizes["train_rounds"], warmup=1)))
    del case["times_s"]
    extra = {m: peak_alloc_bytes(fns[m], args.device) for m in models}
    own = {m: tensor_bytes(models[m]) + _opt_bytes(opts[m]) for m in models}
    case["peak_extra_bytes"], case["peak_total_bytes"] = extra, {m: extra[m] + own[m] for m in models}
    case["trainable_params"] = {m: sum(p.numel() for _, p in adapter_params(models[m])) for m in models}
    ratios(case, extra, "peak extra")
    ratios(case, case["peak_total_bytes"], "peak total")
    return case


def _opt_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def part_decode(args: argparse.Namespace, sizes: dict) -> None:
    """Greedy ``generate`` with the adapters unmerged: batch 1 (all methods), and a mixed batch of 3 rows served by
    two adapters and the base model (``adapter_names``; upstream's tuner has no such path)."""
    part = Part(args.out, "decode", args)
    base = llama(sizes, args.device).eval()
    part.payload.update(prompt=sizes["prompt"], new_tokens=sizes["new_tokens"])
    for mixed in (False, True):  # batch 1 in both regimes first
        for regime in REGIMES:
            part.add(_decode_case(args, sizes, base, regime, mixed))


def _decode_case(args: argparse.Namespace, sizes: dict, base, regime: str, mixed: bool) -> dict[str, Any]:
    methods = ("lora", "gralora") if mixed else METHODS
    models, case = {}, {"regime": regime, "batch": "mixed 3" if mixed else "1"}
    for m in methods:
        try:
            models[m] = adapted(base, m, R, K, regime, "all-linear", extra=mixed).eval()
        except Exception as exc:  # noqa: BLE001
            case[f"{m} error"] = _error(exc)
    ids = _ids(sizes, 3 if mixed else 1, sizes["prompt"], args.device)
    new = sizes["new_tokens"]
    kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if mixed:
        kw["adapter_names"] = ["default", "other", "__base__"]

    def run(m: str) -> None:
        with torch.inference_mode(), autocast(args.device, regime):
            models[m].generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        sync(args.device)

    fns = {m: (lambda m=m: run(m)) for m in models}
    case.update(summarize(interleaved_times(fns, sizes["decode_rounds"], warmup=1)))
    del case["times_s"]
    case["ms_per_token"] = {m: 1e3 * s / new for m, s in case["median_s"].items()}
    case["peak_bytes"] = {m: peak_alloc_bytes(fns[m], args.device) for m in models}
    ratios(case, case["peak_bytes"], "peak")
    return case


def compile_child(method: str, regime: str, device: str, dry_run: bool) -> dict[str, Any]:
    """In this fresh process (empty inductor cache): the first compiled training step (cold compile), then the step
    at steady state, its peak memory and the graph count."""
    from torch._dynamo.testing import CompileCounterWithBackend

    activate()
    sizes = SIZES["dry" if dry_run else "gpu"]
    base = llama(sizes, device, layers=sizes["compile_layers"])
    model = adapted(base, method, R, K, regime, "all-linear").train()
    model.config.use_cache = False
    del base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(
        0, sizes["llama"]["vocab_size"], (sizes["batch"], sizes["seq"]), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    backend = "inductor" if device.startswith("cuda") else "aot_eager"  # no C++ compiles in a CPU dry run
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    t0 = time.perf_counter()
    _train_step(compiled, ids, opt, device, regime)
    cold = time.perf_counter() - t0
    _train_step(compiled, ids, opt, device, regime)  # a recompile would show here, not in the timed steps
    times = []
    for _ in range(sizes["rounds"] + 3):
        t0 = time.perf_counter()
        _train_step(compiled, ids, opt, device, regime)
        times.append(time.perf_counter() - t0)
    peak = peak_alloc_bytes(lambda: _train_step(compiled, ids, opt, device, regime), device)
    return dict(
        backend=backend,
        compile_cold_s=cold,
        step_s=statistics.median(times),
        graphs=counter.frame_count,
        peak_extra_bytes=peak,
        layers=sizes["compile_layers"],
    )


def part_compile(args: argparse.Namespace, sizes: dict) -> None:
    """:func:`compile_child` per method and regime, LoRA and GraLoRA first (the targets), upstream last."""
    part = Part(args.out, "compile", args)
    part.payload["layers"] = sizes["compile_layers"]
    order = sizes["compile_runs"]
    results: dict[str, dict[str, Any]] = {reg: {} for reg in REGIMES}
    for regime, method in order:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            code = (
                "import json; from benchmarks.gpu import compile_child; print('COMPILE=' + json.dumps(compile_child("
                f"{method!r}, {regime!r}, {args.device!r}, {args.dry_run!r})))"
            )
            try:
                res = child_json(code, "COMPILE", env)
            except Exception as exc:  # noqa: BLE001 -- the child's stderr tail says why
                res = {"error": _error(exc) + " " + getattr(exc, "stderr", "")[-600:]}
        results[regime][method] = res
        case = {"regime": regime, "method": method, **res}
        got = results[regime]
        if "step_s" in res and "step_s" in got.get("lora", {}):
            case["step /lora"] = res["step_s"] / got["lora"]["step_s"]
            case["compile /lora"] = res["compile_cold_s"] / got["lora"]["compile_cold_s"]
            case["peak /lora"] = res["peak_extra_bytes"] / max(got["lora"]["peak_extra_bytes"], 1)
        part.add(case)


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _mib(x: Any) -> str:
    return _f(x / 2**20 if isinstance(x, (int, float)) else None, "{:.0f}")


DRY = {"on": False}  # set by report(): a dry run's figures (tiny CPU sizes) are checked against no target


def _verdict(x: Any, target: float = 1.05) -> str:
    if not isinstance(x, (int, float)):
        return "not measured"
    if DRY["on"]:
        return f"{x:.3f}"
    return f"{x:.3f} ({'meets' if x <= target else 'MISSES'} <= {target})"


def report(out: Path) -> str:
    """Markdown of every part found in ``out``; also returns the summary lines printed at the end of the run."""
    env, lines, summary = _load(out, "env") or {}, [], []
    DRY["on"] = bool(env.get("dry_run"))
    if DRY["on"]:
        summary.append("DRY RUN (CPU, tiny sizes): the plumbing only, the figures mean nothing")
    where = f"{env.get('gpu') or env.get('device', '?')}" + (
        " (DRY RUN on CPU, tiny sizes)" if env.get("dry_run") else ""
    )
    lines += [
        f"# GPU check: {where}",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('cuda')}), peft {env.get('peft')}, transformers "
        f"{env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}, triton {env.get('triton')}, "
        f"{env.get('time_utc')}",
        "",
    ]
    tests = out / "tests.log"
    if tests.exists():
        tail = [x for x in tests.read_text().splitlines() if x.strip()][-1:] or ["(empty)"]
        lines += [f"CUDA tests (`tests/test_cuda.py`): {tail[0].strip('= ')}", ""]
        summary.append(f"tests: {tail[0].strip('= ')}")
    lay = _load(out, "layer")
    if lay:
        lines += [
            f"## One adapted layer (bf16 `Linear(d, d)`, {lay.get('tokens')} tokens, forward + backward)",
            "",
            "| regime | d | r | k | LoRA ms | GraLoRA ms | upstream ms | GraLoRA/LoRA | upstream/LoRA | "
            "peak GraLoRA/LoRA |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in lay["cases"]:
            ms = c.get("median_s", {})
            lines.append(
                f"| {c['regime']} | {c['d']} | {c['r']} | {c['k']} | "
                + " | ".join(_f(1e3 * ms[m], "{:.2f}") if m in ms else "-" for m in METHODS)
                + f" | {_f(c.get('gralora/lora'))} | {_f(c.get('upstream/lora'))} | {_f(c.get('peak gralora/lora'))} |"
            )
        for regime in REGIMES:
            vals = [c["gralora/lora"] for c in lay["cases"] if c["regime"] == regime and "gralora/lora" in c]
            if vals:
                summary.append(
                    f"layer {regime}: GraLoRA/LoRA median {statistics.median(vals):.3f}, max {max(vals):.3f} "
                    f"({len(vals)} cases)"
                )
        lines.append("")
    tr = _load(out, "train")
    if tr:
        lines += [
            f"## Training step (~{tr.get('model_params', 0) / 1e9:.2f}B-parameter Llama, batch {tr.get('batch')} x "
            f"{tr.get('seq')}, all-linear r={R}, k={K}, AdamW)",
            "",
            "| regime | LoRA ms | GraLoRA ms | upstream ms | GraLoRA/LoRA | upstream/LoRA | peak total MiB "
            "(LoRA / GraLoRA / upstream) | peak total GraLoRA/LoRA | peak extra GraLoRA/LoRA |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in tr["cases"]:
            ms, pk = c.get("median_s", {}), c.get("peak_total_bytes", {})
            lines.append(
                f"| {c['regime']} | "
                + " | ".join(_f(1e3 * ms[m], "{:.1f}") if m in ms else "-" for m in METHODS)
                + f" | {_f(c.get('gralora/lora'))} | {_f(c.get('upstream/lora'))} | "
                + " / ".join(_mib(pk.get(m)) for m in METHODS)
                + f" | {_f(c.get('peak total gralora/lora'))} | {_f(c.get('peak extra gralora/lora'))} |"
            )
            summary.append(
                f"train {c['regime']}: step GraLoRA/LoRA {_verdict(c.get('gralora/lora'))}; peak memory "
                f"{_verdict(c.get('peak total gralora/lora'))}; upstream/LoRA {_f(c.get('upstream/lora'))}"
            )
        lines.append("")
    de = _load(out, "decode")
    if de:
        lines += [
            f"## Unmerged decode ({de.get('prompt')}-token prompt, {de.get('new_tokens')} new tokens, greedy)",
            "",
            "| regime | batch | LoRA ms/token | GraLoRA ms/token | upstream ms/token | GraLoRA/LoRA | "
            "upstream/LoRA | peak GraLoRA/LoRA |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in de["cases"]:
            mt = c.get("ms_per_token", {})
            lines.append(
                f"| {c['regime']} | {c['batch']} | "
                + " | ".join(_f(mt.get(m), "{:.2f}") for m in METHODS)
                + f" | {_f(c.get('gralora/lora'))} | {_f(c.get('upstream/lora'))} | "
                f"{_f(c.get('peak gralora/lora'))} |"
            )
            summary.append(f"decode {c['regime']} batch {c['batch']}: GraLoRA/LoRA {_verdict(c.get('gralora/lora'))}")
        lines.append("")
    co = _load(out, "compile")
    if co:
        lines += [
            f"## Compiled training step (`torch.compile`, {co.get('layers')}-layer Llama of the same width; one "
            "fresh process and empty inductor cache per row)",
            "",
            "| regime | method | backend | cold compile s | step ms | peak extra MiB | graphs | step/LoRA | "
            "compile/LoRA | error |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in co["cases"]:
            lines.append(
                f"| {c['regime']} | {c['method']} | {c.get('backend', '-')} | {_f(c.get('compile_cold_s'), '{:.1f}')}"
                f" | {_f(1e3 * c['step_s'] if 'step_s' in c else None, '{:.1f}')} | {_mib(c.get('peak_extra_bytes'))}"
                f" | {c.get('graphs', '-')} | {_f(c.get('step /lora'))} | {_f(c.get('compile /lora'))} | "
                f"{c.get('error', '')[:120]} |"
            )
            if c["method"] == "gralora":
                summary.append(
                    f"compiled {c['regime']}: step GraLoRA/LoRA {_verdict(c.get('step /lora'))}, compile "
                    f"{_f(c.get('compile /lora'))}x LoRA's"
                )
        lines.append("")
    missing = [p for p in ("layer", "train", "decode", "compile") if not (out / f"{p}.json").exists()]
    if missing:
        lines += [f"Parts without results (failed or cut by their time guard; see run.log): {', '.join(missing)}.", ""]
        summary.append(f"parts without results: {', '.join(missing)}")
    lines += [
        "Targets (issue 21): training step, unmerged decode, mixed-batch decode and peak memory at most 1.05x "
        "plain LoRA in bf16.",
        "",
    ]
    (out / "gpu.md").write_text("\n".join(lines))
    return "\n".join(summary)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", required=True, help=f"comma-separated, run in order in this process: {PARTS}")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the plumbing only")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 7, dry run 2)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.part.split(",") if x.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--part {args.part!r}: choose from {PARTS}")
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --dry-run (CPU, tiny sizes) or on a machine with a GPU")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = dict(SIZES["dry" if args.dry_run else "gpu"])
    if args.rounds:
        sizes.update(rounds=args.rounds, train_rounds=args.rounds, decode_rounds=args.rounds)
    parts = {"env": part_env, "layer": part_layer, "train": part_train, "decode": part_decode, "compile": part_compile}
    for name in args.parts:
        if name == "report":
            print(report(args.out))
            continue
        activate()
        torch.manual_seed(0)
        parts[name](args, sizes)


if __name__ == "__main__":
    sys.exit(main())
