"""QGraLoRA: GraLoRA (and GraLoRA + DoRA) on bitsandbytes 4-bit / 8-bit bases, on bitsandbytes' CPU backend.

Models come the way users get them: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` and
``prepare_model_for_kbit_training``. The reference is an fp32 model holding the dequantized weights (read before any
forward can repack them) with the same adapter weights.

bitsandbytes 0.50 repacks a 4-bit weight for its CPU kernel on the first eval forward on CPUs with AVX512-BF16; both
layouts are forced here (``_convert_weight_packed_for_cpu`` is the conversion that forward runs; switching
``support_avx512bf16_for_cpu`` off keeps the canonical layout), so the merge tests cover both on any machine.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as bnbf  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from peft_gralora.dora import GraLoraDoraLinearVariant  # noqa: E402
from peft_gralora.quant import dequantize_base_weight, is_cpu_packed_4bit  # noqa: E402
from peft_gralora.variant import GraLoraLinearVariant  # noqa: E402

from .models import tiny_llama  # noqa: E402
from .reference import dense_delta  # noqa: E402

# every feature size a multiple of 64 (bitsandbytes' 4-bit block) and of 32 (its CPU tile): the repack needs both
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
FOUR_BIT = [q for q in QUANT if q != "int8"]
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8]])


def _gralora(**kw) -> LoraConfig:
    base = dict(r=8, lora_alpha=16, target_modules="all-linear", use_gralora=True, gralora_k=2, hybrid_r=2) | dict(
        init_lora_weights=False
    )
    return LoraConfig(**(base | kw))


def _lora(**kw) -> LoraConfig:
    return LoraConfig(**(dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False) | kw))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(**SIZES).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(rounding errors|compute_dtype|quantiz).*")
        yield


def _quantized(base_dir, quant: str):
    q = BitsAndBytesConfig(**QUANT[quant], bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _pair(base_dir, quant: str, cfg: LoraConfig, seed: int = 0):
    """(peft model on the quantized base, fp32 peft model on its dequantized weights, same adapter)."""
    torch.manual_seed(seed)
    qmodel = get_peft_model(_quantized(base_dir, quant), copy.deepcopy(cfg))
    ref = tiny_llama(**SIZES)
    for name, module in qmodel.base_model.model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            target = ref.get_submodule(name.replace(".base_layer", ""))
            target.weight.data = dequantize_base_weight(module).float().clone()
    ref = get_peft_model(ref, copy.deepcopy(cfg))
    adapter = {k: v for k, v in qmodel.state_dict().items() if "lora_" in k}
    missing = ref.load_state_dict(adapter, strict=False)
    assert not missing.unexpected_keys
    return qmodel, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _bnb_layers(model):
    return [m for m in model.modules() if isinstance(m, (lora_bnb.Linear4bit, lora_bnb.Linear8bitLt))]


def _set_repack(model, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = enabled


def _force_packed(model) -> None:
    """Put every 4-bit weight into bitsandbytes' CPU-packed layout, exactly as its eval forward does."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not is_cpu_packed_4bit(module.weight):
            module.weight.data, module.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state
            )
    assert all(is_cpu_packed_4bit(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def _requant_weight(w: torch.Tensor, quant: str) -> torch.Tensor:
    """``w`` quantized and dequantized once, as bitsandbytes stores it for ``quant``."""
    if quant == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(w / scale) * scale
    spec = QUANT[quant]
    q, state = bnbf.quantize_4bit(
        w,
        blocksize=64,
        quant_type=spec["bnb_4bit_quant_type"],
        compress_statistics=spec.get("bnb_4bit_use_double_quant", False),
    )
    return bnbf.dequantize_4bit(q, state)


def _requantized(model, quant: str):
    """The quantization floor: ``model`` (fp32) with every adapted weight quantized and dequantized once."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
            module.weight.data = _requant_weight(module.weight.data, quant)
    return model


def _assert_merged_weights_near_exact(qmodel, exact, quant: str) -> None:
    """Layer by layer: the merged quantized weight is as close to the exact fp32 merge as re-quantizing it is."""
    for name, module in qmodel.base_model.model.named_modules():
        if isinstance(module, (lora_bnb.Linear4bit, lora_bnb.Linear8bitLt)):
            want = exact.get_submodule(name).weight.data
            err = _rel(dequantize_base_weight(module.get_base_layer()).float(), want)
            floor = _rel(_requant_weight(want, quant), want)
            assert err <= 1.1 * floor + 1e-3, (name, err, floor)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", list(QUANT))
def test_resolves_to_gralora_with_loras_parameter_count(base_dir, quant):
    model = get_peft_model(_quantized(base_dir, quant), _gralora())
    layers = _bnb_layers(model)
    assert len(layers) == 7
    assert all(type(m.lora_variant["default"]) is GraLoraLinearVariant for m in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain = get_peft_model(_quantized(base_dir, quant), _lora())
    assert not any(m.lora_variant for m in _bnb_layers(plain))  # plain LoRA stays plain
    assert trainable == sum(p.numel() for p in plain.parameters() if p.requires_grad)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_get_delta_weight_is_the_gralora_block_formula(base_dir, quant):
    model = get_peft_model(_quantized(base_dir, quant), _gralora())
    for layer in _bnb_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = dense_delta(a, b, 2, 2) * layer.scaling["default"]
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", list(QUANT))
def test_forward_matches_fp32_dequantized_model_as_closely_as_lora(base_dir, quant):
    errors = {}
    for name, cfg in {"gralora": _gralora(), "lora": _lora()}.items():
        qmodel, ref = _pair(base_dir, quant, cfg)
        qmodel.train()  # canonical layout, no dropout
        errors[name, "train"] = _rel(_logits(qmodel), _logits(ref))
        qmodel.eval()  # 4-bit: bitsandbytes' packed CPU kernel where the CPU has AVX512-BF16
        errors[name, "eval"] = _rel(_logits(qmodel), _logits(ref))
    for mode in ("train", "eval"):
        assert errors["gralora", mode] <= 2 * errors["lora", mode] + 1e-4, errors
    # and the adapter matters: the reference without it is far away
    assert errors["gralora", "train"] < 1e-2


def _grad_error(qmodel, ref) -> float:
    """Relative error of the adapter gradients of ``qmodel`` against the fp32 reference."""
    params_q = [p for p in qmodel.parameters() if p.requires_grad]
    params_r = [p for p in ref.parameters() if p.requires_grad]
    grads_q = torch.autograd.grad(qmodel(IDS, labels=IDS).loss, params_q)
    grads_r = torch.autograd.grad(ref(IDS, labels=IDS).loss, params_r)
    num = sum((a - b).norm() ** 2 for a, b in zip(grads_q, grads_r, strict=True)) ** 0.5
    return (num / sum(b.norm() ** 2 for b in grads_r) ** 0.5).item()


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_training_matches_fp32_reference_as_closely_as_lora(base_dir, quant):
    qmodel, ref = _pair(base_dir, quant, _gralora())
    params = [p for p in qmodel.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    # bitsandbytes' backward through the quantized weight is not bit-exact: compare with plain LoRA's error. The int8
    # matmuls also quantize the activations, so there the error depends on the adapter: a plain bound.
    err = _grad_error(qmodel, ref)
    if quant == "int8":
        assert err < 5e-2
    else:
        assert err <= 2 * _grad_error(*_pair(base_dir, quant, _lora())) + 1e-5
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = qmodel(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_mixed_batch_gralora_lora_and_base(base_dir):
    model = get_peft_model(_quantized(base_dir, "nf4"), _gralora(), adapter_name="gra")
    model.add_adapter("plain", _lora())
    model.eval()
    names = ["gra", "plain", "__base__", "gra"]
    ids = IDS[[0, 1, 0, 1]]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        singles = {}
        for name in ("gra", "plain"):
            model.set_adapter(name)
            singles[name] = model(ids).logits
        with model.disable_adapter():
            singles["__base__"] = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(singles["gra"], singles["__base__"], atol=1e-3)


@pytest.mark.parametrize("quant", ["fp4-dq", "int8"])
def test_save_and_load_on_a_fresh_quantized_base(base_dir, quant, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(_quantized(base_dir, quant), _gralora())
    model.train()
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_quantized(base_dir, quant), tmp_path)
    assert all(type(m.lora_variant["default"]) is GraLoraLinearVariant for m in _bnb_layers(loaded))
    loaded.train()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def _floor(qmodel, ref, quant: str) -> float:
    """What a correct merge cannot beat: re-quantizing the exact merged weight, plus the quantized kernel's own
    forward error (int8 quantizes activations too; 0 for the canonical 4-bit path)."""
    kernel = _rel(_logits(qmodel), _logits(ref))
    exact = ref.merge_and_unload()
    return _rel(_logits(_requantized(exact, quant)), _logits(exact)) + kernel


MERGE_CASES = [(q, "packed") for q in FOUR_BIT] + [("nf4", "canonical"), ("int8", "canonical")]


@pytest.mark.parametrize(("quant", "layout"), MERGE_CASES)
def test_merge_within_requantization_error_of_exact_merge(base_dir, quant, layout):
    qmodel, ref = _pair(base_dir, quant, _gralora())
    qmodel.eval()
    _set_repack(qmodel, False)  # eval forwards below must not change the layout chosen here
    unmerged = _logits(qmodel)
    floor = _floor(qmodel, ref, quant)
    exact = ref.get_base_model()
    if layout == "packed":
        _force_packed(qmodel)
    qmodel.merge_adapter()
    _assert_merged_weights_near_exact(qmodel, exact, quant)
    merged_err = _rel(_logits(qmodel), _logits(exact))
    assert merged_err <= 1.25 * floor + 1e-3, (merged_err, floor)
    qmodel.unmerge_adapter()  # re-quantizes once more
    assert _rel(_logits(qmodel), unmerged) <= 3 * floor + 1e-3
    merged_model = qmodel.merge_and_unload()
    assert not _bnb_layers(merged_model)
    assert _rel(_logits(merged_model), _logits(exact)) <= 2.5 * floor + 1e-3


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_packed_layout_breaks_plain_dequantize_but_not_lora_merges(base_dir, quant):
    """The hazard itself, and plain LoRA's merge made right by the same patch."""
    qmodel, ref = _pair(base_dir, quant, _lora())
    qmodel.train()
    floor = _floor(qmodel, ref, quant)
    exact = ref.get_base_model()
    layer = next(m for m in qmodel.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = dequantize_base_weight(layer).clone()
    _force_packed(qmodel)  # no forward while packed: only AVX512-BF16 CPUs have the kernel for it
    assert _rel(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before) > 0.3
    assert _rel(dequantize_base_weight(layer), before) < 1e-2  # only absmax's bf16 rounding
    merged = qmodel.merge_and_unload()
    assert _rel(_logits(merged), _logits(exact)) <= 1.25 * floor + 1e-3


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
def test_real_eval_forward_repacks_and_merge_stays_right(base_dir):
    qmodel, ref = _pair(base_dir, "nf4", _gralora())
    qmodel.eval()
    _logits(qmodel)
    assert all(is_cpu_packed_4bit(m.weight) for m in qmodel.modules() if isinstance(m, bnb.nn.Linear4bit))
    _set_repack(qmodel, False)
    qmodel.train()  # the canonical kernel for the floor's forward: what is compared is the merge
    floor = _floor(qmodel, ref, "nf4")
    exact = ref.get_base_model()
    assert _rel(_logits(qmodel.merge_and_unload()), _logits(exact)) <= 1.25 * floor + 1e-3


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
@pytest.mark.parametrize("use_gralora", [False, True], ids=["plain-DoRA", "GraLoRA-DoRA"])
def test_dora_eval_forward_reads_the_repacked_weight_correctly(base_dir, use_gralora):
    """DoRA dequantizes the base weight in its forward; after bitsandbytes' repack that must still be W."""
    cfg = _gralora(use_dora=True) if use_gralora else _lora(use_dora=True)
    qmodel, ref = _pair(base_dir, "nf4", cfg)
    qmodel.eval()
    err = _rel(_logits(qmodel), _logits(ref))
    assert all(is_cpu_packed_4bit(m.weight) for m in qmodel.modules() if isinstance(m, bnb.nn.Linear4bit))
    lora_q, lora_ref = _pair(base_dir, "nf4", _lora())
    lora_q.eval()
    assert err <= 2 * _rel(_logits(lora_q), _logits(lora_ref)) + 1e-4  # the packed bf16 kernel's own error


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_gralora_dora_on_quantized_bases(base_dir, quant):
    cfg = _gralora(use_dora=True)
    qmodel, ref = _pair(base_dir, quant, cfg)
    layers = _bnb_layers(qmodel)
    assert all(type(m.lora_variant["default"]) is GraLoraDoraLinearVariant for m in layers)
    assert all(m.lora_magnitude_vector["default"].weight.requires_grad for m in layers)
    qmodel.train()
    train_err = _rel(_logits(qmodel), _logits(ref))
    assert train_err < (1e-5 if quant != "int8" else 5e-2)
    qmodel.eval()
    lora_q, lora_ref = _pair(base_dir, quant, _lora(use_dora=False))
    lora_q.eval()
    assert _rel(_logits(qmodel), _logits(ref)) <= 2 * _rel(_logits(lora_q), _logits(lora_ref)) + 1e-4
    # after the eval forward a 4-bit weight is packed (on AVX512-BF16 CPUs); the merge must still be right
    _set_repack(qmodel, False)
    qmodel.train()
    floor = _floor(qmodel, ref, quant)
    exact = ref.get_base_model()
    qmodel.merge_adapter()
    assert _rel(_logits(qmodel), _logits(exact)) <= 1.25 * floor + 1e-3


# QLoRA's usual loop evaluates, then trains, then saves. On CPUs with AVX512-BF16 bitsandbytes packs 4-bit weights on
# the eval forward; training and saving afterwards must still be right (the packing is forced: any CPU runs this).


def _grads(model) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(model(IDS, labels=IDS).loss, params))


@pytest.mark.parametrize("make_config", [_gralora, _lora], ids=["gralora", "lora"])
def test_training_and_saving_after_the_eval_repack(base_dir, make_config):
    model = get_peft_model(_quantized(base_dir, "nf4"), make_config())
    model.train()
    expected = _grads(model)
    with torch.no_grad():
        logits_before = model.eval()(IDS).logits
    _force_packed(model)  # what that eval forward does on an AVX512-BF16 CPU
    model.train()
    got = _grads(model)
    # a packed weight runs through a kernel without autograd: without the fix the earlier layers' grads go wrong
    # (restoring keeps the bf16-rounded absmax of the packing: a small, uniform difference, not a broken gradient)
    errors = [((g - e).norm() / e.norm()).item() for g, e in zip(got, expected, strict=True)]
    assert max(errors) < 2e-2
    _force_packed(model)
    model.state_dict()  # bitsandbytes' inverse conversion here used to corrupt absmax in the live model
    with torch.no_grad():
        logits_after = model.eval()(IDS).logits
    assert ((logits_after - logits_before).norm() / logits_before.norm()).item() < 1e-2
