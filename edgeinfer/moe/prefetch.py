"""Read-ahead that never loses: per layer, fetch a guessed expert only when it pays.

The decoder ranks each layer's experts before the layer runs (decoder.py: the layer's router on
the current stream). For every layer and guess rank this keeps the measured probability p that
a guess of that rank is then chosen when it was not cached (smoothed over tokens; the likely
experts are usually cached already, so an uncached guess is right less often than the top-k guess
as a whole). Costs are in seconds, measured:

- *saved*, what a right guess takes off the decode thread's critical path. With reader threads, a
  record's read (they read and widen it into a slot ahead). Without (the default: the guess's read
  is started into a scratch buffer, reads.py, and the decode thread widens it when its layer needs
  it), the decode thread's measured wait per record read cold minus per record started ahead
  (cache.read_times);
- *wasted*, a wrong guess's disk time, which costs as much as the disk is busy (u: the readers'
  busy share, or the share of time the decode thread waited for reads), plus the decode thread's
  CPU time to start the read, plus, with reader threads and no free slot, the eviction it causes: a
  later demand read with the measured probability h that an evicted expert is asked for again soon
  (cache.regret_rate). Reads started without threads evict nothing;
- *overhead*, the decode thread's own CPU time for ranking, asking and scoring per layer.

CPU time is charged at what it costs in wall time: the ratio of a token's wall time to the decode
thread's CPU time for it (1 with a core to itself; 3-4 measured while two other agents' jobs held
this 2-core machine at load 9), so on a machine short of CPU read-ahead stays off where the waits
it would remove are worth less than the CPU it would take.

A guess of rank r pays when p * saved > (1 - p) * wasted; a layer is ranked and read ahead at all
only when the guesses that pay are expected to save more than the overhead, each rank weighted by
how often its guess was not cached (a cached guess saves nothing; the likely experts usually are).
Otherwise the layer is not even ranked, but for one token in 16 that keeps the measurements
fresh. Speculative reads into slots never evict the running layer's experts nor the other guesses
for their own layer (cache.py), and demand reads overtake them (reader.py).
"""

from __future__ import annotations

import time

from .cache import ExpertCache
from .reader import ReaderPool

_ALPHA = 0.05  # smoothing of the per-rank hit probabilities (~20 tokens)
_EXPLORE = 16  # every this many tokens, read ahead anyway (to keep measuring what it saves)


