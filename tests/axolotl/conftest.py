"""tests/axolotl/ runs in axolotl's own environment (scripts/test-axolotl.sh); the main suite, without axolotl, skips
it at collection."""

import importlib.util
import os

# offline and quiet, in this process (load_cfg, model loads) and in the axolotl commands it starts
for key, value in {
    "AXOLOTL_DO_NOT_TRACK": "1",  # axolotl's telemetry would try to upload from a background thread
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}.items():
    os.environ.setdefault(key, value)

collect_ignore_glob = [] if importlib.util.find_spec("axolotl") else ["test_*.py"]
