"""The decode loop: prefill, then ask a strategy for the next token(s) until a
stop condition; detokenize as tokens stream; hold back text that might be the
start of a stop string so that a stop string never leaks into the output.

A *strategy* (``edgeinfer.strategies``) decides the next tokens given the
models and caches; speculative ones return several tokens per call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from edgeinfer.tokenizer import TextTokenizer

from .config import GenerationConfig
from .sampler import Sampler


@dataclass
class TokenEvent:
    """One generated token: id, the text it releases (may be empty while a
    character or a possible stop string is incomplete), its log-probability
    when asked for, and which model or exit produced it."""

    token_id: int
    text: str
    index: int
    logprob: float | None = None
    source: str = "model"


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled", "time" (max_time_s)
    ttft_s: float
    decode_tok_s: float
    total_s: float
    reused_prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Generation:
    """An iterator of :class:`TokenEvent`; ``.result`` is set once it ends.
    Stop iterating (or call ``cancel()``) to cancel."""

    def __init__(self, run):
        """RUN(generation) -> the iterator of events; it sets ``generation.result`` when it ends
        and reads ``generation.cancelled`` between tokens."""
        self.result: GenerationResult | None = None
        self._cancelled = False
        self._events: Iterator[TokenEvent] = run(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def text(self) -> str:
        """Run to the end and return the full text."""
        for _ in self:
            pass
        return self.result.text if self.result else ""

    def stream_to(self, callback) -> GenerationResult | None:
        """Call ``callback(event)`` for every event; returns the result. A callback
        that returns False cancels."""
        for ev in self:
            if callback(ev) is False:
                self.cancel()
        return self.result

    def close(self) -> None:
        """Stop now and release the model (also what abandoning the iterator does)."""
        close = getattr(self._events, "close", None)
        if close:
            close()

    def __aiter__(self):
        return self._async_events()

    async def _async_events(self):
        """``async for event in generation``."""
        async for batch in self.async_batches():
            for ev in batch:
                yield ev

    async def async_batches(self, ahead: int = 16):
        """``async for events in generation.async_batches()``: the events ready since the last batch (at
        least one), in order. One worker thread runs the generation, at most AHEAD events ahead of the
        consumer, and wakes the event loop once per batch (so the loop never blocks on the model, and a
        consumer that falls behind takes several events at once)."""
        import asyncio

        loop = asyncio.get_running_loop()
        ready: deque = deque()
        lock, room, wake, end = threading.Lock(), threading.Semaphore(ahead), asyncio.Event(), object()

        def push(item) -> None:
            with lock:
                was_empty = not ready
                ready.append(item)
            if was_empty:
                loop.call_soon_threadsafe(wake.set)

        def produce() -> None:
            try:
                for ev in self:
                    room.acquire()
                    push(ev)
                push(end)
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                push(e)

        worker = threading.Thread(target=produce, name="edgeinfer-gen", daemon=True)
        worker.start()
        try:
            while True:
                await wake.wait()
                wake.clear()  # before taking: an event pushed from now on sets it again
                with lock:
                    items = list(ready)
                    ready.clear()
                batch = []
                for item in items:
                    if item is end:
                        if batch:
                            yield batch
                        return
                    if isinstance(item, BaseException):
                        raise item
                    room.release()
                    batch.append(item)
                yield batch
        finally:
            # Also on cancellation (a client gone): the step in flight finishes (one token), then the
            # generation is closed, which releases the model. No await here: it must run even when cancelled.
            self.cancel()
            for _ in range(ahead):
                room.release()  # a worker waiting for room goes on, and sees the cancel
            worker.join()
            self.close()


def run_generation(gen: Generation, strategy, tokenizer: TextTokenizer, prompt_ids: list[int],
                   config: GenerationConfig, cached_prefix: int,
                   eos_token_ids: set[int] | None = None) -> Iterator[TokenEvent]:
    """The loop behind every one-sequence generation (``Model.generate``, encoder-decoder
    packages' searches). ``cached_prefix`` prompt tokens are already in the cache;
    EOS_TOKEN_IDS end it (default: the tokenizer's)."""
    eos = tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids
    sampler = Sampler(config, prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    logits = strategy.prefill(prompt_ids[cached_prefix:])
    token, logprob = sampler(logits, prompt_ids)
    t_first = time.perf_counter()
    history = list(prompt_ids)
    out_ids: list[int] = []
    detok = tokenizer.stream()
    stops = StopMatcher(config.stop)
    finish = "length"
    stop_hit = False
    pending = [(token, logprob, strategy.prefill_source)]
    sources: dict[str, int] = {}  # emitted tokens per producing model / exit
    t_last = t_first
    while True:
        for token, logprob, source in pending:
            out_ids.append(token)
            history.append(token)
            sources[source] = sources.get(source, 0) + 1
            is_eos = token in eos and not config.ignore_eos
            piece = "" if is_eos else detok.add(token)
            text, hit = stops.feed(piece)
            t_last = time.perf_counter()
            yield TokenEvent(token, text, len(out_ids) - 1, logprob, source)
            if is_eos or hit:
                finish, stop_hit = "stop", hit
                break
            if len(out_ids) >= config.max_new_tokens:
                break
            if gen.cancelled:
                finish = "cancelled"
                break
            if config.max_time_s is not None and time.perf_counter() - t0 > config.max_time_s:
                finish = "time"
                break
        else:
            dec = strategy.decoder
            if dec.length >= dec.capacity:  # the context is full: end cleanly, as at max_new_tokens
                finish = "length"
                break
            if len(out_ids) < config.max_new_tokens and not gen.cancelled:
                strategy.tokens_left = config.max_new_tokens - len(out_ids)
                pending = strategy.advance(out_ids[-1], sampler, history)
                pending = pending[: config.max_new_tokens - len(out_ids)]
                continue
            finish = "cancelled" if gen.cancelled else "length"
        break
    tail = "" if stop_hit else stops.feed("" if finish == "stop" else detok.flush(), final=True)[0]
    if tail:
        yield TokenEvent(out_ids[-1], tail, len(out_ids) - 1, None, "flush")
    n = len(out_ids)
    decode_s = t_last - t_first
    strategy.finish(sources)
    gen.result = GenerationResult(
        text=stops.text, tokens=out_ids, prompt_tokens=len(prompt_ids), new_tokens=n, finish_reason=finish,
        ttft_s=t_first - t0, decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_s=time.perf_counter() - t0, reused_prompt_tokens=cached_prefix, stats=dict(strategy.stats))
    if sampler.mask is not None:  # whether the output is a whole string of the constraint's language
        gen.result.stats["constraint"] = sampler.mask.report(out_ids)


class StopMatcher:
    """Releases text while holding back any tail that could begin a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""  # released so far
        self.held = ""

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            self.text += piece
            return piece, False
        buf = self.held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held = buf[:cut], ""
            self.text += out
            return out, True
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])),
                                   default=0)
        out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out, False
