"""The fine-tuning example's data: built-in set, file formats, schemas, prompt masking, EOS, cutoff and errors."""

from __future__ import annotations

import ast
import csv
import hashlib
import json

import pytest

from peft_gralora.finetune import data as D
from tests.finetune_helpers import task_records, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def builtin():
    return D.build_builtin_dataset()


def test_builtin_split_is_fixed_and_hash_based(builtin):
    again = D.build_builtin_dataset()
    assert again == builtin
    train_ids = [r["id"] for r in builtin["train"]]
    test_ids = [r["id"] for r in builtin["test"]]
    assert len(train_ids) > 150 and len(test_ids) > 10
    assert not set(train_ids) & set(test_ids)
    assert train_ids == sorted(train_ids) and test_ids == sorted(test_ids)
    # independent restatement of the rule: first 8 hex digits of sha256(id), mod 100, below 10
    for rid in test_ids:
        assert int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16) % 100 < 10
    for rid in train_ids:
        assert int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16) % 100 >= 10
    # a smaller length cap keeps each function on the same side of the split
    small = D.build_builtin_dataset(max_chars=400)
    assert {r["id"] for r in small["test"]} <= set(test_ids)
    assert {r["id"] for r in small["train"]} <= set(train_ids)


def test_builtin_records_are_signature_docstring_to_code(builtin):
    rec = next(r for r in builtin["train"] + builtin["test"] if r["id"] == "shlex.quote")
    name = rec["id"].rsplit(".", 1)[1]
    assert rec["input"].startswith(f"def {name}(") and '"""' in rec["input"]
    tree = ast.parse(rec["output"])  # the answer is valid Python: the function without its docstring
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef) and func.name == name
    assert ast.get_docstring(func) is None
    assert "`shlex.quote`" in rec["instruction"]
    for r in builtin["train"][:50]:
        ast.parse(r["output"])


def _write_all_formats(tmp_path, records):
    paths = {"jsonl": write_jsonl(str(tmp_path / "d.jsonl"), records)}
    (tmp_path / "d.json").write_text(json.dumps(records))
    paths["json"] = str(tmp_path / "d.json")
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    paths["csv"] = str(tmp_path / "d.csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    return paths


def test_every_file_format_gives_the_same_records(tmp_path):
    records = task_records(12)
    paths = _write_all_formats(tmp_path, records)
    loaded = {ext: D.load_splits(p, val_set_size=3, seed=1) for ext, p in paths.items()}
    first = loaded["jsonl"]
    assert len(first[0]) == 9 and len(first[1]) == 3 and first[2] == "instruction/output"
    for ext, got in loaded.items():
        assert got == first, ext
    msgs = first[0][0]["messages"]
    # the held-out 3 are a seeded shuffle's first 3; training keeps the rest in file order
    order = [i for i in range(12) if records[i]["output"] not in {r["messages"][1]["content"] for r in first[1]}]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] == f"{records[order[0]]['instruction']}\n\n{records[order[0]]['input']}"
    # held-out and train partition the data
    all_answers = sorted(r["output"] for r in records)
    got_answers = sorted(r["messages"][1]["content"] for r in first[0] + first[1])
    assert got_answers == all_answers


def test_schemas_instruction_response_messages_text(tmp_path):
    ir = [{"instruction": "sort the letters", "context": "b a", "response": "a b"}]
    recs, schema = D.normalise_records(ir)
    assert schema == "instruction/response"
    assert recs[0]["messages"] == [
        {"role": "user", "content": "sort the letters\n\nb a"},
        {"role": "assistant", "content": "a b"},
    ]
    chat = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    assert D.normalise_records(chat) == (chat, "messages")
    assert D.normalise_records([{"text": "a b c"}]) == ([{"text": "a b c"}], "text")
    # instruction without input: the prompt is the instruction alone
    recs, _ = D.normalise_records([{"instruction": "copy", "input": "", "output": "a"}])
    assert recs[0]["messages"][0]["content"] == "copy"


def test_folder_with_train_and_test_files(tmp_path):
    write_jsonl(str(tmp_path / "data" / "train.jsonl"), task_records(10, seed=1))
    write_jsonl(str(tmp_path / "data" / "test.jsonl"), task_records(4, seed=2))
    train, held, _ = D.load_splits(str(tmp_path / "data"), val_set_size=40)
    assert len(train) == 10 and len(held) == 4
    train, held, _ = D.load_splits(str(tmp_path / "data"), val_set_size=2)
    assert len(train) == 10 and len(held) == 2


