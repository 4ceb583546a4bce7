"""Sharded training vs one process, GraLoRA next to plain LoRA: runs every case of ``tests/distributed_worker.py`` in
one torchrun launch (2 gloo CPU processes) and writes the per-case maxima to ``benchmarks/results/sharded_training``
(``.jsonl`` with both ranks' rows, ``.md`` as a table).

    python -m benchmarks.sharded_training
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.distributed_worker import CASES, TOL

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
        start = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [str(ROOT / "tests" / "distributed_worker.py"), str(out), *CASES]
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
        seconds = time.time() - start
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows.sort(key=lambda r: (list(CASES).index(r["case"]), r["rank"]))
    for row in rows:
        row.pop("traceback", None)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sharded_training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.1e}"

    lines = [
        f"# Sharded training vs one process (2 gloo CPU processes, tolerance {TOL:g}; {seconds:.0f} s in all)",
        "",
        "Max over both ranks of: adapter gradients before each of 3 AdamW steps, eval logits between steps, weights "
        "after, the saved adapter file after (its bytes equal one process's before training: `init file`). "
        "`*-qlora*-eval-repack` is bitsandbytes' CPU repack hazard (README; plain LoRA too), "
        "`fsdp1_unpatched_policy` the clear error for peft's unpatched policy.",
        "",
        "| case | equal | grad | eval | weights | file | init file | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        mine = [r for r in rows if r["case"] == case]
        worst = {k: max((r.get(k) or 0.0) for r in mine) if any(r.get(k) is not None for r in mine) else None
                 for k in ("grad_diff", "eval_diff", "weight_diff", "file_diff")}  # fmt: skip
        ok = all(r.get("equal") for r in mine) and len(mine) == 2
        init = all(r.get("init_file_equal") for r in mine) if "init_file_equal" in mine[0] else None
        error = (mine[0].get("error") or "")[:90]
        lines.append(
            f"| {case} | {'yes' if ok else 'NO'} | {fmt(worst['grad_diff'])} | {fmt(worst['eval_diff'])} | "
            f"{fmt(worst['weight_diff'])} | {fmt(worst['file_diff'])} | {'-' if init is None else init} | {error} |"
        )
    (RESULTS / "sharded_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
