"""Execution providers: selection (auto by package target), unavailable or unsuitable providers (clear
error, or a logged CPU fallback when allowed), session-creation failures, and ``edgeinfer info``."""

from __future__ import annotations

import dataclasses
import json
import logging

import onnxruntime as ort
import pytest
from edgeinfer.runtimes import PROVIDERS, available_providers, create_session, provider_report, resolve_provider
from edgeinfer.runtimes import base as runtimes_base

import edgeinfer
from edgeinfer.cli import main
from edgeinfer.errors import MemoryBudgetError, ProviderError
from edgeinfer.package import open_package

EXPECTED = {"cpu", "cuda", "tensorrt", "directml", "coreml", "qnn", "openvino", "xnnpack"}


def _has_qnn() -> bool:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def gpu_package(tmp_path_factory, tiny_models):
    """A tiny ``--target gpu`` package (fp16 weights, declared for GPU providers)."""
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("gpu-pkg") / "llama-gpu"
    export_model(str(tiny_models("llama")), out, "fp16", target="gpu", max_context=64, progress=False)
    return out


def test_every_provider_module_describes_itself():
    assert set(PROVIDERS) == EXPECTED
    for name, p in PROVIDERS.items():
        assert p.name == name and p.ort_name.endswith("ExecutionProvider")
        assert p.device_kind in ("cpu", "gpu", "npu")
        assert set(p.needs) >= {"static_shapes", "qdq", "fp16", "note"} and p.install
        assert isinstance(p.provider_options(), dict)
    assert PROVIDERS["qnn"].needs["static_shapes"] and PROVIDERS["qnn"].needs["qdq"]
    assert PROVIDERS["coreml"].needs["static_shapes"] and not PROVIDERS["cpu"].needs["static_shapes"]


def test_available_providers_use_devices_for_plugins():
    have = available_providers()
    assert have[0] == "cpu"
    assert ("qnn" in have) == _has_qnn()  # a plugin EP: found through its library and ort.get_ep_devices()
    for row in provider_report():
        if row["name"] == "qnn" and _has_qnn():
            assert row["registration"] == "plugin" and row["devices"][0]["ep"] == "QNNExecutionProvider"
        if row["registration"] == "classic":
            assert row["available"] == (row["onnxruntime_name"] in ort.get_available_providers())


def test_auto_on_a_cpu_package_picks_cpu_and_says_so(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "fp32"))
    assert model.target.name == "cpu" and model.target.reason == "auto for a cpu package"


