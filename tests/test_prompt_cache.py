"""The persistent prompt cache (edgeinfer/prompt_cache/), on the real SmolLM2-135M package: a prefix
restored from disk by a fresh model gives the tokens and the log-probabilities of a cold prompt; bad
files (corrupt, truncated, foreign) are ignored with a warning and give the cold output; the folder
keeps to its byte bound (LRU) and never holds a partial entry; the CLI, the server and the unsupported
decoders."""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import edgeinfer
from edgeinfer.prompt_cache import PromptCache, PromptCacheError

ROOT = Path(__file__).resolve().parents[1]
# A long system prompt: the exporter's calibration paragraphs (~500 tokens with the chat template).
DOC = (ROOT / "export" / "quant" / "calibration.txt").read_text(encoding="utf-8")
ASK_A = "Summarize the text above in one sentence."
ASK_B = "Which topics does the text mention?"
NEW = 24
HEAD = struct.Struct("<8sIIII")  # the file header, as docs/prompt-cache.md describes it


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": DOC}, {"role": "user", "content": question}]


def run(model, prompt):
    """Greedy tokens, their log-probabilities and the result."""
    gen = model.generate(prompt, max_new_tokens=NEW, temperature=0.0, logprobs=True)
    events = [e for e in gen if e.source != "flush"]
    return [e.token_id for e in events], np.array([e.logprob for e in events]), gen.result


def cache_at(folder, **kw) -> PromptCache:
    return PromptCache(folder, min_tokens=kw.pop("min_tokens", 64), background=kw.pop("background", False), **kw)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct package (the exporter's default precision for its GGUF file)."""
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("pc-real") / "smollm2"
    export_model("smollm2-135m", out, None, max_context=1024, progress=False)
    return out


@pytest.fixture(scope="module")
def cold(smollm2):
    """question -> (tokens, logprobs) of a model that never saw a cache."""
    model = edgeinfer.load(smollm2)
    out = {}
    for q in (ASK_A, ASK_B):
        model.reset()
        tokens, lps, res = run(model, chat(q))
        assert res.reused_prompt_tokens == 0
        out[q] = (tokens, lps)
    return out


@pytest.fixture(scope="module")
def saved_entry(smollm2, tmp_path_factory):
    """The bytes of the entry a first run of chat(ASK_A) saves, and its file name."""
    folder = tmp_path_factory.mktemp("pc-entry")
    model = edgeinfer.load(smollm2, prompt_cache=cache_at(folder))
    run(model, chat(ASK_A))
    files = sorted(folder.glob("*.kv"))
    assert len(files) == 1
    return files[0].read_bytes(), files[0].name


def rewrite(data: bytes, meta=None, tokens=None, version=None) -> bytes:
    """The entry DATA with its header's JSON, token ids or version replaced, CRC recomputed."""
    magic, ver, jlen, ntok, _ = HEAD.unpack_from(data)
    off = HEAD.size
    body = json.loads(data[off:off + jlen])
    toks = np.frombuffer(data, "<i4", count=ntok, offset=off + jlen)
    payload = data[off + jlen + 4 * ntok:]
    if meta:
        meta(body)
    if tokens is not None:
        toks = np.asarray(tokens, "<i4")
    jb = json.dumps(body, sort_keys=True).encode()
    return HEAD.pack(magic, version or ver, len(jb), len(toks), zlib.crc32(jb + toks.tobytes())) + jb + \
        toks.tobytes() + payload


@pytest.mark.slow  # exports the real SmolLM2 package
@pytest.mark.parametrize("question", [ASK_B, ASK_A], ids=["shared-system-prompt", "same-prompt"])
def test_restored_prefix_gives_the_cold_tokens_and_logprobs(smollm2, cold, saved_entry, tmp_path, question):
    data, name = saved_entry
    (tmp_path / name).write_bytes(data)
    model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))  # a fresh process's view: nothing in memory
    ids = model.encode(chat(question))
    tokens, lps, res = run(model, chat(question))
    first = model.encode(chat(ASK_A))
    shared = next(i for i, (a, b) in enumerate(zip(first + [-1], ids + [-2])) if a != b)
    restored = res.stats["prompt_cache"]["restored_tokens"]
    assert restored == min(shared, len(ids) - 2) and restored > 400  # the whole system prompt came from disk
    assert res.reused_prompt_tokens == restored
    assert tokens == cold[question][0]
    np.testing.assert_allclose(lps, cold[question][1], atol=1e-4)


