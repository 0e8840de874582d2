"""Read-ahead: a background thread that loads the experts the decoder predicts for its next layer
into the expert cache while the current layer computes."""

from __future__ import annotations

import queue
import threading

from .cache import ExpertCache


class Prefetcher:
    """A daemon thread that loads predicted experts in the order they were asked for.

    Requests carry the decode position they are for; one the decoder has already
    passed is dropped unread."""

    def __init__(self, cache: ExpertCache, readers: int = 1):
        self.cache = cache
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.position = (0, -1)  # (token step, layer) the decoder is at
        self._stop = False
        # More than one reader overlaps one expert's session build (CPU) with another's read (disk).
        self.threads = [threading.Thread(target=self._run, name=f"edgeinfer-expert-reader-{i}", daemon=True)
                        for i in range(max(1, readers))]
        for t in self.threads:
            t.start()

    def request(self, step: int, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.requests.put((step, layer, e))

    def _run(self) -> None:
        while True:
            item = self.requests.get()
            if item is None or self._stop:
                return
            step, layer, e = item
            if (step, layer) > self.position:
                self.cache.prefetch_one(layer, e)
            self.cache.return_freed_memory()

    def close(self) -> None:
        self._stop = True
        for _ in self.threads:
            self.requests.put(None)
        for t in self.threads:
            t.join(timeout=5)
