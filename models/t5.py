"""T5, Flan-T5 and mT5: pre-norm with RMS layer norms (no mean, no bias), no
biases anywhere, attention scores not scaled, and no position embeddings: a
learned bias per (bucketed) relative position, computed in the first layer and
shared by all. T5 v1.1 / Flan / mT5 use a gated GELU (tanh) MLP and an untied
head; the original T5 a ReLU MLP and a tied head scaled by d_model^-0.5.

The bucketed bias depends only on ``key - query``, so it is tabulated here for
every relative position the package allows (2·L-1 rows), and the graph looks it up.
"""

from __future__ import annotations

import numpy as np

from .seq2seq_base import Seq2SeqSpec

FAMILIES = ("t5", "mt5")
DEFAULT_MAX_POSITIONS = 512


def spec_from_hf(config: dict) -> Seq2SeqSpec:
    proj = config.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-", 1)[1] if gated else proj
    activation = {"relu": "relu", "gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu"}.get(act)
    if activation is None:
        raise ValueError(f"feed_forward_proj '{proj}' is not supported")
    d = int(config["d_model"])
    positions = int(config.get("n_positions") or DEFAULT_MAX_POSITIONS)
    scaled = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
    return Seq2SeqSpec(
        family=config["model_type"], d_model=d, encoder_layers=int(config["num_layers"]),
        decoder_layers=int(config.get("num_decoder_layers") or config["num_layers"]), heads=int(config["num_heads"]),
        ffn=int(config["d_ff"]), vocab_size=int(config["vocab_size"]), max_source_positions=positions,
        max_target_positions=positions, frontend="tokens", norm="rms",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-6)), activation=activation, gated=gated,
        kv_dim=int(config["d_kv"]), attention_scale=1.0, position="relative",
        head_scale=d ** -0.5 if scaled else 1.0)


def relative_bucket(relative: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of each relative position (key - query): exact for small distances,
    logarithmic up to ``max_distance``, one bucket beyond (float32 like the reference)."""
    rel = relative.astype(np.int64)
    ret = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    safe = np.maximum(n, 1).astype(np.float32)  # n = 0 takes the exact branch below
    ratio = np.log(safe / np.float32(max_exact)) / np.float32(np.log(max_distance / max_exact))
    large = max_exact + (ratio * np.float32(num_buckets - max_exact)).astype(np.int64, copy=False)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


def _bias_table(table: np.ndarray, length: int, bidirectional: bool, buckets: int, distance: int) -> np.ndarray:
    rel = np.arange(-(length - 1), length)
    return table[relative_bucket(rel, bidirectional, buckets, distance)].astype(np.float32)  # (2L-1, heads)


def weights_from_hf(sd: dict[str, np.ndarray], spec: Seq2SeqSpec, config: dict) -> dict[str, np.ndarray]:
    buckets = int(config.get("relative_attention_num_buckets", 32))
    distance = int(config.get("relative_attention_max_distance", 128))
    w: dict[str, np.ndarray] = {}

    def mlp(dst: str, src: str) -> None:
        if f"{src}.wi_0.weight" in sd:
            w[f"{dst}.fc_gate.w"], w[f"{dst}.fc1.w"] = sd[f"{src}.wi_0.weight"], sd[f"{src}.wi_1.weight"]
        else:
            w[f"{dst}.fc1.w"] = sd[f"{src}.wi.weight"]
        w[f"{dst}.fc2.w"] = sd[f"{src}.wo.weight"]

    def attn(dst: str, src: str) -> None:
        for p in "qkvo":
            w[f"{dst}.{p}.w"] = sd[f"{src}.{p}.weight"]

    shared = sd.get("shared.weight")
    w["enc.embed"] = sd.get("encoder.embed_tokens.weight", shared)
    w["dec.embed"] = sd.get("decoder.embed_tokens.weight", shared)
    for i in range(spec.encoder_layers):
        s = f"encoder.block.{i}.layer"
        w[f"enc.{i}.attn_norm.w"] = sd[f"{s}.0.layer_norm.weight"]
        attn(f"enc.{i}.attn", f"{s}.0.SelfAttention")
        w[f"enc.{i}.mlp_norm.w"] = sd[f"{s}.1.layer_norm.weight"]
        mlp(f"enc.{i}", f"{s}.1.DenseReluDense")
    w["enc.norm.w"] = sd["encoder.final_layer_norm.weight"]
    for i in range(spec.decoder_layers):
        s = f"decoder.block.{i}.layer"
        w[f"dec.{i}.self_norm.w"] = sd[f"{s}.0.layer_norm.weight"]
        attn(f"dec.{i}.self", f"{s}.0.SelfAttention")
        w[f"dec.{i}.cross_norm.w"] = sd[f"{s}.1.layer_norm.weight"]
        attn(f"dec.{i}.cross", f"{s}.1.EncDecAttention")
        w[f"dec.{i}.mlp_norm.w"] = sd[f"{s}.2.layer_norm.weight"]
        mlp(f"dec.{i}", f"{s}.2.DenseReluDense")
    w["dec.norm.w"] = sd["decoder.final_layer_norm.weight"]
    w["enc.rel_bias"] = _bias_table(sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
                                    spec.max_source_positions, True, buckets, distance)
    w["dec.rel_bias"] = _bias_table(sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
                                    spec.max_target_positions, False, buckets, distance)
    head = sd.get("lm_head.weight")
    if head is not None and not np.array_equal(head, w["dec.embed"]):
        w["lm_head.w"] = head
    return w
