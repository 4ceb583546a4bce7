"""Adapter-directory conversions: exact export to plain LoRA, upstream <-> variant, info, error paths.

The references are independent of the converter: the GraLoRA model's own outputs (ours or upstream peft's tuner), the
exported adapter loaded by vanilla peft in a subprocess (PEFT_GRALORA_DISABLE=1), and the dense block formula of
tests/reference.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from peft_gralora.convert import AdapterConversionError, _pattern_value, adapter_info, convert_adapter, export_lora
from tests.convert_cases import Case, load_with_adapter, run, save_trained
from tests.reference import dense_delta

REPO = Path(__file__).resolve().parents[1]
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

# LoraConfig(use_gralora=True) adapters; "up" marks the ones upstream GraloraConfig can represent
VARIANT_CASES = [
    Case("mlp-k2", "mlp", dict(r=4, lora_alpha=8, gralora_k=2, target_modules=["lin0", "lin1"])),
    Case(
        "mlp-hybrid-rslora-lorabias",
        "mlp",
        dict(
            r=6,
            lora_alpha=8,
            gralora_k=2,
            hybrid_r=2,
            use_rslora=True,
            lora_bias=True,
            target_modules=["lin0", "lin1"],
        ),
    ),
    Case(
        "conv1d-k4", "conv1d", dict(r=8, lora_alpha=16, gralora_k=4, target_modules=["c0", "c1"], fan_in_fan_out=True)
    ),
    Case(
        "mlp-k4-modules_to_save-biasall",
        "mlp",
        dict(r=4, lora_alpha=8, gralora_k=4, target_modules=["lin0"], modules_to_save=["lin1"], bias="all"),
    ),
    Case(
        "gpt2-hybrid-patterns-rslora",
        "gpt2",
        dict(
            r=6,
            lora_alpha=12,
            gralora_k=2,
            hybrid_r=2,
            use_rslora=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
            rank_pattern={"c_fc": 10},
            alpha_pattern={"attn.c_proj": 3},
            modules_to_save=["ln_f"],
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        ),
    ),
]
VARIANT_CASES.append(
    Case(
        "mlp-dora-hybrid",
        "mlp",
        dict(r=6, lora_alpha=8, gralora_k=2, hybrid_r=2, use_dora=True, target_modules=["lin0"]),
    )
)
UPSTREAM_REPRESENTABLE = ["mlp-k2", "conv1d-k4", "mlp-k4-modules_to_save-biasall"]

UPSTREAM_CASES = [
    Case("up-mlp-k2", "mlp", dict(r=4, alpha=8, gralora_k=2, target_modules=["lin0", "lin1"]), upstream=True),
    Case(
        "up-mlp-k4-hybrid-mts",
        "mlp",
        dict(r=4, alpha=6, gralora_k=4, hybrid_r=2, target_modules=["lin0"], modules_to_save=["lin1"]),
        upstream=True,
    ),
    Case(
        "up-gpt2-hybrid-bias",
        "gpt2",
        dict(r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=["c_attn", "c_fc"], bias="gralora_only"),
        upstream=True,
    ),
]
ALL_CASES = {c.id: c for c in VARIANT_CASES + UPSTREAM_CASES}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / WEIGHTS)


def _config(d: Path) -> dict:
    return json.loads((d / CONFIG).read_text())


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[Path, Path, torch.Tensor]]:
    """case id -> (adapter dir, base weights file, the adapter model's output)."""
    root = tmp_path_factory.mktemp("trained")
    return {case.id: save_trained(case, root / case.id) for case in ALL_CASES.values()}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Export every case to plain LoRA, then load all of them in ONE vanilla-peft subprocess.

    Returns case id -> (exported dir, output of vanilla peft with the exported adapter).
    """
    root = tmp_path_factory.mktemp("exported")
    jobs = []
    for case_id, (adapter, base_file, _) in trained.items():
        dst = export_lora(adapter, root / case_id / "plain")
        jobs.append(
            dict(
                factory=ALL_CASES[case_id].factory,
                base=str(base_file),
                adapter=str(dst),
                output=str(root / case_id / "y.safetensors"),
            )
        )
    spec = root / "spec.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PEFT_GRALORA_DISABLE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.convert_cases", str(spec)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        case_id: (root / case_id / "plain", load_file(root / case_id / "y.safetensors")["y"]) for case_id in trained
    }


# ---------------------------------------------------------------------------------------------------------------------
# export to plain LoRA
# ---------------------------------------------------------------------------------------------------------------------


# peft 0.20's GraloraConfig does not save the base biases that bias="gralora_only" trains (peft 0.21 does): its file
# holds less than the trained model, and the reference is then what peft's own tuner makes of that file
UPSTREAM_SAVES_GRALORA_ONLY_BIAS = Version(peft.__version__) >= Version("0.21")


def _file_reference(case_id: str, trained) -> torch.Tensor:
    adapter, base_file, expected = trained[case_id]
    case = ALL_CASES[case_id]
    if not case.upstream or case.kwargs.get("bias") != "gralora_only" or UPSTREAM_SAVES_GRALORA_ONLY_BIAS:
        return expected
    assert not any(key.endswith(".bias") for key in _tensors(adapter))  # peft 0.20's own behaviour
    return run(load_with_adapter(case.factory, base_file, adapter), _input(case_id))


@pytest.mark.parametrize("case_id", list(ALL_CASES))
def test_export_same_outputs_in_vanilla_peft(case_id, trained, exported):
    expected = _file_reference(case_id, trained)
    _, actual = exported[case_id]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case_id", [c.id for c in VARIANT_CASES])
def test_export_factors_equal_dense_reference(case_id, trained, exported):
    """Every exported module's B @ A is the GraLoRA delta of the block formula, at rank k(r - h) + h."""
    src, dst = trained[case_id][0], exported[case_id][0]
    k, h = _config(src)["gralora_k"], _config(src)["hybrid_r"]
    ts, td = _tensors(src), _tensors(dst)
    names = [key.removesuffix(".lora_A.weight") for key in ts if key.endswith(".lora_A.weight")]
    assert names
    for name in names:
        A, B = ts[f"{name}.lora_A.weight"], ts[f"{name}.lora_B.weight"]
        A_plain, B_plain = td[f"{name}.lora_A.weight"], td[f"{name}.lora_B.weight"]
        r = A.shape[0]
        assert A_plain.shape == (k * (r - h) + h, A.shape[1]) and B_plain.shape == (B.shape[0], k * (r - h) + h)
        torch.testing.assert_close(B_plain.double() @ A_plain.double(), dense_delta(A, B, k, h), rtol=0, atol=1e-12)


def test_export_config_fields(trained, exported):
    """The exported config: plain LoRA (no GraLoRA fields, no rslora), per-module patterns, everything else kept."""
    src = _config(trained["gpt2-hybrid-patterns-rslora"][0])
    dst = _config(exported["gpt2-hybrid-patterns-rslora"][0])
    assert not {"use_gralora", "gralora_k", "hybrid_r"} & dst.keys()
    assert dst["peft_type"] == "LORA" and dst["use_rslora"] is False
    assert dst["r"] == 2 * (6 - 2) + 2
    # c_fc has r=10 -> 2 * 8 + 2 = 18; exact module names, escaped for peft's regex
    assert set(dst["rank_pattern"].values()) == {18}
    assert all(key.endswith(r"mlp\.c_fc") for key in dst["rank_pattern"])
    for name in ("target_modules", "modules_to_save", "task_type", "fan_in_fan_out", "bias", "lora_dropout"):
        assert dst[name] == src[name], name


def test_export_accepts_upstream_and_keeps_names(trained, exported):
    cfg = _config(exported["up-gpt2-hybrid-bias"][0])
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "lora_only" and cfg["r"] == 2 * 4 + 2


# ---------------------------------------------------------------------------------------------------------------------
# upstream GraloraConfig <-> LoraConfig(use_gralora=True)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [c.id for c in UPSTREAM_CASES])
def test_upstream_to_variant_same_outputs_and_round_trip(case_id, trained, tmp_path):
    adapter, base_file, _ = trained[case_id]
    expected = _file_reference(case_id, trained)
    variant = convert_adapter(adapter, tmp_path / "variant", to="variant")
    cfg = _config(variant)
    up_cfg = _config(adapter)
    assert cfg["use_gralora"] is True and cfg["r"] == up_cfg["r"] + up_cfg["hybrid_r"]
    assert cfg["lora_alpha"] == up_cfg["alpha"]
    assert cfg["bias"] == {"gralora_only": "lora_only"}.get(up_cfg["bias"], up_cfg["bias"])
    model = load_with_adapter(ALL_CASES[case_id].factory, base_file, variant)
    assert "lora_A" in str(model)  # really our variant, not upstream's tuner
    torch.testing.assert_close(run(model, _input(case_id)), expected, rtol=1e-5, atol=1e-5)
    back = convert_adapter(variant, tmp_path / "upstream", to="upstream")
    _assert_identical(adapter, back)
    assert _config(back) == up_cfg


@pytest.mark.parametrize("case_id", UPSTREAM_REPRESENTABLE)
def test_variant_to_upstream_same_outputs_and_round_trip(case_id, trained, tmp_path):
    adapter, base_file, expected = trained[case_id]
    upstream = convert_adapter(adapter, tmp_path / "upstream", to="upstream")
    assert _config(upstream)["peft_type"] == "GRALORA"
    model = load_with_adapter(ALL_CASES[case_id].factory, base_file, upstream)
    assert "gralora_A" in str(dict(model.named_parameters()).keys())  # upstream's own tuner
    torch.testing.assert_close(run(model, _input(case_id)), expected, rtol=1e-5, atol=1e-5)
    back = convert_adapter(upstream, tmp_path / "variant", to="variant")
    _assert_identical(adapter, back)


def _input(case_id: str) -> torch.Tensor:
    from tests.convert_cases import make_input

    return make_input(ALL_CASES[case_id].factory)


# ---------------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case_id, kind, k, h", [("mlp-k2", "gralora", 2, 0), ("up-mlp-k4-hybrid-mts", "gralora-upstream", 4, 2)]
)
def test_adapter_info(case_id, kind, k, h, trained):
    adapter = trained[case_id][0]
    info = adapter_info(adapter)
    assert (info["type"], info["gralora_k"], info["hybrid_r"]) == (kind, k, h)
    assert info["parameter_count"] == sum(t.numel() for t in _tensors(adapter).values())
    expected_modules = {"lin0": (16, 24), "lin1": (24, 8)}
    for row in info["modules"]:
        in_f, out_f = expected_modules[row["name"]]
        g = row["r"] - h
        assert (row["in_features"], row["out_features"]) == (in_f, out_f)
        assert row["effective_rank"] == min(k * g + h, in_f, out_f)
    assert info["effective_rank"] == max(row["effective_rank"] for row in info["modules"])


