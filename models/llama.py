"""Llama family (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral without sliding window)."""

from .base import DecoderSpec, common_fields, rope_settings

MODEL_TYPES = ("llama", "mistral")


def spec_from_config(cfg: dict) -> DecoderSpec:
    theta, scaling = rope_settings(cfg)
    fields = common_fields(cfg)
    window = cfg.get("sliding_window")
    windows = [int(window) if window else -1] * fields["layers"]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"llama family with activation {act} is not supported")
    return DecoderSpec(family="llama", rope_theta=theta, rope_scaling=scaling, windows=windows, **fields)
