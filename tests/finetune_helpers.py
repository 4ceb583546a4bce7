"""Offline fixtures for the fine-tuning tests: a word-level tokenizer, a tiny Llama saved to disk, generated data."""

from __future__ import annotations

import json
import os
import random

from tests.models import tiny_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    ["#", "Instruction", "Response", "System", ":", ".", ",", "reverse", "sort", "copy", "the", "letters", "words"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [str(d) for d in range(10)]
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
VOCAB_SIZE = 64  # >= len(SPECIALS) + len(WORDS)


def tiny_tokenizer(chat: bool = False):
    """A word-level PreTrainedTokenizerFast (no download); ``chat=True`` adds a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(folder: str, chat: bool = False, seed: int = 0) -> str:
    """A tiny Llama + tokenizer saved to ``folder`` (loadable with ``--base_model folder``)."""
    model = tiny_llama(
        seed=seed, vocab_size=VOCAB_SIZE, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    model.save_pretrained(folder)
    tiny_tokenizer(chat=chat).save_pretrained(folder)
    return folder


def task_records(n: int, seed: int = 0) -> list[dict]:
    """Instruction records of a learnable toy task: reverse or sort a few letters."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        letters = [chr(ord("a") + rng.randrange(8)) for _ in range(4)]
        task = rng.choice(["reverse", "sort"])
        answer = list(reversed(letters)) if task == "reverse" else sorted(letters)
        out.append({"instruction": f"{task} the letters", "input": " ".join(letters), "output": " ".join(answer)})
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path
