#!/usr/bin/env bash
# GraLoRA in axolotl, end to end on CPU, in axolotl's own virtual environment (its pins conflict with the main one):
# builds or reuses the environment (axolotl 0.19.0 with CPU torch, this checkout installed editable with its
# `axolotl` extra), then runs tests/axolotl/ (axolotl train + merge-lora of examples/axolotl/gralora.yml on a tiny
# Llama, the no-plugin YAML, the refused settings). Extra arguments go to pytest.
#
#   AXOLOTL_VENV   where the environment lives (default: .axolotl-venv/ here, git-ignored); kept between runs
#   PYTHON         the interpreter it is built from (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # the environment must see its own editable install of this checkout, nothing else
PY=${PYTHON:-python3}
VENV=${AXOLOTL_VENV:-.axolotl-venv}
AXOLOTL_VERSION=0.19.0
# axolotl 0.19.0 pins transformers 5.16.1; naming it up front spares pip's resolver a long walk over the
# transformers releases that optimum's `transformers[sentencepiece]` requirement would otherwise download
TRANSFORMERS_PIN=transformers==5.16.1
# axolotl allows torch <=2.13.0: the project's CPU torch pin (scripts/setup.sh), installed first so that pip never
# pulls a CUDA build
torch_pin=$(grep -o '"torch==[^"]*"' scripts/setup.sh | head -1 | tr -d '"')
[ -n "$torch_pin" ] || { echo "cannot read the torch pin from scripts/setup.sh" >&2; exit 2; }

start=$(date +%s)
quiet() { grep -v "^WARNING: Location" || true; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
have() {  # have DIST VERSION: DIST installed at VERSION (a local +cpu label ignored); reads metadata, imports nothing
  "$VENV/bin/python" -c "import sys; from importlib.metadata import version as v
sys.exit(v(sys.argv[1]).split('+')[0] != sys.argv[2])" "$1" "$2" 2>/dev/null
}
if ! have axolotl "$AXOLOTL_VERSION" || ! have torch "${torch_pin#torch==}"; then
  "$VENV/bin/python" -m pip install -q "$torch_pin" 2>&1 | quiet
  "$VENV/bin/python" -m pip install -q "$torch_pin" "axolotl==$AXOLOTL_VERSION" "$TRANSFORMERS_PIN" 2>&1 | quiet
fi
# this checkout, editable, with its `axolotl` extra: again when pyproject.toml, this script or the checkout's path change
stamp="$VENV/.peft_gralora_axolotl"
want="$( (cat pyproject.toml scripts/test-axolotl.sh; pwd) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[axolotl]" pytest "$torch_pin" "axolotl==$AXOLOTL_VERSION" 2>&1 | quiet
  "$VENV/bin/python" -c "import peft_gralora.axolotl.plugin"
  echo "$want" >"$stamp"
fi
"$VENV/bin/python" -c "from importlib.metadata import version as v
print(', '.join(f'{d} {v(d)}' for d in ('axolotl', 'peft', 'transformers', 'accelerate', 'bitsandbytes', 'torch')))"
echo "environment ready in $(($(date +%s) - start)) s"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rf tests/axolotl "$@"
echo "scripts/test-axolotl.sh: $(($(date +%s) - start)) s in all"
