"""Measuring a fine-tuned model: held-out loss, logits on a probe batch, the adapter's fingerprint, one generated
answer and the loss curve."""

from __future__ import annotations

import hashlib
from typing import Any

from .data import PLAIN_TEMPLATE, PadCollator, TokenizedDataset, TokenizeOptions, _use_chat

__all__ = ["adapter_fingerprint", "heldout_loss"]


def adapter_fingerprint(model: Any) -> str:
    """sha256 over the trainable (adapter) tensors, by name: equal on every rank after a correct DDP run."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _loss_curve(log_history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([x for x, _ in train], [y for _, y in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([x for x, _ in evals], [y for _, y in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _logits(model: Any, batch: dict) -> Any:
    """The model's float logits on ``batch`` ``(batch, seq, vocab)``, without gradients."""
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _max_diff(a: Any, b: Any, batch: dict) -> float:
    """Largest absolute difference of two logits tensors over ``batch``'s real (unpadded) tokens."""
    mask = batch["attention_mask"].bool()
    return float((a - b).abs()[mask].max())


def _generate(model: Any, tokenizer: Any, record: dict, opts: TokenizeOptions, max_new_tokens: int) -> dict:
    import torch

    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt_msgs, reference = messages[:last], messages[last]["content"]
    if _use_chat(tokenizer, opts.prompt_template):
        prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        prompt = "".join(PLAIN_TEMPLATE[m["role"]].format(content=m["content"]) for m in prompt_msgs)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return {"prompt": prompt_msgs[-1]["content"], "answer": answer, "reference": reference}


def heldout_loss(model: Any, dataset: TokenizedDataset, collator: PadCollator, batch_size: int) -> float:
    """Mean cross-entropy over every target token of ``dataset`` (token-weighted, dropout off).

    Computed here rather than with ``Trainer.evaluate``: evaluating before ``train()`` marks the model as prepared
    by accelerate, which then skips the DDP wrap in ``train()`` and leaves every rank training alone.
    """
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # position t predicts token t + 1: (batch, seq - 1, vocab) against (batch, seq - 1)
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
