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
in units of one record's read, so a guess is fetched when p > (u + h) / (1 + u + h). Guesses
beyond top_k are considered too (a layer whose guesses are often off by one rank gets the next
ones when they pay). Speculative reads never evict the running layer's experts nor the other
guesses for their own layer (cache.py), and demand reads overtake them (reader.py).
"""

from __future__ import annotations

import time

import numpy as np

from .cache import ExpertCache
from .reader import ReaderPool

_ALPHA = 0.05  # smoothing of the per-rank hit probabilities (~20 tokens)


class ReadAhead:
    """Decides, per layer, which guessed experts to read ahead, and asks the reader pool for them."""

    def __init__(self, cache: ExpertCache, pool: ReaderPool, top_k: int, depth: int | None = None):
        self.cache, self.pool, self.top_k = cache, pool, top_k
        self.depth = depth or 2 * top_k  # guesses considered per layer
        self.p: dict[int, np.ndarray] = {}
        self._util, self._last = 0.0, (time.perf_counter(), 0.0)
        self.enabled = True

    def _probs(self, layer: int) -> np.ndarray:
        if layer not in self.p:  # prior: top-k guesses mostly right, the rest mostly wrong
            self.p[layer] = np.array([0.8] * self.top_k + [0.2] * (self.depth - self.top_k))
        return self.p[layer]

    def utilization(self) -> float:
        """How busy the readers have been lately (0..1), smoothed."""
        now, busy = time.perf_counter(), self.pool.busy_s
        t0, b0 = self._last
        if now - t0 >= 0.005:
            u = min(1.0, (busy - b0) / (now - t0))  # at least one read in flight: the disk is busy
            self._util = 0.8 * self._util + 0.2 * u
            self._last = (now, busy)
        return self._util

    def threshold(self) -> float:
        wasted = self.utilization() + (0.0 if self.cache.free_slots() > 0 else self.cache.regret_rate())
        return wasted / (1.0 + wasted)

    def request(self, step: int, layer: int, ranked: list[int]) -> list[int]:
        """Read ahead the guesses of RANKED (best first) for LAYER that pay; returns them."""
        if not self.enabled:
            return []
        p = self._probs(layer)
        tau = self.threshold()
        guesses = ranked[: self.depth]
        fetch = [e for r, e in enumerate(guesses) if p[r] > tau and not self.cache.has(layer, e)]
        if fetch:
            self.pool.speculate(step, layer, fetch, frozenset(guesses[: self.top_k]) | frozenset(fetch))
        return fetch

    def observe(self, layer: int, ranked: list[int], chosen: list[int]) -> None:
        """The router chose CHOSEN where RANKED was guessed: update the per-rank probabilities."""
        p = self._probs(layer)
        hit = np.array([e in chosen for e in ranked[: self.depth]], np.float64)
        p[: len(hit)] += _ALPHA * (hit - p[: len(hit)])
