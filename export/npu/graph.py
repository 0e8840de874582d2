"""A decoder graph with fixed shapes, built from standard ONNX ops only, for NPUs.

NPU compilers (Qualcomm QNN HTP, OpenVINO NPU, ...) want every shape known at
compile time and only ops from their supported list; the fused contrib ops of
the CPU graphs (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNorm) and
a KV cache that grows inside the graph are out. So this graph:

- takes a fixed chunk of ``chunk`` tokens (a prefill graph with a chunk of,
  say, 32, and a decode graph with a chunk of 1 are built from the same code),
  padded by the runtime when fewer tokens are fed;
- takes the KV cache as fixed-size inputs ``past_key.{i}`` of shape
  ``(1, kv_heads, max_context, head_dim)`` and returns only the chunk's new
  keys and values ``new_key.{i}``; the runtime writes them into its buffers at
  the chunk's positions (no Scatter on the device, no dynamic growth);
- takes the positions (``position_ids``, for the rotary tables) and an additive
  ``attention_mask`` of shape ``(1, 1, groups * chunk, max_context + chunk)``
  built by the runtime: which cache slots and which chunk tokens each query
  row may see. The query heads of one KV group are stacked along the rows,
  so grouped-query attention needs no Expand/Tile of the cache;
- builds attention from MatMul, Add, Softmax, Concat, Reshape, Transpose, and
  rotary from Gather, Split, Concat, Mul, Add (the sign of ``rotate_half`` is
  folded into the sin table, the softmax scale into the query weights).

The graph is float32; ``export/quant/qdq.py`` turns it into a static QDQ graph and
``export/quant/quantized_io.py`` makes its edges (KV cache, mask, logits) 16-bit values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edgeinfer.export.graph.blocks import rotary_cache
from edgeinfer.export.graph.onnx_graph import GraphBuilder
from edgeinfer.models.base import DecoderSpec, StateDict, embed_table, final_norm, layer_weights, lm_head

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOCAL_ATTENTION_MASK = "attention_mask_local"  # sliding-window layers (Gemma3)
LOGITS = "logits"
# Additive mask value for hidden positions: far enough below any real score that
# softmax gives them ~0, near enough that a 16-bit quantized score keeps its resolution.
MASK_VALUE = -80.0


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def new_key(i: int) -> str:
    return f"new_key.{i}"


def new_value(i: int) -> str:
    return f"new_value.{i}"


@dataclass(frozen=True)
class StaticLayout:
    """The fixed shapes a static graph was built with (stored in the manifest)."""

    chunk: int
    max_context: int
    kv_heads: int
    head_dim: int
    heads: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def check_supported(spec: DecoderSpec) -> None:
    """Raise ValueError for model features the static graph does not build."""
    if spec.attn_softcap or spec.final_softcap:
        raise ValueError("logit soft-capping is not built for the npu target")
    if spec.heads % spec.kv_heads:
        raise ValueError("query heads are not a multiple of the KV heads")
    if spec.activation not in ("silu", "gelu_tanh", "gelu"):
        raise ValueError(f"activation '{spec.activation}' is not built for the npu target")


def build_static_decoder(spec: DecoderSpec, sd: StateDict, chunk: int, max_context: int,
                         name: str = "decoder") -> GraphBuilder:
    """The whole decoder (embedding → layers → LM head) for CHUNK tokens over a MAX_CONTEXT cache."""
    check_supported(spec)
    g = GraphBuilder(name)
    layout = StaticLayout(chunk, max_context, spec.kv_heads, spec.head_dim, spec.heads)
    ids = g.input(INPUT_IDS, "int32", [1, chunk])
    pos = g.input(POSITION_IDS, "int32", [1, chunk])
    mask_shape = [1, 1, layout.groups * chunk, max_context + chunk]
    masks = {-1: g.input(ATTENTION_MASK, "float32", mask_shape)}
    if any(w > 0 for w in spec.windows):
        masks[1] = g.input(LOCAL_ATTENTION_MASK, "float32", mask_shape)

    x = g.op1("Gather", [g.initializer("model.embed_tokens.weight", embed_table(sd).astype(np.float32)), ids],
              name="model.embed_tokens", axis=0)
    if spec.embed_scale != 1.0:
        x = g.op1("Mul", [x, g.initializer("embed_scale", np.array(spec.embed_scale, np.float32))])

    rotary = {}
    for theta in {spec.rope_theta, spec.rope_local_theta or spec.rope_theta}:
        scaling = spec.rope_scaling if theta == spec.rope_theta else None
        rotary[theta] = _rotary_inputs(g, pos, spec.head_dim, max_context, theta, scaling, chunk)

    for i in range(spec.layers):
        g.input(past_key(i), "float32", [1, spec.kv_heads, max_context, spec.head_dim])
        g.input(past_value(i), "float32", [1, spec.kv_heads, max_context, spec.head_dim])
        w = layer_weights(sd, i, spec)
        prefix = f"model.layers.{i}"
        window = spec.windows[i]
        theta = spec.rope_local_theta if (window > 0 and spec.rope_local_theta) else spec.rope_theta
        h = rms_norm(g, x, w["input_norm"], spec.rms_eps, f"{prefix}.input_layernorm")
        a = attention(g, h, w, i, spec, layout, masks[1 if window > 0 else -1], rotary[theta], f"{prefix}.self_attn")
        if spec.sandwich_norms:
            a = rms_norm(g, a, w["post_attention_norm"], spec.rms_eps, f"{prefix}.post_attention_layernorm")
            ffn_norm = w["pre_feedforward_norm"]
        else:
            ffn_norm = w["post_attention_norm"]
        x = g.op1("Add", [x, a], name=f"{prefix}.attn_residual")
        h = rms_norm(g, x, ffn_norm, spec.rms_eps, f"{prefix}.pre_feedforward_layernorm")
        m = mlp(g, h, w, spec.activation, f"{prefix}.mlp")
        if spec.sandwich_norms:
            m = rms_norm(g, m, w["post_feedforward_norm"], spec.rms_eps, f"{prefix}.post_feedforward_layernorm")
        x = g.op1("Add", [x, m], name=f"{prefix}.mlp_residual")

    h = rms_norm(g, x, final_norm(sd, spec), spec.rms_eps, "model.norm")
    head = lm_head(sd, spec)
    w_head = g.initializer("lm_head.weight_t", np.ascontiguousarray(head.T).astype(np.float32))
    g.op1("MatMul", [h, w_head], name="lm_head", outputs=[LOGITS])
    g.output(LOGITS, "float32", [1, chunk, spec.vocab])
    return g


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    w = g.initializer(name + ".weight", weight.astype(np.float32))
    return g.op1("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=eps)


def matmul(g: GraphBuilder, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
    """``x @ weight.T (+ bias)`` for a PyTorch-layout weight (out, in): a plain MatMul the quantizer
    gives per-channel int8 weights."""
    w = g.initializer(name + ".weight_t", np.ascontiguousarray(weight.T).astype(np.float32))
    y = g.op1("MatMul", [x, w], name=name)
    if bias is not None:
        y = g.op1("Add", [y, g.initializer(name + ".bias", bias.astype(np.float32))], name=name + ".bias_add")
    return y


def _rotary_inputs(g: GraphBuilder, pos: str, head_dim: int, max_context: int, theta: float,
                   scaling: dict | None, chunk: int) -> tuple[str, str]:
    """cos and signed-sin rows for the chunk's positions, shaped (1, chunk, 1, head_dim) to broadcast
    over the heads of a (1, chunk, heads, head_dim) tensor."""
    cos, sin = rotary_cache(head_dim, max_context, theta, scaling)
    cos_full = np.concatenate([cos, cos], axis=1)
    sin_signed = np.concatenate([-sin, sin], axis=1)  # rotate_half(x) * sin == swap_halves(x) * sin_signed
    shape = g.const_i64([1, chunk, 1, head_dim], f"rotary_shape.{theta:g}")
    out = []
    for label, table in (("cos", cos_full), ("sin", sin_signed)):
        t = g.initializer(f"rotary_{label}.{theta:g}", table.astype(np.float32))
        rows = g.op1("Gather", [t, pos], name=f"rotary_{label}_gather.{theta:g}", axis=0)
        out.append(g.op1("Reshape", [rows, shape]))
    return out[0], out[1]


def _apply_rotary(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, name: str) -> str:
    """Non-interleaved rotary on (1, chunk, heads, head_dim)."""
    half = g.const_i64([head_dim // 2, head_dim // 2], "rotary_split")
    x1, x2 = g.op("Split", [x, half], 2, axis=-1, name=name + ".split")
    swapped = g.op1("Concat", [x2, x1], axis=-1, name=name + ".swap")
    return g.op1("Add", [g.op1("Mul", [x, cos]), g.op1("Mul", [swapped, sin])], name=name + ".rotate")


def attention(g: GraphBuilder, h: str, w: dict[str, np.ndarray], layer: int, spec: DecoderSpec,
              layout: StaticLayout, mask: str, rotary: tuple[str, str], name: str) -> str:
    c, d, kvh, heads = layout.chunk, spec.head_dim, spec.kv_heads, spec.heads
    scale = float(spec.attn_scale)
    wq, bq = w["q"], w.get("q_bias")
    if "q_norm" not in w:  # fold the softmax scale into the query projection
        wq, bq = wq * scale, (bq * scale if bq is not None else None)
    q = matmul(g, h, wq, f"{name}.q_proj", bq)
    k = matmul(g, h, w["k"], f"{name}.k_proj", w.get("k_bias"))
    v = matmul(g, h, w["v"], f"{name}.v_proj", w.get("v_bias"))
    q = g.op1("Reshape", [q, g.const_i64([1, c, heads, d], f"shape.q.{c}")])
    k = g.op1("Reshape", [k, g.const_i64([1, c, kvh, d], f"shape.kv.{c}")])
    v = g.op1("Reshape", [v, g.const_i64([1, c, kvh, d], f"shape.kv.{c}")])
    if "q_norm" in w:  # per-head norms (Qwen3, Gemma3); the scale goes into the query norm's weight
        q = rms_norm(g, q, w["q_norm"] * scale, spec.rms_eps, f"{name}.q_norm")
        k = rms_norm(g, k, w["k_norm"], spec.rms_eps, f"{name}.k_norm")
    cos, sin = rotary
    q = _apply_rotary(g, q, cos, sin, d, f"{name}.q_rotary")
    k = _apply_rotary(g, k, cos, sin, d, f"{name}.k_rotary")
    # (1, chunk, heads, d) -> (1, heads, chunk, d) -> (1, kv_heads, groups * chunk, d)
    q = g.op1("Transpose", [q], perm=[0, 2, 1, 3])
    q = g.op1("Reshape", [q, g.const_i64([1, kvh, layout.groups * c, d], f"shape.qg.{c}")])
    k_new = g.op1("Transpose", [k], perm=[0, 2, 1, 3], outputs=[new_key(layer)])
    v_new = g.op1("Transpose", [v], perm=[0, 2, 1, 3], outputs=[new_value(layer)])
    for out in (new_key(layer), new_value(layer)):
        g.output(out, "float32", [1, kvh, c, d])
    keys = g.op1("Concat", [past_key(layer), k_new], axis=2, name=f"{name}.keys")
    values = g.op1("Concat", [past_value(layer), v_new], axis=2, name=f"{name}.values")
    scores = g.op1("MatMul", [q, g.op1("Transpose", [keys], perm=[0, 1, 3, 2])], name=f"{name}.scores")
    probs = g.op1("Softmax", [g.op1("Add", [scores, mask], name=f"{name}.mask")], axis=-1, name=f"{name}.softmax")
    ctx = g.op1("MatMul", [probs, values], name=f"{name}.context")
    ctx = g.op1("Reshape", [ctx, g.const_i64([1, heads, c, d], f"shape.heads.{c}")])
    ctx = g.op1("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = g.op1("Reshape", [ctx, g.const_i64([1, c, heads * d], f"shape.ctx.{c}")])
    return matmul(g, ctx, w["o"], f"{name}.o_proj")


def mlp(g: GraphBuilder, x: str, w: dict[str, np.ndarray], activation: str, name: str) -> str:
    gate = matmul(g, x, w["gate"], f"{name}.gate_proj")
    up = matmul(g, x, w["up"], f"{name}.up_proj")
    if activation == "silu":
        act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate])], name=f"{name}.silu")
    else:
        approx = {"approximate": "tanh"} if activation == "gelu_tanh" else {}
        act = g.op1("Gelu", [gate], name=f"{name}.gelu", **approx)
    return matmul(g, g.op1("Mul", [act, up], name=f"{name}.gated"), w["down"], f"{name}.down_proj")
