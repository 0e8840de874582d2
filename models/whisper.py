"""Whisper: a conv front-end over log-mel frames, a pre-norm transformer encoder,
and a pre-norm decoder with learned positions and a head tied to the embedding.

Two sources map to the canonical names of :mod:`models.seq2seq_base`:
CTranslate2's ``WhisperSpec`` (fused qkv / kv linears, split here) and a
transformers ``WhisperForConditionalGeneration`` state dict.
"""

from __future__ import annotations

import numpy as np

from .seq2seq_base import Seq2SeqSpec, WeightMap


def spec_from_ct2(variables: dict[str, np.ndarray]) -> Seq2SeqSpec:
    def count(prefix: str) -> int:
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
            n += 1
        return n

    embed = variables["decoder/embeddings/weight"]
    heads = int(np.asarray(variables["encoder/num_heads"]).reshape(-1)[0])
    dec_heads = int(np.asarray(variables.get("decoder/num_heads", heads)).reshape(-1)[0])
    if heads != dec_heads:
        raise ValueError(f"encoder and decoder head counts differ ({heads} vs {dec_heads})")
    return Seq2SeqSpec(
        family="whisper", d_model=int(embed.shape[1]), encoder_layers=count("encoder"),
        decoder_layers=count("decoder"), heads=heads,
        ffn=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]), vocab_size=int(embed.shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]))


def _ln(out: dict, dst: str, v: dict, src: str) -> None:
    out[f"{dst}.w"], out[f"{dst}.b"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _lin(out: dict, dst: str, v: dict, src: str) -> None:
    out[f"{dst}.w"] = v[f"{src}/weight"]
    if f"{src}/bias" in v:
        out[f"{dst}.b"] = v[f"{src}/bias"]


def _split(out: dict, dsts: list[str], v: dict, src: str) -> None:
    """A fused linear (q|k|v or k|v stacked on the output axis) into its parts."""
    ws = np.split(v[f"{src}/weight"], len(dsts), axis=0)
    bs = np.split(v[f"{src}/bias"], len(dsts)) if f"{src}/bias" in v else [None] * len(dsts)
    for dst, w, b in zip(dsts, ws, bs):
        out[f"{dst}.w"] = w
        if b is not None and np.any(b):  # CTranslate2 fills Whisper's missing k bias with zeros
            out[f"{dst}.b"] = b


def weights_from_ct2(variables: dict[str, np.ndarray], spec: Seq2SeqSpec) -> dict[str, np.ndarray]:
    v, w = variables, {}
    for i in (1, 2):
        _lin(w, f"enc.conv{i}", v, f"encoder/conv{i}")
    w["enc.pos"] = v["encoder/position_encodings/encodings"]
    for i in range(spec.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"enc.{i}"
        _ln(w, f"{dst}.attn_norm", v, f"{src}/self_attention/layer_norm")
        _split(w, [f"{dst}.attn.q", f"{dst}.attn.k", f"{dst}.attn.v"], v, f"{src}/self_attention/linear_0")
        _lin(w, f"{dst}.attn.o", v, f"{src}/self_attention/linear_1")
        _ln(w, f"{dst}.mlp_norm", v, f"{src}/ffn/layer_norm")
        _lin(w, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
        _lin(w, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
    _ln(w, "enc.norm", v, "encoder/layer_norm")
    w["dec.embed"] = v["decoder/embeddings/weight"]
    w["dec.pos"] = v["decoder/position_encodings/encodings"]
    for i in range(spec.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"dec.{i}"
        _ln(w, f"{dst}.self_norm", v, f"{src}/self_attention/layer_norm")
        _split(w, [f"{dst}.self.q", f"{dst}.self.k", f"{dst}.self.v"], v, f"{src}/self_attention/linear_0")
        _lin(w, f"{dst}.self.o", v, f"{src}/self_attention/linear_1")
        _ln(w, f"{dst}.cross_norm", v, f"{src}/attention/layer_norm")
        _lin(w, f"{dst}.cross.q", v, f"{src}/attention/linear_0")
        _split(w, [f"{dst}.cross.k", f"{dst}.cross.v"], v, f"{src}/attention/linear_1")
        _lin(w, f"{dst}.cross.o", v, f"{src}/attention/linear_2")
        _ln(w, f"{dst}.mlp_norm", v, f"{src}/ffn/layer_norm")
        _lin(w, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
        _lin(w, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
    _ln(w, "dec.norm", v, "decoder/layer_norm")
    proj = v.get("decoder/projection/weight")
    if proj is not None and proj is not v["decoder/embeddings/weight"]:
        w["lm_head.w"] = proj
    return w


def spec_from_hf(config: dict) -> Seq2SeqSpec:
    if config["encoder_attention_heads"] != config["decoder_attention_heads"]:
        raise ValueError("encoder and decoder head counts differ")
    if config["encoder_ffn_dim"] != config["decoder_ffn_dim"]:
        raise ValueError("encoder and decoder feed-forward sizes differ")
    return Seq2SeqSpec(
        family="whisper", d_model=int(config["d_model"]), encoder_layers=int(config["encoder_layers"]),
        decoder_layers=int(config["decoder_layers"]), heads=int(config["encoder_attention_heads"]),
        ffn=int(config["encoder_ffn_dim"]), vocab_size=int(config["vocab_size"]),
        max_source_positions=int(config["max_source_positions"]),
        max_target_positions=int(config["max_target_positions"]), num_mel_bins=int(config["num_mel_bins"]),
        activation={"gelu": "gelu", "relu": "relu"}[config.get("activation_function", "gelu")])


def weights_from_hf(sd: dict[str, np.ndarray], spec: Seq2SeqSpec) -> dict[str, np.ndarray]:
    m = WeightMap(sd)
    w, take = m.w, m.linear
    e, d = "model.encoder", "model.decoder"
    take("enc.conv1", f"{e}.conv1")
    take("enc.conv2", f"{e}.conv2")
    w["enc.pos"] = sd[f"{e}.embed_positions.weight"]
    for i in range(spec.encoder_layers):
        m.bart_layer("enc", i, f"{e}.layers.{i}")
    take("enc.norm", f"{e}.layer_norm")
    w["dec.embed"] = sd[f"{d}.embed_tokens.weight"]
    w["dec.pos"] = sd[f"{d}.embed_positions.weight"]
    for i in range(spec.decoder_layers):
        m.bart_layer("dec", i, f"{d}.layers.{i}")
    take("dec.norm", f"{d}.layer_norm")
    head = sd.get("proj_out.weight")
    if head is not None and not np.array_equal(head, w["dec.embed"]):
        w["lm_head.w"] = head
    return w
