"""What the quality benchmarks share (``benchmarks.quality``: fixed steps; ``benchmarks.quality_epochs``: epochs):
the methods and their configs, the built-in data's tokenization, batching, the response-token loss and the schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE",
    "METHODS",
    "DATA_KWARGS",
    "k_for_rank",
    "config_for",
    "tokenize",
    "collate",
    "response_loss",
    "lr_at",
]

IGNORE = -100
METHODS = ("lora", "gralora", "hybrid")
# the built-in data's parameters, pinned: the library's defaults may change, and comparable runs need the same data
DATA_KWARGS = {"max_chars": 900, "held_out_percent": 10}


def k_for_rank(r: int) -> int:
    """The paper's recommendation: k = 2 for r <= 32, 4 above."""
    return 2 if r <= 32 else 4


def config_for(method: str, r: int):
    from peft import LoraConfig

    common = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "lora":
        return LoraConfig(**common)
    hybrid_r = r // 4 if method == "hybrid" else 0
    return LoraConfig(**common, use_gralora=True, gralora_k=k_for_rank(r), hybrid_r=hybrid_r)


def tokenize(records: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Prompt (signature and docstring) masked; the implementation and EOS are the targets."""
    out = []
    for rec in records:
        prompt = f"{rec['input']}\n"
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p_ids + r_ids)[:max_len]
        labels = ([IGNORE] * len(p_ids) + r_ids)[:max_len]
        if any(lab != IGNORE for lab in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``(B, L)`` batch, as the fine-tuning example pads it."""
    from peft_gralora.finetune.data import PadCollator

    return PadCollator(pad_id)(batch)


def response_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Mean next-token loss on the response tokens, their count, and how many were predicted right (top-1).

    The LM head runs on the response positions only (the prompt positions need no logits): the 49k-token head is a
    large share of a step of a 135M model.
    """
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, L-1): token t+1 is predicted at position t
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # (T, vocab), T response tokens
    tgt = targets[keep]  # (T,)
    loss = F.cross_entropy(logits.float(), tgt)
    correct = int((logits.argmax(-1) == tgt).sum())
    return loss, int(tgt.numel()), correct


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
