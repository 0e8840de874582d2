"""Per-family knowledge for the exporter: one module per architecture family, and one
registry of every model type the hand-built exporters take, with the kind of package it
becomes.

``spec_for_config(cfg)`` finds a dense decoder family by the config's ``model_type``;
``kind_for(model_type)`` says which exporter takes it: ``decoder`` (export/decoder/graph.py),
``moe`` (export/moe/graph.py) or ``encoder-decoder`` (export/seq2seq/export.py).
"""

from __future__ import annotations

from types import ModuleType

from . import bart, gemma3, llama, moe, qwen2, qwen3, t5, whisper
from .base import DecoderSpec

FAMILIES: dict[str, ModuleType] = {}  # dense decoder model types -> their family module
for _module in (llama, qwen2, qwen3, gemma3):
    for _model_type in _module.MODEL_TYPES:
        FAMILIES[_model_type] = _module

SEQ2SEQ_FAMILIES: dict[str, ModuleType] = {"whisper": whisper, **{t: t5 for t in t5.FAMILIES},
                                           **{t: bart for t in bart.FAMILIES}}

# every model type a hand-built exporter takes -> the kind of package it becomes
KINDS: dict[str, str] = {**{t: "decoder" for t in FAMILIES}, **{t: "moe" for t in moe.MODEL_TYPES},
                         **{t: "encoder-decoder" for t in SEQ2SEQ_FAMILIES}}


def kind_for(model_type: str) -> str | None:
    """``decoder``, ``moe``, ``encoder-decoder``, or None for a model type with no hand-built exporter."""
    return KINDS.get(model_type)


def family_for(model_type: str) -> ModuleType | None:
    return FAMILIES.get(model_type)


def spec_for_config(cfg: dict) -> DecoderSpec:
    module = family_for(cfg.get("model_type", ""))
    if module is None:
        raise KeyError(cfg.get("model_type"))
    return module.spec_from_config(cfg)


__all__ = ["DecoderSpec", "FAMILIES", "KINDS", "SEQ2SEQ_FAMILIES", "family_for", "kind_for", "spec_for_config"]
