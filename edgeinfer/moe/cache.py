"""The expert cache: loaded experts by (layer, expert), within a byte budget.

Bookkeeping only; experts.py makes records runnable, reader.py reads them on other threads,
residency.py says how the budget is split. The rules:

- Each layer has a share of the budget (``quota``: equal, or split by measured miss cost) and
  may have a resident set (its most frequently routed experts on calibration text): a resident
  expert, once loaded, is never evicted.
- A demand load (the decoder needs the expert now) evicts the least recently used expert of the
  layer furthest above its share; experts in use (pinned: the current layer's, and those being
  read) are never evicted.
- A speculative load (read ahead for a layer about to run) takes a free slot, or evicts from a
  layer at or above its share -- the one whose next use is furthest away first, its own layer
  last -- never a pinned expert (the running layer's chosen ones), a resident one, or one of its
  own layer's other guesses; if there is no such victim it is skipped.
- Evicted keys are remembered for a while: a demand miss on one of them is a *regret* (counted:
  what evictions cost).
- A layer's misses are read together. Without reader threads (the default) their reads are all
  started at once (reads.py: native AIO, one system call) before the next layer's guesses; the
  decoder computes with the cached experts while they are read, and each record is made runnable
  as its read completes (``acquire_each``) -- on a helper thread while the decode thread computes
  when that costs more than the hand-over (large int4-channel records), else on the decode thread;
  where a widener process runs (widener.py), it reads and widens the misses, posted before the hits run.
  With reader threads, one job per run of records adjacent on disk, all but one handed to the
  threads, the last read by the decode thread, which then waits for all.
- Read-ahead without threads: a guess's read is started into a scratch buffer (``advise``): it
  takes no slot and evicts nothing; a right guess is made runnable when its layer needs it, a wrong
  one is dropped.

Correctness never depends on prediction: an expert that is neither cached nor in flight is read.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from .budget import cache_budget, malloc_trim
from .experts import CachedExpert, RecordFiller
from .residency import ResidencyPlan, furthest_above
from .stats import CacheStats

_TRIM_EVERY = 64 << 20


@dataclass
class _InFlight:
    slot: int | None
    done: threading.Event = field(default_factory=threading.Event)
    entry: CachedExpert | None = None
    error: BaseException | None = None


class ExpertCache:
    """Loaded experts by (layer, expert), within ``budget`` bytes (None: all of them)."""

    def __init__(self, loader, budget: int | None, sparse_layers: list[int], top_k: int, plan_for=None):
        """PLAN_FOR(capacity) -> ResidencyPlan (None: equal shares, nothing resident)."""
        self.loader = loader
        self.store = loader.store
        self.shared_session = loader.shared_session
        self.expert_bytes = loader.expert_bytes
        self.top_k = top_k
        self.budget = cache_budget(budget, self.expert_bytes, len(self.store.records), top_k)
        self.capacity = self.budget // self.expert_bytes  # experts that fit
        loader.allocate(self.capacity)
        self._free = list(range(self.capacity - 1, -1, -1))
        self.layers: dict[int, OrderedDict] = {i: OrderedDict() for i in sparse_layers}
        self._order = sorted(sparse_layers)
        self.plan = plan_for(self.capacity) if plan_for else ResidencyPlan.equal(sparse_layers, self.capacity, top_k)
        self.quota = self.plan.quotas
        self.resident = self.plan.resident
        self.count = 0  # slots taken: cached experts and reads in flight
        self._reserved = dict.fromkeys(sparse_layers, 0)  # per layer: slots taken by reads in flight
        # per layer: how far above its share it is (cached + reserved - quota), kept as they change
        self._over = {i: -self.quota[i] for i in sparse_layers}
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.pinned: Counter = Counter()
        self.inflight: dict[tuple[int, int], _InFlight] = {}
        self._ghosts: dict[int, OrderedDict] = {i: OrderedDict() for i in sparse_layers}
        self.position = (0, -1)  # (token step, layer) the decoder is at: read-ahead behind it is stale
        self.reader = None  # reader.ReaderPool, when reads run on other threads
        self.reads = None  # reads.ReadQueue: reads started ahead on the decode thread (no reader threads)
        self._freed = 0  # bytes of evicted sessions since memory was last handed back
        self.filler = RecordFiller(loader)  # makes read records runnable, on a helper thread when that pays

    @property
    def resident_bytes(self) -> int:
        return sum(len(e) for e in self.layers.values()) * self.expert_bytes

    # -- slots (callers hold self.lock) ------------------------------------------
    def _take_slot(self, layer: int, speculative: bool, keep: frozenset = frozenset()) -> int | None | bool:
        """A free slot for an expert of LAYER, evicting if needed; False if none may be taken."""
        if not self._free and not self._evict(layer, speculative, keep):
            return False
        self.count += 1
        self._reserve(layer)
        return self._free.pop()

    def _reserve(self, layer: int) -> None:
        self._reserved[layer] += 1
        self._over[layer] += 1

    def _evictable(self, layer: int, keep: frozenset):
        resident = self.resident.get(layer, ())
        return next((e for e in self.layers[layer]
                     if (layer, e) not in self.pinned and e not in resident and e not in keep), None)

    def _evict(self, layer: int, speculative: bool, keep: frozenset) -> bool:
        if speculative:
            # Only layers at or above their share, the one whose next use is furthest away first (layers
            # run in a cycle: the running one, then the one before it, ..., the layer read for last).
            order = self._order
            at = order.index(layer)
            ranked = sorted((i for i in self.layers if len(self.layers[i]) + self._reserved[i] >= self.quota[i]),
                            key=lambda i: (order.index(i) - at) % len(order), reverse=True)
            candidates = ((i, self._evictable(i, keep if i == layer else frozenset())) for i in ranked)
        else:  # the layer furthest above its share first (usually the only one tried: nothing sorted)
            candidates = ((i, self._evictable(i, frozenset())) for i in furthest_above(self._over, layer))
        victim = next(((i, e) for i, e in candidates if e is not None), None)
        if victim is None:
            return False
        i, e = victim
        entry = self.layers[i].pop(e)
        self._over[i] -= 1
        self._free.append(entry.slot)
        if entry.weights is None:  # a session of its own: its memory goes back to the allocator
            self._freed += self.expert_bytes
        self.count -= 1
        self.stats.evictions += 1
        ghosts = self._ghosts[i]
        ghosts[e] = True
        while len(ghosts) > max(2, int(self.quota[i])):
            ghosts.popitem(last=False)
        return True

    def _finish(self, key: tuple[int, int], flight: _InFlight, entry: CachedExpert | None,
                error: BaseException | None) -> None:
        self._place(key, flight.slot, entry)
        if self.inflight.get(key) is flight:
            del self.inflight[key]
        flight.entry, flight.error = entry, error

    def _place(self, key: tuple[int, int], slot: int | None, entry: CachedExpert | None) -> None:
        """A load into SLOT (reserved for KEY) ended: ENTRY cached there, or (None: it failed) the slot given back."""
        layer = key[0]
        self._reserved[layer] -= 1
        if entry is not None and slot is not None:
            entry.slot = slot  # (a session per expert: the slot only counts the budget)
            self.layers[layer][key[1]] = entry
        else:
            self._over[layer] -= 1
            if slot is not None:
                self._free.append(slot)
                self.count -= 1

    # -- loading -----------------------------------------------------------------
    def run_loads(self, jobs: list[tuple[list[tuple[int, int]], list[_InFlight]]], prefetched: bool = False) -> None:
        """Read and make runnable each job's keys (one run of adjacent records per job) into their reserved
        slots, then publish them (any thread)."""
        for keys, flights in jobs:
            try:
                entries, error = self.loader.load(keys, [f.slot for f in flights]), None
            except BaseException as err:  # the decode thread reports it
                entries, error = [None] * len(keys), err
            with self.lock:
                self.stats.reads += 1
                self.stats.bytes_read += len(keys) * self.store.record_size
                for key, flight, entry in zip(keys, flights, entries):
                    if entry is not None:
                        entry.prefetched = prefetched
                        self.stats.prefetched += prefetched
                    self._finish(key, flight, entry, error)
            for flight in flights:
                flight.done.set()

    def _runs(self, layer: int, experts: list[int]) -> list[list[int]]:
        """EXPERTS of LAYER grouped into runs of records adjacent on disk (in disk order)."""
        recs = self.store.records
        ordered = sorted(experts, key=lambda e: recs[(layer, e)][0])
        runs: list[list[int]] = []
        for e in ordered:
            if runs and recs[(layer, e)][0] == recs[(layer, runs[-1][-1])][0] + self.store.record_size:
                runs[-1].append(e)
            else:
                runs.append([e])
        return runs

    # -- decode thread -----------------------------------------------------------
    def acquire(self, layer: int, experts: list[int], _retry: bool = True) -> list[CachedExpert]:
        """EXPERTS of LAYER, loading what is missing (all at once); pinned until ``release``."""
        if self.reads is not None:
            return self._acquire_started(layer, experts)
        t0 = time.perf_counter()
        with self.lock:
            found, waits, misses = self._pin_and_look_up(layer, experts)
            self.stats.misses += len(misses)
            jobs = []
            for run in self._runs(layer, misses):
                flights = []
                for e in run:
                    slot = self._take_slot(layer, speculative=False)
                    flight = self.inflight[(layer, e)] = _InFlight(None if slot is False else slot)
                    if slot is False:  # everything else is pinned: used once, not cached
                        self._reserve(layer)
                    flights.append(flight)
                    waits.append((e, flight))
                jobs.append(([(layer, e) for e in run], flights))
        if jobs and self.reader is not None:
            if len(jobs) > 1:
                self.reader.submit(jobs[:-1])
            self.run_loads(jobs[-1:])
        elif jobs:  # reads on this thread, one run at a time
            self.run_loads(jobs)
        error = None
        for e, flight in waits:
            flight.done.wait()
            if flight.error is not None and error is None:
                error = flight.error
            found[e] = flight.entry
        self.stats.wait_s += time.perf_counter() - t0
        if error is not None:
            self.release(layer, experts)
            if not _retry:
                raise error
            return self.acquire(layer, experts, _retry=False)  # a read ahead failed: read it here (or fail)
        with self.lock:
            for e in experts:
                self._mark_used(found[e])
        return [found[e] for e in experts]

    def _pin_and_look_up(self, layer: int, experts: list[int]) -> tuple[dict, list, list[int]]:
        """Under the lock: pin EXPERTS of LAYER; the cached ones (expert -> entry, marked used), the ones a
        reader thread is loading ((expert, flight)), and the misses (counted as regrets if lately evicted)."""
        found, waits, misses = {}, [], []
        for e in experts:
            key = (layer, e)
            self.pinned[key] += 1
            entry = self.layers[layer].get(e)
            if entry is not None:
                self.layers[layer].move_to_end(e)
                self.stats.hits += 1
                self._mark_used(entry)
                found[e] = entry
            elif key in self.inflight:
                waits.append((e, self.inflight[key]))
                self.stats.late_prefetches += 1
            else:
                misses.append(e)
                if self._ghosts[layer].pop(e, None) is not None:
                    self.stats.regrets += 1
        return found, waits, misses

    def _mark_used(self, entry: CachedExpert) -> None:
        if entry.prefetched and not entry.used:
            self.stats.prefetch_used += 1
        entry.used = True

    def release(self, layer: int, experts: list[int]) -> None:
        with self.lock:
            for e in experts:
                key = (layer, e)
                self.pinned[key] -= 1
                if self.pinned[key] <= 0:
                    del self.pinned[key]

    # -- read-ahead (reader threads) ---------------------------------------------
    def start_speculative(self, step: int, layer: int, experts: list[int], keep: frozenset):
        """Reserve slots for reading EXPERTS of LAYER ahead (for decode step STEP): the jobs to run, or
        [] when they are stale, cached, in flight, or have no slot they may take."""
        with self.lock:
            if (step, layer) <= self.position:
                self.stats.prefetch_skipped += len(experts)
                return []
            todo = []
            for e in experts:
                key = (layer, e)
                if e in self.layers[layer] or key in self.inflight:
                    continue
                slot = self._take_slot(layer, speculative=True, keep=keep)
                if slot is False:
                    self.stats.prefetch_skipped += 1
                    continue
                self.inflight[key] = _InFlight(slot)
                todo.append(e)
            jobs = []
            for run in self._runs(layer, todo):
                jobs.append(([(layer, e) for e in run], [self.inflight[(layer, e)] for e in run]))
            return jobs

    def acquire_each(self, layer: int, experts: list[int]):
        """``acquire`` one expert at a time: yields (index into EXPERTS, entry) as each becomes runnable, the
        cached ones first, then (with the reads queue) the misses as their reads complete, so the caller
        computes with the first while the others are still being read. EXPERTS are pinned; once this is
        exhausted the caller ``release``s them; if it fails or is closed early it releases them itself."""
        if self.reads is None:
            entries = self.acquire(layer, experts)  # releases them itself if it fails
            try:
                yield from enumerate(entries)
            except BaseException:
                self.release(layer, experts)
                raise
            return
        try:
            yield from self._each_started(layer, experts)
        except BaseException:
            self.release(layer, experts)
            raise

    def _acquire_started(self, layer: int, experts: list[int]) -> list[CachedExpert]:
        """``acquire`` with the reads queue (see ``_each_started``)."""
        got = dict(self.acquire_each(layer, experts))  # releases them itself if it fails
        return [got[i] for i in range(len(experts))]

    def _each_started(self, layer: int, experts: list[int]):
        """With the reads queue: yields (index, entry) for the hits, then for the misses whose reads were
        started ahead (guesses, or this layer's own reads started before the next layer's guesses) or start
        now, each made runnable in its slot as its read completes. Wrong guesses for this layer are dropped.
        The time spent in here (not in the caller between yields) is the decode thread's wait."""
        t0 = time.perf_counter()
        wait = 0.0
        reads, size = self.reads, self.store.record_size
        with self.lock:
            found, _, misses = self._pin_and_look_up(layer, experts)  # nothing is in flight with the reads queue
        if not misses:  # every expert cached (the usual layer): nothing to read, time or place
            reads.drop_guesses(layer, experts)
            for i, e in enumerate(experts):
                yield i, found[e]
            return
        with self.lock:
            ahead = {e for e in misses if reads.pending.get((layer, e), (0, 0, False))[2]}
            self.stats.hits += len(ahead)  # read ahead: started before the layer asked
            self.stats.prefetch_used += len(ahead)
            self.stats.misses += len(misses) - len(ahead)
            self.stats.bytes_read += sum(size for e in misses if (layer, e) not in reads.pending)
            slots = []
            for _ in misses:
                slot = self._take_slot(layer, speculative=False)
                if slot is False:  # everything else is pinned: used once, not cached
                    self._reserve(layer)
                slots.append(None if slot is False else slot)
        reads.drop_guesses(layer, experts)
        keys = [(layer, e) for e in misses]
        slot_of = dict(zip(keys, slots))
        index = {e: i for i, e in enumerate(experts)}
        done = set()
        read_s = 0.0
        filling: deque = deque()  # (key, read buffer or None, job making it runnable), in the order started
        # where a widener process runs, it reads and widens the misses not already being read (widener.py)
        todo = [k for k in keys if k not in reads.pending and slot_of[k] is not None
                ] if self.filler.widener is not None else []
        if todo:
            filling.extend((k, None, job) for k, job in zip(todo, self.filler.post_loads(todo, [slot_of[k]
                                                                                                for k in todo])))
        left = [k for k in keys if k not in todo]  # reads of this queue not yet taken from it
        reads.start(left)  # (those not started yet) read while the hits compute
        helper = self.filler.helper()

        def take(block: bool) -> None:
            nonlocal read_s
            got, waited = reads.take_completed(left, block)
            for key, buf in got:
                left.remove(key)
                read_s += waited / len(got)
                try:
                    filling.append((key, buf, self.filler.start(key, reads, buf, slot_of[key], helper)))
                except BaseException:
                    reads.give_back([buf])
                    raise

        try:
            if helper is not None or self.filler.widener is not None:
                take(block=False)  # records read ahead are made runnable elsewhere while the hits compute
            for e, entry in found.items():
                wait += time.perf_counter() - t0
                yield index[e], entry
                t0 = time.perf_counter()
            while left or filling:
                if left:
                    take(block=not filling)
                if filling:
                    key, buf, job = filling.popleft()
                    try:
                        entry = job.result()
                    finally:
                        job.settle()
                        if buf is not None:
                            reads.give_back([buf])
                    with self.lock:
                        self._place(key, slot_of[key], entry)
                    done.add(key)
                    wait += time.perf_counter() - t0
                    yield index[key[1]], entry
                    t0 = time.perf_counter()
            wait += time.perf_counter() - t0
        except BaseException:
            for _, buf, job in filling:  # the helper or widener must be done with a slot before it is given back
                job.settle()
                if buf is not None:
                    reads.give_back([buf])
            reads.drop([k for k in left if k in reads.pending])  # their buffers come back once the disk is done
            with self.lock:
                for key in keys:
                    if key not in done:
                        self._place(key, slot_of[key], None)
            raise
        finally:
            self.loader.timer.add(read_s, 0.0)
            with self.lock:
                self.stats.wait_s += wait

    def close(self) -> None:
        self.filler.close()

    def end_token(self) -> None:
        """Between tokens: take back the buffers of finished dropped reads; give evicted sessions' memory back
        to the system now and then (freed by the allocator, it otherwise stays resident in its arenas)."""
        if self.reads is not None:
            self.reads.end_token()
        if self._freed >= _TRIM_EVERY:
            self._freed = 0
            malloc_trim()

    def advise(self, layer: int, needed: list[int], ahead_layer: int | None = None,
               guesses: list[int] = ()) -> list[int]:
        """Start reading the NEEDED experts of LAYER that are not cached, then the GUESSES for AHEAD_LAYER (found
        uncached by the caller), in one submit (the guesses queue behind the needed reads); returns the
        guesses started. A guess takes no slot and evicts nothing: a wrong one costs disk time and a
        scratch buffer until the disk is done with it."""
        with self.lock:
            keys = [(layer, e) for e in needed if e not in self.layers[layer]]
        if not keys and not guesses:
            return []
        keys = keys[: max(1, self.reads.free_buffers())]  # the rest start when the layer takes them
        ahead = [(ahead_layer, e) for e in guesses]
        started = self.reads.start(keys, guesses=ahead)
        ahead_keys = set(ahead)
        guessed = [k[1] for k in started if k in ahead_keys]
        with self.lock:
            self.stats.prefetched += len(guessed)
            self.stats.bytes_read += len(started) * self.store.record_size
        return guessed

    def uncached(self, layer: int, experts: list[int]) -> list[int]:
        """EXPERTS of LAYER neither cached nor being read."""
        pending = self.reads.pending if self.reads is not None else {}
        with self.lock:
            cached, inflight = self.layers[layer], self.inflight
            return [e for e in experts if e not in cached and (layer, e) not in inflight
                    and (layer, e) not in pending]

    def has(self, layer: int, expert: int) -> bool:
        """Cached or being read."""
        return not self.uncached(layer, [expert])

    def free_slots(self) -> int:
        return len(self._free)

    # -- warm start --------------------------------------------------------------
    def warm(self) -> int:
        """Load every layer's resident set (runs of adjacent records per read); returns how many."""
        n = 0
        for layer, experts in self.resident.items():
            todo = [e for e in experts if not self.has(layer, e)]
            jobs = []
            with self.lock:
                for run in self._runs(layer, todo):
                    flights = []
                    for e in run:
                        slot = self._take_slot(layer, speculative=False)
                        if slot is False:
                            break
                        flights.append(self.inflight.setdefault((layer, e), _InFlight(slot)))
                    if flights:
                        jobs.append(([(layer, e) for e in run[:len(flights)]], flights))
            self.run_loads(jobs)
            n += sum(len(k) for k, _ in jobs)
        return n
