"""Fine-tune a causal LM with GraLoRA: `python examples/gralora_finetuning/gralora_finetuning.py --help`.

Same program as `example_gralora_finetuning.py` at the repository root; the implementation lives in
`peft_gralora.finetune`. See README.md next to this file.
"""

import sys

from peft_gralora.finetune import main

if __name__ == "__main__":
    sys.exit(main())
