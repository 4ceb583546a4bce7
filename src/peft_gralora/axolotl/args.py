"""The plugin's YAML keys as a pydantic model: axolotl mixes it into its config schema, so the checks run as part of
axolotl's own validation (needs pydantic only, not axolotl)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from ..config import GRALORA_FIELDS
from .checks import check_config, check_final_config

__all__ = ["GraLoraArgs"]


class GraLoraArgs(BaseModel):
    """``use_gralora``, ``gralora_k``, ``hybrid_r``: flat, as in ``LoraConfig`` (defaults: off, 2, 0)."""

    use_gralora: bool | None = Field(default=None, json_schema_extra={"description": GRALORA_FIELDS["use_gralora"][2]})
    gralora_k: int | None = Field(default=None, json_schema_extra={"description": GRALORA_FIELDS["gralora_k"][2]})
    hybrid_r: int | None = Field(default=None, json_schema_extra={"description": GRALORA_FIELDS["hybrid_r"][2]})

    @model_validator(mode="before")
    @classmethod
    def check_gralora(cls, data: Any) -> Any:
        # the raw mapping, before pydantic coerces types: "k: 2.5" or "use_gralora: 'yes'" must fail, not round
        if isinstance(data, dict):
            check_config(data)
        return data

    @model_validator(mode="after")
    def check_gralora_final(self) -> GraLoraArgs:
        # after axolotl's own "before" validators, one of which switches the fused LoRA kernels on
        check_final_config(self)
        return self
