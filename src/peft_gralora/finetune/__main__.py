"""``python -m peft_gralora.finetune [FLAGS]``: the run of ``example_gralora_finetuning.py``, same flags, defaults."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m peft_gralora.finetune"))
