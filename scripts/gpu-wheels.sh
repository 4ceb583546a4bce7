#!/usr/bin/env bash
# Prepare the wheels folder that scripts/gpu-check.sh installs from on a GPU machine without a package index
# (Python 3.12, manylinux x86-64; the lent machines have torch, transformers, pytest, but maybe no usable peft and
# no bitsandbytes). Run it here, where pip reaches an index; the folder is git-ignored and travels by name
# (the device tool's `carry`). See docs/gpu.md.
#
#   bash scripts/gpu-wheels.sh [--dir DIR] [--no-bnb] [--python-version 3.12]
#
# Holds peft (in the project's range) and bitsandbytes (its one wheel carries the CUDA 11.8-13.2 libraries, ~43 MB);
# both are installed there with --no-deps: everything they need is already on those machines. --no-bnb leaves
# bitsandbytes out (then its CUDA tests skip there). The folder must stay under LIMIT_MIB (default 50): the whole
# working tree that travels is limited to 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.gpu-wheels
BNB=1
PYV=3.12
LIMIT_MIB=${LIMIT_MIB:-50}
PEFT_SPEC=${PEFT_SPEC:-peft==0.21.2}
BNB_SPEC=${BNB_SPEC:-bitsandbytes==0.50.2}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=${2:?}; shift 2 ;;
    --no-bnb) BNB=0; shift ;;
    --python-version) PYV=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu-wheels: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # one version of each: two would stop the install there

fetch() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DIR" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
fetch "$PEFT_SPEC"
[ "$BNB" = 1 ] && fetch "$BNB_SPEC"
ls "$DIR"/peft-*.whl >/dev/null 2>&1 || { echo "gpu-wheels: no peft wheel was downloaded ($PEFT_SPEC)" >&2; exit 1; }
if [ "$BNB" = 1 ] && ! ls "$DIR"/bitsandbytes-*.whl >/dev/null 2>&1; then
  echo "gpu-wheels: no bitsandbytes wheel ($BNB_SPEC); gpu-check.sh then skips its CUDA tests" >&2
fi
if [ "$BNB" = 1 ] && ls "$DIR"/bitsandbytes-*.whl >/dev/null 2>&1 \
  && ! unzip -l "$DIR"/bitsandbytes-*.whl | grep -q libbitsandbytes_cuda130; then
  echo "gpu-wheels: WARNING: this bitsandbytes wheel has no CUDA 13.0 library (the machines' torch is cu130)" >&2
fi

size_kib=$(du -sk "$DIR" | cut -f1)
echo "gpu-wheels: $DIR holds $(( size_kib / 1024 )) MiB:"
ls -l "$DIR"
if [ $(( size_kib / 1024 )) -ge "$LIMIT_MIB" ]; then
  echo "gpu-wheels: over ${LIMIT_MIB} MiB: rerun with --no-bnb (bitsandbytes' CUDA tests then skip there)" >&2
  exit 1
fi
echo "carry it: run(command='bash scripts/gpu-check.sh --out \$OUT', carry=['$DIR'], timeout_s=540)"
