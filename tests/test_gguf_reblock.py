"""5- and 6-bit symmetric GGUF tensors re-blocked into 8-bit blocks of 64 for int8-activation packages
(export/sources/gguf_tensors.py ``reblocked_8bit``): within 16/127 of the largest source step, other types
and float-activation packages untouched."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")

from edgeinfer.export.graph.blocks import Precision, linear  # noqa: E402
from edgeinfer.export.graph.onnx_graph import GraphBuilder  # noqa: E402
from edgeinfer.export.sources.gguf_tensors import NARROW_TYPES, block_weight, reblocked_8bit  # noqa: E402
from test_gguf_exact import random_blocks, reference, run  # noqa: E402


def largest_source_step(w, block: int) -> np.ndarray:
    """Per new block of BLOCK weights: the largest step |scale| of the source blocks inside it."""
    n, k = w.shape
    steps = np.repeat(np.abs(w.scales), w.block_size, axis=1)  # (n, k): each weight's source step
    return steps.reshape(n, k // block, block).max(axis=2)


@pytest.mark.parametrize("type_name", NARROW_TYPES)
@pytest.mark.parametrize("k", [768, 544])
def test_narrow_types_move_at_most_an_eighth_of_a_step(type_name, k):
    if k % 256 and type_name.endswith("_K"):
        pytest.skip("K-quant rows are whole super-blocks of 256")
    n = 12
    src = block_weight(type_name, random_blocks(type_name, n, k, seed=7), k)
    wide = reblocked_8bit(src)
    block = 64 if k % 64 == 0 else 32
    assert (wide.bits, wide.block_size, wide.offsets) == (8, block, None)
    assert wide.source_type == f"{type_name}->8b{block}" and wide.q.min() >= 1  # symmetric: codes 1..255
    moved = np.abs(wide.dequantize() - src.dequantize()).reshape(n, k // block, block).max(axis=2)
    bound = largest_source_step(src, block) * 16 / 127
    assert (moved <= bound * (1 + 1e-5)).all(), (moved / bound).max()
    assert moved.max() > 0  # a real re-quantization, not a copy


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q8_0"])
def test_other_types_are_left_exact(type_name):
    k = 512
    src = block_weight(type_name, random_blocks(type_name, 4, k), k)
    assert reblocked_8bit(src) is src


def test_reblocked_matmul_runs_at_int8_activations():
    """The re-blocked Q6_K weight through MatMulNBits at accuracy level 4 stays within the level's own
    activation rounding of the exact product (the bound test_gguf_exact.py applies to the file's blocks)."""
    n, k = 48, 768
    raw = random_blocks("Q6_K", n, k, seed=1)
    wide = reblocked_8bit(block_weight("Q6_K", raw, k))
    g = GraphBuilder("t")
    x = g.input("x", "float32", [1, "s", k])
    y = linear(g, x, wide, "proj", Precision("source", accuracy_level=4))
    g.output(g.op1("Identity", [y], outputs=["y"]), "float32", [1, "s", n])
    xs = np.random.default_rng(2).standard_normal((1, 5, k)).astype(np.float32)
    want = xs @ reference("Q6_K", raw, n, k).T
    assert np.abs(run(g, {"x": xs}) - want).max() <= 2e-2 * np.abs(want).max()


def test_only_int8_activation_source_packages_reblock():
    from edgeinfer.export.exporter import _source_blocks
    from edgeinfer.export.sources.load import SourceModel

    k = 512
    blocks = {"a": block_weight("Q6_K", random_blocks("Q6_K", 4, k), k),
              "b": block_weight("Q4_K", random_blocks("Q4_K", 4, k), k)}
    src = SourceModel("t", "gguf", "t.gguf", {"model_type": "qwen2"}, {}, "{}", None, blocks=blocks)
    level4 = _source_blocks(src, Precision("source", accuracy_level=4))
    assert level4["a"].block_size == 64 and level4["b"] is blocks["b"]
    assert "narrow_types" in Precision("source", accuracy_level=4).describe()
    for level in (0, 1):
        assert _source_blocks(src, Precision("source", accuracy_level=level)) is blocks
        assert "narrow_types" not in Precision("source", accuracy_level=level).describe()


def test_info_says_which_types_were_reblocked():
    from edgeinfer.cli.package_info import describe_weights

    described = Precision("source", accuracy_level=4).describe()
    line = describe_weights({**described, "source_types": {"Q4_K": 2, "Q6_K": 1}})
    assert "Q5_0/Q6_K re-quantized into symmetric 8-bit blocks of 64" in line and "Q6_K x1" in line
    assert "re-quantized" not in describe_weights({**Precision("source", accuracy_level=0).describe()})


def test_exact_blocks_keeps_the_files_blocks_at_level_4(tmp_path):
    """--exact-blocks: a source package at accuracy level 4 keeps Q5_0/Q6_K blocks exactly as the file has them
    (and says nothing re-blocked); asked of a re-quantized precision it is refused, not ignored."""
    from edgeinfer.export.exporter import _source_blocks, export_model
    from edgeinfer.export.sources.load import SourceModel

    from edgeinfer.errors import ExportError

    k = 512
    blocks = {"a": block_weight("Q6_K", random_blocks("Q6_K", 4, k), k),
              "b": block_weight("Q5_0", random_blocks("Q5_0", 4, k), k)}
    src = SourceModel("t", "gguf", "t.gguf", {"model_type": "qwen2"}, {}, "{}", None, blocks=blocks)
    exact = Precision("source", accuracy_level=4, exact_blocks=True)
    assert _source_blocks(src, exact) is blocks and not exact.reblocks_narrow_types
    assert "narrow_types" not in exact.describe()
    with pytest.raises(ExportError, match="--exact-blocks keeps a GGUF file's own blocks.*not int4"):
        export_model(src, tmp_path / "out", "int4", exact_blocks=True)
    assert not (tmp_path / "out").exists()
