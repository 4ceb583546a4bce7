"""Regression: a find_spec probe for peft (transformers' is_peft_available) must not consume the import hook."""

import os
import subprocess
import sys

PROBE = """
import importlib.util, sys
assert importlib.util.find_spec("peft") is not None  # what transformers.utils.is_peft_available does
assert "peft" not in sys.modules
from peft import LoraConfig
cfg = LoraConfig(r=4, use_gralora=True, gralora_k=2)
print("OK", cfg.use_gralora, cfg.gralora_k)
"""


def test_find_spec_probe_keeps_auto_activation():
    env = {k: v for k, v in os.environ.items() if k != "PEFT_GRALORA_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK True 2" in proc.stdout
