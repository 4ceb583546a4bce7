"""Fine-tune a causal LM with GraLoRA: `python example_gralora_finetuning.py --help`.

With no arguments it runs offline on CPU: SmolLM2-135M-Instruct (embedded GGUF) on built-in Python stdlib code tasks.
The implementation lives in `peft_gralora.finetune` (shared with examples/gralora_finetuning/gralora_finetuning.py).
"""

import sys

from peft_gralora.finetune import main

if __name__ == "__main__":
    sys.exit(main())
