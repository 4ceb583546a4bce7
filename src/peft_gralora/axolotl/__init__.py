"""GraLoRA in axolotl: ``plugins: [peft_gralora.axolotl.GraLoraPlugin]`` and ``use_gralora: true`` in the YAML.

Only :class:`GraLoraPlugin` needs axolotl (loaded on first use); :mod:`.checks` needs nothing, :mod:`.args` pydantic.
See docs/axolotl.md.
"""

__all__ = ["GraLoraPlugin", "PLUGIN"]

PLUGIN = "peft_gralora.axolotl.GraLoraPlugin"


def __getattr__(name: str) -> object:
    if name == "GraLoraPlugin":
        from .plugin import GraLoraPlugin

        return GraLoraPlugin
    raise AttributeError(f"module 'peft_gralora.axolotl' has no attribute {name!r}")
