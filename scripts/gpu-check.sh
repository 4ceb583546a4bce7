#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA GPU and this project's tree (not pip-installed):
# the CUDA tests (tests/test_cuda.py), then the bf16 benchmarks (benchmarks/gpu.py), every part under its own time
# guard so that one slow part cannot eat the others. About 8 minutes on one H100. See docs/gpu.md.
#
#   bash scripts/gpu-check.sh [--out DIR] [--dry-run] [--wheels DIR] [--use-wheels]
#
#   --out DIR      results: env/layer/train/decode/compile .json, gpu.md, tests.log, run.log (8 files, no folders;
#                  default benchmarks/results/gpu, with --dry-run outputs/gpu-check-dry)
#   --dry-run      the same plumbing on CPU with tiny sizes (a few minutes; CI runs it: tests/test_gpu_check.py)
#   --wheels DIR   carried wheels, installed with pip --no-index when a package is missing or outside the project's
#                  range (default .gpu-wheels; scripts/gpu-wheels.sh prepares it)
#   --use-wheels   install peft (and bitsandbytes) from the wheels even where a usable one is installed
#
# Time guards (seconds) can be changed with GPU_CHECK_T_<PART>=..., e.g. GPU_CHECK_T_COMPILE=200.
# Exit status: 0 when every part finished and the tests passed; 1 otherwise (the results written so far stay).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=
DRY=0
WHEELS=.gpu-wheels
FORCE_WHEELS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --use-wheels) FORCE_WHEELS=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# a dry run's figures mean nothing: by default they go to the git-ignored outputs/, never next to real results
[ -n "$OUT" ] || OUT=$([ "$DRY" = 1 ] && echo outputs/gpu-check-dry || echo benchmarks/results/gpu)
# the interpreter: $PYTHON, else the README set-up's .venv when there is one, else python3 (a lent machine's)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
# --- 1. Python, torch and the device (refused before anything is written) -------------------------------------------
START=$(date +%s)
if ! INFO=$("$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())" 2>/dev/null); then
  echo "gpu-check: '$PY' cannot import torch; set PYTHON=/path/to/python of an environment with torch" >&2
  exit 2
fi
read -r PY_VERSION TORCH_VERSION HAS_CUDA <<<"$INFO"
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != True ]; then
  echo "gpu-check: torch $TORCH_VERSION sees no CUDA device here; run with --dry-run for the CPU plumbing check" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
# only this script's own files are replaced; anything else in --out stays
rm -f "$OUT"/env.json "$OUT"/layer.json "$OUT"/train.json "$OUT"/decode.json "$OUT"/compile.json \
  "$OUT"/gpu.md "$OUT"/tests.log "$OUT"/run.log
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

if [ "$DRY" = 1 ]; then
  # generous on a loaded 2-core CI machine; the GPU guards below sum to 7.7 minutes
  T_TESTS=${GPU_CHECK_T_TESTS:-400} T_LAYER=${GPU_CHECK_T_LAYER:-150} T_TRAIN=${GPU_CHECK_T_TRAIN:-150}
  T_DECODE=${GPU_CHECK_T_DECODE:-200} T_COMPILE=${GPU_CHECK_T_COMPILE:-250}
  MODE=(--dry-run)
else
  T_TESTS=${GPU_CHECK_T_TESTS:-115} T_LAYER=${GPU_CHECK_T_LAYER:-50} T_TRAIN=${GPU_CHECK_T_TRAIN:-80}
  T_DECODE=${GPU_CHECK_T_DECODE:-75} T_COMPILE=${GPU_CHECK_T_COMPILE:-140}
  MODE=()
fi
FAILED=()
say() { echo "[gpu-check +$(( $(date +%s) - START ))s] $*"; }

say "python $PY_VERSION, torch $TORCH_VERSION, mode $([ "$DRY" = 1 ] && echo 'dry run (CPU, tiny sizes)' || echo GPU)"

