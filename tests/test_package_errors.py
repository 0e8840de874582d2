"""Bad input gets one clear sentence, and nothing is half-written."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import edgeinfer
from edgeinfer.errors import ContextLengthError, ExportError, GenerationError, PackageError
from edgeinfer.package import MANIFEST


@pytest.fixture
def pkg_copy(tmp_path, tiny_packages):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_packages("llama", "int4"), dst)
    return dst


def _edit_manifest(pkg, fn):
    m = json.loads((pkg / MANIFEST).read_text())
    fn(m)
    (pkg / MANIFEST).write_text(json.dumps(m))


def test_missing_package():
    with pytest.raises(PackageError, match="no model package at"):
        edgeinfer.load("/nonexistent/pkg")


def test_missing_graph(pkg_copy):
    (pkg_copy / "graphs" / "stage0.onnx").unlink()
    with pytest.raises(PackageError, match="stage0.onnx' is missing"):
        edgeinfer.load(pkg_copy)


def test_truncated_graph_data(pkg_copy):
    data = pkg_copy / "graphs" / "stage0.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(PackageError, match="truncated or altered"):
        edgeinfer.load(pkg_copy)


def test_bit_flipped_graph_is_caught_by_sha256(pkg_copy):
    data = pkg_copy / "graphs" / "stage0.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="does not match its sha256"):
        edgeinfer.load(pkg_copy, verify=True)


def test_corrupt_graph_with_matching_manifest_is_refused_by_onnxruntime(pkg_copy):
    """A graph that is garbage but listed with its real hash still fails cleanly."""
    from edgeinfer.export.package_writer import write_manifest

    (pkg_copy / "graphs" / "stage0.onnx").write_bytes(b"not an onnx graph")
    m = json.loads((pkg_copy / MANIFEST).read_text())
    for k in ("format", "format_version", "files"):
        m.pop(k)
    write_manifest(pkg_copy, m)
    with pytest.raises(PackageError, match="could not be loaded by onnxruntime"):
        edgeinfer.load(pkg_copy, verify=True)


def test_newer_major_format_is_refused(pkg_copy):
    _edit_manifest(pkg_copy, lambda m: m.update(format_version=[99, 0]))
    with pytest.raises(PackageError, match="exported for format 99.*upgrade edgeinfer"):
        edgeinfer.load(pkg_copy)


def test_not_json_manifest(pkg_copy):
    (pkg_copy / MANIFEST).write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        edgeinfer.load(pkg_copy)


@pytest.mark.parametrize("evil", ["../outside.onnx", "/etc/passwd", "graphs/../../x.onnx"])
def test_manifest_path_outside_package_is_refused(pkg_copy, evil):
    def fn(m):
        m["graphs"][0]["path"] = evil
        m["files"][evil] = {"size": 1, "sha256": "0" * 64}

    _edit_manifest(pkg_copy, fn)
    with pytest.raises(PackageError, match="outside the package"):
        edgeinfer.load(pkg_copy)


def test_symlink_leaving_package_is_refused(pkg_copy, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    tok = pkg_copy / "tokenizer.json"
    tok.unlink()
    os.symlink(outside, tok)
    with pytest.raises(PackageError, match="leading outside the package"):
        edgeinfer.load(pkg_copy)


def test_unknown_alias():
    from edgeinfer.export import export_model

    with pytest.raises(ExportError, match="not a file, folder, hub id or known alias"):
        export_model("no-such-model", "/tmp/never-written")
    assert not os.path.exists("/tmp/never-written")


def test_existing_output_needs_force(tiny_models, tiny_packages):
    from edgeinfer.export import export_model

    with pytest.raises(ExportError, match="already exists.*--force"):
        export_model(str(tiny_models("llama")), tiny_packages("llama", "int4"), "int4")


def test_failed_export_leaves_nothing_and_keeps_old_package(tmp_path, tiny_models, monkeypatch):
    from edgeinfer.export import export_model
    from edgeinfer.export.decoder import graph as decoder_graph

    out = tmp_path / "pkg"
    export_model(str(tiny_models("llama")), out, "int4", max_context=64, progress=False)
    before = (out / MANIFEST).read_text()

    def boom(*a, **k):
        raise RuntimeError("simulated crash in the middle of an export")

    monkeypatch.setattr(decoder_graph, "build_stages", boom)
    with pytest.raises(RuntimeError):
        export_model(str(tiny_models("llama")), out, "fp32", force=True, progress=False)
    assert (out / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no partial folder left


def test_disk_full_during_export_is_clear_and_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    """ENOSPC half-way through writing the graphs (injected into the writer of every graph file, after
    a few real writes): one sentence, the old package untouched, no temporary folder left."""
    import errno

    from edgeinfer.export import export_model
    from edgeinfer.export.graph import onnx_graph

    from edgeinfer.errors import ExportError

    out = tmp_path / "pkg"
    export_model(str(tiny_models("llama")), out, "int4", max_context=64, progress=False)
    before = (out / MANIFEST).read_text()
    real_save, calls = onnx_graph.GraphBuilder.save, []

    def save_until_full(self, path):
        calls.append(path)
        if len(calls) > 1:
            path.write_bytes(b"\0" * 4096)  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(self, path)

    monkeypatch.setattr(onnx_graph.GraphBuilder, "save", save_until_full)
    with pytest.raises(ExportError, match="the disk is full while writing .*: free some space and export again"):
        export_model(str(tiny_models("llama")), out, "fp32", stages=[2], force=True, progress=False)
    assert len(calls) == 2
    assert (out / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_prompt_longer_than_context(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"), max_context=32)
    with pytest.raises(ContextLengthError, match="the context holds 32"):
        model.complete("the quick brown fox " * 40, max_new_tokens=4)
    # A generation that fills the context ends there, like one that reaches max_new_tokens.
    ids = model.tokenizer.encode("the quick brown fox " * 40)[:20]
    res = model.complete(ids, max_new_tokens=30, ignore_eos=True)
    assert res.finish_reason == "length" and len(ids) + res.new_tokens <= 33
    # Feeding past the reserved KV directly is an error naming the figures.
    model.reset()
    model.decoder.forward(ids)
    with pytest.raises(ContextLengthError, match="do not fit the context of 32"):
        model.decoder.forward(ids)
    # the model stays usable after the error
    assert model.complete("hello", max_new_tokens=3, ignore_eos=True).new_tokens == 3


@pytest.mark.parametrize("params,match", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in"),
    (dict(temperature=float("nan")), "finite number"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(top_k=-3), "top_k must be"),
    (dict(bogus=1), "unknown generation parameter"),
])
def test_bad_generation_parameters(tiny_packages, params, match):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    with pytest.raises(GenerationError, match=match):
        model.complete("hello", **params)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True)


def test_cli_errors_are_one_sentence(tmp_path):
    r = _cli("run", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("edgeinfer: error: no model package at")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("export", "not-an-alias", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "known alias" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_prompt_over_context(tiny_packages):
    r = _cli("run", str(tiny_packages("llama", "int4")), "word " * 400, "--max-context", "64")
    assert r.returncode == 2 and "context holds 64" in r.stderr and "Traceback" not in r.stderr


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    from edgeinfer.export import export_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="looks like a hub id, but HF_HUB_OFFLINE=1"):
        export_model("HuggingFaceTB/SmolLM2-135M-Instruct", "/tmp/never-written-hub")
    assert not os.path.exists("/tmp/never-written-hub")


def test_bad_layer_list_on_cli(tmp_path):
    r = _cli("export", "smollm2-135m", "-o", str(tmp_path / "o"), "--exits", "8,x")
    assert r.returncode == 2 and "--exits takes comma-separated layer numbers" in r.stderr


def test_exit_outside_model_is_refused(tiny_models, tmp_path):
    from edgeinfer.export import export_model

    with pytest.raises(ExportError, match="stage cut 9 is outside 1..4"):
        export_model(str(tiny_models("llama")), tmp_path / "o", "fp32", exits=[9])
    assert not (tmp_path / "o").exists()


def _retarget_external_data(graph: str, location: str) -> None:
    import onnx

    model = onnx.load(graph, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, graph)


def _rehash(pkg):
    """What an attacker controlling the whole package would do: make the manifest agree."""
    from edgeinfer.export.package_writer import write_manifest

    m = json.loads((pkg / MANIFEST).read_text())
    for k in ("format", "format_version", "files"):
        m.pop(k)
    write_manifest(pkg, m)


@pytest.mark.parametrize("location", ["../../secret.bin", "/etc/hostname", "unlisted-link.data"])
def test_external_data_outside_package_is_refused(pkg_copy, tmp_path, location):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    if location == "unlisted-link.data":
        os.symlink(secret, pkg_copy / "graphs" / location)
    _retarget_external_data(str(pkg_copy / "graphs" / "stage0.onnx"), location)
    if location != "unlisted-link.data":
        _rehash(pkg_copy)
    with pytest.raises(PackageError, match="outside the package|escapes model directory|Absolute path not allowed"):
        edgeinfer.load(pkg_copy, verify=True)


def test_export_options_a_pipeline_does_not_use_are_refused(tiny_models, tmp_path):
    """One set of export options for five pipelines: each refuses, in one sentence and before
    anything is written, what it would otherwise ignore."""
    from edgeinfer.export import export_model

    from edgeinfer.errors import ExportError

    hf = str(tiny_models("llama"))
    cases = [(dict(prefill_chunk=64), "--prefill-chunk does not apply to a dense decoder package"),
             (dict(activation_bits=8), "--activation-bits does not apply to a dense decoder package"),
             (dict(target="npu", max_context=64, exits=[1], lm_head_bits=8),
              "--exits, --lm-head-bits do not apply to an npu"),
             (dict(target="npu", max_context=64, block_size=64), "--block-size does not apply to an npu")]
    for options, message in cases:
        out = tmp_path / "pkg"
        with pytest.raises(ExportError, match=message):
            export_model(hf, out, progress=False, **options)
        assert not out.exists()


def test_calibration_text_is_read_one_way_with_a_clear_error(tmp_path):
    """export --calibration: npu calibration, exit adapters and trimmed exit heads read FILE the same way."""
    from edgeinfer.export.calibration_text import read_paragraphs

    text = tmp_path / "cal.txt"
    text.write_text("First paragraph.\nStill the first.\n\n\n\nSecond one.\n\n   \n", encoding="utf-8")
    assert read_paragraphs(text) == ["First paragraph.\nStill the first.", "Second one."]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    for bad in (tmp_path / "bad.txt", tmp_path / "missing.txt"):
        with pytest.raises(ExportError, match=r"cannot read the calibration text .*give a UTF-8 text file"):
            read_paragraphs(bad)


def test_generation_and_audio_sections_are_typed_records(tiny_packages):
    """manifest `generation` and `audio` are read into GenerationSpec / AudioSpec: a wrong type is a clear
    PackageError at load, and what export wrote reads back unchanged."""
    from edgeinfer.package import AudioSpec, GenerationSpec, Manifest

    whisper = {"decoder_start_ids": [1, 9], "decoder_start_ids_timestamps": [1], "eos_token_id": 2,
               "no_timestamps_token_id": 9, "timestamp_begin": 10, "suppress_tokens": [3],
               "begin_suppress_tokens": [], "max_new_tokens": 224, "english_only": True, "custom": "kept"}
    spec = GenerationSpec.from_dict(whisper)
    assert spec.timestamp_begin == 10 and spec.extra == {"custom": "kept"}
    assert spec.to_dict() == {k: v for k, v in whisper.items() if v != []}
    audio = AudioSpec.from_dict({"sampling_rate": 16000, "n_fft": 400, "hop_length": 160, "num_mel_bins": 80,
                                 "frames": 3000})
    assert audio.window_s == 30.0
    base = Manifest.from_dict(json.loads((tiny_packages("llama", "int4") / MANIFEST).read_text())).to_dict()
    for section, bad, what in (("generation", {"eos_token_id": "2"}, "generation eos_token_id"),
                               ("generation", {"suppress_tokens": [1, "x"]}, "generation suppress_tokens"),
                               ("generation", {"language_ids": {"en": 1.5}}, "generation language_ids"),
                               ("audio", {"sampling_rate": 16000}, "audio n_fft")):
        with pytest.raises(PackageError, match=f"invalid {what}"):
            Manifest.from_dict({**base, section: bad})


def test_moe_and_static_sections_are_typed_records():
    """manifest `moe` and `static`: ExpertsSpec / StaticSpec, a wrong type refused in one sentence."""
    from edgeinfer.package import ExpertsSpec, StaticSpec

    moe = {"num_experts": 8, "top_k": 2, "expert_intermediate": 64, "norm_topk_prob": True, "dense_layers": [],
           "shared_expert_intermediate": None, "expert_store": {"file": "experts/experts.bin"},
           "router": {"weights": "routers.npy", "norms": "router_norms.npy", "eps": 1e-6}}
    assert ExpertsSpec.from_dict(moe).to_dict() == moe
    for bad, what in (({"top_k": "2"}, "moe top_k"), ({"router": {"weights": "r.npy"}}, "moe router"),
                      ({"dense_layers": [0.5]}, "moe dense_layers")):
        with pytest.raises(PackageError, match=f"invalid {what}"):
            ExpertsSpec.from_dict({**moe, **bad})
    static = {"chunk": 64, "max_context": 512, "kv_heads": 2, "head_dim": 32, "heads": 4, "num_layers": 2,
              "sliding_windows": [-1, -1], "mask_value": -10000.0, "kv_update": "host", "kv_dtype": "uint8"}
    assert StaticSpec.from_dict(static).to_dict() == static
    with pytest.raises(PackageError, match="invalid static chunk"):
        StaticSpec.from_dict({**static, "chunk": None})
