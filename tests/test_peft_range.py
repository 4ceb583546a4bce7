"""A peft outside the supported range never breaks peft; GraLoRA's names where peft keeps its LoRA variants.

The real unsupported versions (peft 0.19.1) run in their own environment (scripts/test-compat.sh and
benchmarks/results/compat.md); here the installed peft is declared unsupported by changing ``peft.__version__``,
which is all the version check reads.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, PeftConfig, get_peft_model

import peft_gralora.integration as integration
from peft_gralora.dora import GraLoraDoraLinearVariant
from peft_gralora.integration import (
    SUPPORTED_PEFT,
    UnsupportedPeftVersionError,
    auto_install,
    install,
    is_installed,
    patch_table,
    uninstall,
)
from peft_gralora.variant import GraLoraLinearVariant
from tests.models import TinyMLP

MISSING = object()
OLD = "0.19.1"
REAL = peft.__version__


@pytest.fixture
def unsupported_peft(monkeypatch):
    """peft as released, declaring itself OLD; GraLoRA put back afterwards."""
    uninstall()
    entries = {(o, a): o.__dict__.get(a, MISSING) for o, a, *_ in patch_table()}
    init = LoraConfig.__dict__["__init__"]
    monkeypatch.setattr(peft, "__version__", OLD)
    try:
        yield entries, init
    finally:
        monkeypatch.undo()
        uninstall()
        install()


def test_auto_install_warns_once_and_keeps_plain_peft(unsupported_peft):
    entries, _ = unsupported_peft
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto_install()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f"peft{SUPPORTED_PEFT}" in messages[0] and f"peft {OLD} is installed" in messages[0]
    assert not is_installed()
    # plain LoRA exactly as peft does it: nothing but LoraConfig.__init__ is touched
    changed = [(o, a) for (o, a), v in entries.items() if o.__dict__.get(a, MISSING) is not v]
    assert changed == [(LoraConfig, "__init__")]
    model = get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False))
    assert "gralora" not in repr(model.peft_config["default"]).lower()
    assert model(torch.randn(2, 16)).shape == (2, 8)


def test_gralora_config_on_unsupported_peft_names_version_range_and_fix(unsupported_peft):
    with pytest.warns(UserWarning):
        auto_install()
    with pytest.raises(UnsupportedPeftVersionError) as err:
        LoraConfig(r=4, use_gralora=True, gralora_k=2)
    message = str(err.value)
    assert f"peft {OLD}" in message and f"peft{SUPPORTED_PEFT}" in message and "pip install" in message
    assert "unexpected keyword" not in message


def test_saved_gralora_adapter_on_unsupported_peft_is_refused_not_degraded(unsupported_peft, tmp_path):
    """peft drops config keys it does not know: without the refusal a GraLoRA adapter would load as plain LoRA."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft, "__version__", REAL)
        install()
        get_peft_model(TinyMLP(), LoraConfig(r=4, target_modules=["lin0"], use_gralora=True)).save_pretrained(tmp_path)
        uninstall()
    with pytest.warns(UserWarning):
        auto_install()
    with pytest.raises(UnsupportedPeftVersionError, match=re.escape(SUPPORTED_PEFT)):
        PeftConfig.from_pretrained(tmp_path)


def test_uninstall_removes_the_refusal_and_install_replaces_it(unsupported_peft, monkeypatch):
    entries, init = unsupported_peft
    with pytest.warns(UserWarning):
        auto_install()
    uninstall()
    assert LoraConfig.__dict__["__init__"] is init
    with pytest.warns(UserWarning):
        auto_install()
    monkeypatch.setattr(peft, "__version__", REAL)
    install()  # a supported peft: the refusal gives way to the real thing, not wrapped inside it
    assert is_installed()
    assert LoraConfig(r=4, use_gralora=True).use_gralora
    uninstall()
    assert LoraConfig.__dict__["__init__"] is init


def test_auto_install_survives_a_failing_patch(monkeypatch):
    """Any error while installing (not only the version): a warning and the refusal, never a broken import."""
    uninstall()

    def broken():
        raise RuntimeError("peft moved a class")

    monkeypatch.setattr(integration, "patch_table", broken)
    try:
        with pytest.warns(UserWarning, match="peft moved a class"):
            auto_install()
        with pytest.raises(UnsupportedPeftVersionError):
            LoraConfig(r=4, use_gralora=True)
    finally:
        monkeypatch.undo()
        uninstall()
        install()


def test_variant_classes_in_peft_variants_module():
    from peft.tuners.lora import variants
    from peft.tuners.lora.variants import GraLoraDoraLinearVariant as dora_cls
    from peft.tuners.lora.variants import GraLoraLinearVariant as cls

    assert cls is GraLoraLinearVariant and dora_cls is GraLoraDoraLinearVariant
    uninstall()
    try:
        assert not hasattr(variants, "GraLoraLinearVariant") and not hasattr(variants, "GraLoraDoraLinearVariant")
    finally:
        install()
    assert variants.GraLoraLinearVariant is GraLoraLinearVariant


def test_import_peft_never_fails_in_a_fresh_interpreter_with_unsupported_peft():
    """The import hook for real: a fresh interpreter in which the installed peft is outside the range."""
    code = (
        "import sys, warnings\n"
        "import peft_gralora.integration as integration\n"
        "assert 'peft' not in sys.modules\n"
        "integration.SUPPORTED_PEFT = '>=99'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import peft\n"
        "from peft import LoraConfig\n"
        "LoraConfig(r=4)\n"
        "try:\n"
        "    LoraConfig(r=4, use_gralora=True)\n"
        "except integration.UnsupportedPeftVersionError as exc:\n"
        "    print('refused:', exc)\n"
        "ours = [w for w in caught if 'peft-gralora' in str(w.message)]\n"
        "print(integration.is_installed(), len(ours))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: LoraConfig(use_gralora=True) is not available" in out.stdout
    assert out.stdout.split()[-2:] == ["False", "1"]
