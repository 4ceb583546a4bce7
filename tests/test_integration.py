"""install() / uninstall() / the import hook: explicit, idempotent, reversible, and active in fresh interpreters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_gralora import integration
from peft_gralora.config import GRALORA_FIELDS
from peft_gralora.integration import (
    SUPPORTED_PEFT,
    UnsupportedPeftVersionError,
    check_peft_version,
    gralora_installed,
    install,
    is_installed,
    patch_table,
    uninstall,
)
from tests.models import TinyMLP, tiny_llama

REPO = Path(__file__).resolve().parents[1]
MISSING = object()


def _owner_entries() -> dict[tuple[type, str], object]:
    """Each patched attribute as its owner's own ``__dict__`` holds it (MISSING where it is inherited or absent)."""
    return {(owner, attr): owner.__dict__.get(attr, MISSING) for owner, attr, *_ in patch_table()}


def _gralora_config(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, target_modules=["lin0", "lin1"], use_gralora=True, init_lora_weights=False, **kwargs)


@pytest.fixture
def pristine():
    """peft as released: GraLoRA taken out for the test, put back afterwards whatever the test did."""
    uninstall()
    entries = _owner_entries()
    fields = dict(LoraConfig.__dataclass_fields__)
    try:
        yield entries, fields
    finally:
        install()


def _assert_pristine(entries, fields) -> None:
    for (owner, attr), original in entries.items():
        assert owner.__dict__.get(attr, MISSING) is original, f"{owner.__name__}.{attr} not restored"
    assert LoraConfig.__dataclass_fields__ == fields
    assert not set(GRALORA_FIELDS) & set(LoraConfig.__dataclass_fields__)


def test_installed_on_import():
    # the .pth hook installed GraLoRA when this test session imported peft; nothing here called install()
    assert is_installed()
    assert LoraConfig(r=4, use_gralora=True).use_gralora is True


def test_install_is_idempotent():
    install()
    entries = _owner_entries()
    fields = dict(LoraConfig.__dataclass_fields__)
    install()
    install()
    assert all(owner.__dict__.get(attr, MISSING) is obj for (owner, attr), obj in entries.items())
    assert LoraConfig.__dataclass_fields__ == fields
    # the wrappers did not stack: one GraLoRA model still behaves as one
    model = get_peft_model(TinyMLP(), _gralora_config())
    assert type(model.base_model.model.lin0.lora_variant["default"]).__name__ == "GraLoraLinearVariant"


def test_uninstall_restores_every_patched_attribute(pristine):
    entries, fields = pristine
    assert not is_installed()
    with pytest.raises(TypeError, match="use_gralora"):
        LoraConfig(r=4, use_gralora=True)

    install()
    for (owner, attr), original in entries.items():
        assert owner.__dict__.get(attr, MISSING) is not original, f"{owner.__name__}.{attr} was not patched"
    assert set(GRALORA_FIELDS) <= set(LoraConfig.__dataclass_fields__)

    uninstall()
    _assert_pristine(entries, fields)
    with pytest.raises(TypeError, match="use_gralora"):
        LoraConfig(r=4, use_gralora=True)
    # plain LoRA is untouched by the round trip
    plain = get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"]))
    assert plain.base_model.model.lin0.lora_variant == {}
    uninstall()  # a second uninstall is a no-op
    _assert_pristine(entries, fields)

    install()
    model = get_peft_model(TinyMLP(), _gralora_config(gralora_k=2))
    assert type(model.base_model.model.lin0.lora_variant["default"]).__name__ == "GraLoraLinearVariant"


def test_context_manager_from_uninstalled(pristine):
    entries, fields = pristine
    with gralora_installed():
        assert is_installed()
        assert LoraConfig(r=4, use_gralora=True, gralora_k=4).gralora_k == 4
    assert not is_installed()
    _assert_pristine(entries, fields)
    # an exception inside the block restores too
    with pytest.raises(RuntimeError, match="boom"), gralora_installed():
        raise RuntimeError("boom")
    _assert_pristine(entries, fields)


def test_context_manager_keeps_an_existing_install():
    before = _owner_entries()
    with gralora_installed():
        assert is_installed()
    assert is_installed()
    assert _owner_entries() == before


@pytest.mark.parametrize("version", ["0.19.1", "0.22.0", "1.0.0", "0.21.0rc1", "0.22.0.dev0"])
def test_unsupported_version_names_the_range(version):
    with pytest.raises(UnsupportedPeftVersionError, match=re.escape(f"peft{SUPPORTED_PEFT}, but peft {version}")):
        check_peft_version(version)
    # an ImportError, so code that treats a missing optional dependency as "not available" handles it too
    assert issubclass(UnsupportedPeftVersionError, ImportError)


