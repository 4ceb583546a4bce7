"""Records in their normalised shapes (checked before any model loads) and their tokenization with prompt masking.

Every source ends up as a list of records in one of two normalised shapes:

* ``{"messages": [{"role": ..., "content": ...}, ...]}``  (instruction data becomes a user turn + an assistant turn)
* ``{"text": "..."}``                                      (plain text, loss on every token)

Tokenization turns a record into ``input_ids`` and ``labels``; prompt tokens get label ``-100`` (ignored by the loss)
unless ``train_on_inputs``; an EOS token closes every example; everything is cut at ``cutoff_len``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DataFormatError",
    "SCHEMAS",
    "normalise_records",
    "PLAIN_TEMPLATE",
    "TokenizeOptions",
    "tokenize_record",
    "tokenize_records",
    "TokenizedDataset",
    "PadCollator",
    "TokenizedSplits",
]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """The data cannot be used: unreadable file, unknown columns or a malformed record. Raised before model load."""


SCHEMAS = (
    "instruction/input/output",
    "instruction/response (input or context optional)",
    "messages (a list of {role, content})",
    "text",
)


def _detect_schema(keys: set[str]) -> str | None:
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "instruction/output"
    if "instruction" in keys and "response" in keys:
        return "instruction/response"
    if "text" in keys:
        return "text"
    return None


def _need_str(value: Any, what: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: {what} is empty")
    return value


def normalise_records(records: Iterable[dict], source: str = "data") -> tuple[list[dict], str]:
    """Check records and bring them to ``{"messages": [...]}`` or ``{"text": ...}``; returns ``(records, schema)``.

    The schema is detected from the first record's keys and every record must follow it.

    Raises:
        DataFormatError: no known fields, or a record whose fields have the wrong type / are empty.
    """
    records = list(records)
    if not records:
        raise DataFormatError(f"{source}: no records")
    schema = _detect_schema(set(records[0]))
    if schema is None:
        raise DataFormatError(
            f"{source}: unrecognised record fields {sorted(records[0])}; expected one of: {'; '.join(SCHEMAS)}"
        )
    out = []
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if schema == "text":
            out.append({"text": _need_str(rec.get("text"), "'text'", where)})
            continue
        if schema == "messages":
            out.append({"messages": _check_messages(rec.get("messages"), where)})
            continue
        answer_key = "output" if schema == "instruction/output" else "response"
        instruction = _need_str(rec.get("instruction"), "'instruction'", where)
        answer = _need_str(rec.get(answer_key), f"{answer_key!r}", where)
        extra = rec.get("input", rec.get("context"))
        if extra is not None:
            extra = _need_str(extra, "'input'", where, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return out, schema


def _check_messages(messages: Any, where: str) -> list[dict]:
    if isinstance(messages, str):
        try:  # CSV cells hold JSON text
            messages = json.loads(messages)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: 'messages' is a string that is not JSON") from err
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataFormatError(f"{where}: message {j} needs a 'role' in {ROLES}, got {m!r:.80}")
        out.append({"role": m["role"], "content": _need_str(m.get("content"), f"message {j} 'content'", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(f"{where}: 'messages' has no assistant turn to learn from")
    return out


# used for messages when the tokenizer has no chat template (or with --prompt_template plain)
PLAIN_TEMPLATE = {
    "system": "### System:\n{content}\n\n",
    "user": "### Instruction:\n{content}\n\n### Response:\n",
    "assistant": "{content}",
    "between": "\n\n",
}


def _plain_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        text = PLAIN_TEMPLATE[m["role"]].format(content=m["content"])
        if m["role"] == "assistant" and i + 1 < len(messages):
            segments.append((text, True))
            segments.append((PLAIN_TEMPLATE["between"], False))
        else:
            segments.append((text, m["role"] == "assistant"))
    return segments


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, is_assistant) pieces, by rendering growing prefixes."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return _chat_segments_last_turn(tokenizer, messages)
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = _render(tokenizer, messages, False)
    if not rest.startswith(done):
        return _chat_segments_last_turn(tokenizer, messages)
    if len(rest) > len(done):
        segments.append((rest[len(done) :], False))
    return [s for s in segments if s[0]]


def _chat_segments_last_turn(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    # templates that rewrite earlier turns (e.g. drop past reasoning): learn only the last assistant turn
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _render(tokenizer, messages[:last], True)
    full = _render(tokenizer, messages[: last + 1], False)
    if not full.startswith(prompt):
        raise DataFormatError(
            "the tokenizer's chat template does not render the prompt as a prefix of the conversation, so prompt "
            "tokens cannot be masked; use --prompt_template plain or --train_on_inputs"
        )
    return [(prompt, False), (full[len(prompt) :], True)]


@dataclass
class TokenizeOptions:
    cutoff_len: int = 256
    train_on_inputs: bool = False
    prompt_template: str = "auto"  # auto | chat | plain
    stats: dict = field(default_factory=lambda: {"dropped_no_target": 0, "truncated": 0})


def _use_chat(tokenizer: Any, prompt_template: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_template == "chat" and not has_template:
        raise DataFormatError("--prompt_template chat: the tokenizer has no chat template")
    return prompt_template == "chat" or (prompt_template == "auto" and has_template)


def tokenize_record(record: dict, tokenizer: Any, opts: TokenizeOptions) -> dict | None:
    """``{"input_ids", "labels"}`` of one normalised record, or None when no target token survives truncation."""
    chat = _use_chat(tokenizer, opts.prompt_template)
    if "text" in record:
        segments, chat = [(record["text"], True)], False
    elif chat:
        segments = _chat_segments(tokenizer, record["messages"])
    else:
        segments = _plain_segments(record["messages"])
    # the closing EOS: trailing whitespace after the template's own end-of-turn token would hide it
    text, trainable = segments[-1]
    segments[-1] = (text.rstrip(), trainable)
    eos_id = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for n, (text, trainable) in enumerate(segments):
        if not text:
            continue
        # chat templates write their own BOS; plain text gets the tokenizer's usual special tokens up front
        piece = tokenizer(text, add_special_tokens=(n == 0 and not chat))["input_ids"]
        if n == 0 and not chat and eos_id is not None and len(piece) > 1 and piece[-1] == eos_id:
            piece = piece[:-1]  # tokenizers that append EOS themselves
        ids += piece
        labels += piece if (trainable or opts.train_on_inputs) else [IGNORE_INDEX] * len(piece)
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        labels.append(eos_id if (segments[-1][1] or opts.train_on_inputs) else IGNORE_INDEX)
    if len(ids) > opts.cutoff_len:
        opts.stats["truncated"] += 1
        ids, labels = ids[: opts.cutoff_len], labels[: opts.cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        opts.stats["dropped_no_target"] += 1
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_records(records: Sequence[dict], tokenizer: Any, opts: TokenizeOptions) -> list[dict]:
    """Tokenize every record, dropping those left with no target token (counted in ``opts.stats``)."""
    out = [t for t in (tokenize_record(r, tokenizer, opts) for r in records) if t is not None]
    return out


class TokenizedDataset:
    """A map-style dataset over tokenized examples (what ``Trainer`` and its samplers need)."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class PadCollator:
    """Right-pads a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, plus ``attention_mask``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (batch, width)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class TokenizedSplits:
    """The fine-tuning data as the run uses it: the records, the tokenizer, the options and the tokenized splits."""

    train_recs: list[dict]
    eval_recs: list[dict]
    schema: str
    tokenizer: Any
    opts: TokenizeOptions
    train_ds: TokenizedDataset
    eval_ds: TokenizedDataset

    @property
    def n_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train_ds.examples)