def test_unknown_provider_is_a_clear_error(tiny_packages, capsys):
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu': choose one of auto, cpu"):
        edgeinfer.load(tiny_packages("llama", "fp32"), provider="tpu")
    assert main(["run", str(tiny_packages("llama", "fp32")), "hi", "--provider", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown execution provider 'tpu'" in err[0]


def test_unavailable_provider_errors_or_falls_back_when_allowed(tiny_packages, caplog):
    assert "cuda" not in available_providers()  # no GPU on CI or developer machines
    with pytest.raises(ProviderError, match="cuda is not available here.*--fallback.*onnxruntime-gpu"):
        edgeinfer.load(tiny_packages("llama", "fp32"), provider="cuda")
    with caplog.at_level(logging.WARNING, logger="edgeinfer"):
        model = edgeinfer.load(tiny_packages("llama", "fp32"), provider="cuda", allow_fallback=True)
    assert model.target.name == "cpu" and model.target.reason.startswith("fallback: cuda is not available")
    assert any("falling back to the cpu provider" in r.getMessage() for r in caplog.records)
    assert len(model.complete([5, 6, 7], max_new_tokens=3, ignore_eos=True).tokens) == 3


def test_gpu_package_on_a_cpu_only_machine(gpu_package, capsys):
    manifest = json.loads((gpu_package / "edgeinfer.json").read_text())
    assert manifest["target"] == "gpu" and manifest["quantization"]["weights"] == "fp16"
    with pytest.raises(ProviderError, match="exported for gpu and none of its providers .* is available here"):
        edgeinfer.load(gpu_package)
    assert main(["run", str(gpu_package), "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported for gpu" in err[0] and "--fallback" in err[0]
    assert main(["run", str(gpu_package), "hello", "--max-new-tokens", "2", "--fallback"]) == 0
    assert "cpu (fallback: this package was exported for gpu" in capsys.readouterr().err


def test_provider_unsuitable_for_the_package(tiny_packages):
    if not _has_qnn():
        pytest.skip("onnxruntime-qnn is not installed")
    with pytest.raises(ProviderError, match="qnn provider \\(HTP\\) runs only static-shape QDQ graphs.*--target npu"):
        edgeinfer.load(tiny_packages("llama", "fp32"), provider="qnn")
    model = edgeinfer.load(tiny_packages("llama", "fp32"), provider="qnn", allow_fallback=True)
    assert model.target.name == "cpu"


def test_session_creation_failure_falls_back_only_when_allowed(tiny_packages, monkeypatch, caplog):
    """A provider that is there but cannot load a graph: ProviderError naming it, or (allowed) a logged
    CPU session."""
    real = ort.InferenceSession

    def picky(path, sess_options=None, providers=None, **kw):
        if providers and providers[0][0] == "XnnpackExecutionProvider":
            raise RuntimeError("simulated: node GroupQueryAttention is not supported")
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(runtimes_base.ort, "InferenceSession", picky)
    graph = tiny_packages("llama", "fp32") / "graphs" / "stage0.onnx"
    target = runtimes_base._target("xnnpack", None, False, True, "requested")
    with pytest.raises(ProviderError, match="xnnpack provider could not load graph 'stage0.onnx' .*simulated"):
        create_session(graph, target)
    allowed = runtimes_base._target("xnnpack", None, True, True, "requested")
    with caplog.at_level(logging.WARNING, logger="edgeinfer"):
        session = create_session(graph, allowed)
    assert session.get_providers() == ["CPUExecutionProvider"] and allowed.fallbacks == ["stage0.onnx"]
    assert any("could not load 'stage0.onnx'" in r.getMessage() for r in caplog.records)


def test_running_out_of_memory_while_loading_is_not_called_a_corrupt_package(tiny_packages, monkeypatch):
    def starved(path, sess_options=None, providers=None, **kw):
        raise RuntimeError("std::bad_alloc")

    monkeypatch.setattr(runtimes_base.ort, "InferenceSession", starved)
    graph = tiny_packages("llama", "fp32") / "graphs" / "stage0.onnx"
    with pytest.raises(MemoryBudgetError, match="ran out of memory loading graph 'stage0.onnx'.*smaller model"):
        create_session(graph, runtimes_base._target("cpu", None, False, True, "requested"))


def test_strict_qnn_refuses_a_graph_it_cannot_take_whole(tiny_packages):
    """With CPU fallback disabled, a graph with nodes QNN cannot run fails to load (the real EP)."""
    if not _has_qnn():
        pytest.skip("onnxruntime-qnn is not installed")
    graph = tiny_packages("llama", "fp32") / "graphs" / "stage0.onnx"
    strict = runtimes_base._target("qnn", None, False, False, "requested")
    with pytest.raises(ProviderError, match="qnn provider could not load graph 'stage0.onnx'"):
        create_session(graph, strict)
    npu_spec = dataclasses.replace(open_package(tiny_packages("llama", "fp32"), verify=False).spec, target="npu")
    assert resolve_provider("qnn", spec=npu_spec).name == "qnn"


def test_info_lists_providers_and_devices(capsys, tmp_path):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["providers"] == available_providers()
    assert {r["name"] for r in info["provider_details"]} == EXPECTED
    assert any(d["ep"] == "CPUExecutionProvider" for d in info["devices"])
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for name in EXPECTED:
        assert f"\n  {name} " in text
    assert "devices      CPUExecutionProvider on CPU" in text
    assert "onnxruntime-gpu" in text  # how to get a provider that is not here


def test_info_shows_package_target(gpu_package, capsys):
    assert main(["info", str(gpu_package)]) == 0
    assert "target       gpu" in capsys.readouterr().out


def test_gpu_providers_keep_the_kv_cache_in_device_memory():
    """CUDA/TensorRT targets allocate the decoder's KV buffers on the GPU (IO binding on device memory);
    not runnable here (no GPU), so only the choice is checked."""
    assert runtimes_base._target("cuda", None, False, True, "test").device_memory == "cuda"
    assert runtimes_base._target("tensorrt", None, False, True, "test").device_memory == "cuda"
    assert runtimes_base._target("cpu", None, False, True, "test").device_memory == "cpu"
    assert runtimes_base._target("qnn", None, False, True, "test").device_memory == "cpu"
