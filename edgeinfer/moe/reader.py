"""Reader threads: several expert reads in flight, demand reads first.

A small pool of threads (``preadv`` releases the GIL, and so do the numpy passes that widen int4
records) takes jobs from one priority queue:

- demand jobs (priority 0): runs of a layer's missing experts, their slots already reserved by
  the decode thread, which reads one run itself and waits for the rest;
- speculative requests (priority 1, by decode step, layer and guess rank): experts read ahead for
  a layer about to run; their slots are reserved only when a reader takes them (cache.py decides
  whether they may evict anything), and one the decoder has already passed is dropped unread.
"""

from __future__ import annotations

import heapq
import itertools
import threading


class ReaderPool:
    """THREADS daemon readers for the expert CACHE."""

    def __init__(self, cache, threads: int = 3):
        self.cache = cache
        self.cond = threading.Condition()
        self.heap: list = []
        self.seq = itertools.count()
        self._stop = False
        self.threads = [threading.Thread(target=self._run, name=f"edgeinfer-expert-reader-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()
        cache.reader = self

    def submit(self, jobs: list) -> None:
        """Demand jobs (keys, flights) whose slots are reserved: read them first."""
        with self.cond:
            for job in jobs:
                heapq.heappush(self.heap, ((0, next(self.seq)), "demand", job))
            self.cond.notify(len(jobs))

    def speculate(self, step: int, layer: int, experts: list[int], keep: frozenset) -> None:
        """Read EXPERTS of LAYER ahead for decode STEP (most likely first), keeping KEEP in that layer."""
        with self.cond:
            for rank, e in enumerate(experts):
                heapq.heappush(self.heap, ((1, step, layer, rank, next(self.seq)), "ahead", (step, layer, [e], keep)))
            self.cond.notify(len(experts))

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.heap and not self._stop:
                    self.cond.wait()
                if self._stop:
                    return
                _, kind, job = heapq.heappop(self.heap)
            if kind == "demand":
                self.cache.run_loads([job])
            else:
                step, layer, experts, keep = job
                jobs = self.cache.start_speculative(step, layer, experts, keep)
                if jobs:
                    self.cache.run_loads(jobs, prefetched=True)

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=5)
        # Requests never taken had reserved nothing; demand jobs are never left behind (the decode
        # thread waits for them before it can close).