@pytest.mark.slow  # exports the real SmolLM2 package
def test_a_batched_model_restores_into_and_saves_from_its_slots(smollm2, cold, saved_entry, tmp_path):
    """With parallel > 1 the engine restores a prompt's saved start into the prompt's KV slot and saves a
    new long prompt from it, in the entry format and key of the one-sequence model: entries go both ways."""
    data, name = saved_entry  # saved by a one-sequence model
    (tmp_path / name).write_bytes(data)
    batched = edgeinfer.load(smollm2, parallel=2, prompt_cache=cache_at(tmp_path))
    tokens, lps, res = run(batched, chat(ASK_B))
    assert res.reused_prompt_tokens > 400  # the system prompt came from disk into the slot
    assert batched.engine.stats["restored_prompt_tokens"] == res.reused_prompt_tokens
    assert res.stats["prompt_cache"] == {"restored_tokens": res.reused_prompt_tokens, "saved_tokens": 0}
    assert tokens == cold[ASK_B][0]
    np.testing.assert_allclose(lps, cold[ASK_B][1], atol=1e-4)
    assert sorted(p.name for p in tmp_path.glob("*.kv")) == [name]  # nothing new worth saving
    batched.engine.close()

    fresh = tmp_path / "fresh"
    batched = edgeinfer.load(smollm2, parallel=2, prompt_cache=cache_at(fresh))
    *_, res = run(batched, chat(ASK_A))
    assert res.stats["prompt_cache"] == {"restored_tokens": 0, "saved_tokens": res.prompt_tokens}
    batched.engine.close()
    saved = list(fresh.glob("*.kv"))
    assert [p.name for p in saved] == [name]  # the same key and token ids as the one-sequence model's entry
    def payload(entry: bytes) -> bytes:
        _, _, jlen, ntok, _ = HEAD.unpack_from(entry)
        return entry[HEAD.size + jlen + 4 * ntok:]

    assert payload(saved[0].read_bytes()) == payload(data)  # the slot's prefill wrote the very same KV
    single = edgeinfer.load(smollm2, prompt_cache=cache_at(fresh))
    tokens, lps, res = run(single, chat(ASK_B))
    assert res.stats["prompt_cache"]["restored_tokens"] > 400
    assert tokens == cold[ASK_B][0]
    np.testing.assert_allclose(lps, cold[ASK_B][1], atol=1e-4)


@pytest.mark.slow  # exports the real SmolLM2 package
def test_the_logprob_check_sees_a_wrong_restore(smollm2, cold, saved_entry, tmp_path):
    """Control: another text's KV restored under chat(ASK_B)'s token ids changes the log-probabilities far
    beyond the tolerance above, so that comparison would catch a restore that loads the wrong KV."""
    data, name = saved_entry
    shuffled = "\n\n".join(reversed(DOC.split("\n\n")))  # the same paragraphs in the reverse order
    assert shuffled[:100] != DOC[:100]
    other = [{"role": "system", "content": shuffled}, {"role": "user", "content": ASK_A}]
    run(edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path / "other")), other)
    wrong = next((tmp_path / "other").glob("*.kv")).read_bytes()
    model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))
    ids_b = model.encode(chat(ASK_B))
    (tmp_path / name).write_bytes(rewrite(wrong, tokens=(ids_b * 2)[: HEAD.unpack_from(wrong)[3]]))
    tokens, lps, res = run(model, chat(ASK_B))
    assert res.stats["prompt_cache"]["restored_tokens"] > 64
    m = min(len(lps), len(cold[ASK_B][1]))
    assert tokens != cold[ASK_B][0] or np.max(np.abs(lps[:m] - cold[ASK_B][1][:m])) > 0.01