# --- 2. packages: what is installed when it fits, else the carried wheels -------------------------------------------
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
# on exit: drop the temporary site, then let tee finish run.log before the caller reads it
trap 'rm -rf "$SITE"; exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT
# status NAME...: one line per package: "NAME ok VERSION", "NAME old VERSION" (outside the project's range) or
# "NAME missing -"; reads metadata only (importing peft costs seconds), with $SITE first on the path
status() {
  PYTHONPATH="$SITE" "$PY" - "$@" <<'EOF'
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

ranges = {"peft": ("0.20.0", "0.22"), "transformers": ("4.56", "5.24")}  # pyproject.toml's dependencies
for name in sys.argv[1:]:
    try:
        v = version(name)
    except PackageNotFoundError:
        v = None
    if v is None or importlib.util.find_spec(name) is None:
        print(name, "missing", "-")
        continue
    low, high = ranges.get(name, ("0", "9999"))
    print(name, "ok" if Version(low) <= Version(v) < Version(high) else "old", v)
EOF
}
install_wheel() {  # install_wheel NAME: from $WHEELS into $SITE (no index, no dependencies)
  local whl
  whl=$(ls "$WHEELS"/"$1"-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || return 1
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$whl" || return 1
  else  # a wheel is a zip laid out for site-packages
    "$PY" -m zipfile -e "$whl" "$SITE" || return 1
  fi
  say "installed $(basename "$whl") from $WHEELS"
}
while read -r pkg state version; do
  if [ "$state" = ok ] && { [ "$FORCE_WHEELS" = 0 ] || [ "$pkg" = transformers ] || [ "$pkg" = pytest ]; }; then
    say "$pkg: using the installed $version"
  elif [ "$pkg" = transformers ]; then
    say "WARNING: transformers is $state ($version); the project needs >=4.56,<5.24 and no wheel is carried for it"
  elif [ "$pkg" = pytest ]; then
    echo "gpu-check: pytest is missing (carry its wheel)" >&2
    exit 2
  elif install_wheel "$pkg"; then
    :
  elif [ "$pkg" = peft ]; then
    echo "gpu-check: peft is $state ($version; the project needs >=0.20,<0.22) and $WHEELS has no peft wheel" \
      "(bash scripts/gpu-wheels.sh prepares one)" >&2
    exit 2
  else
    say "bitsandbytes: $state and no wheel in $WHEELS: its CUDA tests skip"
  fi
done < <(status peft bitsandbytes transformers pytest)

# --- 3. GraLoRA-aware peft without the .pth hook: src on the path, install() in every process -----------------------
export PYTHONPATH="$ROOT/src:$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" - <<'EOF'; then
import os

import peft
import peft_gralora

peft_gralora.install()
from peft import LoraConfig

LoraConfig(r=4, target_modules=["q"], use_gralora=True, gralora_k=2)
where = os.path.dirname(peft_gralora.__file__)
assert where == os.path.join(os.environ["PYTHONPATH"].split(":")[0], "peft_gralora"), where
print(f"[gpu-check] peft {peft.__version__} from {os.path.dirname(peft.__file__)}; peft_gralora from {where}")
EOF
  echo "gpu-check: could not make peft GraLoRA-aware (see above)" >&2
  exit 2
fi

# --- 4. the parts, each under its own time guard ----------------------------------------------------------------------
part() {  # part NAME SECONDS LOG COMMAND...  (LOG: a file for the command's output, or - for this log)
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  t0=$(date +%s)
  say "$name: start (time guard ${limit}s)"
  if [ "$log" = - ]; then
    timeout -k 10 "$limit" "$@"
  else
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
  fi
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    say "$name: TIMED OUT after ${limit}s (what it wrote so far stays)"
    FAILED+=("$name (timed out)")
  elif [ $rc != 0 ]; then
    say "$name: FAILED (exit $rc)"
    FAILED+=("$name (exit $rc)")
  else
    say "$name: done in $(( $(date +%s) - t0 ))s"
  fi
}

PYTEST_ARGS=(tests/test_cuda.py -v --tb=short -ra -p no:cacheprovider)
if [ "$DRY" = 1 ]; then
  export PEFT_GRALORA_TEST_DEVICE=cpu
  # its plain-DoRA twin compiles in ~40 s on a 2-core CPU; tests/test_compile.py covers GraLoRA + DoRA there
  PYTEST_ARGS+=(--deselect "tests/test_cuda.py::test_compiled_training_step[gralora+dora-autocast]")
fi
part tests "$T_TESTS" "$OUT/tests.log" "$PY" -c "
import sys
import peft_gralora
peft_gralora.install()
import pytest
sys.exit(pytest.main(sys.argv[1:]))" "${PYTEST_ARGS[@]}"
unset PEFT_GRALORA_TEST_DEVICE
tail -n 3 "$OUT/tests.log"

part layer "$T_LAYER" - "$PY" -m benchmarks.gpu --part env,layer --out "$OUT" "${MODE[@]}"
part train "$T_TRAIN" - "$PY" -m benchmarks.gpu --part train --out "$OUT" "${MODE[@]}"
part decode "$T_DECODE" - "$PY" -m benchmarks.gpu --part decode --out "$OUT" "${MODE[@]}"
part compile "$T_COMPILE" - "$PY" -m benchmarks.gpu --part compile --out "$OUT" "${MODE[@]}"

# --- 5. report ----------------------------------------------------------------------------------------------------------
say "summary (details: $OUT/gpu.md)"
"$PY" -m benchmarks.gpu --part report --out "$OUT" "${MODE[@]}" || FAILED+=("report")
say "total $(( $(date +%s) - START ))s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "NOT OK: ${FAILED[*]}"
  exit 1
fi
say "OK"
