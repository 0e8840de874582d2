"""Per-family knowledge for the exporter: one module per architecture family.

``spec_for_config(cfg)`` finds the family by the config's ``model_type``.
"""

from __future__ import annotations

from types import ModuleType

from . import gemma3, llama, qwen2, qwen3
from .base import DecoderSpec

FAMILIES: dict[str, ModuleType] = {}
for _module in (llama, qwen2, qwen3, gemma3):
    for _model_type in _module.MODEL_TYPES:
        FAMILIES[_model_type] = _module


def family_for(model_type: str) -> ModuleType | None:
    return FAMILIES.get(model_type)


def spec_for_config(cfg: dict) -> DecoderSpec:
    module = family_for(cfg.get("model_type", ""))
    if module is None:
        raise KeyError(cfg.get("model_type"))
    return module.spec_from_config(cfg)


__all__ = ["DecoderSpec", "FAMILIES", "family_for", "spec_for_config"]