def _corrupt(data):
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


BAD = {
    "corrupt-payload": (_corrupt, "payload fails its CRC-32"),
    "truncated": (lambda d: d[: len(d) // 3], "truncated"),
    "corrupt-header": (lambda d: d[:HEAD.size + 5] + bytes([d[HEAD.size + 5] ^ 1]) + d[HEAD.size + 6:],
                       "header fails its CRC-32"),
    "other-package": (lambda d: rewrite(d, meta=lambda m: m["key"].update(manifest_sha256="0" * 64)),
                      "another package"),
    "other-dtype": (lambda d: rewrite(d, meta=lambda m: [r.__setitem__(4, "<f2") for r in m["key"]["kv"]]),
                    "another KV layout or dtype"),
    "other-onnxruntime": (lambda d: rewrite(d, meta=lambda m: m["key"].update(onnxruntime="0.0.1")),
                          "another onnxruntime version"),
    "other-version": (lambda d: rewrite(d, version=99), "format version 99"),
    "not-a-cache-file": (lambda d: b"PK\x03\x04" + d[4:], "not a prompt cache file"),
}


@pytest.mark.slow  # exports the real SmolLM2 package
@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_file_is_ignored_with_a_warning_and_gives_the_cold_output(smollm2, cold, saved_entry, tmp_path,
                                                                        caplog, kind):
    data, name = saved_entry
    mutate, reason = BAD[kind]
    bad = tmp_path / name
    bad.write_bytes(mutate(data))
    model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))
    with caplog.at_level(logging.WARNING, logger="edgeinfer.prompt_cache"):
        tokens, lps, res = run(model, chat(ASK_B))
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgeinfer.prompt_cache"]
    assert len(warnings) == 1 and reason in warnings[0] and name in warnings[0], warnings
    assert res.stats["prompt_cache"]["restored_tokens"] == 0 and res.reused_prompt_tokens == 0
    assert tokens == cold[ASK_B][0]
    np.testing.assert_allclose(lps, cold[ASK_B][1], atol=1e-4)
    # the bad file is gone; the cold prompt was saved in its place and is restored next time
    assert not bad.exists() or bad.read_bytes() != mutate(data)
    again = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))
    tokens2, _, res2 = run(again, chat(ASK_B))
    assert res2.stats["prompt_cache"]["restored_tokens"] > 400 and tokens2 == tokens


def test_lru_eviction_keeps_the_folder_within_its_bound(tmp_path):
    cache = PromptCache(tmp_path, max_bytes=3000)
    key = {"format": 1}
    paths = []
    for i in range(3):
        payload = np.full(1000, i, np.uint8)
        paths.append(cache.write(f"k-{i}.kv", {"key": key, "model": "m"}, np.arange(10 + i), payload))
        if i == 1:  # entry 0 is used again: entry 1 is now the least recently used
            os.utime(paths[0], (1e9 + 10, 1e9 + 10))
            os.utime(paths[1], (1e9, 1e9))
        assert cache.total_bytes() <= 3000
    assert [p.exists() for p in paths] == [True, False, True]
    assert {e.path.name for e in cache.entries()} == {"k-0.kv", "k-2.kv"}
    assert cache.stats["evicted"] == 1
    with pytest.raises(PromptCacheError, match="positive"):
        PromptCache(tmp_path, max_bytes=0)
    with pytest.raises(PromptCacheError, match="not a size"):
        PromptCache(tmp_path, max_bytes="lots")
    with pytest.raises(PromptCacheError, match="min_tokens"):
        PromptCache(tmp_path, min_tokens=0)


