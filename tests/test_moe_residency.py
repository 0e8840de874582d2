"""Expert residency and read-ahead rules: routing measured at export (frequencies, co-activation
layout), the budget split by miss cost, resident experts, speculative reads that never evict
what the running layer or their own layer needs, a layer's misses read together."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_moe import PROMPT, few_experts_budget, moe_models  # noqa: F401


def test_export_records_routing_and_lays_out_the_store(moe_models):  # noqa: F811
    _, _, pkg = moe_models("qwen3_moe")
    moe = json.loads((pkg / "edgeinfer.json").read_text())["moe"]
    routing, index = moe["routing"], moe["expert_store"]
    assert routing["calibration_tokens"] > 100 and index["layout"] == "co-activation"
    for layer, freqs in routing["frequencies"].items():
        assert len(freqs) == moe["num_experts"] and abs(sum(freqs) - moe["top_k"]) < 1e-3
        offsets = [off for off, _ in index["layers"][layer]]
        assert len(set(offsets)) == len(offsets) and len(index["checksums"][layer]) == len(offsets)
        # the most frequent expert comes first in its layer's stretch of the store
        assert offsets[int(np.argmax(freqs))] == min(offsets)


def test_budget_split_follows_miss_cost():
    from edgeinfer.moe.residency import ResidencyPlan

    concentrated = np.array([1.0, 0.9, 0.05, 0.05] + [0.0] * 12)  # two experts take almost every token
    spread = np.full(16, 2 / 16)
    plan = ResidencyPlan.from_frequencies({0: concentrated, 1: spread}, capacity=12, top_k=2, resident_fraction=0.5)
    # beyond one token's experts each slot goes where it saves most: the spread layer
    assert plan.quotas == {0: 2.0, 1: 10.0}
    assert not plan.resident[0] and len(plan.resident[1]) == 5  # half its share; room left for top-k
    plan = ResidencyPlan.from_frequencies({0: concentrated, 1: spread}, capacity=24, top_k=2, resident_fraction=0.5)
    assert plan.quotas[0] == 8 and plan.resident[0] == frozenset({0, 1, 2, 3})
    equal = ResidencyPlan.equal([0, 1], 12, 2)
    assert equal.quotas == {0: 6.0, 1: 6.0} and not any(equal.resident.values())
    full = ResidencyPlan.from_frequencies({0: concentrated, 1: spread}, capacity=32, top_k=2)
    assert full.quotas == {0: 16.0, 1: 16.0}


def _loaded(pkg, slots: int, **kw):
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    probe = MoEDecoder(open_package(pkg), resolve_provider("cpu"), prefetch=False, readers=0)
    per = probe.cache.expert_bytes
    probe.close()
    return MoEDecoder(open_package(pkg), resolve_provider("cpu"), memory_budget=slots * per, **kw)


def test_speculative_reads_never_evict_the_running_layer_or_their_own_guesses(moe_models):  # noqa: F811
    _, _, pkg = moe_models("qwen3_moe")
    dec = _loaded(pkg, 6, prefetch=False, resident_fraction=0)
    cache = dec.cache
    for layer, experts in ((0, [0, 1]), (1, [0, 1]), (2, [0, 1])):
        cache.acquire(layer, experts)
        cache.release(layer, experts)
    assert cache.count == cache.capacity == 6 and cache.free_slots() == 0
    cache.position = (5, 0)  # the decoder runs layer 0 with experts 0 and 1
    running = cache.acquire(0, [0, 1])
    jobs = cache.start_speculative(5, 1, [4, 5], keep=frozenset({0, 4, 5}))  # guesses for layer 1
    cache.run_loads(jobs, prefetched=True)
    assert set(cache.layers[0]) == {0, 1}  # the running layer's experts stay
    assert 0 in cache.layers[1] and {4, 5} <= set(cache.layers[1]) | set(cache.layers[2])
    assert [e.session for e in cache.acquire(0, [0, 1])] == [e.session for e in running]
    assert cache.start_speculative(4, 2, [6], keep=frozenset()) == []  # behind the decoder: stale
    assert cache.stats.prefetch_skipped >= 1
    dec.close()


def test_a_miss_with_every_layer_at_its_share_evicts_from_its_own_layer(moe_models):  # noqa: F811
    """On-demand eviction takes the layer furthest above its share; where every layer is at its share, the
    asking layer's own least recently used expert (the other layers keep theirs: shares stay put)."""
    _, _, pkg = moe_models("qwen3_moe")
    dec = _loaded(pkg, 6, prefetch=False, resident_fraction=0)
    cache = dec.cache
    shares = {layer: int(q) for layer, q in cache.quota.items()}
    assert sum(shares.values()) == cache.capacity and all(q == cache.quota[i] for i, q in shares.items())
    for layer, q in shares.items():
        for e in range(q):
            cache.acquire(layer, [e])
            cache.release(layer, [e])
    before = {layer: list(cache.layers[layer]) for layer in shares}
    last = max(layer for layer, q in shares.items() if q)
    cache.acquire(last, [7])
    cache.release(last, [7])
    for layer in shares:
        want = before[layer] if layer != last else before[layer][1:] + [7]
        assert list(cache.layers[layer]) == want, (layer, list(cache.layers[layer]), want)
    dec.close()


