"""Sparse MoE: tiny random Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE packages match
transformers (logits and greedy tokens) with every expert cached and with a cache
that holds only a few -- the store laid out by co-activation, reads started ahead,
guesses from either routing-ahead source; the expert store and the budget refuse
bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeinfer.errors import PackageError

BASE = dict(vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
PROMPT = [5, 17, 99, 3, 250, 11, 42, 7, 64, 128]


def moe_config(family: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "qwen3_moe":  # renormalized top-k, per-head q/k norms
        return Qwen3MoeConfig(**BASE, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, head_dim=16, norm_topk_prob=True)
    if family == "qwen2_moe":  # shared expert with a sigmoid gate, one dense layer, no renormalization
        return Qwen2MoeConfig(**BASE, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                              mlp_only_layers=[1], norm_topk_prob=False)
    if family == "mixtral":  # always renormalized
        return MixtralConfig(**BASE, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                             intermediate_size=32)
    if family == "olmoe":  # full-width q/k norms, no renormalization
        return OlmoeConfig(**BASE, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=32)
    raise ValueError(family)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """family -> (transformers model, HF folder, fp32 package)."""
    import torch
    from conftest import build_from_config
    from edgeinfer.export import export_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            hf = build_from_config(moe_config(family), root / f"hf-{family}")
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            pkg = root / f"pkg-{family}"
            export_model(str(hf), pkg, "fp32", max_context=128, progress=False)
            cache[family] = (model, hf, pkg)
        return cache[family]

    return get


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def few_experts_budget(pkg) -> int:
    """Room for one layer's top-k experts plus one: every layer keeps evicting. The cache counts
    what an expert costs in memory (measured at load), so ask a loaded one."""
    import edgeinfer

    dec = edgeinfer.load(pkg).decoder
    dec.close()
    return (dec.top_k + 1) * dec.cache.expert_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(moe_models, family):
    import edgeinfer

    hf_model, _, pkg = moe_models(family)
    ref = reference_logits(hf_model, PROMPT)
    greedy = reference_greedy(hf_model, PROMPT, 8)
    few = few_experts_budget(pkg)
    for budget, predict_from in ((None, "stream"), (few, "stream"), (few, "input")):
        model = edgeinfer.load(pkg, memory_budget=budget)
        dec = model.decoder
        dec.predict_from = predict_from  # where read-ahead's guesses come from: never what is computed
        got = dec.forward(PROMPT, logits_to_keep=len(PROMPT))
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        dec.reset()  # one token at a time: the decode path (routing per token, prefetch)
        dec.forward(PROMPT[:3])
        steps = np.stack([dec.step(t).copy() for t in PROMPT[3:]])
        np.testing.assert_allclose(steps, ref[3:], atol=1e-4, rtol=0)
        res = model.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
        assert res.tokens == greedy, (budget, res.tokens, greedy)
        stats = res.stats["experts"]
        assert stats["needed"] > 0 and stats["hits"] + stats["late_prefetches"] + stats["misses"] == stats["needed"]
        if budget is not None:  # a few experts only: the cache must have reloaded some
            assert dec.cache.resident_bytes <= budget
            assert dec.top_k <= dec.cache.capacity <= dec.top_k + 2
            assert stats["misses"] + stats["late_prefetches"] > 0
        dec.close()


def test_prefetch_predicts_and_does_not_change_results(moe_models):
    import edgeinfer

    _, _, pkg = moe_models("qwen3_moe")
    budget = few_experts_budget(pkg)  # experts keep leaving the cache: there is something to prefetch
    with_prefetch = edgeinfer.load(pkg, memory_budget=budget)
    without = edgeinfer.load(pkg, memory_budget=budget)
    without.decoder.stop_prefetch()  # every expert the decoder lacks is read when needed
    a = with_prefetch.complete(PROMPT, max_new_tokens=12, ignore_eos=True)
    b = without.complete(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert a.tokens == b.tokens
    sa, sb = a.stats["experts"], b.stats["experts"]
    assert sa["predicted"] > 0 and 0 <= sa["prefetch_accuracy"] <= 1
    assert sa["prefetched"] + sa["late_prefetches"] > 0  # the reader loaded experts for the next layer
    assert sb["prefetched"] == 0 and sb["predicted"] == 0


def test_int8_package_runs_close_to_fp32(moe_models, tmp_path):
    from edgeinfer.export import export_model

    import edgeinfer

    hf_model, hf, _ = moe_models("mixtral")
    pkg = tmp_path / "int8"
    export_model(str(hf), pkg, "int8", max_context=64, block_size=32, progress=False)
    index = json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]
    assert index["precision"] == "int8" and index["alignment"] == 4096
    assert all(off % 4096 == 0 for recs in index["layers"].values() for off, _ in recs)
    got = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg)).decoder.forward(PROMPT, len(PROMPT))
    ref = reference_logits(hf_model, PROMPT)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


def test_cli_run_reports_expert_stats(moe_models):
    _, _, pkg = moe_models("olmoe")
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "hello there", "--json",
                          "--max-new-tokens", "4", "--memory-budget", f"{few_experts_budget(pkg)}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]["experts"]
    for key in ("hits", "misses", "bytes_read", "wait_s", "prefetch_accuracy", "hit_rate"):
        assert key in stats
    assert stats["bytes_read"] > 0


def test_budget_below_one_layer_names_the_minimum(moe_models):
    import edgeinfer
    from edgeinfer.errors import MemoryBudgetError

    _, _, pkg = moe_models("mixtral")
    m = json.loads((pkg / "edgeinfer.json").read_text())["moe"]
    record = m["expert_store"]["record_size"]  # an expert costs at least its record in memory
    with pytest.raises(MemoryBudgetError, match=r"cannot hold one layer's 2 experts: give at least \d+ bytes") as e:
        edgeinfer.load(pkg, memory_budget=m["top_k"] * record - 1)
    minimum = int(str(e.value).split("at least ")[1].split(" bytes")[0])
    assert minimum >= m["top_k"] * record
    edgeinfer.load(pkg, memory_budget=2 * minimum).decoder.forward(PROMPT)
    with pytest.raises(MemoryBudgetError, match="not a size"):
        edgeinfer.load(pkg, memory_budget="lots")
    out = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "run", str(pkg), "hi", "--memory-budget", "1KB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "give at least" in out.stderr and "Traceback" not in out.stderr


def _copy(pkg, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def test_truncated_store_is_refused(moe_models, tmp_path):
    import edgeinfer

    pkg = _copy(moe_models("qwen2_moe")[2], tmp_path)
    store = pkg / "experts" / "experts.bin"
    with open(store, "r+b") as f:
        f.truncate(store.stat().st_size - 4096)
    with pytest.raises(PackageError, match="experts/experts.bin"):
        edgeinfer.load(pkg, verify=False)


@pytest.mark.parametrize("entry, message", [([4096 * 10**5, None], "outside the expert store"),
                                             ([100, None], "bad offset"),
                                             (["x", 1], "malformed")])
def test_index_outside_the_store_is_refused(moe_models, tmp_path, entry, message):
    import edgeinfer

    pkg = _copy(moe_models("mixtral")[2], tmp_path)
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    index = manifest["moe"]["expert_store"]
    index["layers"]["1"][2] = [entry[0], index["record_size"] if entry[1] is None else entry[1]]
    (pkg / "edgeinfer.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        edgeinfer.load(pkg, verify=False)


def test_corrupt_record_is_refused_by_its_checksum(moe_models, tmp_path):
    import edgeinfer

    pkg = _copy(moe_models("qwen3_moe")[2], tmp_path)
    index = json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]
    offset = index["layers"]["2"][5][0]
    with open(pkg / "experts" / "experts.bin", "r+b") as f:  # same size: only the bytes differ
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackageError, match="does not match its sha256"):
        edgeinfer.load(pkg, verify=True)
    dec = edgeinfer.load(pkg, verify=False).decoder  # unverified at open: the record's own checksum refuses it
    with pytest.raises(PackageError, match="expert 5 of layer 2 does not match its checksum"):
        dec.cache.acquire(2, [5])
    dec.close()


@pytest.mark.parametrize("change, message", [
    (lambda idx: idx["tensors"][0].update(name="gate_up.other"), "not an input of the expert graph"),
    (lambda idx: idx["checksums"]["0"].pop(), "checksums do not match its index"),
    (lambda idx: idx["layers"]["0"].__setitem__(1, list(idx["layers"]["0"][0])), "share one record"),
    (lambda idx: idx.update(precision="int3-channel"), "format 'int3-channel' is unknown"),
])
def test_store_layout_that_does_not_match_is_refused(moe_models, tmp_path, change, message):
    from edgeinfer.export import export_model

    import edgeinfer

    _, hf, _ = moe_models("olmoe")
    pkg = tmp_path / "pkg"
    export_model(str(hf), pkg, "fp32", max_context=64, expert_bits=8, progress=False)
    manifest = json.loads((pkg / "edgeinfer.json").read_text())
    change(manifest["moe"]["expert_store"])
    (pkg / "edgeinfer.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message) as e:
        edgeinfer.load(pkg, verify=False)
    assert "re-export" in str(e.value) or "upgrade" in str(e.value)


def test_cache_never_exceeds_budget_and_keeps_pinned(moe_models):
    import edgeinfer

    _, _, pkg = moe_models("qwen3_moe")
    dec = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg)).decoder
    dec.stop_prefetch()
    cache = dec.cache
    first = cache.acquire(0, [0, 1])
    for layer in (0, 2, 1):  # fill and churn while experts 0 and 1 of layer 0 are in use
        for e in range(8):
            cache.acquire(layer, [e])
            cache.release(layer, [e])
            assert cache.count <= cache.capacity
    assert 0 in cache.layers[0] and 1 in cache.layers[0]
    # the same sessions: never evicted while pinned
    assert [e.session for e in cache.acquire(0, [0, 1])] == [e.session for e in first]


def test_bench_reports_expert_stats(moe_models):
    from edgeinfer.bench import bench_package

    _, _, pkg = moe_models("qwen3_moe")
    report = bench_package(str(pkg), prompt_tokens=8, new_tokens=6, repeats=1, warmup=0,
                           memory_budget=few_experts_budget(pkg))
    stats = report["experts"][0]
    assert stats["needed"] > 0 and stats["bytes_read"] > 0 and stats["tokens"] > 0
