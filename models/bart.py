"""BART, mBART and Marian: the same transformer with different habits.

* BART: post-norm blocks, learned positions stored with an offset of 2,
  ``layernorm_embedding`` after the embeddings, optional ``scale_embedding``.
* mBART: the same, but pre-norm, with a final layer norm on each side.
* Marian: post-norm, sinusoidal positions (no offset), no embedding norm,
  embeddings scaled by sqrt(d_model).

All three add ``final_logits_bias`` to the logits; the head is tied to the
shared embedding unless the checkpoint says otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from .seq2seq_base import Seq2SeqSpec, WeightMap

FAMILIES = ("bart", "mbart", "marian")
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "silu": "silu", "gelu_new": "gelu_tanh"}
_POSITION_OFFSET = {"bart": 2, "mbart": 2, "marian": 0}


def spec_from_hf(config: dict) -> Seq2SeqSpec:
    family = config["model_type"]
    if config["encoder_attention_heads"] != config["decoder_attention_heads"]:
        raise ValueError("encoder and decoder head counts differ")
    if config["encoder_ffn_dim"] != config["decoder_ffn_dim"]:
        raise ValueError("encoder and decoder feed-forward sizes differ")
    act = config.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation '{act}' is not supported")
    d = int(config["d_model"])
    positions = int(config["max_position_embeddings"])
    return Seq2SeqSpec(
        family=family, d_model=d, encoder_layers=int(config["encoder_layers"]),
        decoder_layers=int(config["decoder_layers"]), heads=int(config["encoder_attention_heads"]),
        ffn=int(config["encoder_ffn_dim"]), vocab_size=int(config["vocab_size"]), max_source_positions=positions,
        max_target_positions=positions, frontend="tokens", pre_norm=family == "mbart",
        activation=_ACTIVATIONS[act], embed_scale=math.sqrt(d) if config.get("scale_embedding") else 1.0)


def weights_from_hf(sd: dict[str, np.ndarray], spec: Seq2SeqSpec) -> dict[str, np.ndarray]:
    m = WeightMap(sd)
    w, take = m.w, m.linear
    offset = _POSITION_OFFSET[spec.family]

    for side, layers in (("enc", spec.encoder_layers), ("dec", spec.decoder_layers)):
        root = "model.encoder" if side == "enc" else "model.decoder"
        embed = sd.get(f"{root}.embed_tokens.weight", sd.get("model.shared.weight"))
        w[f"{side}.embed"] = embed
        w[f"{side}.pos"] = sd[f"{root}.embed_positions.weight"][offset:]
        if f"{root}.layernorm_embedding.weight" in sd:
            take(f"{side}.embed_norm", f"{root}.layernorm_embedding")
        if f"{root}.layer_norm.weight" in sd:
            take(f"{side}.norm", f"{root}.layer_norm")
        for i in range(layers):
            m.bart_layer(side, i, f"{root}.layers.{i}")
    head = sd.get("lm_head.weight")
    if head is not None and not np.array_equal(head, w["dec.embed"]):
        w["lm_head.w"] = head
    if "final_logits_bias" in sd and np.any(sd["final_logits_bias"]):
        w["lm_head.b"] = sd["final_logits_bias"].reshape(-1)
    return w
