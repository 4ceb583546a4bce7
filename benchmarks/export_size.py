"""Size of a GraLoRA adapter exported to exact plain LoRA (``peft_gralora.export_lora``) vs the GraLoRA original.

    python -m benchmarks.export_size      # writes benchmarks/results/export_size.{json,md}

For every adapted module of rank ``r``, the export has rank ``k * (r - hybrid_r) + hybrid_r``. The sizes here are
counted, not derived: one decoder layer of each model shape gets bf16 GraLoRA factors of the real module shapes,
``export_lora_factors`` exports them, and the bytes of both are multiplied by the number of layers. Unmerged, a
LoRA-serving engine spends adapter FLOPs in proportion to these parameter counts as well (``rank * (in + out)`` per
token and module); merged into the base weights, neither costs anything at inference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peft_gralora.functional import export_lora_factors  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# public configs: hidden, intermediate, attention heads, kv heads, head dim, layers, total parameters
MODELS = {
    "Llama-3.1-8B": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, layers=32, params=8.03e9),
    "SmolLM2-135M": dict(hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64, layers=30, params=134.5e6),
}
# (r, gralora_k, hybrid_r): the paper's recommendation is k=2 up to r=32 and k=4 above
SETTINGS = [(16, 2, 0), (16, 2, 4), (32, 2, 0), (64, 4, 0), (64, 4, 16), (128, 4, 0)]


def layer_shapes(m: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear module of one decoder layer ("all-linear")."""
    h, q, kv = m["hidden"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, m["inter"]),
        "up_proj": (h, m["inter"]),
        "down_proj": (m["inter"], h),
    }


def measure(m: dict, r: int, k: int, hybrid_r: int) -> dict:
    gralora_bytes = exported_bytes = 0
    exported_rank = None
    for in_f, out_f in layer_shapes(m).values():
        weight_A = torch.zeros(r, in_f, dtype=torch.bfloat16)
        weight_B = torch.zeros(out_f, r, dtype=torch.bfloat16)
        A_plain, B_plain = export_lora_factors(weight_A, weight_B, k, hybrid_r)
        gralora_bytes += sum(t.numel() * t.element_size() for t in (weight_A, weight_B))
        exported_bytes += sum(t.numel() * t.element_size() for t in (A_plain, B_plain))
        exported_rank = A_plain.shape[0]
    layers = m["layers"]
    return dict(
        r=r,
        gralora_k=k,
        hybrid_r=hybrid_r,
        exported_rank=exported_rank,
        gralora_mib=gralora_bytes * layers / 2**20,
        exported_mib=exported_bytes * layers / 2**20,
        ratio=exported_bytes / gralora_bytes,
        exported_share_of_base=exported_bytes * layers / (2 * m["params"]),
    )


def markdown(name: str, rows: list[dict]) -> str:
    m = MODELS[name]
    out = [
        f"{name}, all linear layers of {m['layers']} decoder layers, bf16 "
        f"(base model {2 * m['params'] / 2**30:.1f} GiB in bf16):",
        "",
        "| r | gralora_k | hybrid_r | exported LoRA rank | GraLoRA adapter | exported LoRA adapter | ratio | "
        "exported / base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        out.append(
            f"| {row['r']} | {row['gralora_k']} | {row['hybrid_r']} | {row['exported_rank']} | "
            f"{row['gralora_mib']:.1f} MiB | {row['exported_mib']:.1f} MiB | {row['ratio']:.2f}x | "
            f"{100 * row['exported_share_of_base']:.1f}% |"
        )
    return "\n".join(out)


def main() -> None:
    results = {name: [measure(m, *s) for s in SETTINGS] for name, m in MODELS.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_size.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "\n\n".join(markdown(name, rows) for name, rows in results.items()) + "\n"
    (RESULTS / "export_size.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
