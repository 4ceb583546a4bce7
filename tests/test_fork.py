"""Adapters saved by the GraLoRA PEFT fork load exactly, on every load path, or are refused clearly.

References, both independent of this package's conversion code:

- ``tests/fixtures/fork-gralora-gpt2``: a real adapter saved by the fork, with the fork's own logits (made outside
  this project, see its README);
- upstream peft's ``GraloraConfig`` tuner holding the same ``gralora_*`` tensors (the fork computes its function, and
  stores its tensors under the same names and shapes), for fork-layout adapters built here with more shapes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import GraloraConfig, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from peft_gralora.cli import main as cli
from peft_gralora.convert import AdapterConversionError, adapter_info, convert_adapter
from peft_gralora.integration import install, uninstall

FIXTURE = Path(__file__).parent / "fixtures" / "fork-gralora-gpt2"
ADAPTER = FIXTURE / "adapter"
TOL = dict(atol=1e-5, rtol=0)
LOG_LINE = "saved by the GraLoRA PEFT fork"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def _base() -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(FIXTURE / "base_model").eval()


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def _fork_log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "peft_gralora" and LOG_LINE in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------------------
# the real fork adapter, on every load path
# ---------------------------------------------------------------------------------------------------------------------


def _adapter_with_base_path(tmp_path: Path) -> Path:
    """A copy of the fixture adapter that names its base model (the fork saved it with an empty name)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str((FIXTURE / "base_model").resolve())
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def _peft_load_adapter(tmp_path: Path) -> nn.Module:
    # next to another adapter, loaded under its own name, then made active
    model = get_peft_model(_base(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_gralora=True))
    model.load_adapter(ADAPTER, adapter_name="fork")
    model.set_adapter("fork")
    return model


def _transformers_load_adapter(tmp_path: Path) -> nn.Module:
    model = _base()
    model.load_adapter(str(ADAPTER))
    return model


LOAD_PATHS = {
    "PeftModel.from_pretrained": lambda tmp: PeftModel.from_pretrained(_base(), ADAPTER),
    "low_cpu_mem_usage": lambda tmp: PeftModel.from_pretrained(_base(), ADAPTER, low_cpu_mem_usage=True),
    "is_trainable": lambda tmp: PeftModel.from_pretrained(_base(), ADAPTER, is_trainable=True),
    "PeftModel.load_adapter": _peft_load_adapter,
    "transformers load_adapter": _transformers_load_adapter,
    "AutoModelForCausalLM.from_pretrained": lambda tmp: AutoModelForCausalLM.from_pretrained(
        _adapter_with_base_path(tmp)
    ),
}


def test_fixture_is_what_its_readme_says(expected):
    """The base model reproduces the fixture's base logits, and the fork's adapter changes them (by ~1.03)."""
    torch.testing.assert_close(_logits(_base(), expected["input_ids"]), expected["base_logits"], **TOL)
    assert (expected["fork_logits"] - expected["base_logits"]).abs().max() > 1.0


@pytest.mark.parametrize("path", LOAD_PATHS)
def test_fork_adapter_reproduces_the_forks_logits(path, expected, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="peft_gralora")
    model = LOAD_PATHS[path](tmp_path)
    torch.testing.assert_close(_logits(model, expected["input_ids"]), expected["fork_logits"], **TOL)
    assert len(_fork_log_lines(caplog)) == 1, caplog.text
    if path == "is_trainable":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_saving_after_loading_writes_our_layout(expected, tmp_path, caplog):
    model = PeftModel.from_pretrained(_base(), ADAPTER)
    model.save_pretrained(tmp_path / "saved")
    keys = load_file(tmp_path / "saved" / "adapter_model.safetensors").keys()
    assert keys and not any("gralora_" in k for k in keys)
    assert adapter_info(tmp_path / "saved")["type"] == "gralora"
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="peft_gralora")
    again = PeftModel.from_pretrained(_base(), tmp_path / "saved")
    assert not _fork_log_lines(caplog)  # nothing left to convert
    torch.testing.assert_close(_logits(again, expected["input_ids"]), expected["fork_logits"], **TOL)


def test_cli_info_and_convert_accept_fork_directories(expected, tmp_path, capsys):
    assert cli(["info", str(ADAPTER)]) == 0
    assert "gralora-fork adapter" in capsys.readouterr().out
    assert cli(["convert", str(ADAPTER), str(tmp_path / "variant"), "--to", "variant"]) == 0
    assert adapter_info(tmp_path / "variant")["type"] == "gralora"
    model = PeftModel.from_pretrained(_base(), tmp_path / "variant")
    torch.testing.assert_close(_logits(model, expected["input_ids"]), expected["fork_logits"], **TOL)
    # to upstream goes through our layout first
    assert cli(["convert", str(ADAPTER), str(tmp_path / "up"), "--to", "upstream"]) == 1
    assert "convert it with to='variant' first" in capsys.readouterr().err


