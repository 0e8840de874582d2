"""Hostile and absurd input: sandboxed chat templates, bad text, huge limits, faults
inside a generation, and fuzzing of the manifest reader, the stop-string matcher and
the streaming detokenizer (hypothesis, bounded time)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edgeinfer
import edgeinfer.package
from edgeinfer.errors import EdgeInferError, GenerationError, PackageError
from edgeinfer.generation import StopMatcher
from edgeinfer.package import MANIFEST, check_manifest

ROOT = Path(__file__).resolve().parents[1]
# derandomize: the same examples every run, so CI cannot fail by chance (apps/fuzz explores at random).
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def pkg(tmp_path, tiny_packages):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_packages("llama", "int4"), dst)
    return dst


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}",
    "{{ raise_exception('nope') }}",
])
def test_chat_template_runs_in_a_sandbox(pkg, template):
    m = json.loads((pkg / MANIFEST).read_text())
    m["tokenizer"]["chat_template"] = template
    (pkg / MANIFEST).write_text(json.dumps(m))
    model = edgeinfer.load(pkg)
    with pytest.raises(GenerationError, match="chat template failed"):
        model.chat([{"role": "user", "content": "hi"}])


def test_no_pickle_anywhere_in_the_runtime_or_exporter():
    for folder in ("edgeinfer", "export", "models", "runtimes"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
            assert "allow_pickle=True" not in text and "torch.load(" not in text, path


@pytest.mark.parametrize("prompt", ["\udcff broken surrogate", "\x00\x01\x02 control bytes", "🙂" * 50])
def test_odd_text_is_handled_or_refused_clearly(tiny_packages, prompt):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    try:
        res = model.complete(prompt, max_new_tokens=4, ignore_eos=True)
        assert res.new_tokens == 4
    except GenerationError as e:
        assert "not valid Unicode text" in str(e)
    assert model.complete("hello", max_new_tokens=3, ignore_eos=True).new_tokens == 3


def test_huge_max_new_tokens_stops_at_the_context(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"), max_context=64)
    res = model.complete("hello", max_new_tokens=10**9, ignore_eos=True)
    assert res.finish_reason == "length" and res.prompt_tokens + res.new_tokens <= 65


def test_wall_time_bound(tiny_packages, monkeypatch):
    import time

    model = edgeinfer.load(tiny_packages("llama", "int4"))
    step = model.decoder.step
    monkeypatch.setattr(model.decoder, "step", lambda t: (time.sleep(0.02), step(t))[1])
    res = model.complete("hello", max_new_tokens=200, ignore_eos=True, max_time_s=0.2)
    assert res.finish_reason == "time" and res.new_tokens < 30
    with pytest.raises(GenerationError, match="max_time_s"):
        model.complete("hello", max_time_s=-1)


def test_fault_inside_a_generation_leaves_the_model_usable(tiny_packages, monkeypatch):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    ref = model.complete("Paris is", max_new_tokens=8, ignore_eos=True).tokens
    step = model.decoder.step
    calls = {"n": 0}

    def flaky(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return step(t)

    monkeypatch.setattr(model.decoder, "step", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        model.complete("Paris is", max_new_tokens=8, ignore_eos=True)
    monkeypatch.undo()
    assert model.complete("Paris is", max_new_tokens=8, ignore_eos=True).tokens == ref


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                           max_leaves=20)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "format_version", "graphs", "files", "tokenizer", "kv_cache",
                                        "io", "exits", "architecture"]) | st.text(max_size=8), json_values,
                       max_size=10))
def test_fuzz_manifest_check_only_raises_package_errors(manifest):
    try:
        check_manifest(manifest)
    except PackageError:
        pass


@FUZZ
@given(files=st.dictionaries(st.text(min_size=1, max_size=30), st.fixed_dictionaries(
    {"size": st.integers(-5, 10**6), "sha256": st.text(max_size=64)}), min_size=1, max_size=5))
@example(files={".": {"size": 0, "sha256": ""}})  # found by hypothesis: Path('.').parts is empty
@example(files={"./": {"size": 0, "sha256": ""}})
def test_fuzz_manifest_files_never_escape(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("fuzzpkg")
    manifest = {"format": "edgeinfer-package", "format_version": [1, 0], "graphs": [], "files": files,
                "tokenizer": {}, "kv_cache": {}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeInferError):
        edgeinfer.package.open_package(root, verify=True)


@FUZZ
@given(pieces=st.lists(st.text(alphabet="abST\nOP", max_size=5), max_size=12),
       stops=st.lists(st.text(alphabet="abSTOP\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_fuzz_stop_matcher(pieces, stops):
    m = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            break
    if not hit:
        out += m.feed("", final=True)[0]
    full = "".join(pieces)
    first = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
    assert out == (full if first < 0 else full[:first])  # exactly the text before the first stop
    assert m.text == out


@FUZZ
@given(ids=st.lists(st.integers(0, 319), max_size=30))
def test_fuzz_streaming_detokenizer(tiny_packages, ids):
    model = _tiny_model(tiny_packages)
    stream = model.tokenizer.stream()
    text = "".join(stream.add(t) for t in ids) + stream.flush()
    assert text == model.tokenizer.decode(ids)


_MODEL = {}


def _tiny_model(tiny_packages):
    if "m" not in _MODEL:
        _MODEL["m"] = edgeinfer.load(tiny_packages("llama", "int4"))
    return _MODEL["m"]


@pytest.mark.parametrize("template", [
    "{% for m in mess in messages %}{{ m }}{% endfor %}",  # the fuzzer's finding: TypeError while rendering
    "{{ 1 / 0 }}",
    "{{ messages[0]['content'] + 1 }}",
])
def test_chat_template_python_errors_are_clear(template):
    from edgeinfer.tokenizer import render_chat_template

    with pytest.raises(GenerationError, match="chat template failed"):
        render_chat_template(template, [{"role": "user", "content": "hi"}], True, "<s>", "</s>")


# -- GGUF headers: every count, length and extent is checked against the file size first ------------
def _gguf(path: Path) -> bytes:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    return data.replace(old, new, 1)


def _gguf_cases(valid: bytes) -> list[tuple[bytes, str]]:
    import struct

    key = b"llama.block_count"
    tensor = b"token_embd.weight"
    dims = struct.pack("<I", 2) + struct.pack("<QQ", 8, 4)
    return [
        (b"GGML" + valid[4:], "no GGUF magic"),
        (valid[:4] + struct.pack("<I", 99) + valid[8:], "unsupported version 99"),
        (valid[:8] + struct.pack("<Q", 1 << 40) + valid[16:], "tensors and .* metadata entries declared"),
        (_patch(valid, struct.pack("<Q", len(key)) + key, struct.pack("<Q", 1 << 62) + key), "a string of"),
        (_patch(valid, struct.pack("<IQ", 8, 3), struct.pack("<IQ", 8, 1 << 40)), "an array of"),
        (_patch(valid, tensor + dims, tensor + struct.pack("<I", 2) + struct.pack("<QQ", 1 << 40, 1 << 40)),
         "a tensor dimension of"),
        (_patch(valid, tensor + dims, tensor + struct.pack("<I", 9) + struct.pack("<QQ", 8, 4)), "rank 9"),
        (_patch(valid, tensor + dims + struct.pack("<I", 0), tensor + dims + struct.pack("<I", 77)),
         "unknown tensor type 77"),
        (_patch(valid, tensor + dims + struct.pack("<IQ", 0, 0), tensor + dims + struct.pack("<IQ", 0, 1 << 20)),
         "outside the file"),
        (valid[: len(valid) - 40], "outside the file"),
        (valid[:30], "runs past the end of the file"),
    ]


def test_hostile_gguf_headers_get_one_clear_error(tmp_path):
    from edgeinfer.export.sources.gguf_check import check_gguf

    from edgeinfer.errors import ExportError

    valid = _gguf(tmp_path / "valid.gguf")
    assert check_gguf(tmp_path / "valid.gguf")["tensors"] == 1
    for i, (data, message) in enumerate(_gguf_cases(valid)):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ExportError, match=message):
            check_gguf(bad)


def test_hostile_gguf_is_refused_by_export_before_any_reader(tmp_path):
    from edgeinfer.export import export_model

    from edgeinfer.errors import ExportError

    valid = _gguf(tmp_path / "valid.gguf")
    (tmp_path / "model.gguf").write_bytes(valid[:4] + valid[4:8] + (1 << 40).to_bytes(8, "little") + valid[16:])
    with pytest.raises(ExportError, match="not a valid GGUF file"):
        export_model(str(tmp_path / "model.gguf"), tmp_path / "out", "int4", progress=False)
    assert not (tmp_path / "out").exists()


@FUZZ
@given(data=st.binary(max_size=64), where=st.integers(min_value=0, max_value=400))
def test_fuzz_gguf_header_only_raises_export_errors(tmp_path_factory, data, where):
    """Random bytes spliced into a valid header: accepted or one ExportError, never another exception."""
    from edgeinfer.export.sources.gguf_check import check_gguf

    from edgeinfer.errors import ExportError

    root = tmp_path_factory.getbasetemp() / "gguf-fuzz"
    root.mkdir(exist_ok=True)
    seed = root / "seed.gguf"
    valid = seed.read_bytes() if seed.exists() else _gguf(seed)
    bad = root / "bad.gguf"
    bad.write_bytes(valid[:where] + data + valid[where + len(data):])
    try:
        check_gguf(bad)
    except ExportError:
        pass


def test_memory_budget_is_checked_before_allocation(tiny_packages):
    from edgeinfer.errors import MemoryBudgetError
    from edgeinfer.memory import dense_needs
    from edgeinfer.package import open_package

    path = tiny_packages("llama", "int4")
    need = dense_needs(open_package(path), None)
    with pytest.raises(MemoryBudgetError, match=r"needs .* MB .* KV cache for a context of 256.*max_context=\d+"):
        edgeinfer.load(path, memory_budget=need["weights"] + need["kv"] // 2)
    with pytest.raises(MemoryBudgetError, match="the weights alone do not fit"):
        edgeinfer.load(path, memory_budget="1KB")
    # the suggested context fits
    model = edgeinfer.load(path, memory_budget=need["weights"] + need["kv"] // 2, max_context=128)
    assert model.max_context == 128 and model.complete("hi", max_new_tokens=3).new_tokens == 3


def test_ct2_zero_dimension_beside_a_huge_one_is_a_clear_error(tmp_path):
    """The atheris finding in the CTranslate2 reader: shape (0, 2^31) passes the size check (0 bytes)
    and numpy refused the reshape with a ValueError."""
    import base64

    from edgeinfer.export.sources.ct2_reader import read_model_bin

    from edgeinfer.errors import ExportError

    (tmp_path / "model.bin").write_bytes(base64.b64decode(
        "BgAAAAwAV2hpc3BlclNwZWMAAAADAAEAAAAVAGVuY29kZXIvY2h0AAICAAAAAwAAAAQMAHBlclNjbwAAAAAAAAAAAAAAAAAAAAAAZGVy"
        "L2NvbgB2PABAAA=="))
    with pytest.raises(ExportError, match="impossible shape"):
        read_model_bin(tmp_path / "model.bin")


def test_tokenizer_file_that_panics_the_rust_side_is_a_clear_error(pkg):
    """The atheris finding in tokenizer.json loading: a BPE vocabulary with a gap makes the tokenizers
    library panic, which pyo3 raises as a BaseException that `except Exception` does not catch."""
    from edgeinfer.package import sha256_file

    tok = pkg / "tokenizer.json"
    tok.write_text('{"r","model":{"vocab":{"a":5,"b":2},"merges":[["a","b"]]}}')
    m = json.loads((pkg / MANIFEST).read_text())
    m["files"]["tokenizer.json"] = {"size": tok.stat().st_size, "sha256": sha256_file(tok)}  # reach the parser
    (pkg / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PackageError, match="tokenizer file 'tokenizer.json' cannot be read"):
        edgeinfer.load(pkg)
    # a file the manifest does not list is never opened
    m["files"].pop("tokenizer.json")
    (pkg / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PackageError, match="not in the manifest's file table"):
        edgeinfer.load(pkg)
