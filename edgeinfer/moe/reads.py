"""Record reads started ahead and finished when needed, on the decode thread, without threads.

``ReadQueue`` starts reads of expert records into page-aligned scratch buffers of its own and
finishes them when the decoder needs the records (cache.py then makes them runnable in a slot):

- with Linux native AIO (aio.py, O_DIRECT): a batch of reads is one ``io_submit``; the disk
  works while the decoder computes; ``take_completed`` hands over the reads that have completed,
  without waiting or waiting for the first;
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
import os
import time

from .aio import AsyncReader
from .store import ExpertStore
from .widener import shared_region

_CHUNK = 16  # scratch buffers allocated at a time


class ReadQueue:
    def __init__(self, store: ExpertStore, max_buffers: int = 64, shared: bool = False):
        """SHARED: the MAX_BUFFERS scratch buffers are allocated at once in memory another process maps through
        ``shared_fd`` (the widener's); buffers beyond them (demand reads past the bound) are this process's."""
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
        self._tensors: dict[int, dict] = {}
        self.pending: dict[tuple[int, int], tuple[int, int | None, bool]] = {}  # key -> (buffer, tag, speculative)
        self._abandoned: list[tuple[int, int | None]] = []  # (buffer, tag) of dropped reads still in flight
        self.shared_fd: int | None = None
        self.shared_buffers = 0  # buffers 0 .. shared_buffers - 1 lie in the shared region
        if shared:
            self.shared_fd, chunk = shared_region("edgeinfer-reads", max_buffers * self.size)
            self._add_chunk(chunk, max_buffers)
            self.shared_buffers = max_buffers

    # -- scratch buffers -----------------------------------------------------------
    def _take(self) -> int | None:
        if not self._free:
            if len(self._views) >= self.max_buffers:
                self._reap()
                if not self._free:
                    return None
            else:
                self._add_chunk(mmap.mmap(-1, _CHUNK * self.size), _CHUNK)
        return self._free.pop()

    def _add_chunk(self, chunk: mmap.mmap, n: int) -> None:
        base = ctypes.addressof(ctypes.c_char.from_buffer(chunk))
        view = memoryview(chunk)
        for i in range(n):
            self._free.append(len(self._views))
            self._views.append(view[i * self.size:(i + 1) * self.size])
            self._addresses.append(base + i * self.size)
        self._chunks.append(chunk)

    def buffers(self) -> dict[str, int]:
        """How many scratch buffers are free, pending, dropped but still being read, and in all."""
        return {"free": len(self._free), "pending": len(self.pending), "dropped": len(self._abandoned),
                "all": len(self._views)}

    def free_buffers(self) -> int:
        """Scratch buffers free now, or still to be allocated within the bound."""
        return len(self._free) + max(0, self.max_buffers - len(self._views))

    def give_back(self, buffers: list[int]) -> None:
        self._free.extend(buffers)

    def view(self, buffer: int) -> memoryview:
        return self._views[buffer]

    def tensors(self, buffer: int) -> dict:
        """The record tensors inside BUFFER (views made once per buffer: the buffers never move)."""
        got = self._tensors.get(buffer)
        if got is None:
            got = self._tensors[buffer] = self.store.views(self._views[buffer])
        return got

    # -- reads -----------------------------------------------------------------------
    def start(self, keys: list[tuple[int, int]], guesses: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """Start reading KEYS (needed), then GUESSES, those not already pending, in one submit (the disk serves
        them in that order); returns those started. A needed read always starts, into a temporary buffer if
        need be; a guess without a free buffer does not."""
        if not keys and not guesses:
            return []
        started, bufs, spec = [], [], []
        for group, is_guess in ((keys, False), (guesses, True)):
            first = len(started)
            for k in group:
                if k in self.pending:
                    continue
                b = self._take()
                if b is None:
                    if is_guess:
                        continue
                    b = self._extra()
                started.append(k)
                bufs.append(b)
                spec.append(is_guess)
            # within a group, in file order
            order = sorted(range(first, len(started)), key=lambda i: self.store.records[started[i]][0])
            started[first:] = [started[i] for i in order]
            bufs[first:] = [bufs[i] for i in order]
        if not started:
            return []
        tags: list = [None] * len(started)
        if self.aio is not None:
            try:
                tags = self.aio.submit(self.store.direct_fd, [(self.store.records[k][0], self.size,
                                                               self._addresses[b]) for k, b in zip(started, bufs)])
            except OSError:  # the kernel refuses AIO on this file after all: read through the page cache
                self._without_aio()
        if self.mode == "kernel":
            self.store.advise(started)
        for k, b, t, g in zip(started, bufs, tags, spec):
            self.pending[k] = (b, t, g)
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

    def take_completed(self, keys: list[tuple[int, int]], block: bool) -> tuple[list, float]:
        """Of KEYS (reads started and not yet taken), those whose reads have completed, taken out of the queue:
        ([(key, buffer index)], seconds waited). Without BLOCK it does not wait (through the page cache nothing counts
        as completed until asked with BLOCK); with BLOCK it waits for at least one. Checks lengths (a read the
        kernel refused is done now); checksums are the caller's (``store.verify``), which gives the buffers back."""
        t0 = time.perf_counter()
        if not keys:
            return [], 0.0
        out = []
        if self.aio is not None:
            tags = {self.pending[k][1]: k for k in keys}
            self.aio.poll()
            done = [t for t in tags if t in self.aio.done]
            if not done and block:
                self.aio.wait_any(list(tags))
                done = [t for t in tags if t in self.aio.done]
            try:
                for t in done:
                    k = tags[t]
                    got = self.aio.done.pop(t)
                    out.append((k, self.pending.pop(k)[0]))
                    if got < 0:  # the kernel refused this read (say EAGAIN): do it now
                        self.store.read_into([k], [self._views[out[-1][1]]])
                    elif got != self.size:
                        self.store.short_read(k, got)
            except BaseException:
                self._free.extend(b for _, b in out)  # the disk is done with them
                raise
        elif block:
            k = min(keys, key=lambda k: self.store.records[k][0])
            b = self.pending.pop(k)[0]
            try:
                self.store.read_into([k], [self._views[b]])
            except BaseException:
                self._free.append(b)
                raise
            out.append((k, b))
        return out, time.perf_counter() - t0

    def drop(self, keys: list[tuple[int, int]]) -> None:
        """Reads nobody needs any more (wrong guesses): their buffers come back once the disk is done."""
        for k in keys:
            b, tag, _ = self.pending.pop(k)
            if tag is None:
                self._free.append(b)
            else:
                self._abandoned.append((b, tag))

    def drop_guesses(self, layer: int, chosen: list[int]) -> None:
        """LAYER runs with CHOSEN experts: drop the reads of its other guesses."""
        if self.pending:
            self.drop([k for k, (_, _, g) in self.pending.items() if g and k[0] == layer and k[1] not in chosen])

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
        if self.shared_fd is not None:
            os.close(self.shared_fd)
            self.shared_fd = None
