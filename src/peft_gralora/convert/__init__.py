"""Adapter-directory conversions: GraLoRA -> exact plain LoRA, upstream ``GraloraConfig`` <-> this package, and the
GraLoRA PEFT fork's layout -> this package.

All functions work on the saved files (``adapter_config.json`` + ``adapter_model.safetensors``); no base model and
no peft import is needed. Four adapter types are recognised (by the config and, for the fork, by its weight keys):

====================  ======================================================  ======================================
type                  adapter_config.json                                     weights per adapted module
====================  ======================================================  ======================================
``gralora``           ``peft_type: LORA``, ``use_gralora: true``              ``lora_A.weight (r, in)``,
                                                                              ``lora_B.weight (out, r)``
                                                                              [, ``lora_B.bias (out,)``,
                                                                              ``lora_magnitude_vector (out,)``]
``gralora-upstream``  ``peft_type: GRALORA`` (peft's own ``GraloraConfig``)   ``gralora_A (k, in/k, g)``,
                                                                              ``gralora_B (k, g, out/k)``
                                                                              [, ``gralora_{A,B}_general.weight``]
``gralora-fork``      ``peft_type: LORA``, ``use_gralora: true`` (the         upstream's ``gralora_*`` tensors, plus
                      GraLoRA PEFT fork)                                      unused ``lora_A`` / ``lora_B`` weights
``lora``              ``peft_type: LORA``                                     ``lora_A.weight``, ``lora_B.weight``
====================  ======================================================  ======================================

The math is in :mod:`peft_gralora.functional` (``export_lora_factors``, ``upstream_to_variant``,
``variant_to_upstream``); this package reads, checks, renames and writes. Every output is written to a temporary
directory next to ``dst_dir`` and moved into place only when complete, so on any error ``dst_dir`` is untouched.

    layout.py      file names, weight keys, adapter types, per-module views of a state dict
    files.py       reading and writing adapter directories
    upstream.py    upstream GraloraConfig <-> LoraConfig(use_gralora=True)
    fork.py        the GraLoRA PEFT fork's layout -> this package's
    dispatch.py    convert_adapter: the conversion an adapter's type asks for
    plain_lora.py  export_lora: the exact plain LoRA adapter
    info.py        adapter_info
"""

from .dispatch import convert_adapter
from .fork import ForkConversion, fork_to_variant_state_dict
from .info import adapter_info
from .layout import (
    BIN_NAME,
    CONFIG_NAME,
    MODEL_PREFIX,
    SAFETENSORS_NAME,
    AdapterConversionError,
    _pattern_value,
    has_fork_layout,
)
from .plain_lora import export_lora

__all__ = [
    "AdapterConversionError",
    "export_lora",
    "convert_adapter",
    "adapter_info",
    "has_fork_layout",
    "fork_to_variant_state_dict",
    "ForkConversion",
    "CONFIG_NAME",
    "SAFETENSORS_NAME",
    "BIN_NAME",
    "MODEL_PREFIX",
    "_pattern_value",
]
