"""Qwen3 (dense): per-head RMSNorm on queries and keys before rotary, no q/k/v bias."""

from .base import DecoderSpec, common_fields, rope_settings

MODEL_TYPES = ("qwen3",)


def spec_from_config(cfg: dict) -> DecoderSpec:
    theta, scaling = rope_settings(cfg)
    fields = common_fields(cfg)
    return DecoderSpec(family="qwen3", rope_theta=theta, rope_scaling=scaling, qk_norm=True,
                       qkv_bias=bool(cfg.get("attention_bias", False)), **fields)
