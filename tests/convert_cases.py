"""Trained-like adapters on tiny models for the conversion tests, and the worker that loads exports in vanilla peft.

Imports neither peft_gralora nor peft at module level: ``python -m tests.convert_cases SPEC`` runs in a subprocess
with ``PEFT_GRALORA_DISABLE=1`` and must see peft exactly as released.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.models import TinyConv1DNet, TinyMLP, tiny_gpt2

# adapter factors (already random with init_lora_weights=False / init_weights=False)
_FACTOR = re.compile(r"\.(lora_[AB]|gralora_[AB](_general)?)(\.|$)")
FACTORIES = {"mlp": TinyMLP, "conv1d": TinyConv1DNet, "gpt2": tiny_gpt2}


@dataclass(frozen=True)
class Case:
    """One adapter: a model factory and config kwargs; ``upstream`` picks peft's ``GraloraConfig``."""

    id: str
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    upstream: bool = False


def make_base(factory: str, base_file: Path | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FACTORIES[factory]()
    if base_file is not None:
        model.load_state_dict(load_file(base_file))
    return model.eval()


def make_input(factory: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if factory == "gpt2":
        return torch.randint(0, 128, (2, 8), generator=gen)
    return torch.randn(3, 16, generator=gen)


@torch.no_grad()
def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x).logits if x.dtype == torch.long else model(x)
    return out.detach().float()


def _perturb_trainable_extras(model: torch.nn.Module) -> None:
    """Move every trainable tensor that is not an adapter factor (modules_to_save copies, learnable biases,
    lora_B.bias) away from its initial value, so that dropping or misnaming it changes the outputs."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            factor = _FACTOR.search(name) and not name.endswith("lora_B.default.bias")
            if param.requires_grad and not factor:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def save_trained(case: Case, root: Path) -> tuple[Path, Path, torch.Tensor]:
    """Build the case's adapter with random (non-zero) A and B, save it; returns (adapter dir, base file, output)."""
    from peft import GraloraConfig, LoraConfig, get_peft_model

    root.mkdir(parents=True, exist_ok=True)
    base = make_base(case.factory)
    base_file = root / "base.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, str(base_file))
    if case.upstream:
        config = GraloraConfig(init_weights=False, **case.kwargs)
    else:
        config = LoraConfig(use_gralora=True, init_lora_weights=False, **case.kwargs)
    model = get_peft_model(base, config)
    _perturb_trainable_extras(model)
    model.eval()
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return adapter, base_file, run(model, make_input(case.factory))


def load_with_adapter(factory: str, base_file: Path, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(make_base(factory, base_file), adapter_dir).eval()


def _worker(spec_file: str) -> None:
    """Load every exported adapter of the spec in this (vanilla peft) process and save its outputs."""
    from peft import LoraConfig

    if "use_gralora" in LoraConfig.__dataclass_fields__:
        raise SystemExit("peft-gralora is active in the worker; run it with PEFT_GRALORA_DISABLE=1")
    for job in json.loads(Path(spec_file).read_text()):
        model = load_with_adapter(job["factory"], Path(job["base"]), Path(job["adapter"]))
        save_file({"y": run(model, make_input(job["factory"])).contiguous()}, job["output"])


if __name__ == "__main__":
    _worker(sys.argv[1])
