"""Build a decoder-only model as one or more *stage* graphs.

Stage ``s`` owns layers ``[cuts[s], cuts[s+1])`` and their KV buffers. The
first stage also embeds tokens; the last also applies the final norm and the
LM head to the last ``logits_to_keep`` positions. Between stages flows the
residual stream (``hidden_states``), so a strategy can stop after any stage.

Every stage takes the same two position inputs (``seqlens_k`` and
``total_sequence_length``) and, per layer, a KV buffer of shape
``(batch, kv_heads, max_context, head_dim)`` bound as both past and present:
GroupQueryAttention writes the new keys in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from edgeinfer.export.decoder.kv_precision import KVPrecision
from edgeinfer.export.graph.blocks import (
    AttentionIO,
    Precision,
    attention,
    embedding,
    gated_mlp,
    linear,
    quantized_table,
    rms_norm,
    rotary_cache,
    skip_rms_norm,
    tied_lm_head,
)
from edgeinfer.export.graph.onnx_graph import GraphBuilder
from edgeinfer.export.sources.gguf_tensors import BlockWeight
from edgeinfer.models.base import DecoderSpec, StateDict, embed_table, final_norm, layer_weights, lm_head

INPUT_IDS = "input_ids"
HIDDEN_IN = "hidden_states"
HIDDEN_OUT = "hidden_states_out"
SEQLENS_K = "seqlens_k"
TOTAL_SEQ_LEN = "total_sequence_length"
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS = "logits"
EXIT_EXTRA_TOKENS = "extra_token_ids"  # a VocabTrim exit head also scores these (vocab_trim.py)


def decoder_io() -> dict:
    """The manifest's ``io`` table of a decoder package: graph input/output names (per-layer KV
    names take ``{layer}``)."""
    return {"input_ids": INPUT_IDS, "hidden_in": HIDDEN_IN, "hidden_out": HIDDEN_OUT, "seqlens_k": SEQLENS_K,
            "total_sequence_length": TOTAL_SEQ_LEN, "logits_to_keep": LOGITS_TO_KEEP, "logits": LOGITS,
            "past_key": "past_key.{layer}", "past_value": "past_value.{layer}",
            "present_key": "present_key.{layer}", "present_value": "present_value.{layer}",
            "exit_extra_tokens": EXIT_EXTRA_TOKENS}


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"


@dataclass
class StageGraph:
    name: str
    layers: tuple[int, int]
    embed: bool
    head: bool
    builder: GraphBuilder
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def manifest_entry(self, path: str) -> dict:
        return {"name": self.name, "role": "stage", "path": path, "layers": list(self.layers),
                "embed": self.embed, "head": self.head, "inputs": self.inputs, "outputs": self.outputs}


def stage_cuts(num_layers: int, cuts: Iterable[int]) -> list[int]:
    """Validated boundaries ``[0, c1, ..., num_layers]`` from user cut points. A cut at NUM_LAYERS makes a
    last stage of the final norm and head alone: an exit after the last layer (a drafting head)."""
    inner = sorted(set(int(c) for c in cuts))
    for c in inner:
        if not 0 < c <= num_layers:
            raise ValueError(f"stage cut {c} is outside 1..{num_layers}")
    return [0, *[c for c in inner if c < num_layers], num_layers] + ([num_layers] if num_layers in inner else [])


def build_stages(spec: DecoderSpec, sd: StateDict, precision: Precision, max_context: int,
                 cuts: Iterable[int] = (), progress: Callable[[int], None] | None = None,
                 kv: KVPrecision | None = None) -> list[StageGraph]:
    """KV: how the KV buffers are stored (default fp32; export/decoder/kv_precision.py)."""
    kv = kv or KVPrecision()
    bounds = stage_cuts(spec.layers, cuts)
    stages = []
    for s in range(len(bounds) - 1):
        first, last = bounds[s], bounds[s + 1]
        stage = StageGraph(name=f"stage{s}", layers=(first, last), embed=(s == 0),
                           head=(s == len(bounds) - 2), builder=GraphBuilder(f"stage{s}"))
        _build_stage(stage, spec, sd, precision, max_context, progress, kv)
        stages.append(stage)
    return stages


def _build_stage(stage: StageGraph, spec: DecoderSpec, sd: StateDict, precision: Precision,
                 max_context: int, progress: Callable[[int], None] | None, kv: KVPrecision) -> None:
    g = stage.builder
    head_bits = precision.head_bits
    shared = None
    if stage.embed:
        ids = g.input(INPUT_IDS, "int64", ["batch", "seq"])
        # A tied head shares the quantized table only when both live in this graph.
        table_bits = head_bits if (spec.tie_embeddings and stage.head) else precision.bits
        x, shared = embedding(g, ids, embed_table(sd), "model.embed_tokens", precision, table_bits)
        if spec.embed_scale != 1.0:
            x = g.op1("Mul", [x, g.initializer("embed_scale", np.array(spec.embed_scale, np.float32))])
    else:
        x = g.input(HIDDEN_IN, "float32", ["batch", "seq", spec.hidden])
    seqlens = g.input(SEQLENS_K, "int32", ["batch"])
    total = g.input(TOTAL_SEQ_LEN, "int32", [])
    caches = {}
    for theta in {spec.rope_theta, spec.rope_local_theta or spec.rope_theta}:
        scaling = spec.rope_scaling if theta == spec.rope_theta else None
        cos, sin = rotary_cache(spec.head_dim, max_context, theta, scaling)
        caches[theta] = (g.initializer(f"cos_cache.{theta:g}", cos), g.initializer(f"sin_cache.{theta:g}", sin))

    delta = None  # the stream value is x + delta; kept apart so norms fuse the add
    for i in range(*stage.layers):
        kv_shape = ["batch", spec.kv_heads, "max_context", spec.head_dim]
        g.input(past_key(i), kv.dtype, kv_shape)
        g.input(past_value(i), kv.dtype, kv_shape)
        g.output(present_key(i), kv.dtype, kv_shape)
        g.output(present_value(i), kv.dtype, kv_shape)
        w = layer_weights(sd, i, spec)
        name = f"model.layers.{i}"
        h, x = _norm_stream(g, x, delta, w["input_norm"], spec.rms_eps, f"{name}.input_layernorm")
        window = spec.windows[i]
        theta = spec.rope_local_theta if (window > 0 and spec.rope_local_theta) else spec.rope_theta
        io = AttentionIO(past_key(i), past_value(i), present_key(i), present_value(i), seqlens, total,
                         *caches[theta], *_kv_scales(g, kv, i))
        a = attention(g, h, w, io, num_heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                      eps=spec.rms_eps, scale=spec.attn_scale, window=window, softcap=spec.attn_softcap,
                      name=f"{name}.self_attn", precision=precision)
        if spec.sandwich_norms:
            a = rms_norm(g, a, w["post_attention_norm"], spec.rms_eps, f"{name}.post_attention_layernorm")
            ffn_norm = w["pre_feedforward_norm"]
        else:
            ffn_norm = w["post_attention_norm"]
        h, x = _norm_stream(g, x, a, ffn_norm, spec.rms_eps, f"{name}.pre_feedforward_layernorm")
        delta = gated_mlp(g, h, w, spec.activation, f"{name}.mlp", precision)
        if spec.sandwich_norms:
            delta = rms_norm(g, delta, w["post_feedforward_norm"], spec.rms_eps, f"{name}.post_feedforward_layernorm")
        if progress:
            progress(1)

    if not stage.head:
        out = g.op1("Add", [x, delta], outputs=[HIDDEN_OUT]) if delta is not None else x
        g.output(out, "float32", ["batch", "seq", spec.hidden])
    else:
        _append_head(g, x, delta, spec, sd, precision, shared)
    stage.inputs = [v.name for v in g.inputs]
    stage.outputs = [v.name for v in g.outputs]


def _append_head(g: GraphBuilder, x: str, delta: str | None, spec: DecoderSpec, sd: StateDict,
                 precision: Precision, shared: str | None) -> None:
    """Final norm + LM head on the last ``logits_to_keep`` positions of the stream ``x + delta``."""
    head_bits = precision.head_bits
    keep = g.input(LOGITS_TO_KEEP, "int64", [1])
    start = g.op1("Neg", [keep])
    end, axis = g.const_i64([2**62], "slice_end"), g.const_i64([1], "slice_axis")
    x = g.op1("Slice", [x, start, end, axis])
    if delta is not None:
        delta = g.op1("Slice", [delta, start, end, axis])
    h, _ = _norm_stream(g, x, delta, final_norm(sd, spec), spec.rms_eps, "model.norm")
    table = embed_table(sd)
    head = lm_head(sd, spec)
    if precision.name == "source" and precision.lm_head_bits and isinstance(head, BlockWeight):
        # --lm-head-bits on a GGUF package: the head re-quantized (symmetric rtn blocks of 32) from the file's
        # values, the embedding gather still exact -- fewer bytes per token, a measured quality trade
        requant = Precision(f"int{precision.lm_head_bits}", accuracy_level=precision.accuracy_level,
                            symmetric=True, quant_method="rtn")
        logits = linear(g, h, head.dequantize(), "lm_head", requant, bits=precision.lm_head_bits)
    elif shared is not None and spec.tie_embeddings:
        logits = tied_lm_head(g, h, shared, spec.vocab, spec.hidden, head_bits, precision, "lm_head",
                              table=table if isinstance(table, BlockWeight) else None)
    elif spec.tie_embeddings and precision.name in ("fp32", "source") and not isinstance(table, BlockWeight):
        # One fp32 table serves the embedding Gather and, transposed once at load, the head.
        table = g.initializer("model.embed_tokens.weight", embed_table(sd).astype(np.float32))
        logits = g.op1("MatMul", [h, g.op1("Transpose", [table])], name="lm_head")
    else:
        logits = linear(g, h, head, "lm_head", precision, bits=head_bits)
    if spec.final_softcap:
        cap = g.initializer("final_softcap", np.array(spec.final_softcap, np.float32))
        logits = g.op1("Mul", [g.op1("Tanh", [g.op1("Div", [logits, cap])]), cap])
    g.op1("Identity", [logits], outputs=[LOGITS])
    g.output(LOGITS, "float32", ["batch", "logits_seq", spec.vocab])


def build_exit_head(spec: DecoderSpec, sd: StateDict, precision: Precision) -> GraphBuilder:
    """The shared early-exit head: final norm + LM head on any stage's residual stream."""
    g = GraphBuilder("exit_head")
    x = g.input(HIDDEN_IN, "float32", ["batch", "seq", spec.hidden])
    shared = None
    if spec.tie_embeddings and precision.head_bits and not isinstance(embed_table(sd), BlockWeight):
        # The tied table, in the layout the LM head reads.
        quantized_table(g, embed_table(sd), "model.embed_tokens", precision, precision.head_bits)
        shared = "model.embed_tokens"
    _append_head(g, x, None, spec, sd, precision, shared)
    return g


def _kv_scales(g: GraphBuilder, kv: KVPrecision, layer: int) -> tuple[str, str, str]:
    """(k_scale, v_scale, quant type) initializers of LAYER's int8 KV; empty names for float KV."""
    if not kv.quantized:
        return "", "", ""
    k, v = kv.layer_scales(layer)
    return g.initializer(f"k_scale.{layer}", k), g.initializer(f"v_scale.{layer}", v), kv.quant_type


def _norm_stream(g: GraphBuilder, x: str, delta: str | None, weight: np.ndarray, eps: float,
                 name: str) -> tuple[str, str]:
    """Normalize the stream ``x + delta``; returns (normed, new stream value)."""
    if delta is None:
        return rms_norm(g, x, weight, eps, name), x
    return skip_rms_norm(g, delta, x, weight, eps, name)
