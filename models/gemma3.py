"""Gemma 3 (text): sandwich norms with (1 + w) weights, q/k norms, scaled embeddings,
tanh-GELU, and interleaved sliding-window / global layers with their own rotary bases."""

from .base import DecoderSpec, common_fields, rope_settings

MODEL_TYPES = ("gemma3_text", "gemma3")


def spec_from_config(cfg: dict) -> DecoderSpec:
    cfg = cfg.get("text_config", cfg)
    fields = common_fields(cfg)
    layers = fields["layers"]
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
        for i in range(layers)]
    window = int(cfg.get("sliding_window") or 4096)
    theta, scaling = rope_settings(cfg, "full_attention")
    local_theta, local_scaling = rope_settings(cfg, "sliding_attention")
    if "rope_local_base_freq" in cfg:
        local_theta = float(cfg["rope_local_base_freq"])
    if local_scaling:
        raise ValueError("Gemma3 with scaled rotary on sliding-window layers is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    fields["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    return DecoderSpec(
        family="gemma3", rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        windows=[window if t == "sliding_attention" else -1 for t in layer_types],
        activation="gelu_tanh" if "tanh" in act else "gelu",
        attn_scale=float(cfg.get("query_pre_attn_scalar", fields["head_dim"])) ** -0.5,
        embed_scale=float(fields["hidden"]) ** 0.5, norm_offset=1.0, sandwich_norms=True, qk_norm=True,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0), **fields)
