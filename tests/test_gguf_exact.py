"""GGUF block types carried over exactly: every type's blocks, rearranged for MatMulNBits /
GatherBlockQuantized, give the graph the very weights the ``gguf`` package dequantizes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

gguf = pytest.importorskip("gguf")

from edgeinfer.export.graph.blocks import Precision, embedding, linear, tied_lm_head  # noqa: E402
from edgeinfer.export.graph.onnx_graph import GraphBuilder  # noqa: E402
from edgeinfer.export.sources.gguf_tensors import EXACT_TYPES, BlockWeight, block_weight, concat_rows  # noqa: E402
from edgeinfer.runtimes.cpu import compatible_session_options  # noqa: E402

SOURCE = Precision("source")


def random_blocks(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw ggml rows (n, bytes): random quants, scales and minimums in a realistic range."""
    rng = np.random.default_rng(seed)
    block_bytes, per_block = EXACT_TYPES[type_name]
    raw = rng.integers(0, 256, (n, k // per_block, block_bytes), dtype=np.uint8)

    def f16(offset: int, lo: float, hi: float) -> None:
        v = (rng.random((n, k // per_block)) * (hi - lo) + lo).astype(np.float16)
        raw[..., offset:offset + 2] = v.view(np.uint8).reshape(n, k // per_block, 2)

    if type_name == "Q6_K":
        f16(208, 1e-3, 1e-2)
    else:
        f16(0, 1e-3, 2e-2)
        if type_name in ("Q4_1", "Q5_1"):
            f16(2, -0.2, 0.2)
        if type_name in ("Q4_K", "Q5_K"):
            f16(2, 1e-4, 5e-3)
    return raw.reshape(n, -1)


def reference(type_name: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(n, k).astype(np.float32)


def run(g: GraphBuilder, feeds: dict) -> np.ndarray:
    return session(g).run(None, feeds)[0]


def session(g: GraphBuilder) -> ort.InferenceSession:
    return ort.InferenceSession(g.to_model().SerializeToString(), compatible_session_options(),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("type_name", sorted(EXACT_TYPES))
def test_blocks_dequantize_like_the_gguf_package(type_name):
    n, k = 6, 512
    raw = random_blocks(type_name, n, k)
    w = block_weight(type_name, raw, k)
    assert w.bits in (4, 8) and w.q.max() < (1 << w.bits)
    np.testing.assert_allclose(w.dequantize(), reference(type_name, raw, n, k), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("type_name", sorted(EXACT_TYPES))
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmul_uses_the_files_own_weights(type_name, accuracy_level):
    """x @ W.T through MatMulNBits (+ block offsets) equals the product with the dequantized weight:
    to float rounding at accuracy level 0; level 4 quantizes the activations (not the weights) to int8
    per block, as llama.cpp's q8 dot products do, which bounds the difference."""
    n, k = 48, 768
    raw = random_blocks(type_name, n, k, seed=1)
    w = block_weight(type_name, raw, k)
    g = GraphBuilder("t")
    x = g.input("x", "float32", [1, "s", k])
    y = linear(g, x, w, "proj", Precision("source", accuracy_level=accuracy_level))
    g.output(g.op1("Identity", [y], outputs=["y"]), "float32", [1, "s", n])
    xs = np.random.default_rng(2).standard_normal((1, 5, k)).astype(np.float32)
    got = run(g, {"x": xs})
    want = xs @ reference(type_name, raw, n, k).T
    scale = np.abs(want).max()
    tol = 2e-6 if accuracy_level == 0 else 2e-2
    assert np.abs(got - want).max() <= tol * scale, (type_name, np.abs(got - want).max() / scale)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q6_K", "Q4_K", "Q4_1"])
def test_embedding_gather_and_tied_head(type_name):
    """The embedding rows gathered from the file's blocks, and the tied LM head reading the same
    initializers, both equal the dequantized table (the head at accuracy level 0)."""
    vocab, hidden = 40, 512
    raw = random_blocks(type_name, vocab, hidden, seed=3)
    table = block_weight(type_name, raw, hidden)
    ref = reference(type_name, raw, vocab, hidden)
    g = GraphBuilder("t")
    ids = g.input("ids", "int64", [1, "s"])
    x = g.input("x", "float32", [1, 1, hidden])
    h, shared = embedding(g, ids, table, "embed", SOURCE, None)
    logits = tied_lm_head(g, x, shared, vocab, hidden, None, Precision("source", accuracy_level=0), "head",
                          table=table)
    g.output(g.op1("Identity", [h], outputs=["h"]), "float32", [1, "s", hidden])
    g.output(g.op1("Identity", [logits], outputs=["logits"]), "float32", [1, 1, vocab])
    sess = session(g)
    token_ids = np.array([[0, 7, 39, 7]], np.int64)
    xs = np.random.default_rng(4).standard_normal((1, 1, hidden)).astype(np.float32)
    got_h, got_logits = sess.run(None, {"ids": token_ids, "x": xs})
    np.testing.assert_allclose(got_h[0], ref[token_ids[0]], rtol=1e-6, atol=1e-7)
    want = xs[0] @ ref.T
    assert np.abs(got_logits[0] - want).max() <= 2e-6 * np.abs(want).max()


def test_rows_of_different_types_stay_apart_and_like_types_fuse():
    k = 256
    a = block_weight("Q4_1", random_blocks("Q4_1", 4, k), k)
    b = block_weight("Q4_0", random_blocks("Q4_0", 2, k), k)
    c = block_weight("Q6_K", random_blocks("Q6_K", 2, k), k)
    fused = concat_rows([a, b])
    assert isinstance(fused, BlockWeight) and fused.offsets is not None
    np.testing.assert_allclose(fused.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]), rtol=1e-6)
    assert concat_rows([a, c]) is None  # 4-bit blocks of 32 and 8-bit blocks of 16: two matmuls


def test_a_type_without_exact_form_is_requantized_and_said(tmp_path, capsys):
    """An IQ2_XXS tensor (no MatMulNBits form) is dequantized by the gguf package, re-quantized to int8
    blocks, and the exporter names the type and the tensor in one warning line."""
    from edgeinfer.export.exporter import _checked_precision
    from edgeinfer.export.sources.gguf_tensors import read_gguf_tensors
    from edgeinfer.export.sources.load import SourceModel

    rng = np.random.default_rng(5)
    n, k = 8, 256
    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    raw[..., 0:2] = np.full((n, k // block), 0.01, np.float16).view(np.uint8).reshape(n, k // block, 2)
    path = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw.reshape(n, -1), raw_dtype=qtype)
    q41 = random_blocks("Q4_1", n, k)
    writer.add_tensor("blk.0.ffn_gate.weight", q41, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tensors = read_gguf_tensors(path, "llama", heads=1, kv_heads=1)
    up = "model.layers.0.mlp.up_proj.weight"
    assert tensors.requantized == {"IQ2_XXS": [up]}
    want = gguf.quants.dequantize(raw.reshape(n, -1), qtype).reshape(n, k)
    np.testing.assert_array_equal(tensors.floats[up], want)  # the float weights are the file's
    block_weight_up = tensors.blocks[up]
    assert block_weight_up.bits == 8 and block_weight_up.source_type == "IQ2_XXS->int8"
    assert np.abs(block_weight_up.dequantize() - want).max() <= np.abs(want).max() / 254 + 1e-7
    gate = tensors.blocks["model.layers.0.mlp.gate_proj.weight"]
    assert gate.source_type == "Q4_1"

    src = SourceModel("t", "gguf", str(path), {"model_type": "llama"}, tensors.floats, "{}", None,
                      blocks=tensors.blocks, tensor_types=tensors.types, requantized=tensors.requantized)
    assert _checked_precision(src, None, "cpu", "llama") == "source"
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and "IQ2_XXS" in lines[0] and "mlp.up_proj.weight" in lines[0] and "int8" in lines[0]
    _checked_precision(src, "int4", "cpu", "llama")  # re-quantizing on request: one line per group
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 2 and any("Q4_1" in line for line in lines) and all("int4" in line for line in lines)
