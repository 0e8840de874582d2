"""8-bit MatMulNBits at float accuracy levels are written as two 4-bit halves (export/graph/int8_halves.py):
the same product to float rounding, through onnxruntime, for symmetric and zero-point blocks, with a bias
and for a head that reads a tied embedding's table through a Reshape; level 4 is left alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from edgeinfer.export.graph.onnx_graph import MS_DOMAIN, GraphBuilder
from edgeinfer.runtimes.cpu import compatible_session_options
from onnx import helper

N, K, BLOCK = 40, 96, 32
BLOCKS = K // BLOCK


def _weights(seed: int, zero_points: bool):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, size=(N, BLOCKS, BLOCK), dtype=np.uint8)
    scales = (rng.random((N, BLOCKS)) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(90, 170, size=(N, BLOCKS), dtype=np.uint8) if zero_points else np.full((N, BLOCKS), 128, np.uint8)
    dense = ((q.astype(np.float64) - zp[..., None]) * scales[..., None]).reshape(N, K)
    return q, scales, (zp if zero_points else None), dense


def _run(g: GraphBuilder, feeds: dict):
    """(the graph's outputs, the model written)."""
    model = g.to_model()
    sess = ort.InferenceSession(model.SerializeToString(), compatible_session_options(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds), model


def _nbits(model) -> list[tuple[int, int]]:
    """(bits, accuracy_level) of every MatMulNBits in MODEL."""
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            out.append((a["bits"], a["accuracy_level"]))
    return out


@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_float_level_int8_matmul_becomes_two_halves_with_the_same_product(zero_points, bias):
    q, scales, zp, dense = _weights(1, zero_points)
    b = np.linspace(-1, 1, N).astype(np.float32) if bias else None
    g = GraphBuilder("t")
    x = g.input("x", "float32", [1, "s", K])
    inputs = [x, g.initializer("w.q", q), g.initializer("w.s", scales)]
    inputs.append(g.initializer("w.z", zp) if zp is not None else "")
    if b is not None:
        inputs += ["", g.initializer("w.b", b)]
    while inputs[-1] == "":
        inputs.pop()
    y = g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, name="proj", K=K, N=N, bits=8, block_size=BLOCK,
              accuracy_level=0)
    g.output(g.op1("Identity", [y], outputs=["y"]), "float32", [1, "s", N])
    xs = np.random.default_rng(2).standard_normal((1, 5, K)).astype(np.float32)
    (got,), model = _run(g, {"x": xs})
    want = xs.astype(np.float64) @ dense.T + (0 if b is None else b)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    assert _nbits(model) == [(4, 0), (4, 0)]
    names = {t.name for t in model.graph.initializer}
    assert not names & {"w.q", "w.s", "w.z"}  # the 8-bit tensors are gone, not stored twice
    assert ("w.b" in names) == bias


def test_tied_head_through_a_reshape_keeps_the_table_for_its_gather_and_level_4_is_untouched():
    q, scales, _, dense = _weights(3, False)
    for level, expect in ((0, [(4, 0), (4, 0)]), (4, [(8, 4)])):
        g = GraphBuilder("t")
        ids = g.input("ids", "int64", [1, "s"])
        x = g.input("x", "float32", [1, 1, K])
        table = g.initializer("embed.q", q.reshape(N, K))  # the embedding's (vocab, hidden) table
        rows = g.op1("Gather", [table, ids])
        packed = g.op1("Reshape", [table, g.const_i64([N, BLOCKS, BLOCK], "head.shape")])
        logits = g.op1("MatMulNBits", [x, packed, g.initializer("embed.s", scales)], domain=MS_DOMAIN, name="head",
                       K=K, N=N, bits=8, block_size=BLOCK, accuracy_level=level)
        g.output(g.op1("Identity", [rows], outputs=["rows"]), "uint8", [1, "s", K])
        g.output(g.op1("Identity", [logits], outputs=["logits"]), "float32", [1, 1, N])
        xs = np.random.default_rng(4).standard_normal((1, 1, K)).astype(np.float32)
        (got_rows, got), model = _run(g, {"ids": np.array([[0, 7]], np.int64), "x": xs})
        np.testing.assert_array_equal(got_rows[0], q.reshape(N, K)[[0, 7]])
        assert _nbits(model) == expect
        want = xs.astype(np.float64) @ dense.T
        assert np.abs(got - want).max() <= (2e-6 if level == 0 else 2e-2) * np.abs(want).max()
        assert ("head.shape" in {t.name for t in model.graph.initializer}) == (level == 4)


def test_two_matmuls_of_one_weight_share_its_halves():
    """An exit head reading the final head's weights: one set of halves, both products right."""
    q, scales, _, dense = _weights(5, False)
    g = GraphBuilder("t")
    x = g.input("x", "float32", [1, 1, K])
    w, s = g.initializer("head.q", q), g.initializer("head.s", scales)
    ys = [g.op1("MatMulNBits", [x, w, s], domain=MS_DOMAIN, name=name, K=K, N=N, bits=8, block_size=BLOCK,
                accuracy_level=0) for name in ("head", "exit_head")]
    for i, y in enumerate(ys):
        g.output(g.op1("Identity", [y], outputs=[f"y{i}"]), "float32", [1, 1, N])
    xs = np.random.default_rng(6).standard_normal((1, 1, K)).astype(np.float32)
    outs, model = _run(g, {"x": xs})
    want = xs.astype(np.float64) @ dense.T
    for got in outs:
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    assert _nbits(model) == [(4, 0)] * 4
    assert len(model.graph.initializer) == 6  # hi and lo: weight, scales, zero points -- once
