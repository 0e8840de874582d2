"""What the exporter needs to know about a decoder-only family.

A family module turns a Hugging Face config (as a dict) into a
:class:`DecoderSpec` and maps a state dict onto per-layer weight groups. The
graph builder in ``export/decoder/graph.py`` reads only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

StateDict = dict[str, np.ndarray]


@dataclass
class DecoderSpec:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_position: int
    activation: str = "silu"
    tie_embeddings: bool = False
    rope_scaling: dict | None = None
    # Per layer: -1 for global attention, else the sliding window (tokens).
    windows: list[int] = field(default_factory=list)
    # Rotary base of sliding-window layers where it differs (Gemma3).
    rope_local_theta: float | None = None
    attn_scale: float | None = None
    embed_scale: float = 1.0
    # Gemma's RMSNorm multiplies by (1 + w): folded into the weights on export.
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    def __post_init__(self):
        if not self.windows:
            self.windows = [-1] * self.layers
        if self.attn_scale is None:
            self.attn_scale = self.head_dim ** -0.5

    def as_manifest(self) -> dict:
        return {
            "hidden_size": self.hidden, "num_layers": self.layers, "num_heads": self.heads,
            "num_kv_heads": self.kv_heads, "head_dim": self.head_dim, "intermediate_size": self.intermediate,
            "vocab_size": self.vocab, "sliding_windows": self.windows, "tie_embeddings": self.tie_embeddings,
        }


def rope_settings(cfg: dict, layer_type: str | None = None) -> tuple[float, dict | None]:
    """Rotary base and scaling, from either transformers 4.x or 5.x config fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        kind = params.get("rope_type", "default")
        return theta, (None if kind == "default" else dict(params))
    return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")


def layer_weights(sd: StateDict, i: int, spec: DecoderSpec) -> dict[str, np.ndarray]:
    """The Hugging Face names shared by Llama, Qwen2/3 and Gemma3, mapped to roles."""
    p = f"model.layers.{i}."
    w = {
        "input_norm": sd[p + "input_layernorm.weight"],
        "post_attention_norm": sd[p + "post_attention_layernorm.weight"],
        "q": sd[p + "self_attn.q_proj.weight"], "k": sd[p + "self_attn.k_proj.weight"],
        "v": sd[p + "self_attn.v_proj.weight"], "o": sd[p + "self_attn.o_proj.weight"],
        "gate": sd[p + "mlp.gate_proj.weight"], "up": sd[p + "mlp.up_proj.weight"],
        "down": sd[p + "mlp.down_proj.weight"],
    }
    if spec.qkv_bias:
        for n in "qkv":
            w[f"{n}_bias"] = sd[p + f"self_attn.{n}_proj.bias"]
    if spec.qk_norm:
        w["q_norm"] = sd[p + "self_attn.q_norm.weight"]
        w["k_norm"] = sd[p + "self_attn.k_norm.weight"]
    if spec.sandwich_norms:
        w["pre_feedforward_norm"] = sd[p + "pre_feedforward_layernorm.weight"]
        w["post_feedforward_norm"] = sd[p + "post_feedforward_layernorm.weight"]
    if spec.norm_offset:
        for key in ("input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm",
                    "q_norm", "k_norm"):
            if key in w:
                w[key] = w[key] + spec.norm_offset
    return w


def final_norm(sd: StateDict, spec: DecoderSpec) -> np.ndarray:
    return sd["model.norm.weight"] + spec.norm_offset


def embed_table(sd: StateDict) -> np.ndarray:
    return sd["model.embed_tokens.weight"]


def lm_head(sd: StateDict, spec: DecoderSpec) -> np.ndarray:
    if spec.tie_embeddings or "lm_head.weight" not in sd:
        return sd["model.embed_tokens.weight"]
    return sd["lm_head.weight"]


def common_fields(cfg: dict) -> dict:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
