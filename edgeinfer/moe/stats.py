"""The expert cache's counters: what a generation result reports as ``stats["experts"]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheStats:
    hits: int = 0  # needed and already cached (including read ahead in time)
    late_prefetches: int = 0  # needed while its read was in flight: waited for it
    misses: int = 0  # needed, neither cached nor in flight: read on demand
    prefetched: int = 0  # experts read ahead
    prefetch_used: int = 0  # ... of which were used before being evicted
    prefetch_skipped: int = 0  # speculative reads dropped: stale, or no slot they may take
    regrets: int = 0  # demand misses on an expert evicted not long before
    evictions: int = 0
    reads: int = 0  # read calls (a run of adjacent records is one)
    bytes_read: int = 0
    read_s: float = 0.0  # time spent reading expert records (all threads)
    build_s: float = 0.0  # time spent making records runnable (sessions, or widening into slots)
    wait_s: float = 0.0  # time the decode thread stood still for experts
    predicted: int = 0  # experts predicted for the next layer
    predicted_right: int = 0  # ... that the router then chose
    tokens: int = 0

    def as_dict(self) -> dict:
        needed = self.hits + self.late_prefetches + self.misses
        d = dict(self.__dict__)
        d.update(needed=needed, hit_rate=round(self.hits / needed, 4) if needed else None,
                 # needed experts that came from disk for this use: what a read bound counts
                 needed_reads=self.misses + self.prefetch_used,
                 prefetch_accuracy=round(self.predicted_right / self.predicted, 4) if self.predicted else None,
                 bytes_read_per_token=round(self.bytes_read / self.tokens) if self.tokens else None,
                 read_s=round(self.read_s, 4), build_s=round(self.build_s, 4), wait_s=round(self.wait_s, 4))
        return d

    def minus(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{k: getattr(self, k) - getattr(other, k) for k in self.__dict__})
