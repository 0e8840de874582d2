"""Continuous batching (edgeinfer/batching/): several generations of one model decoded together.

Every batched generation must give what the same request gives decoded alone: greedy tokens,
and sampled tokens for the same seed (each request keeps its own sampler). Requests join and
leave between steps, a cancelled one frees its slot without disturbing the others, and more
requests than slots wait for one. Two packages: the tiny random llama (fast; a 2-stage
package too) and the real SmolLM2-135M int4 default package.
"""

from __future__ import annotations

import threading

import pytest

import edgeinfer
from edgeinfer.decoders.base import PREFILL_TAIL
from edgeinfer.errors import GenerationError, MemoryBudgetError
from edgeinfer.memory import dense_needs

PROMPTS = ["Paris is the capital of", "one two three four five six seven eight nine ten eleven twelve",
           "hello", "The quick brown fox jumps over the lazy dog, and then the dog", "a b c d e f g"]


def _concurrently(fn, items):
    out = [None] * len(items)
    errors = []

    def run(i):
        try:
            out[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


@pytest.fixture(scope="module", params=[(), (2,)], ids=["one-stage", "two-stage"])
def pair(request, tiny_packages):
    pkg = tiny_packages("llama", "int4", request.param)
    return edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)


def test_batched_greedy_and_seeded_sampling_equal_each_request_alone(pair):
    solo, batched = pair
    batched.engine.prefill_chunk = 5  # prompts prefill in several chunks, between batched steps
    ref = [solo.complete(p, max_new_tokens=20, ignore_eos=True).tokens for p in PROMPTS]
    got = _concurrently(lambda p: batched.complete(p, max_new_tokens=20, ignore_eos=True).tokens, PROMPTS)
    assert got == ref  # five requests on three slots: two waited for a free one
    assert batched.engine.stats["rows"] > batched.engine.stats["steps"]  # steps did carry several sequences
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, ignore_eos=True)
    ref = [solo.complete(p, seed=i, **kw).tokens for i, p in enumerate(PROMPTS[:3])]
    got = _concurrently(lambda ip: batched.complete(ip[1], seed=ip[0], **kw).tokens, list(enumerate(PROMPTS[:3])))
    assert got == ref
    assert sorted(batched.engine.free) == [0, 1, 2]


def test_join_mid_stream_and_cancel_one_leave_the_others_intact(pair):
    solo, batched = pair
    ref = {p: solo.complete(p, max_new_tokens=24, ignore_eos=True).tokens for p in PROMPTS[:3]}
    first = batched.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    head = [next(first).token_id for _ in range(6)]  # running alone
    second = batched.generate(PROMPTS[1], max_new_tokens=24, ignore_eos=True)
    doomed = batched.generate(PROMPTS[2], max_new_tokens=24, ignore_eos=True)

    def drain(gen, stop_after=None):
        ids = []
        for ev in gen:
            if ev.source != "flush":
                ids.append(ev.token_id)
            if stop_after is not None and len(ids) == stop_after:
                gen.cancel()
        return ids

    rest, second_ids, doomed_ids = _concurrently(lambda a: drain(*a), [(first,), (second,), (doomed, 4)])
    assert head + rest == ref[PROMPTS[0]]
    assert second_ids == ref[PROMPTS[1]]
    assert doomed.result.finish_reason == "cancelled" and doomed_ids == ref[PROMPTS[2]][:len(doomed_ids)]
    abandoned = batched.generate(PROMPTS[3], max_new_tokens=24)
    next(abandoned)
    abandoned.close()  # a client gone: the slot comes back
    assert sorted(batched.engine.free) == [0, 1, 2]


