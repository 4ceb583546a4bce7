#!/usr/bin/env bash
# Set up (if needed) and run the fine-tuning example on its embedded offline default (SmolLM2-135M, built-in data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python example_gralora_finetuning.py "$@"
