"""The axolotl plugin's parts that need no axolotl: config checks (against peft's own GraLoRA validation and a real
tiny Llama), defaults, the pydantic input model, the guards on axolotl's plain-LoRA paths and the import hook that
applies them. The end-to-end ``axolotl train`` / ``merge-lora`` tests are in tests/axolotl/ (scripts/test-axolotl.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

from peft_gralora.axolotl import PLUGIN, checks, guards
from peft_gralora.axolotl._import_hook import WATCHED
from tests.models import tiny_llama

BASE = {"plugins": [PLUGIN], "adapter": "lora", "lora_r": 8, "use_gralora": True, "gralora_k": 2, "hybrid_r": 0}


def cfg(**overrides):
    out = dict(BASE)
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------------
# ranks: the config-time check accepts exactly what peft's LoraConfig(use_gralora=True) accepts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 4, 6, 8, 12])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [0, 2, 4])
def test_rank_checks_agree_with_loraconfig(r, k, h):
    from peft import LoraConfig

    try:
        LoraConfig(r=r, use_gralora=True, gralora_k=k, hybrid_r=h)
        peft_ok = True
    except ValueError:
        peft_ok = False
    try:
        checks.check_config(cfg(lora_r=r, gralora_k=k, hybrid_r=h))
        ours_ok = True
    except checks.GraLoraAxolotlError:
        ours_ok = False
    assert ours_ok == peft_ok


def test_rank_pattern_entries_checked():
    checks.check_config(cfg(lora_rank_pattern={"q_proj": 4}))
    with pytest.raises(checks.GraLoraAxolotlError, match=r"lora_rank_pattern\['q_proj'\] - hybrid_r = 3"):
        checks.check_config(cfg(lora_rank_pattern={"q_proj": 3}))


# ---------------------------------------------------------------------------------------------------------------------
# every refused combination, on purpose
# ---------------------------------------------------------------------------------------------------------------------

REFUSED = [
    ({"adapter": None}, "adapter: lora"),
    ({"adapter": "llama-adapter"}, "adapter: lora"),
    ({"use_gralora": "yes"}, "true or false"),
    ({"gralora_k": 2.0}, "gralora_k must be an integer"),
    ({"gralora_k": 0}, "gralora_k must be an integer"),
    ({"hybrid_r": -1}, "hybrid_r must be an integer"),
    ({"hybrid_r": 8}, "must be smaller than lora_r"),
    ({"lora_target_parameters": ["mlp.experts.gate_up_proj"]}, "lora_target_parameters"),
    ({"quantize_moe_experts": True}, "quantize_moe_experts"),
    ({"relora": True}, "ReLoRA"),
    ({"relora_steps": 100}, "ReLoRA"),
    ({"nvfp4_merge_aware": True}, "nvfp4_merge_aware"),
    ({"gptq": True}, "gptq"),
    ({"peft_layer_replication": [[0, 2]]}, "peft_layer_replication"),
    ({"peft": {"loftq_config": {"loftq_bits": 4}}}, "peft.loftq_config"),
    ({"trl": {"vllm_lora_sync": True}}, "trl.vllm_lora_sync"),
    ({"trl": {"use_data_producer": True}}, "async GRPO"),
    ({"peft_init_lora_weights": "pissa"}, "peft_init_lora_weights"),
    ({"lora_mlp_kernel": True}, "lora_mlp_kernel: true cannot be used"),
    ({"lora_qkv_kernel": True}, "lora_qkv_kernel: true"),
    ({"lora_o_kernel": True}, "lora_o_kernel: true"),
    ({"lora_embedding_kernel": True}, "lora_embedding_kernel: true"),
    ({"merge_method": "memory_efficient"}, "memory_efficient"),
    ({"use_gralora": False, "gralora_k": 4}, "use_gralora is not true"),
    ({"use_gralora": None, "hybrid_r": 2}, "use_gralora is not true"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_refused_combinations(overrides, message):
    with pytest.raises(checks.GraLoraAxolotlError, match=message):
        checks.check_config(cfg(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"adapter": "qlora"},
        {"peft_use_dora": True},
        {"peft_use_rslora": True},
        {"lora_mlp_kernel": False},
        {"merge_method": "legacy"},
        {"peft_init_lora_weights": "gaussian"},
        {"use_gralora": False, "gralora_k": None, "hybrid_r": None},
    ],
)
def test_accepted_combinations(overrides):
    checks.check_config(cfg(**overrides))


def test_plain_lora_configs_untouched():
    plain = {"adapter": "lora", "lora_r": 8, "lora_mlp_kernel": True, "merge_method": "memory_efficient"}
    checks.check_config(plain)
    checks.require_plugin(plain)
    assert checks.lora_config_kwargs(plain) == {}


# ---------------------------------------------------------------------------------------------------------------------
# feature divisibility, from a local config.json, against what peft refuses on the real model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["down_proj"], "linear"])
def test_feature_divisibility_agrees_with_peft(tmp_path, k, targets):
    from peft import LoraConfig, get_peft_model

    # hidden 32, q 32, kv 16, intermediate 48: k=3 divides only the MLP's intermediate size
    model = tiny_llama(intermediate_size=48)
    model.config.save_pretrained(tmp_path)
    yaml_targets = {"lora_target_linear": True} if targets == "linear" else {"lora_target_modules": targets}
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    r = 2 * k
    try:
        get_peft_model(
            model,
            LoraConfig(r=r, target_modules=linear if targets == "linear" else targets, use_gralora=True, gralora_k=k),
        )
        peft_ok = True
    except ValueError:
        peft_ok = False
    try:
        checks.check_config(cfg(base_model=str(tmp_path), lora_r=r, gralora_k=k, **yaml_targets))
        ours_ok = True
    except checks.GraLoraAxolotlError as exc:
        assert "config.json" in str(exc)
        ours_ok = False
    assert ours_ok == peft_ok


# ---------------------------------------------------------------------------------------------------------------------
# lora_model_dir: the saved adapter must be the GraLoRA adapter the YAML asks for
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    out = {}
    for name, extra in {
        "k2": dict(use_gralora=True, gralora_k=2),
        "k4h4": dict(use_gralora=True, gralora_k=4, hybrid_r=4),
        "plain": {},
    }.items():
        model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj"], **extra))
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = path
    return out


@pytest.mark.parametrize(
    "saved, yaml, ok",
    [
        ("k2", {}, True),
        ("k4h4", {"gralora_k": 4, "hybrid_r": 4}, True),
        ("k4h4", {}, False),
        ("k2", {"gralora_k": 4}, False),
        ("plain", {}, False),
    ],
)
def test_lora_model_dir_must_match(saved_adapters, saved, yaml, ok):
    c = cfg(lora_model_dir=saved_adapters[saved], **yaml)
    if ok:
        checks.check_config(c)
    else:
        with pytest.raises(checks.GraLoraAxolotlError, match="lora_model_dir"):
            checks.check_config(c)


# ---------------------------------------------------------------------------------------------------------------------
# defaults and LoraConfig kwargs
# ---------------------------------------------------------------------------------------------------------------------


def test_apply_defaults_switches_off_plain_lora_paths_and_keeps_explicit_values():
    c = cfg()
    lines = checks.apply_defaults(c)
    assert all(c[key] is False for key in checks.KERNEL_KEYS) and c["merge_method"] == "legacy"
    assert len(lines) == 2 and "Cost on a GPU" in lines[0]
    c = cfg(lora_mlp_kernel=False, merge_method="legacy")
    checks.apply_defaults(c)
    assert c["lora_qkv_kernel"] is False and c["merge_method"] == "legacy"


def test_lora_config_kwargs_build_the_gralora_adapter():
    from peft import LoraConfig

    kwargs = checks.lora_config_kwargs(cfg(gralora_k=4, hybrid_r=4))
    assert kwargs == {"use_gralora": True, "gralora_k": 4, "hybrid_r": 4}
    assert LoraConfig(r=8, **kwargs).gralora_k == 4
    assert checks.lora_config_kwargs(cfg(gralora_k=None, hybrid_r=None)) == {
        "use_gralora": True,
        "gralora_k": 2,
        "hybrid_r": 0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# the pydantic input model, mixed into a schema the way axolotl's merge_input_args does
# ---------------------------------------------------------------------------------------------------------------------


def _schema_with_auto_enable():
    from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

    from peft_gralora.axolotl.args import GraLoraArgs

    class Base(BaseModel):  # stands for axolotl's AxolotlInputConfig: extra keys ignored, kernels auto-enabled
        model_config = ConfigDict(extra="ignore")
        adapter: str | None = None
        lora_r: int | None = None
        lora_mlp_kernel: bool | None = None
        merge_method: str | None = None

        @model_validator(mode="before")
        @classmethod
        def auto_enable(cls, data):
            if data.get("lora_mlp_kernel") is None:
                data["lora_mlp_kernel"] = True
            return data

    class Merged(Base, GraLoraArgs):
        pass

    return Merged, ValidationError


def test_pydantic_args_validate_inside_the_schema():
    merged, validation_error = _schema_with_auto_enable()
    with pytest.raises(validation_error, match="divisible by gralora_k"):
        merged.model_validate(cfg(gralora_k=3))
    # the auto-enable validator turns the kernel on when register() did not switch it off: refused, whichever
    # of the two "before" validators pydantic runs first
    with pytest.raises(validation_error, match="lora_mlp_kernel"):
        merged.model_validate(cfg())
    c = cfg()
    checks.apply_defaults(c)
    assert merged.model_validate(c).lora_mlp_kernel is False


# ---------------------------------------------------------------------------------------------------------------------
# guards on axolotl's code paths, on stand-in modules with axolotl's names and signatures
# ---------------------------------------------------------------------------------------------------------------------


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _gralora_model(gralora=True):
    from peft import LoraConfig, get_peft_model

    extra = dict(use_gralora=True, gralora_k=2) if gralora else {}
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **extra))


def test_watched_modules_all_have_a_guard():
    assert set(WATCHED) == set(guards._GUARDS)


def test_prepare_plugins_guard():
    calls = []
    module = _module("axolotl.cli.config", prepare_plugins=lambda c: calls.append(c))
    guards.guard_module(module)
    first = module.prepare_plugins
    guards.guard_module(module)
    assert module.prepare_plugins is first and guards.is_guarded(first)
    with pytest.raises(checks.GraLoraAxolotlError, match=rf"plugins:\n  - {PLUGIN}"):
        module.prepare_plugins({"adapter": "lora", "use_gralora": True})
    with pytest.raises(checks.GraLoraAxolotlError, match="gralora_k: 4"):
        module.prepare_plugins({"adapter": "lora", "gralora_k": 4})
    assert calls == []
    module.prepare_plugins({"adapter": "lora"})
    module.prepare_plugins(cfg())
    module.prepare_plugins({"adapter": "lora", "use_gralora": False})
    module.prepare_plugins(cfg(plugins=["peft_gralora.axolotl.plugin.GraLoraPlugin"]))
    assert len(calls) == 4


def test_efficient_merge_guard(saved_adapters):
    calls = []
    module = _module("axolotl.cli.utils.lora_merge", merge_lora_sharded_efficient=lambda **kw: calls.append(kw))
    guards.guard_module(module)
    with pytest.raises(checks.GraLoraAxolotlError, match="merge_method: legacy"):
        module.merge_lora_sharded_efficient(base_model_path="b", lora_adapter_path=saved_adapters["k2"])
    module.merge_lora_sharded_efficient(base_model_path="b", lora_adapter_path=saved_adapters["plain"])
    assert len(calls) == 1


@pytest.mark.parametrize("gralora", [True, False])
def test_kernel_and_relora_guards(gralora):
    calls = []
    kernels = _module("axolotl.monkeypatch.lora_kernels", apply_lora_kernel_patches=lambda model, cfg: calls.append(1))
    relora = _module("axolotl.monkeypatch.relora", lora_delta_weight=lambda layer, device: calls.append(2))
    guards.guard_module(kernels)
    guards.guard_module(relora)
    model = _gralora_model(gralora)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    if gralora:
        with pytest.raises(checks.GraLoraAxolotlError, match="X @ A @ B"):
            kernels.apply_lora_kernel_patches(model, {})
        with pytest.raises(checks.GraLoraAxolotlError, match="ReLoRA"):
            relora.lora_delta_weight(layer, "cpu")
        assert calls == []
    else:
        kernels.apply_lora_kernel_patches(model, {})
        relora.lora_delta_weight(layer, "cpu")
        assert calls == [1, 2]


def test_async_grpo_guard():
    class AsyncGRPOTrainer:
        def __init__(self, model):
            self.model = model

        def _sync_peft_weights_no_merge(self):
            return "synced"

        def _sync_lora_adapter(self):
            return "synced"

    guards.guard_module(_module("axolotl.core.trainers.grpo.async_trainer", AsyncGRPOTrainer=AsyncGRPOTrainer))
    with pytest.raises(checks.GraLoraAxolotlError, match="vLLM"):
        AsyncGRPOTrainer(_gralora_model())._sync_lora_adapter()
    assert AsyncGRPOTrainer(_gralora_model(False))._sync_peft_weights_no_merge() == "synced"


# ---------------------------------------------------------------------------------------------------------------------
# the import hook: a process that imports axolotl's config module gets the guard (a stand-in axolotl package)
# ---------------------------------------------------------------------------------------------------------------------

FAKE_CONFIG = """
def prepare_plugins(cfg):
    print("prepared", sorted(cfg))

