"""A tiny random-init Llama and a byte-level BPE tokenizer trained on local jsonl data, saved for axolotl's
``base_model:`` (nothing is downloaded). For trying the plugin and for its end-to-end tests, not for quality.

    python -m peft_gralora.axolotl.tiny_model DATA_DIR OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Sequence

__all__ = ["build_tiny_model", "main", "TINY_LLAMA"]

# every projection's features divisible by 1, 2, 4 and 8 (gralora_k)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 512
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _texts(data_dir: str) -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                texts.extend(str(v) for v in json.loads(line).values())
    if not texts:
        raise ValueError(f"no *.jsonl records in {data_dir!r} (export some with python -m peft_gralora.axolotl.data)")
    return texts


def build_tiny_model(data_dir: str, out_dir: str, seed: int = 0) -> str:
    """Train the tokenizer on ``data_dir/*.jsonl``, build the :data:`TINY_LLAMA` model, save both to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_texts(data_dir), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **TINY_LLAMA))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peft_gralora.axolotl.tiny_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("data_dir", help="folder with the *.jsonl data the tokenizer is trained on")
    parser.add_argument("out_dir", help="folder to save the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.data_dir, args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
