"""Shared helpers of the benchmarks: adapter configs, interleaved timing, memory measurement, result files.

Memory is measured two ways, both of which really see torch's CPU tensors (tracemalloc does not):

- ``peak_alloc_bytes``: torch.profiler(profile_memory=True) records every CPU allocation and free of the
  measured region; the peak of their running sum is the peak of extra tensor memory the region needed.
- ``saved_bytes``: what autograd keeps for backward, from ``torch.autograd.graph.saved_tensors_hooks``
  (distinct storages, parameters excluded).

The model benchmark adds the peak RSS of a fresh subprocess (``resource.getrusage``) as an end-to-end check.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "gralora", "upstream")
# what the timings read: "wall" (time.perf_counter) or "cpu" (time.process_time: the CPU time of this process, which
# a busy shared machine does not inflate with the time other processes hold the core; meaningful with 1 thread)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"name": "wall"}


# the dtypes the benchmarks take on their command lines (--dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# precision regimes (--regime): the dtype of the model's weights and the autocast dtype every timed call runs under.
# bf16-autocast is what the Trainer's bf16=True / accelerate's mixed precision do: fp32 weights, bf16 matmuls.
REGIMES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}
REGIME: dict[str, Any] = {"name": "fp32", "autocast": None, "device": "cpu"}


def set_regime(name: str, device: str = "cpu") -> torch.dtype:
    """Make ``name`` the regime of every timed / measured call on ``device``; returns the dtype the models' weights
    must have."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; choose from {sorted(REGIMES)}")
    dtype, autocast = REGIMES[name]
    REGIME.update(name=name, autocast=autocast, device=str(device).split(":")[0])
    return dtype


def regime_context(device: str | None = None) -> contextlib.AbstractContextManager:
    """Autocast to the regime's dtype (or nothing): what a training loop wraps its forward in."""
    if REGIME["autocast"] is None:
        return contextlib.nullcontext()
    return torch.autocast(str(device or REGIME["device"]).split(":")[0], dtype=REGIME["autocast"])


def child_json(code: str, tag: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter at the repository root; return the JSON it printed after ``TAG=``.

    A fresh process per measurement keeps peak RSS and compile caches from leaking between methods.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    prefix = f"{tag}="
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith(prefix)][-1][len(prefix) :])


def set_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}; choose from {sorted(CLOCKS)}")
    CLOCK["name"] = name


def now() -> float:
    return CLOCKS[CLOCK["name"]]()


def peft_config(method: str, r: int, k: int, hybrid_r: int, target_modules: Any, alpha: float | None = None):
    """The peft config of one method at the same total rank ``r`` and the same scaling (``alpha / r``).

    ``lora``: plain LoRA of rank r. ``gralora``: this package (``LoraConfig(use_gralora=True)``), total rank r of
    which ``hybrid_r`` is the plain branch. ``upstream``: peft's own ``GraloraConfig`` with ``r = r - hybrid_r``
    (upstream's r excludes the hybrid part) and the same ``alpha``, hence the same scaling.
    """
    from peft import GraloraConfig, LoraConfig

    alpha = 2 * r if alpha is None else alpha
    if method == "lora":
        return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0)
    if method == "gralora":
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=target_modules,
            lora_dropout=0.0,
            use_gralora=True,
            gralora_k=k,
            hybrid_r=hybrid_r,
        )
    if method == "upstream":
        return GraloraConfig(
            r=r - hybrid_r, hybrid_r=hybrid_r, alpha=alpha, gralora_k=k, target_modules=target_modules
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter weight (LoRA's zero B included) small random values, so no path is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function once per round, in a rotating order, ``rounds`` times; seconds per call and name.

    Interleaving puts all methods under the same background load; the rotation spreads any first-in-round effect.
    Every call runs under the precision regime's autocast (:func:`set_regime`; none by default).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            with regime_context():
                fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            with regime_context():  # entered outside the clock: the calls are timed, not the context
                t0 = now()
                fns[name]()
                times[name].append(now() - t0)
    return times


def summarize(times: dict[str, list[float]], base: str = "lora") -> dict[str, Any]:
    """Median seconds per method and median per-round ratios to ``base`` (and gralora / upstream).

    The raw per-round seconds are kept too: when rounds differ (background load), the median of per-round ratios
    and the ratio of the medians can differ by a few percent, and readers can check both.
    """
    out: dict[str, Any] = {"median_s": {m: statistics.median(v) for m, v in times.items()}, "rounds": len(times[base])}
    out["times_s"] = {m: list(v) for m, v in times.items()}
    for m, v in times.items():
        if m != base:
            out[f"{m}/{base}"] = statistics.median(a / b for a, b in zip(v, times[base], strict=True))
    if "gralora" in times and "upstream" in times:
        out["gralora/upstream"] = statistics.median(
            a / b for a, b in zip(times["gralora"], times["upstream"], strict=True)
        )
    return out


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer read afterwards includes it (no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_alloc_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak of extra tensor bytes live while ``fn`` runs: on CPU from torch.profiler's allocation events, on CUDA
    from the caching allocator's peak statistics."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with regime_context(device):
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, regime_context():
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def saved_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` builds its graph.

    ``fn`` must return the graph's output (kept alive until counted). Storages of ``exclude`` (the parameters, which
    live anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import peft
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "clock": CLOCK["name"],
        "loadavg_at_start": load,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"
