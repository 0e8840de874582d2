"""Continuous batching: several generations on one model, decoded together.

Each generation runs the one decode loop (``edgeinfer.generation.loop.run_generation``) in
the thread that consumes it, with its own sampler (its seed, its logits processors, its
constraint), stop strings and detokenizer, exactly as an unbatched one. Its strategy,
:class:`SlotStrategy`, does not run the graphs itself: it hands its prompt to the
:class:`BatchEngine`, then its first token and its sampler, and from then on takes the
tokens the engine samples for it.

The engine's thread runs, in turn, one chunk of a waiting prompt (PREFILL_CHUNK tokens: a
new request never stalls the running streams for longer) and one batched step for every
running sequence; right after the step it samples each sequence's next token with that
sequence's own sampler and history, queues it for the generation's thread, and feeds it to
the next step. So a step never waits for the threads that detokenize and stream the tokens
(they run while the next step computes); a sequence may be at most LOOKAHEAD tokens ahead of
its consumer. Before a prompt's first chunk its slot is given the longest start of the prompt
that any slot's cache holds (``_place``: slots keep their tokens after their sequence ends,
and rows move between slots), so only the rest is prefilled. A sequence stops stepping at its
end of sequence, at its token budget, when its cache is full, or when its generation
finishes. A generation takes the lowest free slot when it starts (waiting while all slots are
busy: the queue) and frees it when it ends, is cancelled or is abandoned.

Greedy outputs are those of the same request decoded alone, and seeded sampling draws the same
tokens: the rows of a batched step are bit-identical to one-sequence steps (tested; measured in
apps/bench/batching.py), and each sequence's sampler sees the same logits and history in the
same order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.decoders.staged import StagedDecoder
from edgeinfer.errors import GenerationError
from edgeinfer.generation import Sampler
from edgeinfer.strategies.base import Strategy

from .slots import PREFILL_CHUNK, SlotCaches, SlotKV

log = logging.getLogger("edgeinfer.batching")

LOOKAHEAD = 4  # tokens the engine may sample ahead of the thread that consumes them


def _copy_pays(saved: int, copied: int) -> bool:
    """Whether copying COPIED tokens' cache rows to save prefilling SAVED tokens pays: a row copy costs
    ~1/100 of a token's prefill on a CPU (SmolLM2-135M on 2 cores: ~10 µs against ~1.5 ms), so with a
    margin, when it saves at least 1/64 of what it copies."""
    return saved > 0 and 64 * saved >= copied


class SlotView:
    """What the decode loop asks of a decoder (length, capacity) for one slot: the length as the
    generation sees it (its prompt and the tokens it has fed), not the engine's, which runs ahead."""

    def __init__(self, engine: BatchEngine):
        self.capacity = engine.caches.capacity
        self.vocab_size = engine.decoder.vocab_size
        self.length = 0


@dataclass
class SlotRun:
    """A sequence the engine samples for: its sampler and history, the token it feeds next, and the
    tokens sampled and not yet taken by its generation (or the error that ended it)."""

    sampler: Sampler
    history: list[int]
    eos: set[int]
    budget: int  # tokens still to sample
    next_token: int | None
    out: deque = field(default_factory=deque)
    done: bool = False


class SlotStrategy(Strategy):
    """Plain decoding of one sequence in a slot of a BatchEngine."""

    name = "plain"

    def __init__(self, engine: BatchEngine, slot: int, eos_token_ids: set[int]):
        self.engine, self.slot, self.eos = engine, slot, set(eos_token_ids)
        self.decoder = SlotView(engine)
        self.reused = 0  # prompt tokens found in a slot's cache (not prefilled)
        self.started = False
        self.stats: dict = {"strategy": self.name, "batched": True, "slot": slot}

    def prefill(self, ids: list[int]) -> np.ndarray:
        """IDS: the prompt (the engine prefills what no slot's cache holds of it)."""
        logits, self.reused, cache_report = self.engine.prefill(self.slot, ids)
        if cache_report is not None:  # the prompt cache on disk: tokens restored, saved (as unbatched results)
            self.stats["prompt_cache"] = cache_report
        self.decoder.length += len(ids)
        return logits

    def advance(self, token: int, sampler: Sampler, history: list[int]):
        if not self.started:  # from here on the engine samples for this sequence, with its sampler
            eos = set() if sampler.config.ignore_eos else self.eos
            budget = self.tokens_left if self.tokens_left is not None else self.decoder.capacity
            self.engine.start(self.slot, SlotRun(sampler, list(history), eos, budget, token))
            self.started = True
        self.decoder.length += 1  # TOKEN is in the cache once the engine has stepped it
        tok, lp = self.engine.next_token(self.slot)
        return [(tok, lp, "model")]

    def finish(self, sources: dict[str, int]) -> None:
        self.engine.stop(self.slot)  # before the loop reads the sampler's constraint state


