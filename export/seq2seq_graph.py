"""The three graphs of an encoder-decoder package.

* ``encoder``  — input (log-mel frames or token ids) → ``encoder_hidden_states``.
* ``cross_kv`` — encoder states → the cross-attention K and V of every decoder
  layer, run once per input: the decoder never recomputes them per step.
* ``decoder``  — new token ids + self-attention KV cache + cross K/V → logits and
  the grown cache. Positions and the causal mask come from the cache length, so
  one graph serves the multi-token prompt and every later single-token step.

Weights use the canonical names of :mod:`models.seq2seq_base`; linears go
through :func:`export.blocks.linear`, so int4/int8 (MatMulNBits), fp16 (stored
half, computed in float) and fp32 all come from the same code.
"""

from __future__ import annotations

import numpy as np
from edgeinfer.models.seq2seq_base import Seq2SeqSpec

from .blocks import Precision, embedding, float_weight, linear, tied_lm_head
from .onnx_graph import MS_DOMAIN, GraphBuilder

INPUT_FEATURES = "input_features"
ENCODER_INPUT_IDS = "encoder_input_ids"
ENCODER_HIDDEN = "encoder_hidden_states"
DECODER_INPUT_IDS = "input_ids"
LOGITS = "logits"
PAST_KEY, PAST_VALUE = "past_key.{layer}", "past_value.{layer}"
PRESENT_KEY, PRESENT_VALUE = "present_key.{layer}", "present_value.{layer}"
CROSS_KEY, CROSS_VALUE = "cross_key.{layer}", "cross_value.{layer}"
_MASKED = -1e9  # exp() of this relative to any real score is exactly 0 in float32


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _norm(g: GraphBuilder, x: str, w: dict, key: str, spec: Seq2SeqSpec) -> str:
    scale = g.initializer(f"{key}.w", _f32(w[f"{key}.w"]))
    if spec.norm == "rms":
        return g.op1("SimplifiedLayerNormalization", [x, scale], name=key, axis=-1, epsilon=spec.norm_eps)
    bias = g.initializer(f"{key}.b", _f32(w[f"{key}.b"]))
    return g.op1("LayerNormalization", [x, scale, bias], name=key, axis=-1, epsilon=spec.norm_eps)


def _linear(g: GraphBuilder, x: str, w: dict, key: str, prec: Precision) -> str:
    bias = w.get(f"{key}.b")
    return linear(g, x, _f32(w[f"{key}.w"]), key, prec, bias=None if bias is None else _f32(bias))


def _heads(g: GraphBuilder, x: str, spec: Seq2SeqSpec) -> str:
    """(B, S, D) → (B, H, S, Dh)."""
    shaped = g.op1("Reshape", [x, g.const_i64([0, 0, spec.heads, spec.head_dim], "shape.heads")])
    return g.op1("Transpose", [shaped], perm=[0, 2, 1, 3])


def _merge(g: GraphBuilder, x: str, spec: Seq2SeqSpec) -> str:
    """(B, H, S, Dh) → (B, S, D)."""
    t = g.op1("Transpose", [x], perm=[0, 2, 1, 3])
    return g.op1("Reshape", [t, g.const_i64([0, 0, spec.d_model], "shape.merge")])


def _attend(g: GraphBuilder, q: str, k: str, v: str, spec: Seq2SeqSpec, mask: str | None,
            keys_transposed: bool = False) -> str:
    """softmax(q kᵀ / √d + mask) v over (B, H, ·, Dh) tensors (K given as (B, H, Dh, L) when
    ``keys_transposed``)."""
    scale = g.initializer("attn.scale", np.asarray(spec.head_dim ** -0.5, np.float32))
    kt = k if keys_transposed else g.op1("Transpose", [k], perm=[0, 1, 3, 2])
    scores = g.op1("MatMul", [g.op1("Mul", [q, scale]), kt])
    if mask is not None:
        scores = g.op1("Add", [scores, mask])
    return g.op1("MatMul", [g.op1("Softmax", [scores], axis=-1), v])


def _fused_attention(g: GraphBuilder, q: str, k: str, v: str, spec: Seq2SeqSpec, *, bias: str | None = None,
                     past: tuple[str, str] | None = None, present: tuple[str, str] | None = None) -> str:
    """onnxruntime's MultiHeadAttention: Q (B, S, D); K/V either (B, L, D) or already
    split into heads (B, H, L, Dh), as the cross_kv graph writes them. It never
    materialises the (S × L) score matrix per head in the graph, which is what makes the
    1500-frame encoder fast."""
    inputs = [q, k, v, "", "", bias or ""]
    if past is not None:
        inputs += [past[0], past[1]]
    while inputs[-1] == "":
        inputs.pop()
    outs = [g.unique("mha") + "/out"] + (list(present) if present else [])
    g.op("MultiHeadAttention", inputs, len(outs), domain=MS_DOMAIN, outputs=outs, num_heads=spec.heads,
         scale=spec.head_dim ** -0.5)
    return outs[0]


