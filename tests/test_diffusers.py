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
LOADS = ["load_lora_weights", "load_lora_adapter"]


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
            for key, weight_A in state_dict.items():
                if not key.endswith("lora_A.weight"):
                    continue
                name = key[: -len(".lora_A.weight")]
                weight_B = state_dict[f"{name}.lora_B.weight"]
                rank = weight_A.shape[0]
                alphas = [a for pattern, a in config.alpha_pattern.items() if name.endswith(pattern)]
                alpha = alphas[0] if alphas else config.lora_alpha
                scaling = alpha / (rank**0.5 if config.use_rslora else rank)
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

# save_lora_adapter writes the model's own keys (no component prefix): load_lora_adapter(prefix=None) reads them
ROUND_TRIPS = [
    *[(how, load) for how in ("with_metadata", "without_metadata", "diffusers_keys") for load in LOADS],
    ("save_lora_adapter", "load_lora_adapter"),
]


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


@pytest.mark.parametrize("how,load", ROUND_TRIPS)
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
    if load == "load_lora_weights":
        pipe.load_lora_weights(tmp_path, adapter_name="loaded")
    else:
        prefix = None if how == "save_lora_adapter" else case.component
        target.load_lora_adapter(tmp_path, prefix=prefix, adapter_name="loaded", weight_name=path.name)
    assert _variants(target, "loaded") == {"GraLoraLinearVariant"}
    torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "copy_of",
    [lambda t: t.clone(), lambda t: t.to(torch.bfloat16), lambda t: t.to(torch.float16)],
    ids=["clone", "bf16", "fp16"],
)
def test_copies_are_recognised(case, copy_of, tmp_path):
    """Training scripts cast or clone the state dict before saving: the copies are still known to be GraLoRA."""
    config = _config(r=4, alpha=8, k=2)
    model = _trained(case, config)
    copied = {k: copy_of(v) for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(model)).items()}
    case.save(tmp_path, copied)
    meta = json.loads(_header(tmp_path / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert meta[f"{case.component}.use_gralora"] is True
    pipe = case.new_pipe()
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    target = getattr(pipe, case.component)
    assert _variants(target, "a") == {"GraLoraLinearVariant"}
    as_peft = {k.replace("lora.down", "lora_A").replace("lora.up", "lora_B"): v for k, v in copied.items()}
    torch.testing.assert_close(case.run(target), _reference(case, [(as_peft, config, 1.0)]), atol=ATOL, rtol=0)


def test_round_trip_rank_alpha_patterns_rslora(case, tmp_path):
    """The filled-in metadata carries everything the config says: per-module ranks and alphas, rsLoRA scaling."""
    config = _config(r=4, alpha=6, k=2, rank_pattern={"to_k": 8}, alpha_pattern={"to_v": 3}, use_rslora=True)
    model = _trained(case, config)
    state_dict = get_peft_model_state_dict(model)
    assert {v.shape[0] for k, v in state_dict.items() if k.endswith("to_k.lora_A.weight")} == {8}
    case.save(tmp_path, state_dict)
    pipe = case.new_pipe()
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    target = getattr(pipe, case.component)
    torch.testing.assert_close(case.run(target), _reference(case, [(state_dict, config, 1.0)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(case.run(target), case.run(model), atol=ATOL, rtol=0)


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


def _text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return CLIPTextModel(config).eval()


def test_text_encoder_round_trip_without_metadata(tmp_path):
    """The text encoder (a transformers model) goes through diffusers' own text-encoder loader and save path."""
    encoder = _text_encoder()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = encoder(ids).last_hidden_state
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], use_gralora=True,
        init_lora_weights=False,
    )  # fmt: skip
    encoder.add_adapter(config)
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert not torch.allclose(expected, base, atol=1e-3)
    UNetPipe.save_lora_weights(tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(encoder))
    meta = json.loads(_header(tmp_path / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert meta["text_encoder.use_gralora"] is True
    pipe = UNetPipe(_unet(), _text_encoder())
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    assert _variants(pipe.text_encoder, "a") == {"GraLoraLinearVariant"}
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, expected, atol=ATOL, rtol=0)


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


# --- refusals: never a plain-LoRA reading of GraLoRA weights ---


def _plain_config(r=4, alpha=6) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)


@pytest.mark.parametrize(
    "metadata",
    [
        _plain_config(r=4, alpha=6).to_dict(),
        _config(r=4, alpha=6, k=4).to_dict(),
        {**_config(r=4, alpha=6).to_dict(), "use_gralora": False},
    ],
    ids=["plain_lora", "other_k", "use_gralora_false"],
)
def test_save_refuses_contradicting_metadata(case, metadata, tmp_path):
    model = _trained(case, _config(r=4, alpha=6, k=2))
    with pytest.raises(ValueError, match="tensors belong to a GraLoRA adapter"):
        case.save(tmp_path, get_peft_model_state_dict(model), metadata)
    assert not list(tmp_path.iterdir())


def test_save_refuses_torch_save(case, tmp_path):
    model = _trained(case)
    with pytest.raises(ValueError, match="safe_serialization=True"):
        case.save(tmp_path, get_peft_model_state_dict(model), safe_serialization=False)
    with pytest.raises(ValueError, match="safe_serialization=True"):
        model.save_lora_adapter(tmp_path, safe_serialization=False)
    assert not list(tmp_path.iterdir())


def test_save_refuses_mixed_state_dicts(case, tmp_path):
    gralora = _trained(case, _config(k=2))
    other = _trained(case, _config(k=4))
    plain = _trained(case, _plain_config())
    first = get_peft_model_state_dict(gralora)
    key = next(iter(first))
    with pytest.raises(ValueError, match="different GraLoRA adapters"):
        case.save(tmp_path, {**first, key: get_peft_model_state_dict(other)[key]})
    with pytest.raises(ValueError, match="unknown origin"):
        case.save(tmp_path, {**first, key: get_peft_model_state_dict(plain)[key]})
    assert not list(tmp_path.iterdir())
    # with metadata, the caller vouches for the whole dict
    vouched = gralora.peft_config["default"].to_dict()
    case.save(tmp_path, {**first, key: get_peft_model_state_dict(plain)[key]}, vouched)


def test_load_refuses_contradicting_metadata(case):
    model = _trained(case, _config(k=2))
    state_dict = get_peft_model_state_dict(model)
    target = case.model()
    base = case.run(target)
    with pytest.raises(ValueError, match="tensors belong to a GraLoRA adapter"):
        target.load_lora_adapter(state_dict, prefix=None, adapter_name="a", metadata=_plain_config().to_dict())
    assert "a" not in getattr(target, "peft_config", {})
    torch.testing.assert_close(case.run(target), base, atol=0, rtol=0)


def test_plain_lora_files_unchanged(case, tmp_path):
    """Plain LoRA keeps diffusers' behaviour: no metadata is added, and it loads as plain LoRA."""
    config = _plain_config(r=4, alpha=4)  # diffusers assumes alpha == r without metadata
    gralora = _trained(case, _config(r=4, alpha=4))  # alive, same shapes: must not be mistaken for it
    get_peft_model_state_dict(gralora)
    model = _trained(case, config)
    state_dict = get_peft_model_state_dict(model)
    case.save(tmp_path, state_dict)
    assert "lora_adapter_metadata" not in _header(tmp_path / "pytorch_lora_weights.safetensors")
    pipe = case.new_pipe()
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    target = getattr(pipe, case.component)
    assert _variants(target, "a") == {"NoneType"}
    torch.testing.assert_close(case.run(target), _reference(case, [(state_dict, config, 1.0)]), atol=ATOL, rtol=0)


# --- hotswap ---


def _saved(case: Case, config: LoraConfig, directory: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = _adapted(case, config)
    with torch.no_grad():  # distinct non-zero weights per seed
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    state_dict = get_peft_model_state_dict(model)
    case.save(directory, state_dict, model.peft_config["default"].to_dict())
    return state_dict


def test_hotswap_same_layout_is_exact(case, tmp_path):
    config = _config(r=4, alpha=6, k=2, h=2)
    _saved(case, config, tmp_path / "a", 1)
    sd_b = _saved(case, config, tmp_path / "b", 2)
    pipe = case.new_pipe()
    pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
    target = getattr(pipe, case.component)
    assert _variants(target, "x") == {"GraLoraLinearVariant"}
    torch.testing.assert_close(case.run(target), _reference(case, [(sd_b, config, 1.0)]), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "resident,incoming,exact",
    [
        (_config(r=4, k=2), _config(r=4, k=4), False),
        (_config(r=4, k=4), _config(r=4, k=2), False),
        (_config(r=4, k=2), _plain_config(r=4), False),
        (_plain_config(r=4), _config(r=4, k=2), False),
        (_config(r=4, k=2, h=2), _plain_config(r=2, alpha=3), True),
        (_plain_config(r=8), _config(r=4, k=2), True),
    ],
    ids=["k2_by_k4", "k4_by_k2", "gralora_by_lora", "lora_by_gralora", "hybrid_by_lora", "lora8_by_gralora"],
)
def test_hotswap_other_layout_exact_or_refused_before_any_change(case, resident, incoming, exact, tmp_path):
    """A swap that cannot be exact raises before anything changes (diffusers would delete the resident adapter on
    an error inside its hotswap block); one that can is exact."""
    sd_a = _saved(case, resident, tmp_path / "a", 1)
    sd_b = _saved(case, incoming, tmp_path / "b", 2)
    pipe = case.new_pipe()
    pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
    target = getattr(pipe, case.component)
    if exact:
        pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
        expected = _reference(case, [(sd_b, incoming, 1.0)])
        torch.testing.assert_close(case.run(target), expected, atol=ATOL, rtol=0)
        return
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="cannot be placed exactly"):
        pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
    assert target.peft_config["x"] == resident
    for n, p in target.named_parameters():
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(case.run(target), _reference(case, [(sd_a, resident, 1.0)]), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "first,second,target_rank,outcome",
    [
        (_config(r=4, alpha=6, k=2), _config(r=8, alpha=4, k=2), 8, "exact"),
        (_config(r=8, alpha=6, k=2, h=4), _config(r=4, alpha=3, k=2, h=0), 8, "exact"),
        (_config(r=4, alpha=6, k=2), _plain_config(r=4), 8, "exact"),
        (_config(r=4, alpha=6, k=2), _plain_config(r=8), 8, "swap refused"),
        (_config(r=4, alpha=6, k=2), _config(r=4, k=2), 2, "padding refused"),
    ],
    ids=["r4_by_r8", "r8h4_by_r4h0", "lora4_in_grid", "lora8_refused", "target_rank_too_small"],
)
def test_enable_lora_hotswap(case, first, second, target_rank, outcome, tmp_path):
    """enable_lora_hotswap pads the first adapter to target_rank inside its GraLoRA layout when it loads (peft's
    prepare_model_for_compiled_hotswap), and the swap is exact, or a ValueError leaves the model as it was."""
    sd_a = _saved(case, first, tmp_path / "a", 1)
    sd_b = _saved(case, second, tmp_path / "b", 2)
    pipe = case.new_pipe()
    target = getattr(pipe, case.component)
    pipe.enable_lora_hotswap(target_rank=target_rank)
    if outcome == "padding refused":
        with pytest.raises(ValueError, match="target rank 2"):
            pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
        assert not getattr(target, "peft_config", {})  # diffusers takes the failed load out again
        torch.testing.assert_close(case.run(target), case.run(case.model()), atol=0, rtol=0)
        return
    pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
    assert {m.lora_A["x"].weight.shape[0] for m in target.modules() if hasattr(m, "lora_variant")} == {target_rank}
    expected_a = _reference(case, [(sd_a, first, 1.0)])
    torch.testing.assert_close(case.run(target), expected_a, atol=ATOL, rtol=0)
    if outcome == "swap refused":
        with pytest.raises(ValueError, match="cannot be placed exactly"):
            pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
        assert "x" in target.peft_config
        torch.testing.assert_close(case.run(target), expected_a, atol=ATOL, rtol=0)
        return
    pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
    torch.testing.assert_close(case.run(target), _reference(case, [(sd_b, second, 1.0)]), atol=ATOL, rtol=0)


def test_enable_lora_hotswap_target_hybrid_r(case, tmp_path):
    """target_hybrid_r reserves a hybrid branch when padding, so an adapter with a larger one can come in."""
    first, second = _config(r=4, alpha=6, k=2), _config(r=8, alpha=4, k=2, h=2)
    _saved(case, first, tmp_path / "a", 1)
    sd_b = _saved(case, second, tmp_path / "b", 2)
    for target_hybrid_r in (None, 2):
        pipe = case.new_pipe()
        target = getattr(pipe, case.component)
        if target_hybrid_r is None:
            pipe.enable_lora_hotswap(target_rank=8)
        else:
            pipe.enable_lora_hotswap(target_rank=8, target_hybrid_r=target_hybrid_r)
        pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
        if target_hybrid_r is None:
            with pytest.raises(ValueError, match="target_hybrid_r"):
                pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
            continue
        assert {m.hybrid_r["x"] for m in target.modules() if hasattr(m, "lora_variant")} == {2}
        pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
        torch.testing.assert_close(case.run(target), _reference(case, [(sd_b, second, 1.0)]), atol=ATOL, rtol=0)


@pytest.mark.slow  # dynamo traces the model: ~10 s on 2 CPU cores
def test_compiled_hotswap_does_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    case = next(c for c in CASES if c.name == "flux")
    first, second = _config(r=4, alpha=6, k=2), _config(r=8, alpha=4, k=2)
    sd_a = _saved(case, first, tmp_path / "a", 1)
    sd_b = _saved(case, second, tmp_path / "b", 2)
    pipe = case.new_pipe()
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(tmp_path / "a", adapter_name="x")
    counter = CompileCounter()
    compiled = torch.compile(pipe.transformer, backend=counter)
    pipe.transformer = compiled
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(case.run(compiled), _reference(case, [(sd_a, first, 1.0)]), atol=ATOL, rtol=0)
        frames = counter.frame_count
        pipe.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
        torch.testing.assert_close(case.run(compiled), _reference(case, [(sd_b, second, 1.0)]), atol=ATOL, rtol=0)
        assert counter.frame_count == frames  # no recompilation
    finally:
        torch._dynamo.reset()


# --- install / uninstall ---


def test_uninstall_restores_diffusers_and_install_patches_again():
    from diffusers.loaders import lora_base
    from diffusers.loaders import peft as loaders_peft

    from peft_gralora.integration import install, patch_table, uninstall

    owners = {lora_base, loaders_peft, lora_base.LoraBaseMixin, loaders_peft.PeftAdapterMixin}
    missing = object()
    installed = {(o, a): o.__dict__.get(a, missing) for o, a, *_ in patch_table() if o in owners}
    assert len(installed) == 6
    uninstall()
    try:
        originals = {(o, a): o.__dict__.get(a, missing) for o, a, *_ in patch_table() if o in owners}
        assert originals.keys() == installed.keys()
        for key, original in originals.items():
            assert original is not installed[key]
            assert original is not missing
            function = getattr(original, "__func__", original)
            assert not hasattr(function, "__wrapped__"), key  # diffusers' own function, not a wrapper
        install()
        uninstall()
        for (owner, attr), original in originals.items():
            assert owner.__dict__.get(attr, missing) is original, (owner, attr)
    finally:
        install()


@pytest.mark.slow  # a fresh interpreter importing diffusers: ~5-15 s
def test_peft_first_then_diffusers_gets_patched(tmp_path):
    """peft imported (and GraLoRA installed) before diffusers' loader modules exist: they are patched on import."""
    import subprocess
    import sys

    code = (
        "import peft, sys\n"
        "assert 'diffusers.loaders.lora_base' not in sys.modules\n"
        "from diffusers.loaders.lora_base import LoraBaseMixin\n"
        "from diffusers.loaders.peft import PeftAdapterMixin\n"
        "assert hasattr(LoraBaseMixin.__dict__['_save_lora_weights'].__func__, '__wrapped__')\n"
        "assert hasattr(PeftAdapterMixin.load_lora_adapter, '__wrapped__')\n"
        "print('ok')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**__import__("os").environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