class BatchEngine:
    """SLOTS sequences of DECODER's package decoded together (see the module's docstring)."""

    def __init__(self, decoder: StagedDecoder, slots: int):
        self.decoder = decoder
        self.caches = SlotCaches(decoder, slots)
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per prefill run, between batched steps
        self.free = list(range(slots))
        self.releases = 0
        self.left_at = [0] * slots  # when each slot was last released (0: never used)
        self.placed: set[int] = set()  # taken slots whose prompt has been placed (see _place)
        self.prefills: deque = deque()  # (slot, ids, future) in arrival order
        self.runs: dict[int, SlotRun] = {}  # slot -> the sequence the engine samples for
        self.stepping: set[int] = set()  # slots of the step (and sampling) in progress
        self.cond = threading.Condition()
        self.closed = False
        self.committed = 0  # slots [0, committed) have their buffers paged in (_commit_through)
        self.prompt_cache = None  # a BoundPromptCache: prompt prefixes on disk (edgeinfer/prompt_cache/)
        # rows: sequences advanced by the steps; reused_prompt_tokens: prompt tokens found in a slot's cache
        # or (restored_prompt_tokens of them) in the prompt cache on disk
        self.stats = {"steps": 0, "rows": 0, "prefill_chunks": 0, "reused_prompt_tokens": 0,
                      "restored_prompt_tokens": 0}
        self.thread = threading.Thread(target=self._loop, name="edgeinfer-batch", daemon=True)
        self.thread.start()

    @property
    def slots(self) -> int:
        return self.caches.slots

    # -- the generations' side -------------------------------------------------------
    def acquire(self, is_cancelled=lambda: False) -> int | None:
        """The lowest free slot (batched steps run rows up to the highest busy one), waiting while all
        are busy; None if IS_CANCELLED() turns true first. What it holds is sorted out by its prefill."""
        with self.cond:
            while not self.free:
                if is_cancelled() or self.closed:
                    return None
                self.cond.wait(0.05)
            slot = min(self.free)
            self.free.remove(slot)
            return slot

    def release(self, slot: int) -> None:
        """SLOT is free again; it keeps the tokens its cache holds for a later prompt that starts with them."""
        self.stop(slot)
        with self.cond:
            self.prefills = deque(p for p in self.prefills if p[0] != slot)
            self.caches.park(slot)
            self.placed.discard(slot)
            self.releases += 1
            self.left_at[slot] = self.releases
            if slot not in self.free:
                self.free.append(slot)
            self.cond.notify_all()

    def forget(self) -> None:
        """Slots no sequence uses drop the tokens they hold (the next prompts are computed from scratch)."""
        with self.cond:
            for slot in range(self.slots):
                if slot not in self.placed:
                    self.caches.reset(slot)

    def prefill(self, slot: int, ids: list[int]) -> tuple[np.ndarray, int, dict | None]:
        """SLOT's cache holds the prompt IDS once this returns: the logits of its last token, how many of its
        tokens were found in a slot's cache or the prompt cache on disk (not prefilled), and the prompt
        cache's report of this prompt (None without one)."""
        fut: Future = Future()
        with self.cond:
            self._check_open()
            self.prefills.append([slot, list(ids), fut, None])
            self.cond.notify_all()
        return fut.result()

    def start(self, slot: int, run: SlotRun) -> None:
        """From now on the engine steps SLOT and samples its tokens (RUN.next_token is fed first)."""
        with self.cond:
            self._check_open()
            if run.budget <= 0:
                run.done = True
            self.runs[slot] = run
            self.cond.notify_all()

    def next_token(self, slot: int) -> tuple[int, float | None]:
        """The next token the engine sampled for SLOT (waiting for the step that makes it)."""
        with self.cond:
            run = self.runs.get(slot)
            while run is not None and not run.out and not run.done and not self.closed:
                self.cond.wait()
            if run is None or not run.out:
                raise GenerationError("this model's batching engine has stopped (closed, or an error above): load "
                                      "the model again.")
            item = run.out.popleft()
            self.cond.notify_all()  # room in the lookahead
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self, slot: int) -> None:
        """SLOT is no longer stepped; returns once no step in progress uses its sampler."""
        with self.cond:
            self.runs.pop(slot, None)
            while slot in self.stepping:
                self.cond.wait()

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
                waiting = [job[2] for job in self.prefills]
                self.prefills.clear()
                for run in self.runs.values():
                    run.out.append(e)
                self.stepping.clear()
                self.cond.notify_all()
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(e)
            raise

    def _ready(self) -> dict[int, SlotRun]:
        return {s: r for s, r in self.runs.items()
                if r.next_token is not None and not r.done and len(r.out) < LOOKAHEAD}

    def _commit_through(self, slot: int) -> None:
        """Slots up to SLOT have their buffers paged in (SlotCaches.commit), lowest first."""
        while self.committed <= min(slot, self.slots - 1):
            self.caches.commit(self.committed)
            self.committed += 1

    def _run_loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.prefills and not self._ready():
                    if self.committed < self.slots:
                        break  # idle: page in the next slot's buffers (a request then waits for one slot at most)
                    self.cond.wait()
                if self.closed:
                    return
                batch = self._ready()
                self.stepping = set(batch)
                job = self.prefills[0] if self.prefills else None
            if job is None and not batch:
                self._commit_through(self.committed)
                continue
            if job is not None:
                self._commit_through(job[0])
                self._prefill_chunk(job)
            if batch:
                self._commit_through(max(batch))
                self._step(batch)
            with self.cond:
                self.stepping = set()
                self.cond.notify_all()

    def _prefill_chunk(self, job: list) -> None:
        """The next chunk of JOB = [slot, prompt, future, reused]; before the first, the slot is given the
        longest start of the prompt any slot's cache holds (``_place``)."""
        slot, ids, fut, reused = job
        try:
            if reused is None:
                job[3] = reused = self._place(slot, ids)
                # A longer start saved on disk, read outside the lock: only this thread writes the caches,
                # and SLOT is this prompt's.
                if self.prompt_cache is not None:
                    restored = self.prompt_cache.restore(ids, reused, SlotKV(self.caches, slot))
                    self.stats["restored_prompt_tokens"] += restored - reused
                    self.stats["reused_prompt_tokens"] += restored - reused
                    job[3] = reused = restored
            start = int(self.caches.lengths[slot])
            logits = self.caches.prefill_chunk(slot, ids[start:start + self.prefill_chunk])
        except BaseException as e:  # noqa: BLE001 - handed to the waiting generation
            self._drop_prefill(job)
            fut.set_exception(e)
            return
        self.stats["prefill_chunks"] += 1
        if self.caches.lengths[slot] < len(ids):
            return
        report = None
        if self.prompt_cache is not None:  # a long new prompt: its KV to disk (written on the cache's thread)
            try:
                self.prompt_cache.save(ids, SlotKV(self.caches, slot))
            except Exception as e:  # noqa: BLE001 - the answer must not be lost for a cache entry
                log.warning("edgeinfer: warning: the prompt cache could not save a prompt (%s: %s).",
                            type(e).__name__, e)
            report = self.prompt_cache.report()  # this prompt's (only this thread restores and saves)
        self._drop_prefill(job)
        fut.set_result((np.array(logits, np.float32), reused, report))

    def _place(self, slot: int, ids: list[int]) -> int:
        """Make SLOT's cache hold the longest start of IDS that any slot holds, and return its length.
        The tokens of a slot no sequence uses yet (free, or taken by a request whose prefill has not
        begun: it looks for its own prompt when it does) are swapped in, SLOT's going there; a busy
        slot's are copied. Tokens SLOT holds that IDS does not start with are not simply overwritten:
        they first go to the free slot left longest ago, if they are more than it holds (a copy of rows
        costs ~1/100 of prefilling them again). Only this thread writes the caches, so what a slot
        holds stays valid while it is read; the lock keeps the free list and the records still while
        slots change places."""
        caches, left = self.caches, self.left_at
        with self.cond:
            own = caches.reusable(slot, ids)
            best, src = max(((caches.reusable(s, ids), s) for s in range(self.slots) if s != slot), default=(0, slot))
            unused = src not in self.placed  # free, or taken by a request whose prefill has not begun
            if unused and _copy_pays(best - own, len(caches.held[slot]) + len(caches.held[src])):
                caches.swap(slot, src)
                left[slot], left[src] = left[src], left[slot]
                own = best
            else:
                copy = _copy_pays(best - own, best)
                spares = [s for s in self.free if not (copy and s == src)]  # not the slot copied from
                spare = min(spares, key=lambda s: (left[s], s)) if spares else None
                # keep SLOT's tokens for later, where they are worth more than what the spare holds
                if spare is not None and len(caches.held[slot]) - own > len(caches.held[spare]):
                    caches.copy_prefix(slot, spare, len(caches.held[slot]))
                    left[spare] = left[slot]
                if copy:
                    caches.copy_prefix(src, slot, best)
                    own = best
            caches.keep(slot, own)
            self.placed.add(slot)
        self.stats["reused_prompt_tokens"] += own
        return own

    def _drop_prefill(self, job: list) -> None:
        with self.cond:
            if self.prefills and self.prefills[0] is job:
                self.prefills.popleft()

    def _step(self, batch: dict[int, SlotRun]) -> None:
        """One batched step over BATCH's next tokens, then each sequence's next token sampled."""
        try:
            logits = self.caches.step({s: r.next_token for s, r in batch.items()})
            sampled = {}
            for s, r in batch.items():  # each with its own sampler: the same calls as decoding alone
                tok, lp = r.sampler(logits[s], r.history)
                r.history.append(tok)
                sampled[s] = (tok, lp)
        except BaseException as e:  # noqa: BLE001 - handed to every generation of the step
            with self.cond:
                for r in batch.values():
                    r.out.append(e)
                    r.done = True
                self.cond.notify_all()
            return
        self.stats["steps"] += 1
        self.stats["rows"] += len(batch)
        room = self.caches.capacity
        with self.cond:
            for s, r in batch.items():
                tok, lp = sampled[s]
                r.out.append((tok, lp))
                r.budget -= 1
                r.next_token = tok
                # the end of the sequence, its budget, or a full cache (TOK could not be fed): no more steps
                r.done = tok in r.eos or r.budget <= 0 or self.caches.lengths[s] >= room
            self.cond.notify_all()
