"""GraLoRA in axolotl (its own environment, scripts/test-axolotl.sh), on CPU with a tiny Llama and the built-in data.

``axolotl train`` of examples/axolotl/gralora.yml (through accelerate's launcher, as users run it) must leave an
adapter that computes GraLoRA (checked against the dense block formula of tests/reference.py, applied to the saved
factors by hand), and ``axolotl merge-lora`` with its defaults must give the same model. A GraLoRA YAML without the
plugin line, every refused setting, and axolotl's plain-LoRA paths (fused kernels, memory-efficient merge) are tried
on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from peft_gralora.axolotl import PLUGIN
from peft_gralora.axolotl.checks import KERNEL_KEYS, GraLoraAxolotlError
from peft_gralora.axolotl.data import export_builtin
from peft_gralora.axolotl.tiny_model import build_tiny_model
from tests.reference import dense_delta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "axolotl", "gralora.yml")
GRALORA_KEYS = ("plugins", "use_gralora", "gralora_k", "hybrid_r")
DROP = object()
ATOL = 2e-5  # fp32 logits of a 2-layer model, merged vs unmerged / vs the float64 reference


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("axolotl")
    export_builtin(str(ws / "data"), limit=48)
    build_tiny_model(str(ws / "data"), str(ws / "model"))
    return ws


def write_yaml(ws, name: str, **changes) -> str:
    """examples/axolotl/gralora.yml with the workspace's paths and ``changes`` (``DROP`` removes a key)."""
    with open(EXAMPLE, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg.update(base_model=str(ws / "model"), output_dir=str(ws / name), dataset_prepared_path=str(ws / "prepared"))
    cfg["datasets"][0]["path"] = str(ws / "data" / "train.jsonl")
    for key, value in changes.items():
        if value is DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = ws / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def plain(ws, name: str, **changes) -> str:
    """The example without the plugin line and the GraLoRA keys: a plain LoRA YAML."""
    return write_yaml(ws, name, **{key: DROP for key in GRALORA_KEYS}, **changes)


def run_axolotl(ws, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # offline and untracked: tests/axolotl/conftest.py
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # axolotl train execs `accelerate launch` from PATH
    exe = os.path.join(bin_dir, "axolotl")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=str(ws), timeout=1500)
    log = ws / f"axolotl-{args[0]}-{os.path.basename(args[1])}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="session")
def trained(workspace):
    """``axolotl train`` of the example (4 steps); returns the output folder."""
    cfg = write_yaml(workspace, "gralora")
    proc = run_axolotl(workspace, "train", cfg)
    assert proc.returncode == 0, tail(proc)
    out = workspace / "gralora"
    assert (out / "adapter_config.json").is_file(), tail(proc)
    return out


def reference_model(ws, adapter_dir, formula: str = "gralora"):
    """The base model with every saved adapter factor pair merged by hand: ``scaling * dense_delta`` (GraLoRA) or
    ``scaling * B @ A`` (what plain LoRA would compute). Reads the files; no peft, no peft_gralora."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(ws / "model"), dtype=torch.float32).eval()
    scaling = saved["lora_alpha"] / saved["r"]
    merged = 0
    for key, weight_A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        weight_B = tensors[key.replace(".lora_A.", ".lora_B.")]
        if formula == "gralora":
            delta = dense_delta(weight_A, weight_B, saved["gralora_k"], saved["hybrid_r"])
        else:
            delta = weight_B.double() @ weight_A.double()
        module = model.get_submodule(key[len("base_model.model.") : -len(".lora_A.weight")])
        with torch.no_grad():
            module.weight.copy_((module.weight.double() + scaling * delta).float())
        merged += 1
    assert merged == 2 * 7, merged  # 2 layers x 7 projections
    return model


def logits(model, ws) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws / "model"))
    lines = (ws / "data" / "test.jsonl").read_text().splitlines()[:3]
    texts = [json.loads(line)["input"] for line in lines]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------------------------------
# train and merge
# ---------------------------------------------------------------------------------------------------------------------


def test_trained_adapter_computes_gralora(workspace, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = json.loads((trained / "adapter_config.json").read_text())
    assert saved["use_gralora"] is True and saved["gralora_k"] == 2 and saved["hybrid_r"] == 0
    base = AutoModelForCausalLM.from_pretrained(str(workspace / "model"), dtype=torch.float32).eval()
    before = logits(base, workspace)
    model = PeftModel.from_pretrained(base, str(trained)).eval()
    got = logits(model, workspace)
    want = logits(reference_model(workspace, trained), workspace)
    as_plain_lora = logits(reference_model(workspace, trained, formula="plain"), workspace)
    effect = (want - before).abs().max().item()
    assert effect > 1000 * ATOL, effect  # training moved the model: the comparisons below can fail
    assert (got - want).abs().max().item() < ATOL
    assert (as_plain_lora - want).abs().max().item() > 100 * ATOL  # plain LoRA on these weights is far off


def test_default_merge_lora_equals_gralora(workspace, trained):
    from transformers import AutoModelForCausalLM

    cfg = write_yaml(workspace, "gralora")  # the training YAML, unchanged: merge_method left at its default
    proc = run_axolotl(workspace, "merge-lora", cfg)
    assert proc.returncode == 0, tail(proc)
    merged = AutoModelForCausalLM.from_pretrained(str(trained / "merged"), dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    want = logits(reference_model(workspace, trained), workspace)
    assert (logits(merged, workspace) - want).abs().max().item() < ATOL


def test_yaml_without_the_plugin_line_stops(workspace):
    cfg = write_yaml(workspace, "no-plugin", plugins=DROP)
    proc = run_axolotl(workspace, "train", cfg)
    assert proc.returncode != 0
    assert f"plugins:\n  - {PLUGIN}" in proc.stdout + proc.stderr, tail(proc)
    assert not (workspace / "no-plugin").exists()  # stopped before anything was trained or written


# ---------------------------------------------------------------------------------------------------------------------
# config time, in this process (axolotl's load_cfg / validate_config)
# ---------------------------------------------------------------------------------------------------------------------


def load_cfg(path: str):
    from axolotl.cli.config import load_cfg as axolotl_load_cfg

    return axolotl_load_cfg(path)


def test_the_import_hook_guards_axolotls_plain_lora_paths():
    import importlib

    from peft_gralora.axolotl import guards
    from peft_gralora.axolotl._import_hook import WATCHED

    attrs = {
        "axolotl.cli.config": "prepare_plugins",
        "axolotl.utils.config": "prepare_plugins",
        "axolotl.cli.utils.lora_merge": "merge_lora_sharded_efficient",
        "axolotl.cli.merge_lora": "merge_lora_sharded_efficient",
        "axolotl.monkeypatch.lora_kernels": "apply_lora_kernel_patches",
        "axolotl.monkeypatch.relora": "lora_delta_weight",
    }
    for name in WATCHED:
        module = importlib.import_module(name)
        if name in attrs:
            assert guards.is_guarded(getattr(module, attrs[name])), name
        else:
            assert guards.is_guarded(module.AsyncGRPOTrainer._sync_lora_adapter), name


def test_plugin_installs_gralora_where_the_import_hook_is_off(workspace):
    code = (
        "import sys\n"
        "from axolotl.cli.config import load_cfg\n"
        "from peft_gralora import is_installed\n"
        "from peft_gralora.axolotl import guards\n"
        "was = is_installed()\n"
        "cfg = load_cfg(sys.argv[1])\n"
        "from axolotl.cli.config import prepare_plugins\n"
        "print(was, is_installed(), guards.is_guarded(prepare_plugins), cfg.lora_mlp_kernel)\n"
    )
    env = dict(os.environ, PEFT_GRALORA_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, write_yaml(workspace, "cfg-disabled")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:] == ["False", "True", "True", "False"]


def test_plugin_switches_off_the_fused_kernels_and_selects_the_exact_merge(workspace):
    cfg = load_cfg(write_yaml(workspace, "cfg-ok"))
    assert all(cfg[key] is False for key in KERNEL_KEYS)
    assert cfg.merge_method == "legacy"
    # the same YAML as plain LoRA: axolotl switches the kernels on (what the plugin must undo)
    cfg = load_cfg(plain(workspace, "cfg-plain"))
    assert cfg.lora_mlp_kernel is True and cfg.merge_method == "memory_efficient"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gralora_k": 3}, "divisible by gralora_k: 3"),
        ({"gralora_k": 3, "lora_r": 9}, "in_features=64"),  # ranks fine, the tiny Llama's features are not
        ({"hybrid_r": 8}, "must be smaller than lora_r"),
        ({"lora_rank_pattern": {"q_proj": 5}}, "lora_rank_pattern"),
        ({"adapter": DROP}, "adapter: lora"),
        ({"lora_target_parameters": ["mlp.gate_proj.weight"]}, "lora_target_parameters"),
        ({"lora_mlp_kernel": True}, "lora_mlp_kernel: true cannot be used"),
        ({"merge_method": "memory_efficient"}, "merge_method: memory_efficient"),
        ({"relora": True, "jagged_restart_steps": 2}, "ReLoRA"),
        ({"peft_init_lora_weights": "pissa"}, "peft_init_lora_weights"),
        ({"use_gralora": DROP}, "use_gralora is not true"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_refused_at_config_time(workspace, changes, message):
    with pytest.raises(GraLoraAxolotlError, match=message):
        load_cfg(write_yaml(workspace, "cfg-bad", **changes))


def test_checks_run_inside_axolotls_validation(workspace):
    """The plugin's pydantic model is part of axolotl's schema: validate_config refuses on its own."""
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    PluginManager.get_instance().register(PLUGIN)
    with open(write_yaml(workspace, "cfg-schema", gralora_k=3, lora_mlp_kernel=False), encoding="utf-8") as f:
        raw = DictDefault(yaml.safe_load(f))
    with pytest.raises(ValueError, match="divisible by gralora_k: 3"):
        validate_config(raw)


def test_lora_model_dir_must_be_the_same_gralora_adapter(workspace, trained):
    with pytest.raises(GraLoraAxolotlError, match="lora_model_dir"):
        load_cfg(write_yaml(workspace, "cfg-resume-bad", lora_model_dir=str(trained), gralora_k=4))


def test_lora_model_dir_continues_the_gralora_adapter(workspace, trained):
    from axolotl.cli.utils import load_model_and_tokenizer

    from peft_gralora.variant import is_gralora_adapter

    cfg = load_cfg(write_yaml(workspace, "cfg-resume", lora_model_dir=str(trained)))
    model, _, _ = load_model_and_tokenizer(cfg=cfg)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 14 and all(is_gralora_adapter(m, "default") for m in layers)
    assert all(m.lora_A["default"].weight.requires_grad for m in layers)  # trainable: training continues
    want = logits(reference_model(workspace, trained), workspace)
    assert (logits(model.eval(), workspace) - want).abs().max().item() < ATOL
    # the plugin's last check, after peft loaded the adapter: a YAML that disagrees with it is refused
    from axolotl.utils.dict import DictDefault

    from peft_gralora.axolotl.plugin import GraLoraPlugin

    GraLoraPlugin().post_lora_load(cfg, model)
    with pytest.raises(GraLoraAxolotlError, match="loaded adapter 'default'"):
        GraLoraPlugin().post_lora_load(DictDefault({**cfg, "gralora_k": 4}), model)


# ---------------------------------------------------------------------------------------------------------------------
# axolotl's plain-LoRA paths, reached without the plugin (a plain YAML loading a GraLoRA adapter): refused
# ---------------------------------------------------------------------------------------------------------------------


def test_fused_kernels_refused_on_a_gralora_adapter(workspace, trained):
    from axolotl.cli.utils import load_model_and_tokenizer

    cfg = load_cfg(plain(workspace, "cfg-kernels", lora_model_dir=str(trained)))
    assert cfg.lora_qkv_kernel is True  # auto-enabled: no GraLoRA key in this YAML
    with pytest.raises(GraLoraAxolotlError, match="X @ A @ B"):
        load_model_and_tokenizer(cfg=cfg)


def test_memory_efficient_merge_refused_on_a_gralora_adapter(workspace, trained):
    from axolotl.cli.merge_lora import do_cli

    with pytest.raises(GraLoraAxolotlError, match="merge_method: legacy"):
        do_cli(config=plain(workspace, "cfg-merge", lora_model_dir=str(trained)))
    assert not (workspace / "cfg-merge" / "merged").exists()


# ---------------------------------------------------------------------------------------------------------------------
# adapter: qlora (bitsandbytes 4-bit base, CPU): GraLoRA on the Linear4bit layers, trained factors computed exactly
# ---------------------------------------------------------------------------------------------------------------------


def test_qlora_builds_gralora_on_4bit_layers(workspace):
    import bitsandbytes as bnb
    from axolotl.cli.utils import load_model_and_tokenizer

    from peft_gralora.variant import is_gralora_adapter

    cfg = load_cfg(write_yaml(workspace, "cfg-qlora-new", adapter="qlora", load_in_4bit=True, gralora_k=4, hybrid_r=4))
    model, _, _ = load_model_and_tokenizer(cfg=cfg)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 14
    for layer in layers:
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and is_gralora_adapter(layer, "default")
        assert (layer.gralora_k["default"], layer.hybrid_r["default"]) == (4, 4)


def test_qlora_loads_gralora_on_4bit_layers(workspace, trained):
    import bitsandbytes as bnb
    from axolotl.cli.utils import load_model_and_tokenizer

    from peft_gralora.variant import is_gralora_adapter

    saved = json.loads((trained / "adapter_config.json").read_text())
    cfg = load_cfg(write_yaml(workspace, "cfg-qlora", adapter="qlora", load_in_4bit=True, lora_model_dir=str(trained)))
    assert cfg.lora_mlp_kernel is False
    model, _, _ = load_model_and_tokenizer(cfg=cfg)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 14
    torch.manual_seed(0)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and is_gralora_adapter(layer, "default"), name
        weight_A, weight_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = saved["lora_alpha"] / saved["r"] * dense_delta(weight_A, weight_B, saved["gralora_k"], 0)
        x = torch.randn(3, weight_A.shape[1])
        with torch.no_grad():
            effect = (layer(x) - layer.base_layer(x)).double()
        want = x.double() @ delta.T
        assert want.abs().max() > 1e-4  # the trained adapter does something here
        torch.testing.assert_close(effect, want, atol=1e-5, rtol=1e-4)