def _mlp(g: GraphBuilder, x: str, w: dict, key: str, spec: Seq2SeqSpec, prec: Precision) -> str:
    h = _linear(g, x, w, f"{key}.fc1", prec)
    h = g.op1("Gelu", [h]) if spec.activation == "gelu" else g.op1("Relu", [h])
    return _linear(g, h, w, f"{key}.fc2", prec)


def build_encoder(spec: Seq2SeqSpec, w: dict, prec: Precision) -> GraphBuilder:
    if spec.frontend != "audio":
        raise ValueError(f"encoder front-end '{spec.frontend}' is not built yet")
    g = GraphBuilder("encoder")
    feats = g.input(INPUT_FEATURES, "float32", ["batch", spec.num_mel_bins, "frames"])
    x = feats
    for i, stride in ((1, 1), (2, 2)):
        conv_w = float_weight(g, f"enc.conv{i}.w", _f32(w[f"enc.conv{i}.w"]), prec)
        conv_b = g.initializer(f"enc.conv{i}.b", _f32(w[f"enc.conv{i}.b"]))
        x = g.op1("Conv", [x, conv_w, conv_b], name=f"enc.conv{i}", kernel_shape=[3], pads=[1, 1], strides=[stride])
        x = g.op1("Gelu", [x])
    x = g.op1("Transpose", [x], perm=[0, 2, 1])  # (B, S, D)
    # positions 0..S-1 of the learned/sinusoidal table; S > table is refused by Slice's shape check in Add
    seq = g.op1("Shape", [x], start=1, end=2)
    pos = g.op1("Slice", [g.initializer("enc.pos", _f32(w["enc.pos"])), g.const_i64([0]), seq, g.const_i64([0])])
    x = g.op1("Add", [x, pos])
    for i in range(spec.encoder_layers):
        h = _norm(g, x, w, f"enc.{i}.attn_norm", spec)
        q, k, v = (_linear(g, h, w, f"enc.{i}.attn.{p}", prec) for p in "qkv")
        a = _linear(g, _fused_attention(g, q, k, v, spec), w, f"enc.{i}.attn.o", prec)
        x = g.op1("Add", [x, a])
        x = g.op1("Add", [x, _mlp(g, _norm(g, x, w, f"enc.{i}.mlp_norm", spec), w, f"enc.{i}", spec, prec)])
    out = _norm(g, x, w, "enc.norm", spec)
    g.op("Identity", [out], outputs=[ENCODER_HIDDEN])
    g.output(ENCODER_HIDDEN, "float32", ["batch", "source", spec.d_model])
    return g


def build_cross_kv(spec: Seq2SeqSpec, w: dict, prec: Precision) -> GraphBuilder:
    g = GraphBuilder("cross_kv")
    enc = g.input(ENCODER_HIDDEN, "float32", ["batch", "source", spec.d_model])
    for i in range(spec.decoder_layers):
        k = _heads(g, _linear(g, enc, w, f"dec.{i}.cross.k", prec), spec)
        # keys stored transposed (B, H, Dh, S): each decoder step multiplies by them directly
        g.op("Transpose", [k], outputs=[CROSS_KEY.format(layer=i)], perm=[0, 1, 3, 2])
        g.output(CROSS_KEY.format(layer=i), "float32", ["batch", spec.heads, spec.head_dim, "source"])
        v = _heads(g, _linear(g, enc, w, f"dec.{i}.cross.v", prec), spec)
        g.op("Identity", [v], outputs=[CROSS_VALUE.format(layer=i)])
        g.output(CROSS_VALUE.format(layer=i), "float32", ["batch", spec.heads, "source", spec.head_dim])
    return g


