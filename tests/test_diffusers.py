"""GraLoRA through diffusers' LoRA API on tiny UNet / SD3 / Flux models built from configs (nothing downloaded).

Every output is compared with an independent reference: the base model with ``scaling * delta W`` added to each
adapted weight, ``delta W`` from the dense block formula of ``tests/reference.py``, all adapters non-zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from tests.reference import dense_delta

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ATOL = 1e-5


class UNetPipe(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder)


class SD3Pipe(DiffusionPipeline, SD3LoraLoaderMixin):
    def __init__(self, transformer, text_encoder=None, text_encoder_2=None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


class FluxPipe(DiffusionPipeline, FluxLoraLoaderMixin):
    def __init__(self, transformer, text_encoder=None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder)


def _unet() -> torch.nn.Module:
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )


def _sd3() -> torch.nn.Module:
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
    )


def _flux() -> torch.nn.Module:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )


def _unet_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(1, 4, 8, 8, generator=g),
        timestep=torch.tensor([3]),
        encoder_hidden_states=torch.randn(1, 5, 8, generator=g),
    )


def _sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([3]),
    )


def _flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


@dataclass(frozen=True)
class Case:
    name: str
    build: Any
    inputs: Any
    pipe: type
    component: str  # the pipeline attribute and the save_lora_weights / prefix name

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    def run(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**self.inputs()).sample

    def save(self, directory, state_dict, metadata=None, **kwargs) -> None:
        self.pipe.save_lora_weights(
            directory,
            **{f"{self.component}_lora_layers": state_dict, f"{self.component}_lora_adapter_metadata": metadata},
            **kwargs,
        )

    def new_pipe(self) -> DiffusionPipeline:
        return self.pipe(self.model())


CASES = [
    Case("unet", _unet, _unet_inputs, UNetPipe, "unet"),
    Case("sd3", _sd3, _sd3_inputs, SD3Pipe, "transformer"),
    Case("flux", _flux, _flux_inputs, FluxPipe, "transformer"),
]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def _config(r=4, alpha=6, k=2, h=0, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        use_gralora=True,
        gralora_k=k,
        hybrid_r=h,
        init_lora_weights=False,
        **kwargs,
    )


def _adapted(case: Case, config: LoraConfig, name: str = "default") -> torch.nn.Module:
    model = case.model()
    model.add_adapter(config, adapter_name=name)
    return model


def _reference(case: Case, adapters: list[tuple[dict, LoraConfig, float]]) -> torch.Tensor:
    """The base model's output with ``weight * scaling * dense_delta`` added per adapted module, for each
    ``(state_dict, config, weight)``; state-dict keys as get_peft_model_state_dict writes them."""
    model = case.model()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for state_dict, config, weight in adapters:
            scaling = config.lora_alpha / config.r
            for key, weight_A in state_dict.items():
                if not key.endswith("lora_A.weight"):
                    continue
                name = key[: -len(".lora_A.weight")]
                weight_B = state_dict[f"{name}.lora_B.weight"]
                k, h = (config.gralora_k, config.hybrid_r) if config.use_gralora else (1, 0)
                delta = dense_delta(weight_A, weight_B, k, h) * scaling * weight
                modules[name].weight += delta.to(modules[name].weight.dtype)
    return case.run(model)


def _variants(model: torch.nn.Module, adapter: str) -> set[str]:
    return {type(m.lora_variant.get(adapter)).__name__ for m in model.modules() if hasattr(m, "lora_variant")}


def _header(path: Path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _trained(case: Case, config: LoraConfig | None = None) -> torch.nn.Module:
    """An adapted model after one optimizer step (non-zero A and B)."""
    model = _adapted(case, config or _config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = model(**case.inputs()).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    return model.eval()


# --- training and the reference ---


@pytest.mark.parametrize("k,h", [(2, 0), (4, 0), (2, 2)])
def test_trained_adapter_matches_dense_reference(case, k, h):
    config = _config(r=4 + h, k=k, h=h)
    model = _trained(case, config)
    assert _variants(model, "default") == {"GraLoraLinearVariant"}
    state_dict = get_peft_model_state_dict(model)
    out = case.run(model)
    assert not torch.allclose(out, case.run(case.model()), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out, _reference(case, [(state_dict, config, 1.0)]), atol=ATOL, rtol=0)


# --- save / load round trips ---

SAVES = ["with_metadata", "without_metadata", "diffusers_keys", "save_lora_adapter"]
LOADS = ["load_lora_weights", "load_lora_adapter"]


def _save(case: Case, model, how: str, directory: Path) -> Path:
    state_dict = get_peft_model_state_dict(model)
    if how == "with_metadata":
        case.save(directory, state_dict, model.peft_config["default"].to_dict())
    elif how == "without_metadata":
        case.save(directory, state_dict)
    elif how == "diffusers_keys":  # what older training scripts do: diffusers' own key format, no metadata
        case.save(directory, convert_state_dict_to_diffusers(state_dict))
    else:
        model.save_lora_adapter(directory)
    return directory / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("how", SAVES)
def test_round_trip(case, how, load, tmp_path):
    config = _config(r=6, alpha=9, k=2, h=2)
    model = _trained(case, config)
    expected = _reference(case, [(get_peft_model_state_dict(model), config, 1.0)])
    path = _save(case, model, how, tmp_path)
    meta = json.loads(_header(path)["lora_adapter_metadata"])
    prefix = "" if how == "save_lora_adapter" else f"{case.component}."
    assert (meta[f"{prefix}use_gralora"], meta[f"{prefix}gralora_k"], meta[f"{prefix}hybrid_r"]) == (True, 2, 2)

    pipe = case.new_pipe()
    target = getattr(pipe, case.component)
    if load == "load_lora_weights" and how != "save_lora_adapter":
        pipe.load_lora_weights(tmp_path, adapter_name="loaded")
    else:
        prefix = None if how == "save_lora_adapter" else case.component
        target.load_lora_adapter(tmp_path, prefix=prefix, adapter_name="loaded", weight_name=path.name)
    assert _variants(target, "loaded") == {"GraLoraLinearVariant"}
    torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)


def test_in_memory_state_dict_without_metadata(case):
    """``load_lora_weights(dict)`` / ``load_lora_adapter(dict)`` straight from get_peft_model_state_dict."""
    config = _config(r=4, alpha=8, k=4)
    model = _trained(case, config)
    state_dict = get_peft_model_state_dict(model)
    expected = _reference(case, [(state_dict, config, 1.0)])
    pipe = case.new_pipe()
    pipe.load_lora_weights({f"{case.component}.{k}": v for k, v in state_dict.items()}, adapter_name="a")
    target = getattr(pipe, case.component)
    target.load_lora_adapter(state_dict, prefix=None, adapter_name="b")
    target.set_adapters(["a"])
    torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)
    target.set_adapters(["b"])
    torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)


# --- fuse / unfuse, set_adapters ---


def test_fuse_unfuse(case, tmp_path):
    config = _config(r=4, alpha=5, k=2)
    model = _trained(case, config)
    state_dict = get_peft_model_state_dict(model)
    half = _reference(case, [(state_dict, config, 0.5)])
    case.save(tmp_path, state_dict)
    pipe = case.new_pipe()
    target = getattr(pipe, case.component)
    base = {n: p.detach().clone() for n, p in target.named_parameters()}
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    pipe.fuse_lora(components=[case.component], lora_scale=0.5)
    assert all(m.merged for m in target.modules() if hasattr(m, "lora_variant"))
    torch.testing.assert_close(case.run(target), half, atol=ATOL, rtol=0)
    pipe.unfuse_lora(components=[case.component])
    # diffusers keeps the fusing scale on the unmerged adapter layers
    torch.testing.assert_close(case.run(target), half, atol=ATOL, rtol=0)
    for n, p in target.named_parameters():
        if n.replace("base_layer.", "") in base and "lora_" not in n:
            torch.testing.assert_close(p, base[n.replace("base_layer.", "")], atol=1e-6, rtol=0)


def test_set_adapters_weights(case, tmp_path):
    configs = [_config(r=4, alpha=6, k=2), _config(r=8, alpha=4, k=4, h=4)]
    pipe = case.new_pipe()
    target = getattr(pipe, case.component)
    state_dicts = []
    for i, config in enumerate(configs):
        torch.manual_seed(10 + i)
        model = _trained(case, config)
        state_dicts.append(get_peft_model_state_dict(model))
        case.save(tmp_path / str(i), state_dicts[-1])
        pipe.load_lora_weights(tmp_path / str(i), adapter_name=f"a{i}")
    weights = [0.5, -1.5]
    pipe.set_adapters(["a0", "a1"], adapter_weights=weights)
    expected = _reference(case, [(sd, c, w) for sd, c, w in zip(state_dicts, configs, weights, strict=True)])
    torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)