def test_resident_experts_are_never_evicted(moe_models):  # noqa: F811
    _, _, pkg = moe_models("qwen3_moe")
    dec = _loaded(pkg, 9, prefetch=False, resident_fraction=0.4)
    cache = dec.cache
    resident = {layer: set(r) for layer, r in cache.resident.items()}
    assert any(resident.values())
    assert cache.warm() == sum(len(r) for r in resident.values())
    for _ in range(3):
        for layer in cache.layers:
            for e in range(8):
                cache.acquire(layer, [e])
                cache.release(layer, [e])
                assert cache.count <= cache.capacity
    for layer, r in resident.items():
        assert r <= set(cache.layers[layer])
    assert_shares_counted(cache)
    dec.close()


def test_a_layers_misses_are_read_together(moe_models):  # noqa: F811
    _, _, pkg = moe_models("qwen3_moe")
    dec = _loaded(pkg, 8, prefetch=False, readers=3, resident_fraction=0)
    cache = dec.cache
    index = cache.store.index
    by_offset = sorted(range(8), key=lambda e: index["layers"]["1"][e][0])
    adjacent = by_offset[2:5]  # three records next to each other on disk: one read
    cache.acquire(1, adjacent)
    cache.release(1, adjacent)
    assert cache.stats.misses == 3 and cache.stats.reads == 1
    apart = [by_offset[0], by_offset[6]]
    cache.acquire(1, apart)
    cache.release(1, apart)
    assert cache.stats.misses == 5 and cache.stats.reads == 3
    dec.close()


@pytest.mark.parametrize("predict_from", ["stream", "input"])
def test_read_ahead_policies_compute_the_same_tokens(moe_models, predict_from):  # noqa: F811
    import edgeinfer

    _, _, pkg = moe_models("qwen2_moe")
    budget = few_experts_budget(pkg)
    model = edgeinfer.load(pkg, memory_budget=budget)
    model.decoder.predict_from = predict_from
    plain = edgeinfer.load(pkg)
    a = model.complete(PROMPT, max_new_tokens=10, ignore_eos=True)
    b = plain.complete(PROMPT, max_new_tokens=10, ignore_eos=True)
    assert a.tokens == b.tokens and a.stats["experts"]["predicted"] > 0


@pytest.mark.parametrize("mode", ["aio", "kernel"])
def test_reads_started_ahead_without_threads(moe_models, mode):  # noqa: F811
    import edgeinfer
    from edgeinfer.moe.reads import ReadQueue

    _, _, pkg = moe_models("qwen3_moe")
    plain = edgeinfer.load(pkg).complete(PROMPT, max_new_tokens=12, ignore_eos=True).tokens
    model = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg))
    dec = model.decoder
    assert dec.pool is None and dec.readahead is not None  # the default: no reader threads
    if mode == "kernel":  # what a file system without O_DIRECT (or a kernel without AIO) gets
        dec.cache.store.use_page_cache()
        dec.cache.reads = ReadQueue(dec.cache.store)
    assert dec.cache.reads.mode == mode
    res = model.complete(PROMPT, max_new_tokens=12, ignore_eos=True)
    stats = res.stats["experts"]
    assert res.tokens == plain
    assert stats["prefetched"] > 0 and 0 < stats["prefetch_used"] <= stats["prefetched"]
    assert stats["hits"] + stats["late_prefetches"] + stats["misses"] == stats["needed"]
    # guesses for layers already run were dropped: at most the next layer's are pending, within the pool
    pending = dec.cache.reads.pending
    assert len({layer for layer, _ in pending}) <= 1 and len(pending) <= dec.readahead.depth
    n = dec.cache.reads.buffers()
    assert n["free"] + n["pending"] + n["dropped"] == n["all"]  # every scratch buffer accounted for
    assert_shares_counted(dec.cache)
    dec.close()


def assert_shares_counted(cache):
    """How far each layer is above its share, kept as experts come and go, equals the count."""
    for i in cache.layers:
        assert cache._over[i] == len(cache.layers[i]) + cache._reserved[i] - cache.quota[i], i


