"""The benchmark code itself, on tiny shapes: it runs, its fields are sane, its memory probes see real tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import layer, quality, run, startup
from benchmarks.common import interleaved_times, peak_alloc_bytes, saved_bytes, summarize
from peft_gralora.functional import variant_to_upstream
from tests.reference import dense_output


def test_layer_case_runs_on_a_tiny_shape():
    res = layer.bench_case(64, 32, 8, 2, hybrid=1, rounds=3, time_budget_s=1.0)
    assert (res["d"], res["tokens"], res["r"], res["k"], res["hybrid_r"]) == (64, 32, 8, 2, 2)
    assert set(res["median_ms"]) == {"lora", "gralora", "upstream"}
    assert res["rounds"] == 3
    for key in ("gralora/lora", "upstream/lora", "gralora/upstream", "peak gralora/lora"):
        assert math.isfinite(res[key]) and res[key] > 0
    # backward keeps at least the input x (32 x 64 fp32) for the adapter's weight gradient
    assert all(v >= 32 * 64 * 4 for v in res["saved_bytes"].values())
    assert all(v > 0 for v in res["peak_bytes"].values())
    md = layer.markdown([res])
    assert md.count("\n") == 3 and "| 64 | 32 | 8 | 2 | 2 |" in md
    summ = layer.summary([res])
    assert summ["r<=64"]["gralora/lora"]["n"] == 1


@pytest.mark.parametrize(("k", "h"), [(1, 0), (2, 0), (2, 2)])
def test_the_three_methods_compute_the_same_layer(k, h):
    """Same base layer and scaling, and one non-zero adapter carried across the layouts: GraLoRA's lora_A / lora_B,
    upstream's gralora_A / gralora_B (+ the hybrid general_A / general_B) and, at k = 1 (where GraLoRA is LoRA), plain
    LoRA's own factors. Each model computes base + scaling * the dense block formula of tests/reference.py."""
    models = layer.build_models(16, 4, k, h)
    proj = {method: model.base_model.model.proj for method, model in models.items()}
    base = proj["lora"].get_base_layer()
    for method, module in proj.items():
        assert torch.equal(module.get_base_layer().weight, base.weight), method
        assert torch.equal(module.get_base_layer().bias, base.bias), method
    weight_A, weight_B = proj["gralora"].lora_A["default"].weight, proj["gralora"].lora_B["default"].weight
    upstream = proj["upstream"]
    with torch.no_grad():
        if k == 1:
            weight_A.copy_(proj["lora"].lora_A["default"].weight)
            weight_B.copy_(proj["lora"].lora_B["default"].weight)
        gralora_A, gralora_B, general_A, general_B = variant_to_upstream(weight_A, weight_B, k, h)
        upstream.gralora_A["default"].copy_(gralora_A)
        upstream.gralora_B["default"].copy_(gralora_B)
        if h:
            upstream.gralora_A_general["default"].weight.copy_(general_A)
            upstream.gralora_B_general["default"].weight.copy_(general_B)
    assert torch.count_nonzero(weight_B) == weight_B.numel()  # no zero B: an adapter that does nothing fails
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = base(x).double() + proj["gralora"].scaling["default"] * dense_output(x, weight_A, weight_B, k, h)
        assert (expected - base(x).double()).abs().max() > 1e-3
        for method, model in models.items():
            if method != "lora" or k == 1:  # at k > 1 LoRA's rank-r delta is another function, by design
                torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-6, msg=method)


def test_memory_probes_see_torch_tensors():
    def make() -> torch.Tensor:
        a = torch.empty(256, 1024)  # 1 MiB, freed before b is made
        del a
        b = torch.empty(512, 1024)  # 2 MiB
        return b.sum()

    peak = peak_alloc_bytes(make)
    assert 2 * 2**20 <= peak < 3 * 2**20
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)
    assert saved_bytes(lambda: (x @ w).sum(), exclude=[w]) == x.numel() * 4


def test_interleaved_timing_and_ratios():
    times = interleaved_times({"lora": lambda: None, "gralora": lambda: None, "upstream": lambda: None}, rounds=4)
    assert all(len(v) == 4 for v in times.values())
    summ = summarize({"lora": [1.0, 2.0, 4.0], "gralora": [1.1, 2.2, 4.0], "upstream": [2.0, 4.0, 8.0]})
    assert summ["gralora/lora"] == pytest.approx(1.1)
    assert summ["upstream/lora"] == pytest.approx(2.0)
    assert summ["gralora/upstream"] == pytest.approx(0.55)
    assert summ["times_s"]["gralora"] == [1.1, 2.2, 4.0]  # raw rounds kept for the ratio of medians


def test_importtime_parser_finds_a_module():
    res = startup.importtime_us("import json", "json", repeats=1)
    assert res["found"] and res["median_cumulative_us"] > 0


def test_run_rejects_unknown_parts():
    with pytest.raises(SystemExit, match="unknown part"):
        run.main(["--only", "nonsense"])


def test_quality_helpers():
    assert quality.k_for_rank(32) == 2 and quality.k_for_rank(64) == 4
    cfg = quality.config_for("hybrid", 64)
    assert (cfg.r, cfg.gralora_k, cfg.hybrid_r, cfg.lora_alpha) == (64, 4, 16, 128)
    assert quality.lr_at(0, 10, 1.0, 2) == pytest.approx(0.5)
    assert quality.lr_at(2, 10, 1.0, 2) == pytest.approx(1.0)
    assert quality.lr_at(10, 10, 1.0, 2) == pytest.approx(0.0, abs=1e-12)
    batch = quality.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_response_loss_scores_only_response_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    batch = quality.collate([{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}], 0)
    loss, n, correct = quality.response_loss(lm, batch)
    full = lm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert n == 2 and 0 <= correct <= 2
    torch.testing.assert_close(loss, full)


def test_layer_grid_is_saved_case_by_case(tmp_path):
    argv = ["--only", "layer", "--out", str(tmp_path), "--threads", "1", "--rounds", "3", "--layer-budget", "0.5"]
    argv += ["--dims", "64", "--tokens", "32", "--ranks", "8", "--ks", "2", "--hybrid", "0,1"]
    seen = []
    real_save = run.write_json

    def spy(name, payload, out):
        seen.append(len(payload["cases"]))
        return real_save(name, payload, out)

    run.write_json = spy
    try:
        run.main(argv)
    finally:
        run.write_json = real_save
    saved = json.loads((tmp_path / "layer.json").read_text())
    assert saved["cases_done"] == "2/2" and len(saved["cases"]) == 2
    assert seen[:2] == [1, 2]  # written after the first case already
    assert "Cases measured: 2/2" in (tmp_path / "layer.md").read_text()


def test_serving_benchmark_runs_and_writes_its_table(tmp_path):
    from benchmarks import serving

    with pytest.raises(SystemExit, match="unknown part"):
        serving.main(["--only", "nonsense"])
    payload = serving.main(["--only", "prefill", "--rounds", "1", "--out", str(tmp_path)])
    res = payload["results"]["prefill"]
    assert set(res["median_s"]) == {"lora", "gralora", "upstream"} and res["gralora/lora"] > 0
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"
    assert "| prefill, 512 tokens |" in (tmp_path / "serving.md").read_text()