def test_a_slow_consumer_stop_strings_and_a_full_context_match_decoding_alone(tiny_packages):
    """The engine samples ahead of a generation's thread (at most LOOKAHEAD tokens): a consumer that
    takes its time still gets its own tokens, a stop string ends a stream as it does alone, and a
    sequence that fills its context ends there with "length", as alone."""
    import time

    from edgeinfer.batching.engine import LOOKAHEAD

    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg, max_context=96), edgeinfer.load(pkg, max_context=96, parallel=2)
    ref = solo.complete(PROMPTS[1], max_new_tokens=20, ignore_eos=True)
    stop = ref.text[len(ref.text) // 2:][:3]
    stopped = solo.complete(PROMPTS[1], max_new_tokens=20, ignore_eos=True, stop=[stop])
    full = solo.complete(PROMPTS[3], max_new_tokens=200, ignore_eos=True)
    assert full.finish_reason == "length" and full.prompt_tokens + full.new_tokens == 97

    def slow(p):
        ids = []
        for ev in batched.generate(p, max_new_tokens=20, ignore_eos=True):
            if ev.source != "flush":
                ids.append(ev.token_id)
                time.sleep(0.02)
        return ids

    def fast(p):
        return batched.complete(p, max_new_tokens=200, ignore_eos=True)

    got_slow, got_full = _concurrently(lambda f: f[0](f[1]), [(slow, PROMPTS[1]), (fast, PROMPTS[3])])
    assert got_slow == ref.tokens
    assert (got_full.tokens, got_full.finish_reason) == (full.tokens, "length")
    got_stop = batched.complete(PROMPTS[1], max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert (got_stop.text, got_stop.finish_reason) == (stopped.text, "stop")
    assert got_stop.tokens == stopped.tokens and LOOKAHEAD >= 1
    assert sorted(batched.engine.free) == [0, 1] and not batched.engine.runs


def test_a_slot_keeps_its_prompt_for_the_next_request_that_starts_with_it(tiny_packages):
    """A finished sequence's slot keeps the tokens its cache holds: the same prompt again (or a
    longer one starting with it) prefills only the rest, and gives the tokens of a cold prompt. A
    request always takes the lowest free slot (batched steps run the rows up to the highest busy
    one): what that slot held moves to the free slot left longest ago, and comes back when asked
    for, and the kept tokens survive the batched steps that run over idle rows."""
    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)
    longer = PROMPTS[1] + " thirteen fourteen fifteen"
    ref = {p: solo.complete(p, max_new_tokens=12, ignore_eos=True).tokens for p in (PROMPTS[1], PROMPTS[3], longer)}
    first = batched.complete(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert first.tokens == ref[PROMPTS[1]] and first.reused_prompt_tokens <= 1  # at most a shared BOS
    other = batched.complete(PROMPTS[3], max_new_tokens=12, ignore_eos=True)
    assert other.tokens == ref[PROMPTS[3]] and other.reused_prompt_tokens <= 1 and other.stats["slot"] == 0
    again = batched.complete(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert again.stats["slot"] == 0 and again.reused_prompt_tokens == first.prompt_tokens - PREFILL_TAIL
    assert again.tokens == ref[PROMPTS[1]]
    grown = batched.complete(longer, max_new_tokens=12, ignore_eos=True)
    assert grown.reused_prompt_tokens >= first.prompt_tokens - PREFILL_TAIL and grown.tokens == ref[longer]
    # two together: each finds its prompt (one in a free slot, swapped in; the other copied from a busy one)
    got = _concurrently(lambda p: batched.complete(p, max_new_tokens=12, ignore_eos=True), [PROMPTS[3], longer])
    assert [r.tokens for r in got] == [ref[PROMPTS[3]], ref[longer]]
    assert got[0].reused_prompt_tokens == other.prompt_tokens - PREFILL_TAIL
    assert got[1].reused_prompt_tokens == grown.prompt_tokens - PREFILL_TAIL
    batched.reset()  # forgets what the slots hold
    assert batched.complete(longer, max_new_tokens=12, ignore_eos=True).reused_prompt_tokens <= 1


def test_paging_a_slot_in_keeps_what_it_holds(tiny_packages):
    """The engine pages the slots' buffers in while idle (lowest first, and a slot before its first use):
    zeros past the tokens a slot holds, never over them."""
    import time

    import numpy as np

    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)
    ref = solo.complete(PROMPTS[1], max_new_tokens=12, ignore_eos=True).tokens
    first = batched.complete(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    deadline = time.monotonic() + 30
    while batched.engine.committed < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.engine.committed == 3
    caches = batched.engine.caches
    layer, n = next(iter(caches.keys)), len(caches.held[0])
    kept = caches.keys[layer][0, :, :n].copy()
    assert n > 0 and kept.any()
    caches.keys[layer][0, :, n:] = 7  # what a dummy row or an earlier sequence left past the held tokens
    caches.commit(0)
    assert np.array_equal(caches.keys[layer][0, :, :n], kept) and not caches.keys[layer][0, :, n:].any()
    again = batched.complete(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert again.reused_prompt_tokens == first.prompt_tokens - PREFILL_TAIL and again.tokens == ref


def test_a_prompt_another_slot_holds_is_copied_not_prefilled(tiny_packages):
    """Requests that share a long start (a system prompt) prefill it once: a later one in another slot
    gets a copy of those cache rows (the slot that holds them is busy), and the tokens of a cold prompt."""
    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)
    system = "You answer in one word. " + PROMPTS[1] + " " + PROMPTS[4] + ". "
    prompts = [system + p for p in PROMPTS[:3]]
    ref = [solo.complete(p, max_new_tokens=10, ignore_eos=True).tokens for p in prompts]
    first = batched.generate(prompts[0], max_new_tokens=10, ignore_eos=True)
    head = [next(first).token_id]  # running in slot 0: the others find the system prompt there
    got = _concurrently(lambda p: batched.complete(p, max_new_tokens=10, ignore_eos=True), prompts[1:])
    assert head + [ev.token_id for ev in first if ev.source != "flush"] == ref[0]
    assert [r.tokens for r in got] == ref[1:]
    shared = len(batched.encode(system)) - 1  # the last token may merge with what follows
    assert all(r.reused_prompt_tokens >= shared for r in got)
    assert batched.engine.stats["reused_prompt_tokens"] >= 2 * shared


def test_many_requests_with_shared_prefixes_give_the_tokens_of_cold_prompts(tiny_packages):
    """Slots swapping and copying prefixes under load (random prompts that share starts, more threads than
    slots, budgets that differ): every reply is the one the prompt gets alone from a cold cache."""
    import random

    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)
    starts = ["", "You answer in one word. " + PROMPTS[1] + ". ", PROMPTS[3] + " "]
    prompts = [a + b for a in starts for b in PROMPTS[:3]] + [starts[1] + PROMPTS[0] + " and then"]
    ref = {}
    for p in prompts:
        solo.reset()
        ref[p] = solo.complete(p, max_new_tokens=12, ignore_eos=True).tokens

    def client(seed):
        rng, got = random.Random(seed), []
        for _ in range(8):
            p, n = rng.choice(prompts), rng.choice([3, 7, 12])
            got.append((p, n, batched.complete(p, max_new_tokens=n, ignore_eos=True)))
        return got

    runs = [r for got in _concurrently(client, list(range(5))) for r in got]
    assert all(res.tokens == ref[p][:n] for p, n, res in runs)
    assert sum(res.reused_prompt_tokens for _, _, res in runs) > 0 and sorted(batched.engine.free) == [0, 1, 2]


def test_a_start_in_a_free_slot_is_copied_when_a_swap_would_move_more_than_it_saves(tiny_packages):
    """The prompt's longest start sits in the only other (free) slot, only a few tokens longer than what
    its own slot holds: swapping both slots' rows would cost more than prefilling those tokens, copying
    the start less. The copy gives the tokens of a cold prompt."""
    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=2)
    base = PROMPTS[1] + " " + PROMPTS[3]
    prompt = base + " apple banana cherry"
    ref = solo.complete(prompt, max_new_tokens=12, ignore_eos=True).tokens
    first = batched.generate(base + " zebra", max_new_tokens=12, ignore_eos=True)
    next(first)  # slot 0 busy: the next request takes slot 1
    batched.complete(base + " ap", max_new_tokens=12, ignore_eos=True)
    list(first)
    got = batched.complete(prompt, max_new_tokens=12, ignore_eos=True)  # slot 0; its start is in slot 1
    assert got.stats["slot"] == 0 and got.tokens == ref
    assert got.reused_prompt_tokens >= len(batched.encode(base + " ap"))  # copied from slot 1


def test_batching_refuses_what_it_cannot_do(tiny_packages):
    pkg = tiny_packages("llama", "int4")
    model = edgeinfer.load(pkg, parallel=2)
    with pytest.raises(GenerationError, match="decodes one sequence at a time"):
        model.complete("hi", max_new_tokens=2, strategy="lookup")
    with pytest.raises(GenerationError, match="parallel must be an integer >= 1"):
        edgeinfer.load(pkg, parallel=0)
    need = dense_needs(model.package, None)
    budget = need["weights"] + 3 * need["kv"]  # room for three sequences' caches
    edgeinfer.load(pkg, parallel=3, memory_budget=budget)
    with pytest.raises(MemoryBudgetError, match="8 sequences × .* lower parallel or load with max_context="):
        edgeinfer.load(pkg, parallel=8, memory_budget=budget)


@pytest.mark.slow
def test_real_smollm2_batched_equals_alone(tmp_path_factory):
    """The default SmolLM2-135M int4 package: four chat requests decoded together give each one's
    own greedy reply, and again when their prompts are found in the slots (swapped or copied there)."""
    from edgeinfer.package_cache import resolve_model

    path = resolve_model("smollm2-135m")
    solo, batched = edgeinfer.load(path), edgeinfer.load(path, parallel=4)
    questions = [[{"role": "user", "content": q}] for q in
                 ("What is the opposite of hot?", "Name a planet.", "What color is the sky?", "Say hello.")]
    ref = [solo.complete(q, max_new_tokens=24).tokens for q in questions]
    assert _concurrently(lambda q: batched.complete(q, max_new_tokens=24).tokens, questions) == ref
    again = _concurrently(lambda q: batched.complete(q, max_new_tokens=24), questions)  # prompts held in the slots
    assert [r.tokens for r in again] == ref
    assert all(r.reused_prompt_tokens == r.prompt_tokens - PREFILL_TAIL for r in again)


def test_server_with_parallel_slots_serves_requests_together(tiny_packages):
    """`serve --parallel`: concurrent HTTP requests are decoded together, each with its own reply."""
    import httpx
    from test_server import RunningServer

    from edgeinfer.server import create_app

    pkg = tiny_packages("llama", "int4")
    solo, batched = edgeinfer.load(pkg), edgeinfer.load(pkg, parallel=3)
    srv = RunningServer(create_app(batched, max_queue=4))
    try:
        def ask(prompt):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0},
                           timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        alone = [solo.complete(p, max_new_tokens=32).text for p in PROMPTS[:3]]
        for _ in range(10):  # whether HTTP requests overlap is up to the scheduler and the load: one round must
            assert _concurrently(ask, PROMPTS[:3]) == alone
            if batched.engine.stats["rows"] > batched.engine.stats["steps"]:
                break
        assert batched.engine.stats["rows"] > batched.engine.stats["steps"]  # some steps ran several rows
    finally:
        srv.stop()