@pytest.mark.slow  # exports the real SmolLM2 package
def test_real_saves_respect_the_bound_and_an_entry_over_it_is_not_saved(smollm2, tmp_path, caplog):
    model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path, max_bytes="30MB"))
    for text in (DOC[:700], DOC[700:1400], DOC[1400:]):  # ~150-200 tokens each: ~8 MB of KV
        run(model, [{"role": "system", "content": text}, {"role": "user", "content": ASK_A}])
        assert model.prompt_cache.cache.total_bytes() <= 30e6
    assert len(list(tmp_path.glob("*.kv"))) >= 2
    small = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path / "small", max_bytes="1MB"))
    with caplog.at_level(logging.WARNING, logger="edgeinfer.prompt_cache"):
        run(small, chat(ASK_A))
    assert any("more than the prompt cache's bound" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "small").glob("*"))


@pytest.mark.slow  # exports the real SmolLM2 package
def test_a_failed_write_leaves_no_partial_file(smollm2, tmp_path, monkeypatch, caplog):
    import os

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))
    monkeypatch.setattr(os, "fsync", full_disk)
    with caplog.at_level(logging.WARNING, logger="edgeinfer.prompt_cache"):
        tokens, _, res = run(model, chat(ASK_A))
    assert res.stats["prompt_cache"]["saved_tokens"] > 0  # it tried
    assert any("could not save" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a writer killed mid-file leaves a temporary file: never read, removed once stale
    stale = tmp_path / ".tmp-killed.part"
    stale.write_bytes(b"half an entry")
    os.utime(stale, (1e9, 1e9))
    model.reset()
    run(model, chat(ASK_A))
    assert [p.suffix for p in tmp_path.iterdir()] == [".kv"]


@pytest.mark.slow  # exports the real SmolLM2 package
def test_background_writes_and_cli_cache_list_clear(smollm2, tmp_path, monkeypatch, capsys):
    from edgeinfer.cli import main

    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    prompt = DOC + "\n\nSummarize the text above in one sentence."
    outs = []
    for _ in range(2):
        assert main(["run", str(smollm2), prompt, "--chat", "--prompt-cache", "--max-new-tokens", "8", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["stats"]["prompt_cache"] == {"restored_tokens": 0, "saved_tokens": outs[0]["prompt_tokens"]}
    assert outs[1]["stats"]["prompt_cache"]["restored_tokens"] == outs[1]["prompt_tokens"] - 2
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "SmolLM2" in listing and f" {outs[0]['prompt_tokens']} " in listing and "1 entry," in listing
    assert main(["cache", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["tokens"] == outs[0]["prompt_tokens"] and rows[0]["problem"] is None
    assert main(["cache", "clear"]) == 0
    assert "removed 1 saved prompt" in capsys.readouterr().out
    assert not list((tmp_path / "prompts").glob("*.kv"))
    assert main(["cache", "list"]) == 0 and "no saved prompts" in capsys.readouterr().out
    assert main(["run", str(smollm2), "hi", "--prompt-cache-bytes", "1MB"]) == 2
    assert "add --prompt-cache" in capsys.readouterr().err


@pytest.mark.slow  # exports the real SmolLM2 package
def test_server_saves_and_restores_and_serve_turns_it_on(smollm2, tmp_path, monkeypatch, capsys):
    from starlette.testclient import TestClient

    from edgeinfer.server import create_app

    body = {"messages": chat(ASK_B), "max_tokens": 12, "temperature": 0}
    texts = []
    for _ in range(2):  # two server processes, one after the other
        model = edgeinfer.load(smollm2, prompt_cache=cache_at(tmp_path))
        with TestClient(create_app(model)) as http:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            texts.append(r.json()["choices"][0]["message"]["content"])
            health = http.get("/health").json()["prompt_cache"]
    assert texts[0] == texts[1]
    assert health["hits"] == 1 and health["restored_tokens"] > 400

    import uvicorn

    from edgeinfer.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path / "home"))
    assert main(["serve", str(smollm2), "--prompt-cache-bytes", "64MB"]) == 0
    pc = apps[-1].state.edgeinfer.model.prompt_cache
    assert pc is not None and pc.cache.root == tmp_path / "home" / "prompts" and pc.cache.max_bytes == 64_000_000
    assert main(["serve", str(smollm2), "--parallel", "2"]) == 0  # batched: restored into the slots
    model = apps[-1].state.edgeinfer.model
    assert model.prompt_cache is not None and model.engine.prompt_cache is model.prompt_cache
    model.engine.close()
    assert main(["serve", str(smollm2), "--no-prompt-cache"]) == 0
    assert apps[-1].state.edgeinfer.model.prompt_cache is None
    assert main(["serve", str(smollm2), "--no-prompt-cache", "--prompt-cache-bytes", "1MB"]) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_npu_package_runs_without_the_cache_with_one_warning(tiny_models, tmp_path, caplog):
    from edgeinfer.export import export_model

    pkg = tmp_path / "npu"
    export_model(str(tiny_models("llama")), pkg, "int8", target="npu", max_context=64, prefill_chunk=8,
                 progress=False)
    with caplog.at_level(logging.WARNING, logger="edgeinfer.prompt_cache"):
        model = edgeinfer.load(pkg, prompt_cache=cache_at(tmp_path / "pc", min_tokens=4))
        ref = edgeinfer.load(pkg).complete(list(range(5, 30)), max_new_tokens=6)
        got = model.complete(list(range(5, 30)), max_new_tokens=6)
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgeinfer.prompt_cache"]
    assert len(warnings) == 1 and "prompt cache is off" in warnings[0] and "StaticDecoder" in warnings[0]
    assert model.prompt_cache is None and got.tokens == ref.tokens
    assert not (tmp_path / "pc").exists()
    with pytest.raises(PromptCacheError, match="prompt_cache must be"):
        edgeinfer.load(pkg, prompt_cache=42)


def test_sparse_moe_restores_exactly(tmp_path):
    """The MoE decoder's single KV cache restores too: logits after a restored prefix equal a cold prompt's."""
    from conftest import build_from_config
    from edgeinfer.export import export_model
    from test_moe import moe_config

    hf = build_from_config(moe_config("mixtral"), tmp_path / "hf")
    pkg = tmp_path / "pkg"
    export_model(str(hf), pkg, "fp32", max_context=128, progress=False)
    rng = np.random.default_rng(0)
    first = [int(t) for t in rng.integers(3, 300, 60)]
    second = first[:50] + [int(t) for t in rng.integers(3, 300, 10)]
    cold_tokens, cold_lps, _ = run(edgeinfer.load(pkg), second)
    run(edgeinfer.load(pkg, prompt_cache=cache_at(tmp_path / "pc", min_tokens=16)), first)
    tokens, lps, res = run(edgeinfer.load(pkg, prompt_cache=cache_at(tmp_path / "pc", min_tokens=16)), second)
    assert res.stats["prompt_cache"]["restored_tokens"] == 50
    assert tokens == cold_tokens
    np.testing.assert_allclose(lps, cold_lps, atol=1e-4)


def test_every_stage_of_a_staged_package_is_restored(tiny_models, tmp_path):
    """Three stages with exits, the saving run decoding with early exits (later stages lag behind): every
    stage's cache is saved and restored, and the restored prompt's logprobs equal a cold prompt's."""
    from edgeinfer.export import export_model

    pkg = tmp_path / "pkg"
    export_model(str(tiny_models("llama")), pkg, "fp32", stages=[1, 2], exits=[1, 2], max_context=256,
                 progress=False)
    rng = np.random.default_rng(1)
    first = [int(t) for t in rng.integers(3, 300, 70)]
    second = first[:55] + [int(t) for t in rng.integers(3, 300, 9)]
    cold_tokens, cold_lps, _ = run(edgeinfer.load(pkg), second)
    saver = edgeinfer.load(pkg, prompt_cache=cache_at(tmp_path / "pc", min_tokens=16))
    gen = saver.generate(first, max_new_tokens=12, strategy="early-exit", threshold=0.0)
    gen.text()
    assert len(saver.decoder.kv_caches()) == 3 and gen.result.stats["prompt_cache"]["saved_tokens"] == 70
    model = edgeinfer.load(pkg, prompt_cache=cache_at(tmp_path / "pc", min_tokens=16))
    tokens, lps, res = run(model, second)
    assert res.stats["prompt_cache"]["restored_tokens"] == 55
    assert tokens == cold_tokens
    np.testing.assert_allclose(lps, cold_lps, atol=1e-5)


def test_an_entry_that_extends_another_replaces_it(tiny_packages, tmp_path):
    """A conversation that goes on: the longer prompt's entry replaces the one it extends, which it serves too."""
    pkg = tiny_packages("llama", "fp32")
    rng = np.random.default_rng(2)
    first = [int(t) for t in rng.integers(3, 300, 40)]
    longer = first + [int(t) for t in rng.integers(3, 300, 30)]
    folder = tmp_path / "pc"
    model = edgeinfer.load(pkg, prompt_cache=cache_at(folder, min_tokens=16))
    run(model, first)
    (only,) = folder.glob("*.kv")
    model.reset()  # as a new process would: the disk, not the model's own cache, holds the prefix
    _, _, res = run(model, longer)
    assert res.stats["prompt_cache"] == {"restored_tokens": 40, "saved_tokens": 70}
    (replacement,) = folder.glob("*.kv")
    assert replacement != only
    cold_tokens, cold_lps, _ = run(edgeinfer.load(pkg), first)
    tokens, lps, res = run(edgeinfer.load(pkg, prompt_cache=cache_at(folder, min_tokens=16)), first)
    assert res.stats["prompt_cache"]["restored_tokens"] == 38 and tokens == cold_tokens
    np.testing.assert_allclose(lps, cold_lps, atol=1e-5)
    # a prompt that adds fewer than min_tokens to what the cache holds is not saved again
    _, _, res = run(edgeinfer.load(pkg, prompt_cache=cache_at(folder, min_tokens=16)), longer[:60] + [5, 6, 7])
    assert res.stats["prompt_cache"] == {"restored_tokens": 60, "saved_tokens": 0}
    assert list(folder.glob("*.kv")) == [replacement]


def test_a_batched_model_keeps_its_answer_when_a_save_fails_and_restores_on_the_tiny_llama(tiny_packages, tmp_path,
                                                                                          monkeypatch, caplog):
    pkg = tiny_packages("llama", "int4")
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    ref = edgeinfer.load(pkg).complete(prompt, max_new_tokens=8, ignore_eos=True).tokens
    batched = edgeinfer.load(pkg, parallel=2, prompt_cache=cache_at(tmp_path, min_tokens=4))

    def broken(*args, **kw):
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(batched.prompt_cache, "save", broken)
    with caplog.at_level(logging.WARNING):
        res = batched.complete(prompt, max_new_tokens=8, ignore_eos=True)
    assert res.tokens == ref and "could not save a prompt" in caplog.text and not list(tmp_path.glob("*.kv"))
    monkeypatch.undo()
    assert batched.complete(prompt, max_new_tokens=8, ignore_eos=True).tokens == ref  # now saved
    assert len(list(tmp_path.glob("*.kv"))) == 1
    batched.engine.close()
    fresh = edgeinfer.load(pkg, parallel=2, prompt_cache=cache_at(tmp_path, min_tokens=4))
    res = fresh.complete(prompt, max_new_tokens=8, ignore_eos=True)
    assert res.tokens == ref and res.reused_prompt_tokens == res.prompt_tokens - 2  # restored into its slot
    assert fresh.engine.stats["restored_prompt_tokens"] == res.reused_prompt_tokens
