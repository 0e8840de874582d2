"""Read-ahead that never loses: per layer, fetch a guessed expert only when it pays.

The decoder ranks each layer's experts before the layer runs (decoder.py: the layer's router on
the current stream). For every layer and guess rank this keeps the measured probability that
the guess of that rank is then chosen (smoothed over tokens). A guess is read ahead when

    p * saved  >  (1 - p) * wasted

where a right guess saves a demand read on the decode thread's critical path (one record's read
time) and a wrong one wastes the disk's time for one record -- which costs only as much as the
readers are busy (measured utilization u: an idle disk's time is free) -- plus, when the cache
has no free slot, the eviction it causes, which costs a later demand read with the measured
probability h that an evicted expert is asked for again soon (cache.regret_rate). Both sides are
in units of one record's read, so a guess is fetched when p > (u + h) / (1 + u + h).

With kernel read-ahead (no reader threads: the guess is asked of the kernel, POSIX_FADV_WILLNEED,
and lands in the page cache, not in a slot) a wrong guess evicts nothing (h = 0) and the decode
thread still copies (and widens) every record it uses, so what a right guess saves is measured
rather than assumed: the decode thread's seconds per record read cold minus per record asked
ahead (cache.read_times), against a wrong guess's disk time u * cold (u: the share of time the
decode thread waited for reads). When guesses save nothing -- the disk keeps up and the CPU is
the bottleneck -- the threshold goes to 1 and read-ahead stops, but for one token in 16 that
keeps the measurement fresh. Guesses
beyond top_k are considered too (a layer whose guesses are often off by one rank gets the next
ones when they pay). Speculative reads never evict the running layer's experts nor the other
guesses for their own layer (cache.py), and demand reads overtake them (reader.py).
"""

from __future__ import annotations

import time

from .cache import ExpertCache
from .reader import ReaderPool

_ALPHA = 0.05  # smoothing of the per-rank hit probabilities (~20 tokens)
_EXPLORE = 16  # kernel read-ahead: every this many tokens, read ahead anyway (to keep measuring)


class ReadAhead:
    """Decides, per layer, which guessed experts to read ahead, and asks the reader pool (or the kernel)
    for them. Cheap on the decode thread: the threshold is computed once per token, and a layer whose
    guesses do not pay is not even ranked (but on exploration tokens)."""

    def __init__(self, cache: ExpertCache, pool: ReaderPool | None, top_k: int, depth: int | None = None):
        """POOL: reader threads that read guesses into slots; None: the kernel reads them (cache.advise_ahead)."""
        self.cache, self.pool, self.top_k = cache, pool, top_k
        self.depth = depth or top_k + 2  # guesses considered per layer
        self.p: dict[int, list[float]] = {}
        self._util, self._last = 0.0, (time.perf_counter(), 0.0)
        self._tau_step, self._tau = None, 0.0
        self.enabled = True

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

    def threshold(self, step: int = -1) -> float:
        """The hit probability above which a guess pays, wasted / (saved + wasted); once per STEP."""
        if step == self._tau_step:
            return self._tau
        if self.pool is not None:  # in units of one record's read: a right guess saves one
            wasted = self.utilization() + (self.cache.regret_rate() if self.cache.free_slots() == 0 else 0.0)
            tau = wasted / (1.0 + wasted)
        else:
            times = self.cache.read_times
            if times.ahead is None or times.cold is None:
                tau = 0.0  # nothing measured yet: read ahead, and measure
            else:
                saved = max(0.0, times.cold - times.ahead)  # the wait a right guess took off the decode thread
                wasted = self.utilization() * times.cold  # a wrong guess's disk time, when the disk is busy
                tau = wasted / (saved + wasted) if saved + wasted > 0 else 0.0
                if step % _EXPLORE == 0:  # keep measuring what a guess saves even while it does not pay
                    tau = min(tau, 0.5)
        self._tau_step, self._tau = step, tau
        return tau

    def wants(self, step: int, layer: int) -> bool:
        """Whether any guess for LAYER could pay now (else the decoder need not rank its experts)."""
        return self.enabled and max(self._probs(layer)) > self.threshold(step)

    def request(self, step: int, layer: int, ranked: list[int]) -> list[int]:
        """Read ahead the guesses of RANKED (best first) for LAYER that pay; returns them."""
        p = self._probs(layer)
        tau = self.threshold(step)
        guesses = ranked[: self.depth]
        fetch = self.cache.uncached(layer, [e for r, e in enumerate(guesses) if p[r] > tau])
        if fetch and self.pool is not None:
            self.pool.speculate(step, layer, fetch, frozenset(guesses[: self.top_k]) | frozenset(fetch))
        elif fetch:
            self.cache.advise_ahead(layer, fetch)
        return fetch

    def observe(self, layer: int, ranked: list[int], chosen: list[int]) -> None:
        """The router chose CHOSEN where RANKED was guessed: update the per-rank probabilities."""
        p = self._probs(layer)
        for r, e in enumerate(ranked[: self.depth]):
            p[r] += _ALPHA * ((e in chosen) - p[r])
