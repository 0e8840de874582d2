"""Ways to run one expert from weights loaded at runtime, timed on the random model's expert shape
(gate/up 2*768 x 1024, down 1024 x 768), one token, one compute thread (as the streaming runs
compute), random weights (the times do not depend on the values). Rounds interleaved, medians.

- a session per expert, int4 block-32 weights as external initializers (onnxruntime prepacks them);
- MatMulNBits / QMoE (onnxruntime's fused MoE: a layer's experts as one input, top-k chosen by the
  router input) with the quantized weights as graph inputs, as installed onnxruntime runs them;
- one shared DynamicQuantizeMatMul graph with int8 per-channel weights as inputs: int8-channel
  experts as stored, and int4-channel experts widened at load (what their load costs).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .models import CONFIG


def _timed(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def _model(nodes, inputs, outputs, initializers=()) -> bytes:
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def ffn_options(runs: int = 50, rounds: int = 3) -> dict:
    import onnxruntime as ort
    from edgeinfer.export.moe.expert_store import channel_int4, channel_int8
    from edgeinfer.export.quant.quantize import quantize_blockwise
    from edgeinfer.runtimes import cpu as cpu_runtime
    from onnx import TensorProto, helper

    from edgeinfer.moe.formats import widen_int4

    hid, inter, k = CONFIG["hidden_size"], CONFIG["moe_intermediate_size"], CONFIG["num_experts_per_tok"]
    bs = 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, hid)).astype(np.float32)
    gate_up = (0.02 * rng.standard_normal((2 * inter, hid))).astype(np.float32)
    down = (0.02 * rng.standard_normal((hid, inter))).astype(np.float32)
    vi = helper.make_tensor_value_info

    def so():
        return cpu_runtime.session_options(1)

    def swiglu_graph(matmul) -> tuple[list, str]:
        nodes = [matmul("x", "gate_up", 2 * inter, hid, "gu")]
        nodes.append(helper.make_node("Split", ["gu", "split"], ["g", "u"], axis=-1))
        nodes.append(helper.make_node("QuickGelu", ["g"], ["a"], domain="com.microsoft", alpha=1.0))
        nodes.append(helper.make_node("Mul", ["a", "u"], ["h"]))
        nodes.append(matmul("h", "down", hid, inter, "y"))
        return nodes, "y"

    split = helper.make_tensor("split", TensorProto.INT64, [2], [inter, inter])
    q = {n: quantize_blockwise(w, bits=4, block_size=bs, symmetric=True) for n, w in (("gate_up", gate_up),
                                                                                    ("down", down))}

    def mnb(inp, name, n, kk, out):
        return helper.make_node("MatMulNBits", [inp, f"{name}.qweight", f"{name}.scales"], [out],
                                domain="com.microsoft", K=kk, N=n, bits=4, block_size=bs, accuracy_level=4)

    nodes, _ = swiglu_graph(mnb)
    weight_inputs = [vi(f"{n}.qweight", TensorProto.UINT8, list(q[n].packed.shape)) for n in q]
    weight_inputs += [vi(f"{n}.scales", TensorProto.FLOAT, list(q[n].scales.shape)) for n in q]
    io = ([vi("x", TensorProto.FLOAT, [1, hid])], [vi("y", TensorProto.FLOAT, [1, hid])])
    # (1) a session per expert: the weights as initializers, prepacked when it is made
    placeholders = [helper.make_tensor(f"{n}.qweight", TensorProto.UINT8, q[n].packed.shape, q[n].packed.tobytes(),
                                       raw=True) for n in q]
    placeholders += [helper.make_tensor(f"{n}.scales", TensorProto.FLOAT, q[n].scales.shape,
                                        q[n].scales.tobytes(), raw=True) for n in q]
    per_expert = _model(nodes, io[0], io[1], [split, *placeholders])
    # (2) the same graph, weights as inputs: MatMulNBits unpacks them on every call
    fed = ort.InferenceSession(_model(nodes, io[0] + weight_inputs, io[1], [split]), so(),
                               providers=["CPUExecutionProvider"])
    fed_feeds = {"x": x, **{f"{n}.qweight": q[n].packed for n in q}, **{f"{n}.scales": q[n].scales for n in q}}
    # (3) DynamicQuantizeMatMul with int8 per-channel weights as inputs (int8-channel, widened int4-channel)
    c8 = {n: channel_int8(w) for n, w in (("gate_up", gate_up), ("down", down))}

    def dqmm(inp, name, n, kk, out):
        return helper.make_node("DynamicQuantizeMatMul", [inp, f"{name}.qweight", f"{name}.scales"], [out],
                                domain="com.microsoft")

    nodes8, _ = swiglu_graph(dqmm)
    inputs8 = [vi(f"{n}.qweight", TensorProto.INT8, list(c8[n][0].shape)) for n in c8]
    inputs8 += [vi(f"{n}.scales", TensorProto.FLOAT, list(c8[n][1].shape)) for n in c8]
    shared = ort.InferenceSession(_model(nodes8, io[0] + inputs8, io[1], [split]), so(),
                                  providers=["CPUExecutionProvider"])
    feeds8 = {"x": x, **{f"{n}.qweight": c8[n][0] for n in c8}, **{f"{n}.scales": c8[n][1] for n in c8}}
    c4 = {n: channel_int4(w, bs) for n, w in (("gate_up", gate_up), ("down", down))}
    widened = {n: np.empty((c4[n][0].shape[0] * 2, c4[n][0].shape[1]), np.int8) for n in c4}

    def widen():
        for n in c4:
            widen_int4(c4[n][0], c4[n][1], widened[n])

    def wrap():
        return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feeds8.items() if n != "x"}

    times: dict[str, list] = {}

    def add(name, value):
        times.setdefault(name, []).append(value)

    for _ in range(rounds):
        t0 = time.perf_counter()
        sess = ort.InferenceSession(per_expert, so(), providers=["CPUExecutionProvider"])
        add("session_build_ms", (time.perf_counter() - t0) * 1e3)
        add("session_run_ms", _timed(lambda s=sess: s.run(None, {"x": x}), runs))
        add("matmulnbits_inputs_run_ms", _timed(lambda: fed.run(None, fed_feeds), 5))
        add("int8_channel_run_ms", _timed(lambda: shared.run(None, feeds8), runs))
        add("int8_channel_load_ms", _timed(wrap, runs))
        add("int4_channel_widen_ms", _timed(widen, 20))
    out = {name: float(np.median(v)) for name, v in times.items()}
    out.update(_qmoe(x, hid, inter, k, bs, so, runs))
    out["record_bytes"] = {
        "int4": sum(q[n].packed.nbytes + q[n].scales.nbytes for n in q),
        "int8-channel": sum(a.nbytes + s.nbytes for a, s in c8.values()),
        "int4-channel": sum(p.nbytes + m.nbytes + s.nbytes for p, m, s in c4.values())}
    out["onnxruntime"] = ort.__version__
    out["loadavg"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return out


def _qmoe(x, hid, inter, k, bs, so, runs) -> dict:
    """onnxruntime's QMoE (CPU kernel: interleaved SwiGLU only) with a layer's experts as inputs: the
    router input picks the top-k, so a cache's slots could be fed without a copy; per expert."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    rng = np.random.default_rng(0)
    out = {}
    slots = 16
    for bits in (4, 8):
        per = 8 // bits
        shapes = {"w1": (slots, 2 * inter, hid // per), "s1": (slots, 2 * inter, hid // bs),
                  "w2": (slots, hid, inter // per), "s2": (slots, hid, inter // bs)}
        ins = [vi("x", TensorProto.FLOAT, [1, hid]), vi("r", TensorProto.FLOAT, [1, slots])]
        ins += [vi(n, TensorProto.UINT8 if n[0] == "w" else TensorProto.FLOAT, list(s)) for n, s in shapes.items()]
        node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", k=k,
                                expert_weight_bits=bits, activation_type="swiglu", swiglu_fusion=1,
                                normalize_routing_weights=1, block_size=bs, accuracy_level=4)
        try:
            sess = ort.InferenceSession(_model([node], ins, [vi("y", TensorProto.FLOAT, [1, hid])]), so(),
                                        providers=["CPUExecutionProvider"])
            feeds = {"x": x, "r": np.where(np.arange(slots) < k, 1.0, 0.0).astype(np.float32)[None]}
            for n, s in shapes.items():
                feeds[n] = rng.integers(0, 255, s, dtype=np.uint8) if n[0] == "w" else np.full(s, 0.01, np.float32)
            out[f"qmoe_int{bits}_run_ms"] = _timed(lambda s=sess, f=feeds: s.run(None, f), 10) / k
        except Exception as e:  # an onnxruntime without this kernel: say so in the table
            out[f"qmoe_int{bits}_error"] = str(e).strip().splitlines()[0][:120]
    return out