def test_adapter_info_plain_lora(exported):
    info = adapter_info(exported["mlp-k2"][0])
    assert info["type"] == "lora" and info["r"] == 8 and info["gralora_k"] == 1
    assert [row["effective_rank"] for row in info["modules"]] == [8, 8]


def test_pattern_value_matches_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"c_fc": 1, r"h\.0\.attn\.c_proj": 2, "attn.c_attn": 3, "lin.": 4}
    keys = ["h.0.mlp.c_fc", "h.0.mlp.xc_fc", "h.0.attn.c_proj", "h.1.attn.c_proj", "lin0", "c_attn", "x.attn.c_attn"]
    for key in keys:
        assert _pattern_value(patterns, key, None) == patterns.get(get_pattern_key(patterns, key)), key


# ---------------------------------------------------------------------------------------------------------------------
# errors: a clear message, and dst untouched
# ---------------------------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = _config(d)
    cfg.update(changes)
    (d / CONFIG).write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    tensors = _tensors(d)
    fn(tensors)
    save_file(tensors, str(d / WEIGHTS))


def _rename_to_bin(d: Path) -> None:
    torch.save(_tensors(d), d / "adapter_model.bin")
    (d / WEIGHTS).unlink()


# (id, source case, how to break the copy, call, message fragment)
ERROR_CASES = [
    ("missing-dir", "mlp-k2", lambda d: d.rename(d.with_name("gone")), "export", "does not exist"),
    ("missing-config", "mlp-k2", lambda d: (d / CONFIG).unlink(), "export", "no adapter_config.json"),
    ("missing-weights", "mlp-k2", lambda d: (d / WEIGHTS).unlink(), "export", "neither"),
    ("corrupt-weights", "mlp-k2", lambda d: (d / WEIGHTS).write_bytes(b"\x00garbage" * 9), "export", "corrupt"),
    ("corrupt-config", "mlp-k2", lambda d: (d / CONFIG).write_text("{not json"), "export", "Cannot read"),
    ("bin-without-flag", "mlp-k2", _rename_to_bin, "export", "allow_pickle=True"),
    ("unknown-peft-type", "mlp-k2", lambda d: _edit_config(d, peft_type="IA3"), "export", "peft_type='IA3'"),
    ("plain-lora-to-upstream", "plain:mlp-k2", None, "upstream", "plain LoRA adapter"),
    ("plain-lora-export", "plain:mlp-k2", None, "export", "already a plain LoRA"),
    ("variant-to-variant", "mlp-k2", None, "variant", "already a LoraConfig(use_gralora=True)"),
    ("upstream-to-upstream", "up-mlp-k2", None, "upstream", "already an upstream"),
    ("bad-to", "mlp-k2", None, "sideways", "to must be"),
    (
        "rslora-to-upstream",
        "mlp-hybrid-rslora-lorabias",
        lambda d: _edit_config(d, lora_bias=False),
        "upstream",
        "use_rslora=True cannot be represented",
    ),
    ("lora_bias-to-upstream", "mlp-k2", lambda d: _edit_config(d, lora_bias=True), "upstream", "lora_bias=True"),
    (
        "patterns-to-upstream",
        "gpt2-hybrid-patterns-rslora",
        lambda d: _edit_config(d, use_rslora=False),
        "upstream",
        "rank_pattern/alpha_pattern",
    ),
    ("exclude-to-upstream", "mlp-k2", lambda d: _edit_config(d, exclude_modules=["x"]), "upstream", "exclude_modules"),
    ("dora-without-magnitude", "mlp-k2", lambda d: _edit_config(d, use_dora=True), "export", "use_dora=True in"),
    ("dora-to-upstream", "mlp-dora-hybrid", None, "upstream", "use_dora=True cannot be represented"),
    ("unknown-upstream-field", "up-mlp-k2", lambda d: _edit_config(d, future_option=3), "variant", "future_option"),
    ("upstream-bad-r", "up-mlp-k2", lambda d: _edit_config(d, r=3), "variant", "Invalid upstream"),
    ("rank-mismatch", "mlp-k2", lambda d: _edit_config(d, r=6), "export", "Shape mismatch"),
    ("k-not-dividing", "mlp-k2", lambda d: _edit_config(d, gralora_k=3), "export", "Shape mismatch"),
    (
        "A-B-mismatch",
        "mlp-k2",
        lambda d: _edit_tensors(
            d, lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items() if "lora_B" in k})
        ),
        "export",
        "Shape mismatch",
    ),
    (
        "missing-B",
        "mlp-k2",
        lambda d: _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "lora_B" in k]),
        "export",
        "needs both",
    ),
    (
        "unsupported-key",
        "mlp-k2",
        lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.lin0.lora_embedding_A": torch.ones(2, 24)})),
        "export",
        "Unsupported weight",
    ),
    (
        "upstream-shape",
        "up-mlp-k2",
        lambda d: _edit_tensors(
            d, lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items() if k.endswith("gralora_B")})
        ),
        "variant",
        "Shape mismatch",
    ),
    (
        "upstream-hybrid-missing",
        "up-mlp-k4-hybrid-mts",
        lambda d: _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "_general" in k]),
        "variant",
        "hybrid_r=2",
    ),
]