def test_expert_sessions_and_kv_follow_the_execution_target(moe_models):  # noqa: F811
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    for family in ("olmoe", "mixtral"):
        pkg = moe_models(family)[2]
        target = resolve_provider("cpu")
        dec = MoEDecoder(open_package(pkg), target, memory_budget=few_experts_budget(pkg))
        assert dec.kv.device == target.device_memory
        entry = dec.cache.acquire(0, [0])[0]
        assert entry.session.get_providers() == [target.ort_name]
        dec.close()


def test_reads_fall_back_when_the_kernel_refuses_aio(moe_models):  # noqa: F811
    import edgeinfer

    _, _, pkg = moe_models("qwen3_moe")
    plain = edgeinfer.load(pkg).complete(PROMPT, max_new_tokens=8, ignore_eos=True).tokens
    model = edgeinfer.load(pkg, memory_budget=few_experts_budget(pkg))
    reads = model.decoder.cache.reads
    if reads.mode != "aio":
        pytest.skip("no native AIO here")

    def refuse(fd, batch):
        raise OSError(22, "Invalid argument")

    reads.aio.submit = refuse
    res = model.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert res.tokens == plain and reads.mode in ("kernel", "sync") and res.stats["experts"]["misses"] > 0
    model.decoder.close()


def test_acquire_each_gives_the_cached_first_and_cleans_up_when_closed_early(moe_models):  # noqa: F811
    _, _, pkg = moe_models("qwen3_moe")
    dec = _loaded(pkg, 6, prefetch=False, resident_fraction=0)
    cache = dec.cache
    cache.acquire(0, [3])
    cache.release(0, [3])
    order = [i for i, _ in cache.acquire_each(0, [1, 3, 2])]
    assert order[0] == 1 and sorted(order) == [0, 1, 2]  # expert 3 (index 1) was cached: it comes first
    cache.release(0, [1, 3, 2])
    assert not cache.pinned
    count = cache.count
    each = cache.acquire_each(1, [4, 5])
    next(each)  # both are being read; the caller stops after the first (say its expert failed)
    each.close()
    assert not cache.pinned and not cache.reads.pending  # pins released, the other read dropped
    assert cache.count - count == len(cache.layers[1]) == 1 and cache.free_slots() + cache.count == cache.capacity
    n = cache.reads.buffers()
    assert n["free"] + n["pending"] + n["dropped"] == n["all"]
    dec.close()


def test_read_ahead_is_on_for_the_tokens_where_it_measures_faster():
    from edgeinfer.moe.prefetch import _EXPLORE, _EXPLORE_MAX, _MARGIN, _WARMUP, ReadAhead

    def run(on_s, off_s, tokens=600, spikes=(), flip_at=None):
        ra = ReadAhead(cache=None, pool=None, top_k=2)
        modes = []
        for n in range(tokens):
            if n == flip_at:
                on_s, off_s = off_s, on_s
            modes.append(ra.start_token())
            ra.observe_token((on_s if ra.on else off_s) * (5 if n in spikes else 1))
        return modes

    def explored(modes, slower):  # the positions of the tokens in the slower mode
        return [n for n, m in enumerate(modes) if m == slower]

    clear = run(0.0100, 0.0120)
    assert clear[:_WARMUP] == [True, False] * (_WARMUP // 2)  # the first tokens alternate
    later = explored(clear[_WARMUP:], False)
    # then read-ahead (faster by more than the margin); the other mode is explored, first after _EXPLORE
    # tokens, then twice as late each time the choice stands
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert later[0] == _EXPLORE - 1 and gaps[:4] == [2 * _EXPLORE, 4 * _EXPLORE, 8 * _EXPLORE, _EXPLORE_MAX]
    assert set(gaps[4:]) == {_EXPLORE_MAX}
    # faster by less than the margin: a tie within noise, and no read-ahead but the explorations
    tie = run(0.0100, 0.0100 * (1 + _MARGIN / 2))[_WARMUP:]
    assert explored(tie, True) == later
    # a token slowed down by something else (say preempted) does not flip the choice
    spiked = run(0.012, 0.010, spikes=(_WARMUP + 3, _WARMUP + 5))[_WARMUP:]
    assert explored(spiked, True) == explored(run(0.012, 0.010)[_WARMUP:], True)
    # when the slower mode becomes the faster one, it is found at its next exploration and taken
    flipped = run(0.012, 0.010, flip_at=300)
    assert flipped[300 + _EXPLORE_MAX:].count(True) > 0.9 * len(flipped[300 + _EXPLORE_MAX:])
