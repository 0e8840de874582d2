"""Export a sparse-MoE decoder: small per-layer graphs plus an expert store.

The runtime must choose experts between a layer's attention and its
feed-forward, and load the ones it lacks from disk, so a sparse layer's graph
stops at the router: it takes the residual stream, runs attention over its KV
buffer, and returns the stream after attention, the normalized feed-forward
input, the router logits (fp32, whatever the precision: routing decisions
should not move with quantization), and, for Qwen2-MoE, the shared expert's
gated output. Dense layers among sparse ones are whole layers.

Around the layers: an ``embed`` graph (ids → stream), a ``head`` graph (final
norm + LM head on the last positions), and ``expert_ffn``: one expert's
gated MLP whose weights are initializers the runtime supplies from the expert
store (declared as external data; the runtime replaces them, so the graph
file holds no weights) or, for ``int8-channel`` and ``int4-channel`` experts
(``expert_bits=8`` / ``4``), graph inputs the runtime binds to the cached expert
(one session for all experts). ``experts/routers.npy`` and ``experts/router_norms.npy`` give the runtime
every layer's router and pre-feed-forward norm, which it applies to the current
stream to predict — and prefetch — the next layer's experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from edgeinfer.export.base import ExportResult, PackageBuild
from edgeinfer.export.decoder import graph as dg
from edgeinfer.export.graph.blocks import (
    AttentionIO,
    Precision,
    attention,
    checked_context_and_precision,
    embedding,
    gated_mlp,
    linear,
    rms_norm,
    rotary_cache,
)
from edgeinfer.export.graph.onnx_graph import MS_DOMAIN, GraphBuilder
from edgeinfer.export.moe.calibrate import calibrate
from edgeinfer.export.moe.expert_store import ExpertStoreWriter
from edgeinfer.export.progress import progress_bar
from edgeinfer.models.moe import (
    LayerExperts,
    MoESpec,
    attention_weights,
    dense_mlp_weights,
    router_weight,
    shared_expert_weights,
)
from onnx import TensorProto

from edgeinfer.errors import ExportError
from edgeinfer.moe.formats import CHANNEL_INT4, CHANNEL_INT8, graph_inputs
from edgeinfer.package import ExpertsSpec, GenerationSpec, GraphEntry, KVCacheSpec, Manifest, TokenizerSpec

STREAM = "stream"
FFN_IN = "ffn_in"
ROUTER_LOGITS = "router_logits"
SHARED_OUT = "shared_out"
EXPERT_IN = "expert_in"
EXPERT_OUT = "expert_out"
STORE_FILE = "experts/experts.bin"
ROUTERS_FILE = "experts/routers.npy"
ROUTER_NORMS_FILE = "experts/router_norms.npy"
_FP32 = Precision("fp32")


def build_embed(spec: MoESpec, sd: Mapping, precision: Precision) -> GraphBuilder:
    g = GraphBuilder("embed")
    ids = g.input(dg.INPUT_IDS, "int64", ["batch", "seq"])
    x, _ = embedding(g, ids, sd["model.embed_tokens.weight"], "model.embed_tokens", precision, precision.bits)
    g.op1("Identity", [x], outputs=[dg.HIDDEN_OUT])
    g.output(dg.HIDDEN_OUT, "float32", ["batch", "seq", spec.dense.hidden])
    return g


def build_layer(spec: MoESpec, sd: Mapping, i: int, precision: Precision, max_context: int) -> GraphBuilder:
    """Layer I: attention, then either the router (sparse) or the whole dense MLP."""
    d = spec.dense
    g = GraphBuilder(f"layer{i}")
    x = g.input(dg.HIDDEN_IN, "float32", ["batch", "seq", d.hidden])
    seqlens = g.input(dg.SEQLENS_K, "int32", ["batch"])
    total = g.input(dg.TOTAL_SEQ_LEN, "int32", [])
    kv_shape = ["batch", d.kv_heads, "max_context", d.head_dim]
    for name in (dg.past_key(i), dg.past_value(i)):
        g.input(name, "float32", kv_shape)
    cos, sin = rotary_cache(d.head_dim, max_context, d.rope_theta, d.rope_scaling)
    io = AttentionIO(dg.past_key(i), dg.past_value(i), dg.present_key(i), dg.present_value(i), seqlens, total,
                     g.initializer("cos_cache", cos), g.initializer("sin_cache", sin))
    w = attention_weights(sd, i, spec)
    name = f"model.layers.{i}"
    h = rms_norm(g, x, w["input_norm"], d.rms_eps, f"{name}.input_layernorm")
    if spec.full_width_qk_norm:
        a = _full_width_norm_attention(g, h, w, io, spec, f"{name}.self_attn", precision, d.windows[i])
    else:
        a = attention(g, h, w, io, num_heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim, eps=d.rms_eps,
                      scale=d.attn_scale, window=d.windows[i], softcap=0.0, name=f"{name}.self_attn",
                      precision=precision)
    out = g.op("SkipSimplifiedLayerNormalization",
               [a, x, g.initializer(f"{name}.post_attention_layernorm.weight", w["post_attention_norm"])], 4,
               domain=MS_DOMAIN, name=f"{name}.post_attention_layernorm", epsilon=d.rms_eps)
    h, stream = out[0], out[3]
    if not spec.is_sparse(i):
        mlp = gated_mlp(g, h, dense_mlp_weights(sd, i), "silu", f"{name}.mlp", precision)
        g.op1("Add", [stream, mlp], outputs=[dg.HIDDEN_OUT])
        g.output(dg.HIDDEN_OUT, "float32", ["batch", "seq", d.hidden])
    else:
        g.op1("Identity", [stream], outputs=[STREAM])
        g.op1("Identity", [h], outputs=[FFN_IN])
        g.op1("Identity", [linear(g, h, router_weight(sd, i), f"{name}.mlp.gate", _FP32)], outputs=[ROUTER_LOGITS])
        for n in (STREAM, FFN_IN):
            g.output(n, "float32", ["batch", "seq", d.hidden])
        g.output(ROUTER_LOGITS, "float32", ["batch", "seq", spec.num_experts])
        if spec.shared_expert_intermediate:
            sw = shared_expert_weights(sd, i)
            shared = gated_mlp(g, h, sw, "silu", f"{name}.mlp.shared_expert", precision)
            gate = g.op1("Sigmoid", [linear(g, h, sw["shared_gate"], f"{name}.mlp.shared_expert_gate", _FP32)])
            g.op1("Mul", [shared, gate], outputs=[SHARED_OUT])
            g.output(SHARED_OUT, "float32", ["batch", "seq", d.hidden])
    g.output(dg.present_key(i), "float32", kv_shape)
    g.output(dg.present_value(i), "float32", kv_shape)
    return g


def _full_width_norm_attention(g: GraphBuilder, x: str, w: dict, io: AttentionIO, spec: MoESpec, name: str,
                               precision: Precision, window: int) -> str:
    """OLMoE attention: RMSNorm over the whole q and k projections, optional clipping of q, k, v."""
    d = spec.dense
    qkv = []
    for n in "qkv":
        y = linear(g, x, w[n], f"{name}.{n}_proj", precision, bias=w.get(f"{n}_bias"))
        if n in "qk":
            y = rms_norm(g, y, w[f"{n}_norm"], d.rms_eps, f"{name}.{n}_norm")
        if spec.clip_qkv is not None:
            lim = spec.clip_qkv
            y = g.op1("Clip", [y, g.initializer("clip_min", np.array(-lim, np.float32)),
                               g.initializer("clip_max", np.array(lim, np.float32))])
        qkv.append(y)
    out = g.op("GroupQueryAttention",
               [*qkv, io.past_key, io.past_value, io.seqlens_k, io.total_seq_len, io.cos_cache, io.sin_cache],
               3, domain=MS_DOMAIN, name=f"{name}.attn", outputs=[f"{name}.attn/out", io.present_key, io.present_value],
               num_heads=d.heads, kv_num_heads=d.kv_heads, do_rotary=1, scale=d.attn_scale,
               local_window_size=window, softcap=0.0)
    return linear(g, out[0], w["o"], f"{name}.o_proj", precision)


def build_expert_ffn(spec: MoESpec, layout: list[dict], precision: Precision,
                     weights_as_inputs: bool = False) -> GraphBuilder:
    """One expert's ``down(silu(gate(x)) * up(x))`` on (tokens, hidden) rows; weights come from the store.

    WEIGHTS_AS_INPUTS (``int8-channel`` records): the weights are graph inputs and each
    projection a ``DynamicQuantizeMatMul`` (int8 activations per call, int8 weights with
    per-channel scales), whose int8 GEMM packs a non-constant weight on every call at a
    small cost; MatMulNBits would instead unpack int4 blocks to fp32 on every call
    (~100x slower, ``apps/bench/moe.py ffn-options``)."""
    hidden, inter = spec.dense.hidden, spec.expert_intermediate
    g = GraphBuilder("expert_ffn")
    x = g.input(EXPERT_IN, "float32", ["tokens", hidden])
    for t in layout:
        if weights_as_inputs:
            g.input(t["name"], t["dtype"], t["shape"])
        else:
            _placeholder(g, t)

    def matmul(inp: str, name: str, k: int, n: int) -> str:
        if weights_as_inputs:
            return g.op1("DynamicQuantizeMatMul", [inp, f"{name}.qweight", f"{name}.scales"], domain=MS_DOMAIN,
                         name=name)
        if not precision.bits:
            return g.op1("MatMul", [inp, f"{name}.weight"], name=name)
        inputs = [inp, f"{name}.qweight", f"{name}.scales"]
        if any(t["name"] == f"{name}.zero_points" for t in layout):
            inputs.append(f"{name}.zero_points")
        return g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=precision.bits,
                     block_size=precision.block_size, accuracy_level=precision.accuracy_level)

    gate_up = matmul(x, "gate_up", hidden, 2 * inter)
    gate, up = g.op("Split", [gate_up, g.const_i64([inter, inter], "split")], 2, axis=-1)
    act = g.op1("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0)  # x * sigmoid(x)
    g.op1("Identity", [matmul(g.op1("Mul", [act, up]), "down", inter, hidden)], outputs=[EXPERT_OUT])
    g.output(EXPERT_OUT, "float32", ["tokens", hidden])
    return g


def _placeholder(g: GraphBuilder, t: dict) -> None:
    """An initializer without data: the runtime supplies it (add_external_initializers)."""
    dtypes = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}
    tp = TensorProto()
    tp.name = t["name"]
    tp.data_type = dtypes[t["dtype"]]
    tp.dims.extend(t["shape"])
    tp.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "expert-store-record"), ("offset", "0"), ("length", str(t["nbytes"]))):
        entry = tp.external_data.add()
        entry.key, entry.value = key, value
    g.add_initializer_proto(tp)


def export_moe(src, out: Path, spec: MoESpec, prec: Precision, ctx: int, force: bool, progress,
               expert_bits: int | None = None, calibrate_routing: bool = True) -> ExportResult:
    """Write the package. ``src`` is a SourceModel (its state dict may be lazy).

    EXPERT_BITS=8/4 stores the routed experts as ``int8-channel``/``int4-channel`` records (fed to
    one shared graph); None stores them at the package precision. CALIBRATE_ROUTING runs the package
    over calibration text to record routing frequencies and lay the store out (calibrate.py)."""
    sd, d = src.state_dict, spec.dense
    if prec.name not in ("int4", "int8", "fp32"):
        raise ExportError(f"MoE packages are int4, int8 or fp32 (got {prec.name}): choose one of those.")
    if expert_bits not in (None, 4, 8):
        raise ExportError(f"--expert-bits takes 4 or 8 (int4/int8 experts fed to one shared graph), not {expert_bits}.")
    if (prec.bits and not expert_bits) or expert_bits == 4:
        for what, k in (("expert width", spec.expert_intermediate), ("hidden size", d.hidden)):
            if k % prec.block_size or (expert_bits and k % 2):
                raise ExportError(f"--block-size {prec.block_size} does not divide the {what} {k}: "
                                  "choose a smaller power of two.")
    with PackageBuild(out, force) as build:
        tmp, save, graphs = build.folder, build.save_graph, build.graphs
        save(build_embed(spec, sd, prec), {"role": "embed"})
        store = ExpertStoreWriter(tmp / STORE_FILE, STORE_FILE, d.layers, spec.num_experts,
                                  {None: prec.name, 4: CHANNEL_INT4, 8: CHANNEL_INT8}[expert_bits], prec.block_size,
                                  prec.symmetric)
        routers = np.zeros((d.layers, spec.num_experts, d.hidden), np.float32)
        norms = np.zeros((d.layers, d.hidden), np.float32)
        for i in range(d.layers):
            save(build_layer(spec, sd, i, prec, ctx), {"role": "moe_layer", "layer": i, "sparse": spec.is_sparse(i)})
            if spec.is_sparse(i):
                routers[i] = router_weight(sd, i)
                norms[i] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
                experts = LayerExperts(sd, i, spec.num_experts)
                for e in range(spec.num_experts):
                    store.add(i, e, *experts[e])
                del experts
            progress(1)
        index = store.close()
        if index["layers"]:
            layout = graph_inputs(index) if expert_bits else index["tensors"]
            save(build_expert_ffn(spec, layout, prec, weights_as_inputs=bool(expert_bits)), {"role": "expert_ffn"})
        save(_renamed(dg.build_exit_head(d, sd, prec), "head"), {"role": "head"})
        np.save(tmp / ROUTERS_FILE, routers)
        np.save(tmp / ROUTER_NORMS_FILE, norms)
        build.write_tokenizer(src.tokenizer_json)
        manifest = _manifest(src, spec, prec, ctx, graphs, index)
        build.write_manifest(manifest)
        if index["layers"] and calibrate_routing:  # routing on calibration text: residency and layout
            build.write_manifest(dataclasses.replace(manifest, moe=calibrate(tmp, manifest.moe, STORE_FILE)))
    return build.result()


def _renamed(g: GraphBuilder, name: str) -> GraphBuilder:
    g.name = name
    return g


def _manifest(src, spec: MoESpec, prec: Precision, ctx: int, graphs: list[dict], index: dict) -> Manifest:
    from edgeinfer import __version__

    d = spec.dense
    return Manifest(
        kind="decoder", family=spec.family, name=src.name,
        source={"kind": src.kind, "location": src.location, "model_type": src.config.get("model_type")},
        exporter={"edgeinfer": __version__},
        architecture=d.as_manifest(),
        graphs=[GraphEntry.from_dict(g) for g in graphs],
        io={**dg.decoder_io(), "stream": STREAM, "ffn_in": FFN_IN, "router_logits": ROUTER_LOGITS,
            "shared_out": SHARED_OUT, "expert_in": EXPERT_IN, "expert_out": EXPERT_OUT},
        kv_cache=KVCacheSpec(layout="BNSH", dtype="float32", num_layers=d.layers, num_kv_heads=d.kv_heads,
                             head_dim=d.head_dim, max_context=ctx, shared_buffer=True, sliding_windows=d.windows),
        quantization=prec.describe(),
        moe=ExpertsSpec.from_dict({**spec.as_manifest(), "expert_store": index,
                               "router": {"weights": ROUTERS_FILE, "norms": ROUTER_NORMS_FILE, "eps": d.rms_eps}}),
        tokenizer=TokenizerSpec.from_dict({"file": "tokenizer.json", "chat_template": src.chat_template,
                                           **src.special}),
        generation=GenerationSpec.from_dict({"max_new_tokens": 256, **src.generation}))


def export_moe_source(src, out: Path, precision: str, *, max_context: int | None, stages, exits, force: bool,
                      lm_head_bits: int | None, block_size: int, accuracy_level: int, symmetric: bool,
                      progress: bool, expert_bits: int | None = None) -> ExportResult:
    """``export_model`` for MoE families: checks the options, then writes the package."""
    from edgeinfer.models.moe import spec_from_config

    if stages or exits:
        raise ExportError("stages and exits are not built for MoE models: export without --stages/--exits.")
    try:
        spec = spec_from_config(src.config)
    except (ValueError, KeyError) as e:
        raise ExportError(f"cannot export this {src.config.get('model_type')} model: {e}.") from None
    d = spec.dense
    ctx, prec = checked_context_and_precision(d.max_position, d.hidden, max_context, precision,
                                              block_size=block_size, lm_head_bits=lm_head_bits,
                                              accuracy_level=accuracy_level, symmetric=symmetric)
    bar = progress_bar(d.layers, "building MoE graphs and expert store", progress)
    try:
        return export_moe(src, Path(out), spec, prec, ctx, force, bar.update, expert_bits)
    finally:
        bar.close()