@pytest.mark.parametrize("version", ["0.20.0", "0.20.1", "0.21.0", "0.21.2", "0.21.9"])
def test_supported_versions(version):
    assert check_peft_version(version) == version
    assert check_peft_version() == peft.__version__


def test_install_under_unsupported_version_patches_nothing(pristine):
    entries, fields = pristine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft, "__version__", "0.19.1")
        with pytest.raises(UnsupportedPeftVersionError, match=re.escape(SUPPORTED_PEFT)):
            install()
        assert not is_installed()
        _assert_pristine(entries, fields)
        assert not integration._originals and not integration._added_fields


# ---------------------------------------------------------------------------------------------------------------------
# fresh interpreters (each costs an import of torch + peft: keep them few)
# ---------------------------------------------------------------------------------------------------------------------


def run_python(code: str, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PEFT_GRALORA_DISABLE"}
    env.update(env_extra)
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_interpreter_start_imports_neither_torch_nor_peft():
    out = run_python(
        "import sys; print('torch' in sys.modules, 'peft' in sys.modules, 'peft_gralora._hook' in sys.modules)"
    )
    # the last value shows the hook is really there: without it the first two would be trivially False
    assert out.stdout.split() == ["False", "False", "True"]


def test_disable_env_turns_the_hook_off():
    out = run_python(
        """
        import sys
        hook_loaded = 'peft_gralora._hook' in sys.modules
        from peft import LoraConfig
        try:
            LoraConfig(r=8, use_gralora=True)
            print(hook_loaded, 'accepted')
        except TypeError as exc:
            print(hook_loaded, 'TypeError', 'use_gralora' in str(exc), 'peft_gralora.integration' in sys.modules)
        """,
        PEFT_GRALORA_DISABLE="1",
    )
    # the hook module itself may be loaded (it registers the PEFT_GRALORA_DISABLE warning), GraLoRA is not
    assert out.stdout.split()[1:] == ["TypeError", "True", "False"]


# The saving process does user snippet (a): plain `from peft import ...`, no peft_gralora import anywhere.
SAVE_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model
from tests.models import tiny_llama

out = sys.argv[1]
cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_gralora=True, gralora_k=2, hybrid_r=2,
                 init_lora_weights=False, task_type="CAUSAL_LM")
model = get_peft_model(tiny_llama(seed=0), cfg)
ids = torch.arange(12).reshape(2, 6)
with torch.no_grad():
    logits = model(input_ids=ids).logits
    with model.disable_adapter():
        base = model(input_ids=ids).logits
model.save_pretrained(out)
state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
torch.save({"logits": logits, "base": base, "state": state}, f"{out}/expected.pt")
variants = sorted({type(v).__name__ for m in model.modules() for v in getattr(m, "lora_variant", {}).values()})
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps({"variants": variants, "trainable": trainable, "n_lora_layers": len(state) // 2,
                  "hook_installed": "peft_gralora.integration" in sys.modules}))
"""

LOAD_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from peft import PeftModel
from tests.models import tiny_llama

out = sys.argv[1]
model = PeftModel.from_pretrained(tiny_llama(seed=0), out)
cfg = model.peft_config["default"]
with torch.no_grad():
    logits = model(input_ids=torch.arange(12).reshape(2, 6)).logits
state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
torch.save({"logits": logits, "state": state, "fields": (cfg.use_gralora, cfg.gralora_k, cfg.hybrid_r)},
           f"{out}/loaded.pt")
"""


@pytest.fixture(scope="module")
def saved_in_fresh_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh")
    proc = run_python(SAVE_SCRIPT, str(out))
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_interpreter_plain_peft_import(saved_in_fresh_process):
    _, info = saved_in_fresh_process
    assert info["hook_installed"] is True
    assert info["variants"] == ["GraLoraLinearVariant"]
    assert info["n_lora_layers"] == 14  # 7 projections x 2 decoder layers: every Linear but lm_head
    plain = get_peft_model(tiny_llama(seed=0), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert info["trainable"] == sum(p.numel() for p in plain.parameters() if p.requires_grad)


def test_adapter_reloads_bit_exactly_in_another_process(saved_in_fresh_process):
    out, _ = saved_in_fresh_process
    run_python(LOAD_SCRIPT, str(out))
    expected = torch.load(out / "expected.pt")
    loaded = torch.load(out / "loaded.pt")
    assert loaded["fields"] == (True, 2, 2)
    assert loaded["state"].keys() == expected["state"].keys()
    for key, value in expected["state"].items():
        assert torch.equal(loaded["state"][key], value), key
    # the adapter changes the output, and the reloaded model reproduces it bit for bit
    assert not torch.allclose(expected["logits"], expected["base"], atol=1e-3)
    assert torch.equal(loaded["logits"], expected["logits"])
