"""The Python API for apps: one model shared by threads, cancellation from
another thread, callbacks, async iteration."""

import asyncio
import threading
import time

import edgeinfer

PROMPTS = ["Paris is the capital of", "def add(a, b):", "Once upon a time", "The quick brown fox"]


def test_concurrent_threads_get_sequential_results(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    expected = {p: model.complete(p, max_new_tokens=24, ignore_eos=True).tokens for p in PROMPTS}
    got, errors = {}, []

    def worker(p):
        try:
            for _ in range(3):
                got.setdefault(p, []).append(model.complete(p, max_new_tokens=24, ignore_eos=True).tokens)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in PROMPTS:
        assert got[p] == [expected[p]] * 3


def test_cancel_from_another_thread_is_prompt_and_model_stays_usable(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    ref = model.complete(PROMPTS[0], max_new_tokens=8, ignore_eos=True).tokens
    gen = model.generate(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
    stamps = []
    canceller = threading.Timer(0.05, lambda: (stamps.append(time.perf_counter()), gen.cancel()))
    canceller.start()
    n = 0
    for _ in gen:
        n += 1
        time.sleep(0.002)  # a UI consuming the stream
    end = time.perf_counter()
    canceller.join()
    assert gen.result.finish_reason == "cancelled" and n < 200
    assert end - stamps[0] < 0.2  # stops at the next token
    assert model.complete(PROMPTS[0], max_new_tokens=8, ignore_eos=True).tokens == ref


def test_callback_streaming_and_cancel_by_returning_false(tiny_packages):
    model = edgeinfer.load(tiny_packages("qwen3", "int4"))
    seen, flushed = [], []
    # after the fifth token the callback cancels; text the detokenizer still held back (an incomplete
    # character) may follow as one "flush" event, which is no new token
    res = model.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True).stream_to(
        lambda ev: (flushed if ev.source == "flush" else seen).append(ev.token_id) or len(seen) < 5)
    assert len(seen) == 5 and len(flushed) <= 1 and res.finish_reason == "cancelled" and res.new_tokens == 5


def test_async_iteration(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    ref = model.complete(PROMPTS[2], max_new_tokens=12, ignore_eos=True)

    async def main():
        gen = model.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        tokens = [ev.token_id async for ev in gen]
        t.cancel()
        return tokens, ticks

    tokens, ticks = asyncio.run(main())
    assert tokens == ref.tokens and ticks > 0  # the event loop kept running while the model worked


def test_break_then_new_generation_in_same_thread(tiny_packages):
    model = edgeinfer.load(tiny_packages("llama", "int4"))
    ref = model.complete(PROMPTS[3], max_new_tokens=10, ignore_eos=True).tokens
    gen = model.generate(PROMPTS[3], max_new_tokens=50, ignore_eos=True)
    for i, _ in enumerate(gen):
        if i == 2:
            break  # abandoned, still referenced
    assert model.complete(PROMPTS[3], max_new_tokens=10, ignore_eos=True).tokens == ref