class ReadAhead:
    """Decides, per layer, which guessed experts to read ahead, and starts their reads (or asks the reader
    pool for them). Cheap on the decode thread: the threshold is computed once per token, and a layer whose
    guesses do not pay is not even ranked (but on exploration tokens)."""

    def __init__(self, cache: ExpertCache, pool: ReaderPool | None, top_k: int, depth: int | None = None):
        """POOL: reader threads that read guesses into slots; None: reads started by this thread
        (cache.advise_ahead)."""
        self.cache, self.pool, self.top_k = cache, pool, top_k
        self.depth = depth or top_k + 2  # guesses considered per layer
        self.p: dict[int, list[float]] = {}
        self.q: dict[int, list[float]] = {}
        self._util, self._last = 0.0, (time.perf_counter(), 0.0)
        self._cost_step, self._costs = None, (0.0, 0.0)
        self.overhead = 0.0  # seconds per layer read ahead for (smoothed)
        self.start_cpu = 0.0  # CPU seconds to start one read ahead (smoothed)
        self.contention = 1.0  # wall seconds a CPU second of the decode thread costs (smoothed; 1: a free core)
        self.enabled = True

    def _uncached(self, layer: int) -> list[float]:
        """Per guess rank: how often that guess was not cached (only those can save a read)."""
        if layer not in self.q:
            self.q[layer] = [0.5] * self.depth
        return self.q[layer]

    def _probs(self, layer: int) -> list[float]:
        if layer not in self.p:  # prior: top-k guesses mostly right, the rest mostly wrong
            self.p[layer] = [0.8] * self.top_k + [0.2] * (self.depth - self.top_k)
        return self.p[layer]

    def utilization(self) -> float:
        """How busy the disk has been lately (0..1), smoothed: the reader threads' busy time, or without
        them, the share of time the decode thread stood waiting for reads."""
        now = time.perf_counter()
        busy = self.pool.busy_s if self.pool is not None else self.cache.stats.wait_s
        t0, b0 = self._last
        if now - t0 >= 0.005:
            u = min(1.0, (busy - b0) / (now - t0))  # at least one read in flight: the disk is busy
            self._util = 0.8 * self._util + 0.2 * u
            self._last = (now, busy)
        return self._util

    def costs(self, step: int = -1) -> tuple[float, float]:
        """(saved, wasted) seconds of a right and of a wrong guess; computed once per STEP."""
        if step == self._cost_step:
            return self._costs
        if self.pool is not None:
            t = self.pool.read_s_per_record or 1e-3
            evicts = self.cache.free_slots() == 0
            costs = (t, (self.utilization() + (self.cache.regret_rate() if evicts else 0.0)) * t)
        else:
            times = self.cache.read_times
            if times.ahead is None or times.cold is None:
                costs = (1.0, 0.0)  # nothing measured yet: read ahead, and measure
            else:  # a wrong guess: its disk time when the disk is busy, and the CPU to start and drop it
                costs = (max(0.0, times.cold - times.ahead),
                         self.utilization() * times.cold + self.start_cpu * self.contention)
        self._cost_step, self._costs = step, costs
        return costs

    def threshold(self, step: int = -1) -> float:
        """The hit probability above which a guess pays: wasted / (saved + wasted)."""
        saved, wasted = self.costs(step)
        tau = wasted / (saved + wasted) if saved + wasted > 0 else 1.0
        return min(tau, 0.5) if step % _EXPLORE == 0 else tau

    def wants(self, step: int, layer: int) -> bool:
        """Whether reading ahead for LAYER is expected to save more than it costs the decode thread (else the
        decoder does not even rank its experts)."""
        if not self.enabled:
            return False
        if step % _EXPLORE == 0:
            return True
        saved, wasted = self.costs(step)
        p, q = self._probs(layer), self._uncached(layer)
        gain = sum(qr * max(0.0, pr * saved - (1 - pr) * wasted) for pr, qr in zip(p, q))
        return gain > self.overhead * self.contention

    def observe_token(self, wall: float, cpu: float) -> None:
        """One token took WALL seconds, CPU of them on the decode thread: how dear the CPU is."""
        if cpu > 0:
            self.contention = 0.9 * self.contention + 0.1 * min(10.0, max(1.0, wall / cpu))

    def add_overhead(self, seconds: float) -> None:
        """The decode thread spent SECONDS ranking, asking and scoring for one layer."""
        self.overhead = 0.95 * self.overhead + 0.05 * seconds

    def request(self, step: int, layer: int, ranked: list[int]) -> frozenset:
        """Read ahead the guesses of RANKED (best first) for LAYER that pay; returns the guesses that were not
        cached (what ``observe`` learns from: a cached guess needs no read, right or wrong)."""
        p = self._probs(layer)
        tau = self.threshold(step)
        guesses = ranked[: self.depth]
        uncached = self.cache.uncached(layer, guesses)
        fetch = [e for r, e in enumerate(guesses) if p[r] > tau and e in uncached]
        if fetch and self.pool is not None:
            self.pool.speculate(step, layer, fetch, frozenset(guesses[: self.top_k]) | frozenset(fetch))
        elif fetch:
            t0 = time.thread_time()
            started = self.cache.advise_ahead(layer, fetch)
            if started:
                self.start_cpu = 0.9 * self.start_cpu + 0.1 * (time.thread_time() - t0) / len(started)
        return frozenset(uncached)

    def observe(self, layer: int, ranked: list[int], chosen: list[int], uncached: frozenset) -> None:
        """The router chose CHOSEN where RANKED was guessed: update the per-rank probabilities that an uncached
        guess is chosen."""
        p, q = self._probs(layer), self._uncached(layer)
        for r, e in enumerate(ranked[: self.depth]):
            q[r] += _ALPHA * ((e in uncached) - q[r])
            if e in uncached:
                p[r] += _ALPHA * ((e in chosen) - p[r])