def load_cfg(cfg):
    prepare_plugins(cfg)  # as axolotl's load_cfg: a module-global call
"""


@pytest.mark.parametrize("disable", [False, True])
def test_import_hook_guards_axolotl_in_a_fresh_process(tmp_path, disable):
    pkg = tmp_path / "axolotl" / "cli"
    pkg.mkdir(parents=True)
    (tmp_path / "axolotl" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(FAKE_CONFIG)
    code = textwrap.dedent(
        """
        from axolotl.cli.config import load_cfg
        load_cfg({"adapter": "lora"})
        load_cfg({"adapter": "lora", "use_gralora": True})
        """
    )
    src_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(checks.__file__))))  # .../src
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), src_dir]))
    env["PEFT_GRALORA_DISABLE"] = "1" if disable else ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if disable:  # the hook is off: nothing guards (the plugin's register() would still apply the guards)
        assert proc.returncode == 0 and proc.stdout.count("prepared") == 2
    else:
        assert proc.returncode != 0 and proc.stdout.count("prepared") == 1
        assert f"plugins:\n  - {PLUGIN}" in proc.stderr


def test_interpreter_start_loads_only_the_tiny_axolotl_hook():
    code = (
        "import sys; print(*(name in sys.modules for name in ('peft_gralora.axolotl._import_hook', "
        "'peft_gralora.axolotl.guards', 'peft_gralora.axolotl.checks', 'axolotl', 'pydantic', 'json')))"
    )
    src_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(checks.__file__))))
    env = {k: v for k, v in os.environ.items() if k != "PEFT_GRALORA_DISABLE"}
    env["PYTHONPATH"] = src_dir
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    # the first value shows the hook is really there: without it the others would be trivially False
    assert out.stdout.split() == ["True", "False", "False", "False", "False", "False"], out.stderr
