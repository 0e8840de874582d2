"""int4-channel experts (``expert_bits=4``): routed experts stored as int4 with 4-bit block
multipliers of a per-channel scale, widened at load to exactly the int8 weights of the shared
DynamicQuantizeMatMul graph -- no session per loaded expert, half the bytes of int8-channel.
They track transformers as closely as int4 weights allow, and a budget never changes what they
compute (the same arithmetic whether an expert stayed cached or was read again)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_moe import PROMPT, few_experts_budget, moe_models, reference_logits  # noqa: F401


@pytest.fixture(scope="module")
def int4_expert_packages(moe_models, tmp_path_factory):  # noqa: F811
    """family -> (transformers model, package with fp32 dense weights and int4-channel experts)."""
    from edgeinfer.export import export_model

    root = tmp_path_factory.mktemp("moe-int4-experts")
    made: dict = {}

    def get(family: str):
        if family not in made:
            model, hf, _ = moe_models(family)
            pkg = root / family
            export_model(str(hf), pkg, "fp32", max_context=128, expert_bits=4, block_size=16, progress=False)
            made[family] = (model, pkg)
        return made[family]

    return get


def test_widening_is_exact_and_close_to_the_weights():
    from edgeinfer.export.moe.expert_store import channel_int4
    from edgeinfer.export.quant.quantize import quantize_blockwise

    from edgeinfer.moe.formats import widen_int4

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    w[:, :3] *= 8  # outlier input features: block multipliers must follow them
    q4, mult, scale = channel_int4(w, 32)
    assert q4.shape == (64, 96) and mult.shape == (4, 96) and 1 <= np.abs(mult).min() and np.abs(mult).max() <= 15
    q8 = np.empty((128, 96), np.int8)
    widen_int4(q4, mult, q8)
    lo = (q4.view(np.int8) * np.int8(16)) >> 4
    hi = q4.view(np.int8) >> 4
    expected = np.concatenate([lo, hi]).astype(np.int32) * np.repeat(mult, 32, axis=0)
    assert np.array_equal(q8.astype(np.int32), expected) and np.abs(expected).max() <= 120
    err = np.linalg.norm((q8 * scale).T - w) / np.linalg.norm(w)
    block = quantize_blockwise(w, bits=4, block_size=32, symmetric=True).dequantize()
    assert err < 1.05 * np.linalg.norm(block - w) / np.linalg.norm(w), err  # as close as symmetric int4 blocks


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_int4_channel_experts_track_transformers_under_any_budget(int4_expert_packages, family):
    import edgeinfer

    hf_model, pkg = int4_expert_packages(family)
    index = json.loads((pkg / "edgeinfer.json").read_text())["moe"]["expert_store"]
    assert index["precision"] == "int4-channel" and index["weights_as_inputs"] and index["block_size"] == 16
    record = index["record_size"]
    ref = reference_logits(hf_model, PROMPT)
    results = {}
    for budget in (None, few_experts_budget(pkg)):
        model = edgeinfer.load(pkg, memory_budget=budget)
        dec = model.decoder
        # the widened int8 weights are what a cached expert holds: twice its int4 bytes, one page-rounded slot
        assert dec.cache.expert_bytes % 4096 == 0 and dec.cache.expert_bytes >= record
        got = dec.forward(PROMPT, logits_to_keep=len(PROMPT))
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
        dec.reset()
        dec.forward(PROMPT[:3])
        steps = np.stack([dec.step(t).copy() for t in PROMPT[3:]])
        res = model.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
        results[budget] = (got, steps, res.tokens)
        built = [e for layer in dec.cache.layers.values() for e in layer.values()]
        assert built and all(e.session is dec.cache.shared_session for e in built)  # no session per expert
        if budget is not None:
            assert res.stats["experts"]["misses"] > 0 and dec.cache.resident_bytes <= budget
        dec.close()
    (a, sa, ta), (b, sb, tb) = results.values()
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and ta == tb  # a budget changes nothing computed


def test_int4_channel_store_is_half_of_int8(moe_models, tmp_path):  # noqa: F811
    from edgeinfer.export import export_model

    _, hf, _ = moe_models("mixtral")
    sizes = {}
    for bits in (4, 8):
        export_model(str(hf), tmp_path / str(bits), "fp32", max_context=64, expert_bits=bits, block_size=16,
                     progress=False)
        sizes[bits] = json.loads((tmp_path / str(bits) / "edgeinfer.json").read_text())["moe"]["expert_store"]
    tensors = {b: sum(t["nbytes"] for t in s["tensors"]) for b, s in sizes.items()}
    assert tensors[4] < 0.6 * tensors[8], tensors


def test_records_made_runnable_on_the_helper_thread_change_nothing(int4_expert_packages, monkeypatch):
    """Large records are widened on a helper thread while the decode thread computes the cached experts;
    forced on for these small ones, every step's logits equal those of all experts resident."""
    import edgeinfer
    from edgeinfer.moe import experts as experts_mod

    _, pkg = int4_expert_packages("qwen3_moe")
    plain = edgeinfer.load(pkg).decoder
    plain.forward(PROMPT[:3])
    want = np.stack([plain.step(t).copy() for t in PROMPT[3:]])
    monkeypatch.setattr(experts_mod, "_HAND_OVER_S", 0.0)
    dec = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg)).decoder
    dec.forward(PROMPT[:3])
    got = np.stack([dec.step(t).copy() for t in PROMPT[3:]])
    stats = dec.expert_stats().as_dict()
    assert dec.cache.filler.helping and stats["misses"] > 0
    assert np.array_equal(got, want)
    assert not dec.cache.pinned and dec.cache.count <= dec.cache.capacity
    dec.close()
    assert not dec.cache.filler.helping
