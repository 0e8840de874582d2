"""Qwen2 / Qwen2.5: Llama layout plus biases on the q, k and v projections."""

from .base import DecoderSpec, common_fields, rope_settings

MODEL_TYPES = ("qwen2",)


def spec_from_config(cfg: dict) -> DecoderSpec:
    theta, scaling = rope_settings(cfg)
    fields = common_fields(cfg)
    windows = [-1] * fields["layers"]
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        start = int(cfg.get("max_window_layers", fields["layers"]))
        windows = [int(cfg["sliding_window"]) if i >= start else -1 for i in range(fields["layers"])]
    return DecoderSpec(family="qwen2", rope_theta=theta, rope_scaling=scaling, windows=windows,
                       qkv_bias=True, **fields)
