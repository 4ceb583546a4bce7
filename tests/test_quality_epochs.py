"""The multi-epoch quality benchmark (``python -m benchmarks.quality_epochs --epochs N``) on a tiny Llama: the
learning-rate grid picks each method's best rate, the sweep uses it and reuses the grid run it equals, and a cut-short
sweep resumes to exactly the numbers of an uninterrupted one."""

from __future__ import annotations

import json
import zlib

import pytest

from benchmarks import quality, quality_common, quality_epochs
from tests.models import tiny_llama


class WordTokenizer:
    """Whitespace words hashed into a 128-token vocabulary: short sequences of the real built-in data for a tiny
    model (ids 0 and 1 are pad and EOS)."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + zlib.crc32(w.encode()) % 126 for w in text.split()]}


ARGS = ["--epochs", "2", "--lrs", "1e-3,2e-2", "--grid-rank", "8", "--train-examples", "8", "--batch-size", "4"]
ARGS += ["--max-len", "64", "--threads", "1"]


def run_epochs(tmp_path, extra: list[str], **kwargs) -> dict:
    return quality_epochs.main(
        ARGS + ["--out", str(tmp_path)] + extra, base=tiny_llama(), tokenizer=WordTokenizer(), **kwargs
    )


def test_grid_picks_each_methods_best_rate_and_the_sweep_uses_it(tmp_path):
    methods = ("lora", "gralora")
    payload = run_epochs(tmp_path, ["--methods", ",".join(methods), "--ranks", "8,16", "--seeds", "0,1"])
    runs = payload["runs"]
    keys = [(x["method"], x["r"], x["seed"], x["lr"]) for x in runs]
    assert len(keys) == len(set(keys)), "a run was trained twice"
    for method in methods:
        grid = [x for x in runs if (x["method"], x["r"], x["seed"]) == (method, 8, 0)]
        assert sorted(x["lr"] for x in grid) == [1e-3, 2e-2]
        best = min(grid, key=lambda x: x["epochs"][-1]["eval_loss"])["lr"]
        assert payload["best_lr"][method] == best
        sweep = [x for x in runs if x["method"] == method and (x["r"], x["seed"]) != (8, 0)]
        # r = 16 at both seeds and r = 8 at seed 1 at the chosen rate; r = 8 seed 0 is the grid run
        assert sorted((x["r"], x["seed"]) for x in sweep) == [(8, 1), (16, 0), (16, 1)]
        assert {x["lr"] for x in sweep} == {best}
    assert len(runs) == 2 * 2 + 2 * 3
    for x in runs:
        assert [e["epoch"] for e in x["epochs"]] == [1, 2]
        assert all(e["eval_loss"] > 0 and 0 <= e["eval_token_acc"] <= 1 for e in x["epochs"])
        assert x["steps"] == 2 * (8 // 4)
        assert x["k"] == (None if x["method"] == "lora" else 2)
        assert x["hybrid_r"] == 0
    # the table: one row per (method, r), both seeds, spread = half the range of the two seeds' losses
    row = next(r for r in payload["table"] if (r["method"], r["r"]) == ("gralora", 16))
    pair = [x["epochs"][-1]["eval_loss"] for x in runs if (x["method"], x["r"]) == ("gralora", 16)]
    assert row["seeds"] == [0, 1]
    assert row["epochs"][-1]["eval_loss"] == pytest.approx(sum(pair) / 2)
    assert row["epochs"][-1]["eval_loss_spread"] == pytest.approx(abs(pair[0] - pair[1]) / 2)
    md = (tmp_path / "quality_epochs.md").read_text()
    assert "## Learning-rate grid" in md and "## Rank sweep" in md and md.count("| gralora |") == 2 + 2
    assert (tmp_path / "quality_epochs.png").stat().st_size > 0
    assert json.loads((tmp_path / "quality_epochs.json").read_text())["best_lr"] == payload["best_lr"]


def test_methods_of_one_seed_see_the_same_batches(tmp_path, monkeypatch):
    seen: dict[str, list] = {}
    real = quality_common.collate

    def spy(batch, pad_id):
        seen.setdefault(current.get("method", "zero-shot"), []).append([tuple(x["input_ids"]) for x in batch])
        return real(batch, pad_id)

    current = {}
    real_run = quality_epochs.train_run

    def tagged(base, method, *args, **kwargs):
        current["method"] = method
        return real_run(base, method, *args, **kwargs)

    monkeypatch.setattr(quality_common, "collate", spy)
    monkeypatch.setattr(quality_epochs, "train_run", tagged)
    payload = run_epochs(tmp_path, ["--lrs", "1e-3", "--ranks", "8", "--seeds", "0"])
    assert payload["grid"] == [] and payload["best_lr"] == dict.fromkeys(quality_common.METHODS, 1e-3)
    assert [(x["method"], x["k"], x["hybrid_r"]) for x in payload["runs"]] == [
        ("lora", None, 0),
        ("gralora", 2, 0),
        ("hybrid", 2, 2),
    ]
    assert set(seen) == {"zero-shot", *quality_common.METHODS}
    assert seen["lora"] == seen["gralora"] == seen["hybrid"]
    assert len(seen["lora"]) > 2 * 2  # training batches of both epochs (and the evaluation batches)


def test_a_cut_short_sweep_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    extra = ["--methods", "lora,gralora", "--ranks", "8", "--seeds", "0,1"]
    whole = run_epochs(tmp_path / "whole", extra)
    assert len(whole["runs"]) == 4 + 2

    real_run = quality_epochs.train_run
    calls = []

    def cut_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends mid-sweep
        calls.append(args[1:5])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(quality_epochs, "train_run", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_epochs(tmp_path / "cut", extra)
    saved = json.loads((tmp_path / "cut" / "quality_epochs.json").read_text())
    assert len(saved["runs"]) == 3
    calls.clear()
    monkeypatch.setattr(quality_epochs, "train_run", real_run)
    # the rest in two forked workers: the same numbers as in this process
    resumed = run_epochs(tmp_path / "cut", extra + ["--resume", "--workers", "2"])
    assert len(resumed["runs"]) == 6
    by_key = {(x["method"], x["r"], x["seed"], x["lr"]): x["epochs"] for x in whole["runs"]}
    for x in resumed["runs"]:
        got = [v for e in x["epochs"] for v in (e["eval_loss"], e["eval_token_acc"])]
        want = [
            v for e in by_key[(x["method"], x["r"], x["seed"], x["lr"])] for v in (e["eval_loss"], e["eval_token_acc"])
        ]
        assert got == pytest.approx(want, rel=1e-5)
    assert resumed["best_lr"] == whole["best_lr"]


def test_resume_refuses_other_settings_and_render_rewrites_the_table(tmp_path):
    with pytest.raises(SystemExit, match="no .* to render"):
        run_epochs(tmp_path, ["--render"])
    one = ["--lrs", "1e-3", "--methods", "lora", "--ranks", "8", "--seeds", "0"]
    first = run_epochs(tmp_path, one)
    with pytest.raises(SystemExit, match="other settings"):
        run_epochs(tmp_path, ["--lrs", "2e-3", "--methods", "lora", "--ranks", "8", "--seeds", "0", "--resume"])
    md = tmp_path / "quality_epochs.md"
    text = md.read_text()
    md.unlink()
    rendered = quality_epochs.main(ARGS + ["--out", str(tmp_path), "--render"] + one)  # no model: nothing trains
    assert rendered["runs"] == first["runs"] and md.read_text() == text


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "0"], "at least 1"),
        (["--epochs", "2", "--methods", "lora,dora"], "unknown methods"),
    ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        quality_epochs.parse_args(argv)
    assert match in capsys.readouterr().err


def test_too_few_examples_for_one_batch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="make no batch of 16"):
        run_epochs(tmp_path, ["--batch-size", "16", "--lrs", "1e-3", "--ranks", "8", "--seeds", "0"])


def test_plan_runs_the_grid_first_and_waits_for_it(tmp_path):
    args = quality_epochs.parse_args(["--epochs", "3"])
    assert (args.ranks, args.seeds, args.lrs, args.grid_rank) == ([16, 64, 128], [0, 1], [1e-4, 3e-4, 1e-3], 64)
    # nothing chosen yet: only the 9 grid runs are planned
    assert len(quality_epochs.plan(args, {})) == 9
    full = quality_epochs.plan(args, {"lora": 3e-4, "gralora": 1e-3, "hybrid": 1e-3})
    assert full[:9] == quality_epochs.plan(args, {})
    assert len(full) == 9 + 3 * 3 * 2 - 3  # the seed-0 r=64 sweep runs are grid runs
    assert ("gralora", 128, 1, 1e-3) in full and ("lora", 64, 0, 3e-4) in full[:9]


def test_quality_dispatches_epochs_to_the_multi_epoch_mode(monkeypatch):
    got = []
    monkeypatch.setattr(quality_epochs, "main", lambda argv: got.append(argv) or {})
    quality.main(["--epochs", "3", "--quick"])
    assert got == [["--epochs", "3", "--quick"]]


def test_the_multi_epoch_benchmark_is_its_own_entry_point():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality_epochs", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m benchmarks.quality_epochs") and "--grid-rank" in proc.stdout