@pytest.mark.parametrize(
    "content, name, message",
    [
        ('[{"instruction": "a", "output": "b"},', "bad.json", "not valid JSON"),
        ('{"instruction": "a", "output": "b"}\n{oops\n', "bad.jsonl", "line 2 is not valid JSON"),
        ('[{"question": "a", "answer": "b"}]', "cols.json", "unrecognised record fields ['answer', 'question']"),
        ('[{"instruction": "a", "output": 3}]', "type.json", "'output' must be a string, got int"),
        ('[{"instruction": "", "output": "b"}]', "empty.json", "'instruction' is empty"),
        ('[{"messages": [{"role": "user", "content": "hi"}]}]', "noasst.json", "no assistant turn"),
        ('[{"messages": [{"role": "bot", "content": "hi"}]}]', "role.json", "needs a 'role'"),
        ("[]", "none.json", "no records"),
        ("a,b\n1,2,3\n", "wide.csv", "more fields than the header"),
        ("x", "data.txt", "unsupported file type '.txt'"),
    ],
)
def test_malformed_data_stops_with_a_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(D.DataFormatError) as err:
        D.load_splits(str(path), val_set_size=0)
    assert message in str(err.value)
    assert name in str(err.value)  # the error names the file


def test_missing_local_path_is_not_treated_as_a_hub_name(tmp_path):
    with pytest.raises(D.DataFormatError, match="no such file or folder"):
        D.load_splits(str(tmp_path / "nope.jsonl"))


def test_bad_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    from peft_gralora.finetune import modeling, train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n')

    def no_model(*a, **k):
        raise AssertionError("the model must not load for bad data")

    monkeypatch.setattr(train, "load_base_model", no_model)
    monkeypatch.setattr(modeling, "load_base_model", no_model)
    monkeypatch.setattr(train, "load_tokenizer", no_model)
    with pytest.raises(D.DataFormatError, match="unrecognised record fields"):
        train.run(["--data_path", str(bad), "--output_dir", str(tmp_path / "out")])


# ---- tokenization ---------------------------------------------------------------------------------------------------


def _target_text(tok, example):
    return tok.decode([i for i, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != -100])


def test_plain_template_masks_the_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    rec = D.normalise_records([{"instruction": "reverse the letters", "input": "a b c", "output": "c b a"}])[0][0]
    ex = D.tokenize_record(rec, tok, D.TokenizeOptions(cutoff_len=64))
    prompt = tok("### Instruction:\nreverse the letters\n\na b c\n\n### Response:\n")["input_ids"]
    answer = tok("c b a", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert ex["labels"] == [-100] * len(prompt) + answer + [tok.eos_token_id]
    assert ex["input_ids"].count(tok.eos_token_id) == 1
    assert _target_text(tok, ex) == "c b a </s>"

    on_inputs = D.tokenize_record(rec, tok, D.TokenizeOptions(cutoff_len=64, train_on_inputs=True))
    assert on_inputs["labels"] == on_inputs["input_ids"] == ex["input_ids"]


def test_cutoff_truncates_and_drops_examples_without_targets():
    tok = tiny_tokenizer()
    rec = D.normalise_records([{"instruction": "sort the letters", "input": "d c b a", "output": "a b c d"}])[0][0]
    full = D.tokenize_record(rec, tok, D.TokenizeOptions(cutoff_len=64))
    n_prompt = full["labels"].count(-100)
    opts = D.TokenizeOptions(cutoff_len=n_prompt + 2)
    cut = D.tokenize_record(rec, tok, opts)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["input_ids"] == full["input_ids"][: n_prompt + 2]
    assert tok.eos_token_id not in cut["input_ids"]  # cut before the end: no EOS
    assert opts.stats["truncated"] == 1
    opts = D.TokenizeOptions(cutoff_len=n_prompt)
    assert D.tokenize_record(rec, tok, opts) is None
    assert opts.stats["dropped_no_target"] == 1


def test_chat_template_masks_every_non_assistant_turn():
    tok = tiny_tokenizer(chat=True)
    rec = {
        "messages": [
            {"role": "system", "content": "copy the letters"},
            {"role": "user", "content": "a b"},
            {"role": "assistant", "content": "a b"},
            {"role": "user", "content": "c d"},
            {"role": "assistant", "content": "c d"},
        ]
    }
    ex = D.tokenize_record(rec, tok, D.TokenizeOptions(cutoff_len=64))
    rendered = tok.apply_chat_template(rec["messages"], tokenize=False)
    assert ex["input_ids"] == tok(rendered.rstrip(), add_special_tokens=False)["input_ids"]
    # exactly the two assistant answers and their end-of-turn tokens are learned
    assert _target_text(tok, ex) == "a b </s> c d </s>"
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"].count(tok.eos_token_id) == 5  # one per turn
    # auto picks the chat template; plain overrides it
    plain = D.tokenize_record(rec, tok, D.TokenizeOptions(cutoff_len=64, prompt_template="plain"))
    assert "# # # Instruction :" in tok.decode(plain["input_ids"])
    with pytest.raises(D.DataFormatError, match="no chat template"):
        D.tokenize_record(rec, tiny_tokenizer(), D.TokenizeOptions(prompt_template="chat"))


def test_text_records_learn_every_token():
    tok = tiny_tokenizer()
    ex = D.tokenize_record({"text": "the words a b"}, tok, D.TokenizeOptions(cutoff_len=64))
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_pad_collator():
    batch = D.PadCollator(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
