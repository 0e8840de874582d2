"""How the expert budget is split across layers, and which experts stay resident.

The exporter runs the package over calibration text and records, per sparse layer, how often each
expert was routed to (``moe.routing.frequencies`` in the manifest: per token, summing to top_k).
From that:

- the budget is split across layers by miss cost: every record costs the same read, so a slot
  goes where it saves the most reads. Slots are handed out one at a time to the layer whose next
  most frequent uncached expert is the most frequent (each layer first gets what one token needs,
  top_k, as far as the budget allows) -- a layer whose routing is concentrated needs fewer slots
  for the same hit rate than a layer whose routing is spread out;
- part of each layer's share (``resident_fraction``, off by default) can hold its most frequent
  experts for good (a resident set); the rest is managed least-recently-used, which follows the
  text's own locality.

Without frequencies (packages exported before this, or ``plan=None``) every layer gets an equal
share and nothing is resident: plain per-layer LRU. Random routers route near-uniformly, so their
frequencies say little and the split comes out near-equal.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import PackageError
from ..package import ExpertsSpec

# Off by default: measured (docs/moe.md), resident sets chosen on calibration text raised the MoEfied
# model's hit rate on other real text by 0.2-0.5 points over per-layer LRU and lowered the random
# model's by 2-3 points (its calibration tokens are not distributed like the benchmark's).
RESIDENT_FRACTION = 0.0


@dataclass
class ResidencyPlan:
    quotas: dict[int, float]  # layer -> its share of the cache, in experts
    resident: dict[int, frozenset]  # layer -> experts never evicted once loaded

    @classmethod
    def equal(cls, layers: list[int], capacity: int, top_k: int) -> ResidencyPlan:
        share = capacity / max(1, len(layers))
        return cls({i: share for i in layers}, {i: frozenset() for i in layers})

    @classmethod
    def from_frequencies(cls, freqs: dict[int, np.ndarray], capacity: int, top_k: int,
                         resident_fraction: float = RESIDENT_FRACTION) -> ResidencyPlan:
        """FREQS: layer -> routing frequency per expert. Split CAPACITY slots by miss cost; each layer's
        top ``resident_fraction`` of its share (leaving at least top_k for the rest) is resident."""
        layers = sorted(freqs)
        order = {i: np.argsort(-np.asarray(freqs[i], np.float64), kind="stable") for i in layers}
        total = sum(len(order[i]) for i in layers)
        if capacity >= total:
            return cls({i: float(len(order[i])) for i in layers}, {i: frozenset() for i in layers})
        base = min(top_k, capacity // max(1, len(layers)))
        quotas = {i: base for i in layers}
        left = capacity - base * len(layers)
        heap = [(-float(freqs[i][order[i][base]]), i) for i in layers if base < len(order[i])]
        heapq.heapify(heap)
        while left > 0 and heap:
            _, i = heapq.heappop(heap)
            quotas[i] += 1
            left -= 1
            if quotas[i] < len(order[i]):
                heapq.heappush(heap, (-float(freqs[i][order[i][quotas[i]]]), i))
        resident = {}
        for i in layers:
            n = min(int(quotas[i] * resident_fraction), quotas[i] - top_k)
            resident[i] = frozenset(order[i][:max(0, n)].tolist())
        return cls({i: float(q) for i, q in quotas.items()}, resident)

    @classmethod
    def from_manifest(cls, moe: ExpertsSpec, layers: list[int], capacity: int, top_k: int,
                      resident_fraction: float | None = None) -> ResidencyPlan:
        """The plan for this package's recorded routing frequencies (equal shares if it has none)."""
        freqs = (moe.routing or {}).get("frequencies")
        if not freqs:
            return cls.equal(layers, capacity, top_k)
        try:
            by_layer = {int(k): np.asarray(v, np.float64) for k, v in freqs.items()}
            ok = sorted(by_layer) == sorted(layers) and all(
                v.shape == (moe.num_experts,) and np.isfinite(v).all() and (v >= 0).all()
                for v in by_layer.values())
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise PackageError("the manifest's expert routing frequencies do not match its layers and experts: "
                               "the package is corrupt, re-export it.")
        return cls.from_frequencies(by_layer, capacity, top_k,
                                    RESIDENT_FRACTION if resident_fraction is None else resident_fraction)


def furthest_above(over: dict[int, float], layer: int):
    """Layers by how far above their share they are (OVER), furthest first; among the furthest, LAYER (the
    asking one) first. Lazy: the rest are sorted only if the first has nothing to give."""
    top = max(over.values())
    first = layer if over.get(layer) == top else next(i for i, o in over.items() if o == top)
    yield first
    yield from (i for i in sorted(over, key=over.__getitem__, reverse=True) if i != first)
