"""Sparse Mixture-of-Experts decoder families: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE.

Attention is the dense families' (so :class:`DecoderSpec` describes it); the
feed-forward of a sparse layer is a router choosing ``top_k`` of ``num_experts``
gated-MLP experts. What differs per family is small and lives in
:class:`MoESpec`: whether the top-k weights are renormalized, a shared expert
with a sigmoid gate (Qwen2-MoE), dense layers among sparse ones, and OLMoE's
full-width q/k norms and qkv clipping.

Weights come either from transformers 5's in-memory layout (one
``mlp.experts.gate_up_proj`` tensor of shape (experts, 2*inter, hidden) and one
``mlp.experts.down_proj`` (experts, hidden, inter)) or from the per-expert
checkpoint layout (``experts.{e}.gate_proj``/``w1`` …).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .base import DecoderSpec, common_fields, rope_settings

MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


@dataclass
class MoESpec:
    """The dense part (attention, norms, embeddings) plus the routed feed-forward."""

    dense: DecoderSpec
    num_experts: int
    top_k: int
    expert_intermediate: int
    # Divide the top-k probabilities by their sum (Mixtral always; others per config).
    norm_topk_prob: bool
    # Layers whose feed-forward is one dense MLP instead of experts.
    dense_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate: int = 0
    # OLMoE: RMSNorm over the whole q and k projections (not per head), optional clipping.
    full_width_qk_norm: bool = False
    clip_qkv: float | None = None
    mlp_prefix: str = "mlp"

    @property
    def family(self) -> str:
        return self.dense.family

    @property
    def layers(self) -> int:
        return self.dense.layers

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def as_manifest(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "expert_intermediate": self.expert_intermediate,
                "norm_topk_prob": self.norm_topk_prob, "dense_layers": self.dense_layers,
                "shared_expert_intermediate": self.shared_expert_intermediate}


def spec_from_config(cfg: dict) -> MoESpec:
    kind = cfg.get("model_type")
    theta, scaling = rope_settings(cfg)
    fields = common_fields(cfg)
    layers = fields["layers"]
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if experts < 1 or not 0 < top_k <= experts:
        raise ValueError(f"{experts} experts with {top_k} per token is not a sparse MoE this exporter knows")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation '{cfg.get('hidden_act')}' is not supported for experts (silu only)")
    dense_layers: list[int] = []
    if kind in ("qwen3_moe", "qwen2_moe"):
        step = int(cfg.get("decoder_sparse_step") or 1)
        only = set(cfg.get("mlp_only_layers") or [])
        dense_layers = [i for i in range(layers) if i in only or (i + 1) % step]
    windows = [-1] * layers
    if kind == "mixtral" and cfg.get("sliding_window"):
        windows = [int(cfg["sliding_window"])] * layers
    if kind == "qwen3_moe":
        dense = DecoderSpec(family=kind, rope_theta=theta, rope_scaling=scaling, qk_norm=True,
                            qkv_bias=bool(cfg.get("attention_bias", False)), windows=windows, **fields)
        return MoESpec(dense, experts, top_k, int(cfg["moe_intermediate_size"]),
                       bool(cfg.get("norm_topk_prob", False)), dense_layers)
    if kind == "qwen2_moe":
        dense = DecoderSpec(family=kind, rope_theta=theta, rope_scaling=scaling, qkv_bias=True, windows=windows,
                            **fields)
        return MoESpec(dense, experts, top_k, int(cfg["moe_intermediate_size"]),
                       bool(cfg.get("norm_topk_prob", False)), dense_layers,
                       shared_expert_intermediate=int(cfg.get("shared_expert_intermediate_size") or 0))
    if kind == "mixtral":
        dense = DecoderSpec(family=kind, rope_theta=theta, rope_scaling=scaling, windows=windows, **fields)
        return MoESpec(dense, experts, top_k, int(cfg["intermediate_size"]), True)
    if kind == "olmoe":
        dense = DecoderSpec(family=kind, rope_theta=theta, rope_scaling=scaling, windows=windows,
                            qkv_bias=bool(cfg.get("attention_bias", False)), **fields)
        clip = cfg.get("clip_qkv")
        return MoESpec(dense, experts, top_k, int(cfg["intermediate_size"]), bool(cfg.get("norm_topk_prob", False)),
                       full_width_qk_norm=True, clip_qkv=float(clip) if clip is not None else None)
    raise ValueError(f"'{kind}' is not a sparse MoE family")


def attention_weights(sd: Mapping, i: int, spec: MoESpec) -> dict[str, np.ndarray]:
    """Norms and attention projections of layer I, by role (as ``models.base.layer_weights``)."""
    p = f"model.layers.{i}."
    w = {"input_norm": sd[p + "input_layernorm.weight"],
         "post_attention_norm": sd[p + "post_attention_layernorm.weight"]}
    for n in "qkvo":
        w[n] = sd[p + f"self_attn.{n}_proj.weight"]
    if spec.dense.qkv_bias:
        for n in "qkv":
            w[f"{n}_bias"] = sd[p + f"self_attn.{n}_proj.bias"]
    if spec.dense.qk_norm or spec.full_width_qk_norm:
        w["q_norm"] = sd[p + "self_attn.q_norm.weight"]
        w["k_norm"] = sd[p + "self_attn.k_norm.weight"]
    return w


def dense_mlp_weights(sd: Mapping, i: int) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}.mlp."
    return {"gate": sd[p + "gate_proj.weight"], "up": sd[p + "up_proj.weight"], "down": sd[p + "down_proj.weight"]}


def router_weight(sd: Mapping, i: int) -> np.ndarray:
    """(experts, hidden): router logits are ``h @ W.T``."""
    for key in (f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.block_sparse_moe.gate.weight"):
        if key in sd:
            return np.asarray(sd[key], np.float32)
    raise KeyError(f"model.layers.{i}.mlp.gate.weight")


def shared_expert_weights(sd: Mapping, i: int) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}.mlp."
    return {"gate": sd[p + "shared_expert.gate_proj.weight"], "up": sd[p + "shared_expert.up_proj.weight"],
            "down": sd[p + "shared_expert.down_proj.weight"], "shared_gate": sd[p + "shared_expert_gate.weight"]}


class LayerExperts:
    """The experts of one layer, one at a time: ``(gate_up (2*inter, hidden), down (hidden, inter))``.

    Reading the fused tensor once per layer keeps big exports from holding every
    layer's experts in memory at once (the source mapping may be lazy)."""

    def __init__(self, sd: Mapping, i: int, num_experts: int):
        p = f"model.layers.{i}."
        self.fused = p + "mlp.experts.gate_up_proj" in sd
        if self.fused:
            self.gate_up = np.asarray(sd[p + "mlp.experts.gate_up_proj"], np.float32)
            self.down = np.asarray(sd[p + "mlp.experts.down_proj"], np.float32)
        else:
            self.sd, self.prefix = sd, p
        self.num_experts = num_experts

    def __getitem__(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if self.fused:
            return self.gate_up[e], self.down[e]
        sd, p = self.sd, self.prefix
        if f"{p}mlp.experts.{e}.gate_proj.weight" in sd:
            q = f"{p}mlp.experts.{e}."
            gate, up, down = sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"], sd[q + "down_proj.weight"]
        else:  # Mixtral checkpoint names: w1 = gate, w3 = up, w2 = down
            q = f"{p}block_sparse_moe.experts.{e}."
            gate, up, down = sd[q + "w1.weight"], sd[q + "w3.weight"], sd[q + "w2.weight"]
        return np.concatenate([gate, up], axis=0).astype(np.float32), np.asarray(down, np.float32)
