"""``--target npu`` packages: static shapes, standard ops, static QDQ int8 weights with calibrated
16-bit activations; run by StaticDecoder on the CPU provider and, where onnxruntime-qnn is installed,
entirely on the QNN HTP backend (its CPU emulator on x86 Linux) with CPU fallback disabled.

QDQ tolerance (stated here and in docs/providers.md), against transformers' fp32 logits on the same
token ids, teacher-forced: mean KL(fp32 || npu) below 1e-3 nats, largest absolute logit error below
0.15, next-token argmax agreement of at least 90% of positions.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

import edgeinfer
from edgeinfer.cli import main
from edgeinfer.errors import ContextLengthError, ExportError

CONTEXT, CHUNK = 64, 8
KL_MAX, ABS_MAX, AGREE_MIN = 1e-3, 0.15, 0.9
# ops the graphs may use: all in QNN HTP's supported list (and standard ONNX, for OpenVINO/CoreML)
NPU_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMul", "Add", "Mul", "Sigmoid", "Gelu", "Softmax", "Concat",
           "Split", "Reshape", "Transpose", "Gather", "SimplifiedLayerNormalization"}


@pytest.fixture(scope="module")
def npu_packages(tmp_path_factory, tiny_models):
    """family -> tiny npu package (context 64, prefill chunk 8), exported once."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("npu-pkg")
    cache = {}

    def get(family: str):
        if family not in cache:
            out = root / family
            export_model(str(tiny_models(family)), out, "int8", target="npu", max_context=CONTEXT,
                         prefill_chunk=CHUNK, progress=False)
            cache[family] = out
        return cache[family]

    return get


def _hf_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _assert_close(got, ref, label):
    p = np.exp(_log_softmax(ref))
    kl = (p * (_log_softmax(ref) - _log_softmax(got))).sum(-1)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    err = np.abs(got - ref).max()
    assert kl.mean() < KL_MAX and err < ABS_MAX and agree >= AGREE_MIN, (
        f"{label}: mean KL {kl.mean():.2e}, max |err| {err:.3f}, argmax agreement {agree:.2f}")


def _prompt(n=20, seed=1):
    return [int(t) for t in np.random.RandomState(seed).randint(3, 300, n)]


def _run(decoder, ids, split):
    """Prefill ids[:split] (chunked), then step the rest one token at a time; logits of every position."""
    rows = [decoder.forward(ids[:split], logits_to_keep=split)]
    rows += [decoder.step(t)[None].copy() for t in ids[split:]]
    return np.concatenate(rows)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_npu_package_on_cpu_matches_transformers_and_dynamic_package(family, npu_packages, tiny_models,
                                                                     tiny_packages):
    """Chunked prefill across chunk boundaries (20 = 8 + 8 + 4 tokens, plus steps) within QDQ tolerance of
    fp32 transformers and of the dynamic fp32 package; gemma3 covers sliding windows, q/k norms and
    sandwich norms."""
    ids = _prompt(24)
    ref = _hf_logits(tiny_models(family), ids)
    model = edgeinfer.load(npu_packages(family), provider="cpu")
    assert type(model.decoder).__name__ == "StaticDecoder" and model.max_context == CONTEXT
    got = _run(model.decoder, ids, 20)
    _assert_close(got, ref, f"{family} npu vs transformers")
    dynamic = edgeinfer.load(tiny_packages(family, "fp32"), provider="cpu")
    _assert_close(got, _run(dynamic.decoder, ids, 20), f"{family} npu vs dynamic package")


def test_npu_graphs_have_fixed_shapes_standard_ops_and_int8_weights(npu_packages):
    pkg = npu_packages("llama")
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    assert manifest["target"] == "npu" and manifest["static"]["chunk"] == CHUNK
    assert manifest["static"]["max_context"] == CONTEXT
    # the KV cache, the mask and the logits cross the graph edge as their 16-bit quantized values
    assert manifest["kv_cache"]["dtype"] == "uint16"
    for entry in manifest["graphs"]:
        edges = entry["io_quantization"]
        assert {"attention_mask", "logits", "past_key.0", "new_value.3"} <= set(edges)
        assert edges["past_key.0"] == manifest["graphs"][0]["io_quantization"]["past_key.0"]  # one KV scale
    # the two graphs read one weights file (their quantized weights are the same bytes)
    assert sorted(p.name for p in (pkg / "graphs").iterdir()) == ["decode.onnx", "prefill.onnx", "weights.data"]
    for entry in manifest["graphs"]:
        m = onnx.load(str(pkg / entry["path"]), load_external_data=False)
        for vi in list(m.graph.input) + list(m.graph.output):
            dims = vi.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{vi.name} has a symbolic dimension"
            expected = onnx.TensorProto.UINT16 if vi.name in entry["io_quantization"] else onnx.TensorProto.INT32
            assert vi.type.tensor_type.elem_type == expected, vi.name
        ops = {n.op_type for n in m.graph.node}
        assert ops <= NPU_OPS, f"ops outside the npu list: {ops - NPU_OPS}"
        assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
        weights = {i.name: i for i in m.graph.initializer}
        matmul_weights = [n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear"
                          and n.input[0].endswith("weight_t_quantized")]
        assert matmul_weights, "no quantized MatMul weights"
        for name in matmul_weights:
            assert weights[name].data_type == onnx.TensorProto.FLOAT  # scales
            assert len(weights[name].dims) == 1, "weights are not quantized per output channel"