def build_decoder(spec: Seq2SeqSpec, w: dict, prec: Precision) -> GraphBuilder:
    g = GraphBuilder("decoder")
    ids = g.input(DECODER_INPUT_IDS, "int64", ["batch", "new"])
    kv_shape = ["batch", spec.heads, "past", spec.head_dim]
    for i in range(spec.decoder_layers):
        g.input(PAST_KEY.format(layer=i), "float32", kv_shape)
        g.input(PAST_VALUE.format(layer=i), "float32", kv_shape)
    for i in range(spec.decoder_layers):
        g.input(CROSS_KEY.format(layer=i), "float32", ["batch", spec.heads, spec.head_dim, "source"])
        g.input(CROSS_VALUE.format(layer=i), "float32", ["batch", spec.heads, "source", spec.head_dim])

    past = g.op1("Shape", [PAST_KEY.format(layer=0)], start=2, end=3)  # (1,) cache length
    new = g.op1("Shape", [ids], start=1, end=2)
    total = g.op1("Add", [past, new])
    scalar = g.const_i64([], "shape.scalar")
    past_s, total_s = g.op1("Reshape", [past, scalar]), g.op1("Reshape", [total, scalar])
    one, zero = g.initializer("i64.one", np.asarray(1, np.int64)), g.initializer("i64.zero", np.asarray(0, np.int64))
    q_pos = g.op1("Range", [past_s, total_s, one])  # (new,)
    k_pos = g.op1("Range", [zero, total_s, one])  # (total,)
    # causal mask (new, total): a query at position p sees keys at positions <= p
    future = g.op1("Greater", [g.op1("Unsqueeze", [k_pos, g.const_i64([0], "axes.0")]),
                               g.op1("Unsqueeze", [q_pos, g.const_i64([1], "axes.1")])])
    mask = g.op1("Where", [future, g.initializer("mask.neg", np.asarray(_MASKED, np.float32)),
                           g.initializer("mask.zero", np.asarray(0.0, np.float32))])
    mask = g.op1("Unsqueeze", [mask, g.const_i64([0, 1], "axes.01")])  # (1, 1, new, total)

    bits = prec.head_bits
    x, shared = embedding(g, ids, _f32(w["dec.embed"]), "dec.embed", prec, bits if "lm_head.w" not in w else None)
    x = g.op1("Add", [x, g.op1("Gather", [g.initializer("dec.pos", _f32(w["dec.pos"])), q_pos], axis=0)])
    for i in range(spec.decoder_layers):
        h = _norm(g, x, w, f"dec.{i}.self_norm", spec)
        q, k, v = (_linear(g, h, w, f"dec.{i}.self.{p}", prec) for p in "qkv")
        a = _fused_attention(g, q, k, v, spec, bias=mask,
                             past=(PAST_KEY.format(layer=i), PAST_VALUE.format(layer=i)),
                             present=(PRESENT_KEY.format(layer=i), PRESENT_VALUE.format(layer=i)))
        x = g.op1("Add", [x, _linear(g, a, w, f"dec.{i}.self.o", prec)])
        h = _norm(g, x, w, f"dec.{i}.cross_norm", spec)
        # cross attention in plain MatMuls: one query row against precomputed, pre-transposed keys
        q = _heads(g, _linear(g, h, w, f"dec.{i}.cross.q", prec), spec)
        a = _attend(g, q, CROSS_KEY.format(layer=i), CROSS_VALUE.format(layer=i), spec, None, keys_transposed=True)
        x = g.op1("Add", [x, _linear(g, _merge(g, a, spec), w, f"dec.{i}.cross.o", prec)])
        x = g.op1("Add", [x, _mlp(g, _norm(g, x, w, f"dec.{i}.mlp_norm", spec), w, f"dec.{i}", spec, prec)])
    x = _norm(g, x, w, "dec.norm", spec)
    if "lm_head.w" in w:
        logits = linear(g, x, _f32(w["lm_head.w"]), "lm_head", prec, bits=bits)
    elif shared is not None:
        logits = tied_lm_head(g, x, shared, spec.vocab_size, spec.d_model, bits, prec, "lm_head")
    else:  # float tied head: one table in the file; onnxruntime folds the transpose at load
        table = "dec.embed.weight" if prec.name != "fp16" else g.op1("Cast", ["dec.embed.weight.fp16"], to=1)
        logits = g.op1("MatMul", [x, g.op1("Transpose", [table], perm=[1, 0])], name="lm_head")
    g.op("Identity", [logits], outputs=[LOGITS])
    g.output(LOGITS, "float32", ["batch", "new", spec.vocab_size])
    for i in range(spec.decoder_layers):
        g.output(PRESENT_KEY.format(layer=i), "float32", ["batch", spec.heads, "total", spec.head_dim])
        g.output(PRESENT_VALUE.format(layer=i), "float32", ["batch", spec.heads, "total", spec.head_dim])
    return g
