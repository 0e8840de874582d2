"""Continuous batching: several generations on one model, decoded together.

Each generation runs the one decode loop (``edgeinfer.generation.loop.run_generation``) in
the thread that consumes it, with its own sampler (its seed, its logits processors, its
constraint), stop strings and detokenizer, exactly as an unbatched one. Its strategy,
:class:`SlotStrategy`, does not run the graphs itself: it hands its prompt or its next
token to the :class:`BatchEngine` and waits. The engine's thread runs, in turn, one chunk
of a waiting prompt (PREFILL_CHUNK tokens: a new request never stalls the running streams
for longer) and one batched step for every sequence that has handed in its token, then
gives each its logits. A generation takes a slot when it starts (waiting while all slots
are busy: the queue) and frees it when it ends, is cancelled or is abandoned.

Greedy outputs are those of the same request decoded alone: the rows of a batched step
are bit-identical to one-sequence steps (tested; measured in apps/bench/batching.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np

from edgeinfer.decoders.staged import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler
from edgeinfer.strategies.base import Strategy

from .slots import PREFILL_CHUNK, SlotCaches

GATHER_S = 0.002  # how long a step waits for the other running sequences to hand in their tokens


class SlotView:
    """What the decode loop asks of a decoder (length, capacity) for one slot."""

    def __init__(self, engine: BatchEngine, slot: int):
        self.engine, self.slot = engine, slot
        self.capacity = engine.caches.capacity
        self.vocab_size = engine.decoder.vocab_size

    @property
    def length(self) -> int:
        return int(self.engine.caches.lengths[self.slot])


class SlotStrategy(Strategy):
    """Plain decoding of one sequence in a slot of a BatchEngine."""

    name = "plain"

    def __init__(self, engine: BatchEngine, slot: int):
        self.engine, self.slot = engine, slot
        self.decoder = SlotView(engine, slot)
        self.stats: dict = {"strategy": self.name, "batched": True, "slot": slot}

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.engine.prefill(self.slot, ids)

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        tok, lp = sampler(self.engine.step(self.slot, token), history)
        return [(tok, lp, "model")]


class BatchEngine:
    """SLOTS sequences of DECODER's package decoded together (see the module's docstring)."""

    def __init__(self, decoder: StagedDecoder, slots: int):
        self.decoder = decoder
        self.caches = SlotCaches(decoder, slots)
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per prefill run, between batched steps
        self.free = list(range(slots))
        self.decoding: set[int] = set()  # slots whose prompt is in: they step
        self.prefills: deque = deque()  # (slot, ids, future) in arrival order
        self.steps: dict[int, tuple[int, Future]] = {}  # slot -> (token, future) for the next step
        self.cond = threading.Condition()
        self.closed = False
        self.stats = {"steps": 0, "rows": 0, "prefill_chunks": 0}  # rows: sequences advanced by those steps
        self.thread = threading.Thread(target=self._loop, name="edgeinfer-batch", daemon=True)
        self.thread.start()

    @property
    def slots(self) -> int:
        return self.caches.slots

    # -- the generations' side -------------------------------------------------------
    def acquire(self, is_cancelled=lambda: False) -> int | None:
        """A free slot (the lowest), waiting while all are busy; None if IS_CANCELLED() turns true first."""
        with self.cond:
            while not self.free:
                if is_cancelled() or self.closed:
                    return None
                self.cond.wait(0.05)
            slot = min(self.free)
            self.free.remove(slot)
            self.caches.reset(slot)
            return slot

    def release(self, slot: int) -> None:
        with self.cond:
            self.decoding.discard(slot)
            self.steps.pop(slot, None)
            self.prefills = deque(p for p in self.prefills if p[0] != slot)
            self.caches.reset(slot)
            if slot not in self.free:
                self.free.append(slot)
            self.cond.notify_all()

    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        fut: Future = Future()
        with self.cond:
            self._check_open()
            self.prefills.append([slot, list(ids), fut])
            self.cond.notify_all()
        return fut.result()

    def step(self, slot: int, token: int) -> np.ndarray:
        fut: Future = Future()
        with self.cond:
            self._check_open()
            self.steps[slot] = (token, fut)
            self.cond.notify_all()
        return fut.result()

    def _check_open(self) -> None:
        if self.closed:
            raise GenerationError("this model's batching engine has stopped (closed, or an error above): load the "
                                  "model again.")

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # -- the engine's thread ---------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave generations waiting forever
            with self.cond:
                self.closed = True
                waiting = [f for _, _, f in self.prefills] + [f for _, f in self.steps.values()]
                self.prefills.clear()
                self.steps.clear()
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(e)
            raise

    def _run_loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.prefills and not self.steps:
                    self.cond.wait()
                if self.closed:
                    return
                # let the other running sequences hand in their tokens, briefly, so one step takes them all
                deadline = time.perf_counter() + GATHER_S
                while (not self.prefills and len(self.steps) < len(self.decoding)
                       and (left := deadline - time.perf_counter()) > 0):
                    self.cond.wait(left)
                batch, self.steps = self.steps, {}
                job = self.prefills[0] if self.prefills else None
            if job is not None:
                self._prefill_chunk(job)
            if batch:
                self._step(batch)

    def _prefill_chunk(self, job: list) -> None:
        slot, ids, fut = job
        chunk, rest = ids[:self.prefill_chunk], ids[self.prefill_chunk:]
        try:
            logits = self.caches.prefill_chunk(slot, chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting generation
            self._drop_prefill(job)
            fut.set_exception(e)
            return
        self.stats["prefill_chunks"] += 1
        if rest:
            job[1] = rest
            return
        self._drop_prefill(job)
        with self.cond:
            self.decoding.add(slot)
        fut.set_result(np.array(logits, np.float32))

    def _drop_prefill(self, job: list) -> None:
        with self.cond:
            if self.prefills and self.prefills[0] is job:
                self.prefills.popleft()

    def _step(self, batch: dict[int, tuple[int, Future]]) -> None:
        try:
            logits = self.caches.step({s: t for s, (t, _) in batch.items()})
        except BaseException as e:  # noqa: BLE001 - handed to every waiting generation
            for _, fut in batch.values():
                fut.set_exception(e)
            return
        self.stats["steps"] += 1
        self.stats["rows"] += len(batch)
        for s, (_, fut) in batch.items():
            fut.set_result(logits[s])
