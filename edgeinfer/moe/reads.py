"""Record reads started ahead and finished when needed, on the decode thread, without threads.

``ReadQueue`` starts reads of expert records into page-aligned scratch buffers of its own and
finishes them when the decoder needs the records (cache.py then makes them runnable in a slot):

- with Linux native AIO (aio.py, O_DIRECT): a batch of reads is one ``io_submit``; the disk
  works while the decoder computes; finishing waits only for the records needed;
- else, through the page cache: starting asks the kernel to read (POSIX_FADV_WILLNEED),
  finishing copies the record (``preadv``), and the store is dropped from the page cache
  after every token;
- else (no posix_fadvise) reads happen when finished.

Guesses that turn out wrong are dropped (their buffers come back once the disk is done with
them). The scratch pool is bounded: a guess that finds no free buffer is not read.
"""

from __future__ import annotations

import ctypes
import mmap
import time

from .aio import AsyncReader
from .store import ExpertStore

_CHUNK = 16  # scratch buffers allocated at a time


class ReadQueue:
    def __init__(self, store: ExpertStore, max_buffers: int = 64):
        self.store = store
        self.size = store.record_size
        self.aio = AsyncReader.open() if store.direct_fd is not None else None
        if self.aio is None and not store.kernel:
            store.use_page_cache()
        self.mode = "aio" if self.aio is not None else "kernel" if store.kernel else "sync"
        self.max_buffers = max_buffers
        self._chunks: list[mmap.mmap] = []
        self._free: list[int] = []
        self._views: list[memoryview] = []
        self._addresses: list[int] = []
        self.pending: dict[tuple[int, int], tuple[int, int | None, bool]] = {}  # key -> (buffer, tag, speculative)
        self._abandoned: list[tuple[int, int | None]] = []  # (buffer, tag) of dropped reads still in flight

    # -- scratch buffers -----------------------------------------------------------
    def _take(self) -> int | None:
        if not self._free:
            if len(self._views) >= self.max_buffers:
                self._reap()
                if not self._free:
                    return None
            else:
                chunk = mmap.mmap(-1, _CHUNK * self.size)
                base = ctypes.addressof(ctypes.c_char.from_buffer(chunk))
                view = memoryview(chunk)
                for i in range(_CHUNK):
                    self._free.append(len(self._views))
                    self._views.append(view[i * self.size:(i + 1) * self.size])
                    self._addresses.append(base + i * self.size)
                self._chunks.append(chunk)
        return self._free.pop()

    def buffers(self) -> dict[str, int]:
        """How many scratch buffers are free, pending, dropped but still being read, and in all."""
        return {"free": len(self._free), "pending": len(self.pending), "dropped": len(self._abandoned),
                "all": len(self._views)}

    def give_back(self, buffers: list[int]) -> None:
        self._free.extend(buffers)

    def view(self, buffer: int) -> memoryview:
        return self._views[buffer]

    # -- reads -----------------------------------------------------------------------
    def start(self, keys: list[tuple[int, int]], speculative: bool) -> list[tuple[int, int]]:
        """Start reading KEYS (not already pending); returns those started (a guess without a free buffer is
        not; a demand read always is, into a temporary buffer if need be)."""
        keys = [k for k in keys if k not in self.pending]
        started, bufs = [], []
        for k in keys:
            b = self._take()
            if b is None:
                if speculative:
                    continue
                b = self._extra()
            started.append(k)
            bufs.append(b)
        if not started:
            return []
        order = sorted(range(len(started)), key=lambda i: self.store.records[started[i]][0])
        started = [started[i] for i in order]
        bufs = [bufs[i] for i in order]
        tags: list = [None] * len(started)
        if self.aio is not None:
            try:
                tags = self.aio.submit(self.store.direct_fd, [(self.store.records[k][0], self.size,
                                                               self._addresses[b]) for k, b in zip(started, bufs)])
            except OSError:  # the kernel refuses AIO on this file after all: read through the page cache
                self._without_aio()
        if self.mode == "kernel":
            self.store.advise(started)
        for k, b, t in zip(started, bufs, tags):
            self.pending[k] = (b, t, speculative)
        return started

    def _without_aio(self) -> None:
        """Fall back to reads through the page cache (reads already submitted are waited for first)."""
        in_flight = [tag for _, tag, _ in self.pending.values() if tag is not None]
        in_flight += [tag for _, tag in self._abandoned]
        self.aio.wait([t for t in in_flight if t not in self.aio.done])  # the disk is done with every buffer
        self.aio.close()
        self.aio = None
        self.pending = {k: (b, None, spec) for k, (b, _, spec) in self.pending.items()}
        self._free.extend(b for b, _ in self._abandoned)
        self._abandoned = []
        self.store.use_page_cache()
        self.mode = "kernel" if self.store.kernel else "sync"

    def _extra(self) -> int:
        """A buffer beyond the pool's bound, for a demand read (the pool shrinks back as they return)."""
        chunk = mmap.mmap(-1, self.size)
        self._chunks.append(chunk)
        self._views.append(memoryview(chunk))
        self._addresses.append(ctypes.addressof(ctypes.c_char.from_buffer(chunk)))
        return len(self._views) - 1

    def finish(self, keys: list[tuple[int, int]]):
        """Wait for (or do) the reads of KEYS; yields (key, buffer, seconds waited) as each completes, so the
        caller can make one record runnable while the next is still being read. Checks lengths and checksums
        (store.read_into's errors). The caller gives the buffers back."""
        self.start([k for k in keys if k not in self.pending], speculative=False)
        entries = {k: self.pending.pop(k) for k in keys}
        left = sorted(keys, key=lambda k: self.store.records[k][0])
        try:
            while left:
                t0 = time.perf_counter()
                if self.aio is not None:
                    tags = {entries[k][1]: k for k in left}
                    done = [t for t in tags if t in self.aio.done]
                    if not done:
                        self.aio.wait_any(list(tags))
                        done = [t for t in tags if t in self.aio.done]
                    ready = []
                    for t in done:
                        k = tags[t]
                        got = self.aio.done.pop(t)
                        if got < 0:  # the kernel refused this read (say EAGAIN): do it now
                            self.store.read_into([k], [self._views[entries[k][0]]])
                        elif got != self.size:
                            self.store.short_read(k, got)
                        ready.append(k)
                else:
                    k = left[0]
                    self.store.read_into([k], [self._views[entries[k][0]]])
                    ready = [k]
                waited = (time.perf_counter() - t0) / len(ready)
                for k in ready:
                    left.remove(k)
                    if self.aio is not None:
                        self.store.verify([k], [self._views[entries[k][0]]])
                    yield k, entries[k][0], waited
        except BaseException:
            self._settle([entries[k] for k in left])
            raise

    def _settle(self, entries: list[tuple]) -> None:
        """Buffers of reads that will not be used (an error): back to the pool once the disk is done."""
        for b, tag, _ in entries:
            if tag is None or self.aio is None or tag in self.aio.done:
                if tag is not None and self.aio is not None:
                    self.aio.done.pop(tag)
                self._free.append(b)
            else:
                self._abandoned.append((b, tag))

    def drop(self, keys: list[tuple[int, int]]) -> None:
        """Reads nobody needs any more (wrong guesses): their buffers come back once the disk is done."""
        for k in keys:
            b, tag, _ = self.pending.pop(k)
            if tag is None:
                self._free.append(b)
            else:
                self._abandoned.append((b, tag))

    def _reap(self) -> None:
        if not self._abandoned:
            return
        self.aio.poll()
        still = []
        for b, tag in self._abandoned:
            if tag in self.aio.done:
                self.aio.forget([tag])
                self._free.append(b)
            else:
                still.append((b, tag))
        self._abandoned = still

    def end_token(self) -> None:
        """Between tokens: take back finished dropped reads; through the page cache, drop the store from it."""
        if self.aio is not None:
            self._reap()
        elif self.mode == "kernel" and not self.pending:
            self.store.forget_all()

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()