def _call(how: str, src: Path, dst: Path, **kw):
    if how == "export":
        return export_lora(src, dst, **kw)
    return convert_adapter(src, dst, to=how, **kw)


@pytest.mark.parametrize("dst_exists", [True, False], ids=["dst-nonempty", "dst-absent"])
@pytest.mark.parametrize("eid, source, breaker, how, fragment", ERROR_CASES, ids=[e[0] for e in ERROR_CASES])
def test_errors_leave_dst_untouched(eid, source, breaker, how, fragment, dst_exists, trained, exported, tmp_path):
    origin = exported[source[6:]][0] if source.startswith("plain:") else trained[source][0]
    src = _copy(origin, tmp_path / "src")
    if breaker is not None:
        breaker(src)
    out = tmp_path / "out"
    dst = out / "dst"
    out.mkdir()
    if dst_exists:
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    with pytest.raises(AdapterConversionError) as err:
        # overwrite=True: the data error, not the destination check, must be what stops it
        _call(how, src, dst, overwrite=True)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    if dst_exists:
        assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    assert [p.name for p in out.iterdir()] == (["dst"] if dst_exists else [])  # no temp dirs left behind


def test_destination_checks(trained, tmp_path):
    src = trained["mlp-k2"][0]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(AdapterConversionError, match="not empty; pass overwrite=True"):
        export_lora(src, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(AdapterConversionError, match="is the source directory"):
        export_lora(src, src, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterConversionError, match="not a directory"):
        export_lora(src, tmp_path / "file")
    # overwrite=True replaces the directory as a whole; an empty existing directory needs no flag
    export_lora(src, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == [CONFIG, WEIGHTS]
    (tmp_path / "empty").mkdir()
    export_lora(src, tmp_path / "empty")
    _assert_identical(dst, tmp_path / "empty")


def test_bin_adapter_with_explicit_flag(trained, tmp_path):
    src = _copy(trained["up-mlp-k2"][0], tmp_path / "src")
    _rename_to_bin(src)
    convert_adapter(src, tmp_path / "from_bin", to="variant", allow_pickle=True)
    convert_adapter(trained["up-mlp-k2"][0], tmp_path / "from_safe", to="variant")
    _assert_identical(tmp_path / "from_bin", tmp_path / "from_safe")
    # a pickle that is not a state dict, and one weights_only refuses, are both clear errors
    torch.save([1, 2], src / "adapter_model.bin")
    with pytest.raises(AdapterConversionError, match="does not hold a state dict"):
        adapter_info(src, allow_pickle=True)
    torch.save({"x": object()}, src / "adapter_model.bin")
    with pytest.raises(AdapterConversionError, match="weights_only=True"):
        adapter_info(src, allow_pickle=True)


def test_base_model_name_and_task_type_kept(trained, tmp_path):
    src = _copy(trained["up-mlp-k2"][0], tmp_path / "src")
    _edit_config(src, base_model_name_or_path="org/some-model", task_type="CAUSAL_LM", revision="v1")
    for dst in (
        convert_adapter(src, tmp_path / "variant", to="variant"),
        export_lora(src, tmp_path / "plain"),
        convert_adapter(tmp_path / "variant", tmp_path / "upstream", to="upstream"),
    ):
        cfg = _config(dst)
        assert (cfg["base_model_name_or_path"], cfg["task_type"], cfg["revision"]) == (
            "org/some-model",
            "CAUSAL_LM",
            "v1",
        )


def test_failure_while_writing_leaves_dst_untouched(trained, tmp_path, monkeypatch):
    """Even a failure after validation (disk full, killed writer) must not touch dst: output goes to a temp dir."""
    import safetensors.torch

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "out"
    dst = out / "dst"
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("precious")
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_lora(trained["mlp-k2"][0], dst, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["dst"] and [p.name for p in dst.iterdir()] == ["keep.txt"]
