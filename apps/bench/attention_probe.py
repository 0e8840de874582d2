"""One decode step's attention of one layer, four ways, on onnxruntime's CPU provider: is there a faster
attention than GroupQueryAttention among the plain operators?

    .venv/bin/python apps/bench/attention_probe.py                  # SmolLM2-135M's shape, 512 and 2,048 past
    .venv/bin/python apps/bench/attention_probe.py --past 256,4096 --heads 9 --kv-heads 3 --head-dim 64

- ``gqa``: com.microsoft GroupQueryAttention over a (1, KV heads, capacity, head dim) buffer shared by past
  and present (what the packages run; it writes the new row in place);
- ``blockdiag``: the cache as (positions, KV heads * head dim) rows; the scores as one MatMul against a
  block-diagonal matrix of the queries, Softmax, one MatMul with the values, the diagonal blocks kept;
- ``per-head``: one Gemm (keys transposed) and one MatMul per KV head over contiguous views of the very
  buffers GroupQueryAttention wrote (each head's first positions are contiguous);
- ``attention23``: ONNX Attention (opset 23) with the past as inputs (it concatenates them each call).

The last three read a cache that already holds the new token (the runtime would have to write it); each is
checked against GroupQueryAttention's output, then all are timed in interleaved rounds (thread pools not
spinning between calls, so the sessions do not steal each other's cores). docs/kv-cache.md has the results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _session(graph, opset: int, threads: int) -> ort.InferenceSession:
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=imports, ir_version=10)
    from edgeinfer.runtimes.cpu import compatible_session_options

    so = compatible_session_options()  # in a process whose models share onnxruntime's global pool: that pool
    if so.use_per_session_threads:
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _io(name: str, shape) -> object:
    return helper.make_tensor_value_info(name, F, shape)


def gqa_graph(h: int, kv: int, d: int, capacity: int):
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"],
                            ["o", "present_k", "present_v"], domain="com.microsoft", num_heads=h,
                            kv_num_heads=kv, scale=d ** -0.5)
    ins = [_io("q", [1, 1, h * d]), _io("k", [1, 1, kv * d]), _io("v", [1, 1, kv * d]),
           _io("pk", [1, kv, capacity, d]), _io("pv", [1, kv, capacity, d]),
           helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    return helper.make_graph([node], "gqa", ins, [_io("o", None), _io("present_k", None), _io("present_v", None)])


def blockdiag_graph(h: int, kv: int, d: int):
    group = h // kv
    mask = np.zeros((kv * d, h), np.float32)
    for j in range(h):
        mask[(j // group) * d:(j // group + 1) * d, j] = 1
    nodes = [helper.make_node("Reshape", ["q", "hd"], ["q2"]),
             helper.make_node("Transpose", ["q2"], ["qt"], perm=[1, 0]),
             helper.make_node("Tile", ["qt", "reps"], ["qtile"]),
             helper.make_node("Mul", ["qtile", "mask"], ["qblocks"]),
             helper.make_node("MatMul", ["K", "qblocks"], ["scores_t"]),
             helper.make_node("Transpose", ["scores_t"], ["scores"], perm=[1, 0]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "V"], ["ov"]),
             helper.make_node("Mul", ["ov", "mask_t"], ["ovm"]),
             helper.make_node("Reshape", ["ovm", "h_kv_d"], ["ov3"]),
             helper.make_node("ReduceSum", ["ov3", "axis1"], ["o2"], keepdims=0),
             helper.make_node("Reshape", ["o2", "out_shape"], ["o"])]
    inits = [numpy_helper.from_array(np.array([h, d], np.int64), "hd"),
             numpy_helper.from_array(np.array([kv, 1], np.int64), "reps"),
             numpy_helper.from_array(mask * d ** -0.5, "mask"), numpy_helper.from_array(mask.T.copy(), "mask_t"),
             numpy_helper.from_array(np.array([h, kv, d], np.int64), "h_kv_d"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([1, 1, h * d], np.int64), "out_shape")]
    ins = [_io("q", [1, 1, h * d]), _io("K", ["T", kv * d]), _io("V", ["T", kv * d])]
    return helper.make_graph(nodes, "blockdiag", ins, [_io("o", None)], initializer=inits)


def per_head_graph(h: int, kv: int, d: int):
    group = h // kv
    heads = range(kv)
    nodes = [helper.make_node("Reshape", ["q", "hd"], ["q_rows"]),
             helper.make_node("Split", ["q_rows", "groups"], [f"q_head{i}" for i in heads], axis=0)]
    nodes += [helper.make_node("Gemm", [f"q_head{i}", f"K{i}"], [f"s{i}"], transB=1, alpha=d ** -0.5) for i in heads]
    nodes += [helper.make_node("Concat", [f"s{i}" for i in heads], ["s"], axis=0),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("Split", ["p", "groups"], [f"p{i}" for i in heads], axis=0)]
    nodes += [helper.make_node("MatMul", [f"p{i}", f"V{i}"], [f"ov{i}"]) for i in heads]
    nodes += [helper.make_node("Concat", [f"ov{i}" for i in heads], ["oc"], axis=0),
              helper.make_node("Reshape", ["oc", "out_shape"], ["o"])]
    inits = [numpy_helper.from_array(np.array([h, d], np.int64), "hd"),
             numpy_helper.from_array(np.array([group] * kv, np.int64), "groups"),
             numpy_helper.from_array(np.array([1, 1, h * d], np.int64), "out_shape")]
    ins = [_io("q", [1, 1, h * d])] + [_io(f"{n}{i}", ["T", d]) for n in "KV" for i in heads]
    return helper.make_graph(nodes, "per_head", ins, [_io("o", None)], initializer=inits)


def attention23_graph(h: int, kv: int, d: int):
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "present_k", "present_v"],
                            q_num_heads=h, kv_num_heads=kv, scale=d ** -0.5)
    ins = [_io("q", [1, 1, h * d]), _io("k", [1, 1, kv * d]), _io("v", [1, 1, kv * d]),
           _io("pk", [1, kv, "P", d]), _io("pv", [1, kv, "P", d])]
    return helper.make_graph([node], "attention23", ins, [_io("o", None), _io("present_k", None),
                                                          _io("present_v", None)])


def probe(past: int, h: int, kv: int, d: int, capacity: int, threads: int, rounds: int, calls: int) -> dict:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, h * d), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, kv * d), dtype=np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((1, kv, capacity, d), dtype=np.float32) for _ in range(2))
    total = past + 1
    runs = {}
    gqa = _session(gqa_graph(h, kv, d, capacity), 17, threads)
    b = gqa.io_binding()
    caches = [ort.OrtValue.ortvalue_from_numpy(x) for x in (pk, pv)]
    for name, value in (("q", q), ("k", k), ("v", v), ("seqlens", np.array([past], np.int32)),
                        ("total", np.array(total, np.int32))):
        b.bind_cpu_input(name, value)
    b.bind_ortvalue_input("pk", caches[0])
    b.bind_ortvalue_input("pv", caches[1])
    b.bind_output("o")
    b.bind_ortvalue_output("present_k", caches[0])
    b.bind_ortvalue_output("present_v", caches[1])
    gqa.run_with_iobinding(b)  # writes the new row at position PAST of pk/pv
    want = b.copy_outputs_to_cpu()[0]
    runs["gqa"] = (gqa, b)

    rows = [np.ascontiguousarray(x[0, :, :total].transpose(1, 0, 2).reshape(total, kv * d)) for x in (pk, pv)]
    s = _session(blockdiag_graph(h, kv, d), 17, threads)
    bb = s.io_binding()
    bb.bind_cpu_input("q", q)
    bb.bind_cpu_input("K", rows[0])
    bb.bind_cpu_input("V", rows[1])
    bb.bind_output("o")
    runs["blockdiag"] = (s, bb)

    s = _session(per_head_graph(h, kv, d), 17, threads)
    bb = s.io_binding()
    bb.bind_cpu_input("q", q)
    for i in range(kv):
        for n, buf in (("K", pk), ("V", pv)):
            view = buf[0, i, :total]  # contiguous: one head's first positions
            bb.bind_input(f"{n}{i}", "cpu", 0, np.float32, [total, d], view.ctypes.data)
    bb.bind_output("o")
    runs["per-head"] = (s, bb)

    s = _session(attention23_graph(h, kv, d), 23, threads)
    bb = s.io_binding()
    for name, value in (("q", q), ("k", k), ("v", v), ("pk", np.ascontiguousarray(pk[:, :, :past])),
                        ("pv", np.ascontiguousarray(pv[:, :, :past]))):
        bb.bind_cpu_input(name, value)
    bb.bind_output("o")
    bb.bind_output("present_k")
    bb.bind_output("present_v")
    runs["attention23"] = (s, bb)

    out = {"past": past, "max_abs_diff": {}, "us": {n: [] for n in runs}}
    for name, (sess, binding) in runs.items():
        if name != "gqa":
            sess.run_with_iobinding(binding)
            out["max_abs_diff"][name] = float(np.abs(binding.copy_outputs_to_cpu()[0].reshape(want.shape)
                                                     - want).max())
    for _ in range(rounds):
        for name, (sess, binding) in runs.items():  # GQA's further calls rewrite the same row: same work
            t = time.perf_counter()
            for _ in range(calls):
                sess.run_with_iobinding(binding)
            out["us"][name].append((time.perf_counter() - t) / calls * 1e6)
    out["median_us"] = {n: statistics.median(t) for n, t in out["us"].items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", default="512,2048", help="past tokens, comma-separated")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=4096, help="the KV buffer's positions (GroupQueryAttention)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args(argv)
    print("| past tokens | " + " | ".join(["gqa µs", "blockdiag µs", "per-head µs", "attention23 µs"])
          + " | best / gqa | largest difference from gqa |")
    print("|---|---|---|---|---|---|---|")
    for past in (int(p) for p in args.past.split(",")):
        if past + 1 > args.capacity:
            raise SystemExit(f"--past {past} does not fit --capacity {args.capacity}.")
        r = probe(past, args.heads, args.kv_heads, args.head_dim, args.capacity, args.threads, args.rounds,
                  args.calls)
        med = r["median_us"]
        best = min(v for n, v in med.items() if n != "gqa")
        print(f"| {past} | " + " | ".join(f"{med[n]:.1f}" for n in ("gqa", "blockdiag", "per-head", "attention23"))
              + f" | {med['gqa'] / best:.2f}x | {max(r['max_abs_diff'].values()):.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