def test_greedy_generation_and_prefix_reuse(npu_packages):
    """The common decode loop drives the static decoder; a second turn reuses the cached prefix."""
    model = edgeinfer.load(npu_packages("llama"), provider="cpu")
    ids = _prompt(12, seed=3)
    first = model.complete(ids, max_new_tokens=10, ignore_eos=True)
    again = model.complete(ids, max_new_tokens=10, ignore_eos=True)
    assert first.tokens == again.tokens and len(first.tokens) == 10
    assert again.reused_prompt_tokens > 0
    model.reset()
    assert model.complete(ids, max_new_tokens=10, ignore_eos=True).tokens == first.tokens


def test_prompt_longer_than_fixed_context_is_a_clear_error(npu_packages, capsys):
    model = edgeinfer.load(npu_packages("llama"), provider="cpu")
    with pytest.raises(ContextLengthError, match="re-export with a larger --max-context"):
        model.complete(_prompt(CONTEXT + 5), max_new_tokens=4)
    # generation that runs into the fixed context ends cleanly with finish_reason "length"
    res = model.complete(_prompt(CONTEXT - 4), max_new_tokens=50, ignore_eos=True)
    # (the last new token is sampled from the full cache, never fed: one more than the context)
    assert res.finish_reason == "length" and res.prompt_tokens + res.new_tokens == CONTEXT + 1
    long_text = "The quick brown fox jumps over the lazy dog. " * 30
    assert main(["run", str(npu_packages("llama")), long_text, "--provider", "cpu", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "context holds 64" in err[0] and "--max-context" in err[0]


def test_npu_export_rejects_bad_settings(tiny_models, tmp_path):
    from edgeinfer.export import export_model

    src = str(tiny_models("llama"))
    with pytest.raises(ExportError, match="int8"):
        export_model(src, tmp_path / "a", "fp16", target="npu", max_context=64, progress=False)
    with pytest.raises(ExportError, match="prefill chunk"):
        export_model(src, tmp_path / "b", "int8", target="npu", max_context=64, prefill_chunk=100, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ExportError, match="calibration"):
        export_model(src, tmp_path / "c", "int8", target="npu", max_context=64, calibration=empty, progress=False)
    with pytest.raises(ExportError, match="unknown target"):
        export_model(src, tmp_path / "d", "int8", target="tpu", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_user_calibration_text_is_used(tiny_models, tmp_path):
    from edgeinfer.export import export_model

    text = tmp_path / "calib.txt"
    text.write_text("Paris is the capital of France.\n\nOnce upon a time there was a small model.\n", encoding="utf-8")
    res = export_model(str(tiny_models("llama")), tmp_path / "pkg", "int8", target="npu", max_context=32,
                       prefill_chunk=4, calibration=text, progress=False)
    assert res.manifest["quantization"]["calibration"] == {"text": "calib.txt", "samples": 2}
    model = edgeinfer.load(res.path, provider="cpu")
    ids = _prompt(10)
    _assert_close(_run(model.decoder, ids, 6), _hf_logits(tiny_models("llama"), ids), "user calibration")


# -- QNN HTP (emulated on x86 Linux) --------------------------------------------------------------------


def _qnn_or_skip():
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed (pip install 'edgeinfer[npu]')")


def test_npu_package_runs_entirely_on_qnn_htp(npu_packages, tiny_models):
    """Every node of both graphs on QNN (session.disable_cpu_ep_fallback=1), same tolerance vs fp32."""
    _qnn_or_skip()
    from edgeinfer.runtimes import node_placement, resolve_provider

    from edgeinfer.decoders.static import StaticDecoder
    from edgeinfer.package import open_package

    pkg = open_package(npu_packages("llama"))
    target = resolve_provider("qnn", spec=pkg.spec, cpu_fallback=False)
    decoder = StaticDecoder(pkg, target)
    for graph in (decoder.prefill_graph, decoder.decode_graph):
        placement = node_placement(graph.session)
        assert set(placement) == {"QNNExecutionProvider"} and placement["QNNExecutionProvider"] > 100, placement
    # with CPU fallback allowed (the default) QNN takes every node too: no float conversions at the edges
    default = StaticDecoder(pkg, resolve_provider("qnn", spec=pkg.spec))
    assert set(node_placement(default.decode_graph.session)) == {"QNNExecutionProvider"}
    assert decoder.keys[0].dtype == np.uint16
    ids = _prompt(12)
    got = _run(decoder, ids, 10)
    _assert_close(got, _hf_logits(tiny_models("llama"), ids), "qnn htp vs transformers")
    cpu = edgeinfer.load(npu_packages("llama"), provider="cpu")
    assert np.abs(got - _run(cpu.decoder, ids, 10)).max() < 0.05  # fixed-point HTP vs the CPU's QDQ simulation


def test_int4_weights_run_entirely_on_qnn_htp(tiny_models, tmp_path):
    """--precision int4 with --target npu: int4 per-channel weights (QNN HTP takes them), looser tolerance."""
    _qnn_or_skip()
    from edgeinfer.export import export_model
    from edgeinfer.runtimes import node_placement, resolve_provider

    from edgeinfer.decoders.static import StaticDecoder
    from edgeinfer.package import open_package

    res = export_model(str(tiny_models("llama")), tmp_path / "w4", "int4", target="npu", max_context=32,
                       prefill_chunk=4, progress=False)
    assert res.manifest["quantization"]["weights"] == "int4"
    m = onnx.load(str(res.path / "graphs" / "decode.onnx"), load_external_data=False)
    assert {i.data_type for i in m.graph.initializer if i.name.endswith("weight_t_quantized")} == {
        onnx.TensorProto.INT4}
    pkg = open_package(res.path)
    decoder = StaticDecoder(pkg, resolve_provider("qnn", spec=pkg.spec, cpu_fallback=False))
    assert set(node_placement(decoder.decode_graph.session)) == {"QNNExecutionProvider"}
    ids = _prompt(8)
    got, ref = _run(decoder, ids, 6), _hf_logits(tiny_models("llama"), ids)
    p = np.exp(_log_softmax(ref))
    assert (p * (_log_softmax(ref) - _log_softmax(got))).sum(-1).mean() < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_auto_skips_the_htp_emulator_and_says_so(npu_packages, monkeypatch):
    """auto prefers QNN for an npu package, but not its x86 emulator (100x slower than the CPU): it then
    runs on the CPU and says why; a QNN device that is not an emulation is picked."""
    _qnn_or_skip()
    from edgeinfer.runtimes import PROVIDERS

    model = edgeinfer.load(npu_packages("llama"))
    assert model.target.name == "cpu"
    assert model.target.reason == "auto for a npu package; qnn runs on an emulator here"
    real = dataclasses.replace(PROVIDERS["qnn"], emulated=lambda devices: False)  # as on a phone: the HTP is real
    monkeypatch.setitem(PROVIDERS, "qnn", real)
    model = edgeinfer.load(npu_packages("llama"))
    assert model.target.name == "qnn" and model.target.reason == "auto for a npu package"
    assert len(model.complete(_prompt(6), max_new_tokens=3, ignore_eos=True).tokens) == 3


# -- OpenVINO (its own venv: onnxruntime-openvino ships its own onnxruntime module) -----------------------
def test_npu_package_runs_on_openvino_in_its_venv(npu_packages, tiny_models, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    python = root / ".venv-openvino" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-openvino is absent (make it with runtimes/make_openvino_venv.sh)")
    ids = _prompt(12)
    out = tmp_path / "openvino.npy"
    proc = subprocess.run([str(python), str(root / "apps" / "npu" / "provider_logits.py"), str(npu_packages("llama")),
                           "--provider", "openvino", "--ids", ",".join(map(str, ids)), "--split", "10",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["provider"] == "openvino" and report["session_providers"][0] == "OpenVINOExecutionProvider"
    assert report["onnxruntime"] != sys.modules["onnxruntime"].__version__  # really the other onnxruntime
    if report["placement"]:
        assert set(report["placement"]) == {"OpenVINOExecutionProvider"}, report["placement"]
    got = np.load(out)
    _assert_close(got, _hf_logits(tiny_models("llama"), ids), "openvino vs transformers")
    cpu = edgeinfer.load(npu_packages("llama"), provider="cpu")
    assert np.abs(got - _run(cpu.decoder, ids, 10)).max() < 0.05