def test_fork_adapter_exports_to_plain_lora_for_vanilla_peft(expected, tmp_path):
    assert cli(["export-lora", str(ADAPTER), str(tmp_path / "plain")]) == 0
    uninstall()
    try:  # vanilla peft: the exported adapter is plain LoRA
        model = PeftModel.from_pretrained(_base(), tmp_path / "plain")
        torch.testing.assert_close(_logits(model, expected["input_ids"]), expected["fork_logits"], **TOL)
    finally:
        install()


# ---------------------------------------------------------------------------------------------------------------------
# fork-layout adapters built here, against upstream GraloraConfig holding the same tensors
# ---------------------------------------------------------------------------------------------------------------------

IN, HIDDEN = 12, 24  # divisible by k = 1..4


class Net(nn.Module):
    """Two adapted layers, 12 -> 24 -> 12, as nn.Linear or transformers Conv1D (weight stored (in, out))."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = Conv1D(HIDDEN, IN) if conv else nn.Linear(IN, HIDDEN)
        self.down = Conv1D(IN, HIDDEN) if conv else nn.Linear(HIDDEN, IN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _targets(conv: bool) -> dict:
    return dict(target_modules=["up", "down"], fan_in_fan_out=conv)


def build_fork_adapter(path: Path, conv: bool, k: int, h: int, lora_bias: bool) -> nn.Module:
    """Write a fork-layout adapter whose gralora_* tensors are an upstream GraloraConfig model's; return that model.

    Like the fork's files: a LoraConfig(use_gralora=True) config, and next to the gralora_* tensors unused lora_A /
    lora_B (and lora_B bias) weights, here random (non-zero) so that reading them by mistake changes the outputs.
    """
    g, alpha = 2 * k, 6
    upstream = get_peft_model(
        Net(conv),
        GraloraConfig(
            r=g,
            alpha=alpha,
            gralora_k=k,
            hybrid_r=h,
            init_weights=False,
            target_modules=["up", "down"],
            fan_in_fan_out=conv,
        ),
    ).eval()
    tensors = dict(get_peft_model_state_dict(upstream))
    gen = torch.Generator().manual_seed(1)
    for name, (fan_in, fan_out) in {"up": (IN, HIDDEN), "down": (HIDDEN, IN)}.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(g + h, fan_in, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, g + h, generator=gen)
        if lora_bias:
            tensors[f"{prefix}.lora_B.bias"] = torch.randn(fan_out, generator=gen)
    assert any(key.endswith(".gralora_A") for key in tensors) and (h == 0) != any("_general" in key for key in tensors)
    path.mkdir(parents=True)
    save_file({key: t.contiguous() for key, t in tensors.items()}, path / "adapter_model.safetensors")
    config = dict(
        peft_type="LORA",
        r=g + h,
        lora_alpha=alpha,
        use_gralora=True,
        gralora_k=k,
        hybrid_r=h,
        lora_bias=lora_bias,
        init_lora_weights=False,  # the only setting under which the fork's unused lora_B is not zero
        target_modules=["up", "down"],
        fan_in_fan_out=conv,
        peft_version="0.17.2.dev0@UNKNOWN",
    )
    (path / "adapter_config.json").write_text(json.dumps(config))
    return upstream


MATRIX = [(conv, k, h, bias) for conv in (False, True) for k in (1, 2, 3, 4) for h in (0, 2) for bias in (False, True)]


@pytest.mark.parametrize(
    "conv, k, h, lora_bias",
    MATRIX,
    ids=[f"{'conv1d' if c else 'linear'}-k{k}-h{h}{'-lora_bias' if b else ''}" for c, k, h, b in MATRIX],
)
def test_built_fork_adapter_equals_upstream(conv, k, h, lora_bias, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="peft_gralora")
    upstream = build_fork_adapter(tmp_path / "fork", conv, k, h, lora_bias)
    ours = PeftModel.from_pretrained(Net(conv), tmp_path / "fork").eval()
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = upstream(x), ours(x)
    torch.testing.assert_close(got, expected, **TOL)
    with ours.disable_adapter(), torch.no_grad():
        assert (ours(x) - expected).abs().max() > 1e-3  # the adapter matters: reading nothing would fail above
    (line,) = _fork_log_lines(caplog)
    # the fork's forward never adds lora_B's bias: loaded as zeros, and said so
    assert ("load as zeros" in line) == lora_bias


# ---------------------------------------------------------------------------------------------------------------------
# partial, mixed and inconsistent files: clear errors naming the module, nothing loaded
# ---------------------------------------------------------------------------------------------------------------------


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


DOWN = "base_model.model.down"
BROKEN = {
    "gralora_B missing": (
        lambda p: _edit_tensors(p, lambda t: t.pop(f"{DOWN}.gralora_B")),
        rf"'{DOWN}'.*lacks \['gralora_B'\]",
    ),
    "hybrid weights missing": (
        lambda p: _edit_tensors(p, lambda t: t.pop(f"{DOWN}.gralora_A_general.weight")),
        rf"'{DOWN}'.*hybrid_r=2",
    ),
    "mixed with our layout": (
        lambda p: _edit_tensors(p, lambda t: [t.pop(key) for key in list(t) if key.startswith(f"{DOWN}.gralora")]),
        rf"mixes layouts.*'{DOWN}'",
    ),
    "gralora_B shape": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{DOWN}.gralora_B": t[f"{DOWN}.gralora_B"][:, :-1].clone()})),
        rf"Shape mismatch in module '{DOWN}'",
    ),
    "k of the config": (lambda p: _edit_config(p, gralora_k=4), "Shape mismatch in module"),
    "dead lora_A shape": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{DOWN}.lora_A.weight": torch.ones(3, HIDDEN)})),
        rf"'{DOWN}'.*not the fork's layout",
    ),
    "use_dora": (lambda p: _edit_config(p, use_dora=True), "use_dora"),
    "unknown adapter key": (
        lambda p: _edit_tensors(p, lambda t: t.update({f"{DOWN}.lora_magnitude_vector": torch.ones(HIDDEN)})),
        rf"Unsupported weight '{DOWN}.lora_magnitude_vector'.*saved by the GraLoRA PEFT fork",
    ),
    # with init_lora_weights=True the fork's lora_B is zero for good: a trained one came from somewhere else
    "trained lora_B in a fork module": (
        lambda p: _edit_config(p, init_lora_weights=True),
        r"'base_model.model.(up|down)'.*non-zero lora_B",
    ),
}


@pytest.mark.parametrize("how", BROKEN)
def test_broken_fork_files_are_refused_before_anything_loads(how, tmp_path):
    breaker, message = BROKEN[how]
    build_fork_adapter(tmp_path / "fork", conv=False, k=2, h=2, lora_bias=False)
    breaker(tmp_path / "fork")
    # PeftModel.load_adapter next to an existing adapter: refused, and the model is as it was
    model = get_peft_model(
        Net(False), LoraConfig(r=4, target_modules=["up"], use_gralora=True, init_lora_weights=False)
    )
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterConversionError, match=message):
        model.load_adapter(tmp_path / "fork", adapter_name="fork")
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    # the other paths refuse the same way
    with pytest.raises(AdapterConversionError, match=message):
        PeftModel.from_pretrained(Net(False), tmp_path / "fork")
    with pytest.raises(AdapterConversionError, match=message):
        convert_adapter(tmp_path / "fork", tmp_path / "out", to="variant")
    assert not (tmp_path / "out").exists()


def test_fork_weights_under_a_plain_lora_config_are_refused(tmp_path):
    """A plain LoRA config over fork weights would read the dead lora_A / lora_B: the base model's outputs."""
    build_fork_adapter(tmp_path / "fork", conv=False, k=2, h=0, lora_bias=False)
    plain = LoraConfig(r=4, target_modules=["up", "down"])
    with pytest.raises(AdapterConversionError, match="use_gralora=False"):
        PeftModel.from_pretrained(Net(False), tmp_path / "fork", config=plain)


def test_transformers_load_adapter_refuses_before_injecting(tmp_path):
    """transformers' path converts before it calls transformers: a refused file leaves the model untouched."""
    src = _adapter_with_base_path(tmp_path)
    key = "base_model.model.transformer.h.1.mlp.c_fc"
    _edit_tensors(src, lambda t: t.pop(f"{key}.gralora_A"))
    model = _base()
    with pytest.raises(AdapterConversionError, match=rf"'{key}'.*lacks \['gralora_A'\]"):
        model.load_adapter(str(src))
    assert not getattr(model, "_hf_peft_config_loaded", False)
    assert not any("lora_" in name for name, _ in model.named_parameters())
