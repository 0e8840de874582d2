"""Ways to run one cached expert, timed: sessions with various options, shared graphs with the
weights as inputs, onnxruntime's QMoE, numpy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .models import CONFIG, PKG_INT8


def ffn_options(pkg: Path, runs: int = 100, rounds: int = 5) -> dict:
    """Ways to run one cached expert (decode: one row), timed on the bench model's expert shape with
    one compute thread (as the streaming runs compute). Loading and calling are timed for every option
    in each of ROUNDS interleaved rounds; medians reported (the machine is shared)."""
    import onnxruntime as ort
    from edgeinfer.export.quant.quantize import BlockQuantized
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.moe.store import ExpertStore
    from edgeinfer.package import open_package

    dec = MoEDecoder(open_package(pkg, verify=False), resolve_provider("cpu", 1), max_context=64, prefetch=False)
    cache = dec.cache
    store: ExpertStore = cache.store
    h = np.random.default_rng(0).standard_normal((1, CONFIG["hidden_size"])).astype(np.float32)
    records = [store.read(0, e) for e in range(8)]

    def timed(fn, n=runs):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def session_option(config: dict, arena: bool = True):
        """Builds one expert's session with these options; returns a function that runs it."""
        def build(tensors):
            so = cache.session_options()
            so.enable_cpu_mem_arena = so.enable_mem_pattern = arena
            for k, v in config.items():
                so.add_session_config_entry(k, v)
            so.add_external_initializers(list(tensors), [ort.OrtValue.ortvalue_from_numpy(a) for a in tensors.values()])
            s = ort.InferenceSession(cache.ffn_graph, so, providers=["CPUExecutionProvider"])
            return lambda: s.run(None, {"expert_in": h})
        return build

    # session: what the int4 store does (prepacked); noprepack: the same without prepacking (what is left
    # is creating the session itself: graph, kernels, planning); lean: no arena, memory patterns, spinning.
    options = {"session": (session_option({}), runs),
               "noprepack": (session_option({"session.disable_prepacking": "1"}), 5),
               "lean": (session_option({"session.intra_op.allow_spinning": "0"}, arena=False), runs)}
    int8 = _int8_channel_option(h)
    if int8 is not None:
        options["int8_channel"] = (int8[0], runs)
    times: dict = {k: ([], []) for k in options}
    for _ in range(rounds):
        for name, (build, n) in options.items():
            src = int8[2] if name == "int8_channel" else records
            t0 = time.perf_counter()
            for t in src:
                run = build(t)
            times[name][0].append((time.perf_counter() - t0) / len(src) * 1e3)
            times[name][1].append(timed(run, n))
    out = {}
    for name, (builds, calls) in times.items():
        out[f"{name}_build_ms"], out[f"{name}_run_ms"] = float(np.median(builds)), float(np.median(calls))
    if int8 is not None:
        out["int8_channel_record_bytes"] = int8[1]
    # The same graph with the weights as graph inputs: MatMulNBits then unpacks them on every call.
    tensors = records[0]
    import onnx

    model = onnx.load_from_string(cache.ffn_graph)
    names = {t.name for t in model.graph.initializer}
    for init in [t for t in model.graph.initializer if t.name in tensors]:
        model.graph.initializer.remove(init)
        dt = onnx.TensorProto.UINT8 if tensors[init.name].dtype == np.uint8 else onnx.TensorProto.FLOAT
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, dt, list(tensors[init.name].shape)))
    fed = ort.InferenceSession(model.SerializeToString(), cache.session_options(), providers=["CPUExecutionProvider"])
    feeds = {"expert_in": h, **{k: v for k, v in tensors.items() if k in names}}
    out["weights_as_inputs_ms"] = timed(lambda: fed.run(None, feeds), n=10)
    out.update(_qmoe_option(h, timed))
    # numpy on weights dequantized once (8x the bytes of int4 in the cache).
    inter, hid = CONFIG["moe_intermediate_size"], CONFIG["hidden_size"]
    bs = 32

    def deq(prefix, n, k):
        q = BlockQuantized(tensors[prefix + ".qweight"], tensors[prefix + ".scales"], np.zeros((n, 0), np.uint8), 4,
                           bs, n, k)
        return np.ascontiguousarray(q.dequantize().T)

    wgu, wd = deq("gate_up", 2 * inter, hid), deq("down", hid, inter)

    def numpy_ffn():
        gu = h @ wgu
        g, u = gu[:, :inter], gu[:, inter:]
        return (g / (1 + np.exp(-g)) * u) @ wd

    out["numpy_fp32_ms"] = float(np.median([timed(numpy_ffn) for _ in range(rounds)]))
    out["numpy_dequantize_ms"] = timed(lambda: (deq("gate_up", 2 * inter, hid), deq("down", hid, inter)), n=5)
    out["record_bytes"] = store.record_size
    out["numpy_fp32_bytes"] = wgu.nbytes + wd.nbytes
    out["loadavg"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    dec.close()
    return out


def _qmoe_option(h: np.ndarray, timed) -> dict:
    """onnxruntime's fused com.microsoft.QMoE (CPU kernel in 1.31, SwiGLU with fused gate/up only)
    with the weights as graph inputs: the top-k experts of a layer gathered into one tensor per call.
    Timed per expert on random weights of the bench's shapes (the time does not depend on the values)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, hid, inter = CONFIG["num_experts_per_tok"], CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
    rng = np.random.default_rng(0)
    out = {}
    for bits in (4, 8):
        per_byte = 8 // bits
        shapes = {"w1": (k, 2 * inter, hid // per_byte), "s1": (k, 2 * inter), "w2": (k, hid, inter // per_byte),
                  "s2": (k, hid)}
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hid]),
                  helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, k])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.UINT8 if n[0] == "w" else TensorProto.FLOAT, list(s))
                   for n, s in shapes.items()]
        node = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", k=k,
                                expert_weight_bits=bits, activation_type="swiglu", swiglu_fusion=1,
                                normalize_routing_weights=1)
        graph = helper.make_graph([node], "qmoe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [1, hid])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        from edgeinfer.runtimes import cpu as cpu_runtime

        try:
            sess = ort.InferenceSession(model.SerializeToString(), cpu_runtime.session_options(1),
                                        providers=["CPUExecutionProvider"])
            feeds = {"x": h, "r": np.ones((1, k), np.float32)}
            for n, s in shapes.items():
                feeds[n] = (rng.integers(0, 255, s, dtype=np.uint8) if n[0] == "w"
                            else np.full(s, 0.01, np.float32))
            out[f"qmoe_int{bits}_run_ms"] = timed(lambda s=sess, f=feeds: s.run(None, f), n=10) / k
        except Exception as e:  # an onnxruntime without the CPU kernel: say so in the table
            out[f"qmoe_int{bits}_error"] = str(e).strip().splitlines()[0][:120]
    return out


def _int8_channel_option(h: np.ndarray):
    """The int8-channel package's expert (if that package is built): a function that makes a read record
    runnable on the shared graph (OrtValues bound to its weight inputs) and returns its runner; the
    record size; eight read records."""
    import onnxruntime as ort
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    if not (PKG_INT8 / "edgeinfer.json").is_file():
        return None
    dec = MoEDecoder(open_package(PKG_INT8, verify=False), resolve_provider("cpu", 1), max_context=64, prefetch=False)
    cache = dec.cache
    records = [cache.store.read(0, e) for e in range(8)]
    out = np.zeros_like(h)
    x = ort.OrtValue.ortvalue_from_numpy(h)
    y = ort.OrtValue.ortvalue_from_numpy(out)

    def build(tensors):
        b = cache.shared_session.io_binding()
        b.bind_ortvalue_input("expert_in", x)
        b.bind_ortvalue_output("expert_out", y)
        for name, a in tensors.items():
            b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(a))
        return lambda: cache.shared_session.run_with_iobinding(b)

    return build, cache.store.record_size, records
