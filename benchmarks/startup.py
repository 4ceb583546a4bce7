"""The cost of activation: interpreter start-up with the ``.pth`` hook on and off, and ``import peft`` with and
without the install that the hook triggers.

Wall time of fresh interpreters (``subprocess``), the two settings alternated run by run, medians; plus Python's own
``-X importtime`` figure for the hook module, which is immune to the machine's background load.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any


def _env(disabled: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PEFT_GRALORA_DISABLE", None)
    # as after a normal install, modules load from cached bytecode: without this (PYTHONDONTWRITEBYTECODE set, as in
    # some containers) every start would compile the hook's sources and the number would measure the compiler
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if disabled:
        env["PEFT_GRALORA_DISABLE"] = "1"
    return env


def _wall(code: str, disabled: bool) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_env(disabled), check=True, capture_output=True)
    return time.perf_counter() - t0


def paired_walls(code: str, repeats: int) -> dict[str, Any]:
    """Median wall seconds of ``python -c code`` with the hook on / off, alternating; median of paired differences."""
    on: list[float] = []
    off: list[float] = []
    _wall(code, False)
    _wall(code, True)
    for i in range(repeats):
        if i % 2:
            on.append(_wall(code, False))
            off.append(_wall(code, True))
        else:
            off.append(_wall(code, True))
            on.append(_wall(code, False))
    diffs = [a - b for a, b in zip(on, off, strict=True)]
    return {
        "repeats": repeats,
        "median_on_ms": 1e3 * statistics.median(on),
        "median_off_ms": 1e3 * statistics.median(off),
        "median_paired_diff_ms": 1e3 * statistics.median(diffs),
        "min_on_ms": 1e3 * min(on),
        "min_off_ms": 1e3 * min(off),
        "min_diff_ms": 1e3 * (min(on) - min(off)),
    }


_IMPORTTIME = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def importtime_us(code: str, module: str, repeats: int, disabled: bool = False) -> dict[str, Any]:
    """Median self / cumulative microseconds Python's ``-X importtime`` reports for ``module``."""
    selfs: list[int] = []
    cums: list[int] = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            env=_env(disabled),
            check=True,
            capture_output=True,
            text=True,
        )
        for line in proc.stderr.splitlines():
            match = _IMPORTTIME.match(line)
            if match and match.group(4) == module:
                selfs.append(int(match.group(1)))
                cums.append(int(match.group(2)))
    if not cums:
        return {"module": module, "found": False}
    return {
        "module": module,
        "found": True,
        "median_self_us": statistics.median(selfs),
        "median_cumulative_us": statistics.median(cums),
        "repeats": len(cums),
    }


_INSTALL_CODE = """
import time
import peft
t0 = time.perf_counter()
import peft_gralora.integration as integration
t1 = time.perf_counter()
integration.install()
t2 = time.perf_counter()
assert integration.is_installed()
print(1e3 * (t2 - t0), 1e3 * (t2 - t1))
"""


def install_call_ms(repeats: int) -> dict[str, Any]:
    """What the hook adds to ``import peft``, timed in-process (immune to the seconds-long noise of importing peft):
    median ms of importing ``peft_gralora.integration`` plus ``install()``, and of ``install()`` alone, each in a fresh
    interpreter where peft was imported with the hook off."""
    total: list[float] = []
    alone: list[float] = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _INSTALL_CODE], env=_env(True), check=True, capture_output=True, text=True
        )
        a, b = (float(v) for v in out.stdout.split()[-2:])
        total.append(a)
        alone.append(b)
    return {
        "repeats": repeats,
        "median_import_and_install_ms": statistics.median(total),
        "median_install_ms": statistics.median(alone),
    }


def bench_startup(repeats: int = 40, peft_repeats: int = 10, log=print) -> dict[str, Any]:
    result: dict[str, Any] = {"bytecode_cache": True}
    result["bare_interpreter"] = paired_walls("pass", repeats)
    result["hook_importtime"] = importtime_us("pass", "peft_gralora._hook", max(5, repeats // 4))
    log(
        f"[startup] `python -c pass`: on {result['bare_interpreter']['median_on_ms']:.1f} ms, off "
        f"{result['bare_interpreter']['median_off_ms']:.1f} ms, paired diff "
        f"{result['bare_interpreter']['median_paired_diff_ms']:.2f} ms; -X importtime of the hook: "
        f"{result['hook_importtime'].get('median_cumulative_us', float('nan')):.0f} us"
    )
    result["import_peft"] = paired_walls("import peft", peft_repeats)
    result["install_importtime"] = importtime_us("import peft", "peft_gralora.integration", max(3, peft_repeats // 2))
    result["install_call"] = install_call_ms(max(3, peft_repeats // 2))
    call = result["install_call"]
    log(
        f"[startup] import of the integration + install(): {call['median_import_and_install_ms']:.1f} ms "
        f"(install() alone {call['median_install_ms']:.1f} ms)"
    )
    log(
        f"[startup] `import peft`: on {result['import_peft']['median_on_ms']:.0f} ms, off "
        f"{result['import_peft']['median_off_ms']:.0f} ms, paired diff "
        f"{result['import_peft']['median_paired_diff_ms']:.1f} ms"
    )
    return result


def markdown(result: dict[str, Any]) -> str:
    bare = result["bare_interpreter"]
    peft = result["import_peft"]
    hook = result["hook_importtime"]
    inst = result.get("install_importtime", {})
    call = result.get("install_call")
    return (
        "| measurement | hook on | hook off (`PEFT_GRALORA_DISABLE=1`) | cost of the hook |\n"
        "|---|---|---|---|\n"
        f"| `python -c pass`, wall, median of {bare['repeats']} | {bare['median_on_ms']:.1f} ms | "
        f"{bare['median_off_ms']:.1f} ms | {bare['median_paired_diff_ms']:.2f} ms (paired median) |\n"
        f"| `python -X importtime -c pass`: `peft_gralora._hook` | "
        f"{hook.get('median_cumulative_us', float('nan')):.0f} us | not imported | "
        f"{hook.get('median_cumulative_us', float('nan')) / 1e3:.2f} ms |\n"
        f"| `python -c 'import peft'`, wall, median of {peft['repeats']} | {peft['median_on_ms']:.0f} ms | "
        f"{peft['median_off_ms']:.0f} ms | {peft['median_paired_diff_ms']:.1f} ms (paired median) |\n"
        f"| `-X importtime -c 'import peft'`: `peft_gralora.integration` | "
        f"{inst.get('median_cumulative_us', float('nan')) / 1e3:.1f} ms | not imported | |\n"
        + (
            f"| in-process: import of `peft_gralora.integration` + `install()`, median of {call['repeats']} | "
            f"{call['median_import_and_install_ms']:.1f} ms (`install()` alone: {call['median_install_ms']:.1f} ms) | "
            f"not run | {call['median_import_and_install_ms']:.1f} ms |\n"
            if call
            else ""
        )
    )
