"""Expert records read and widened in a worker process, off the decode thread and without the GIL.

Per missed 0.09 MB int4-channel record the decode thread used to spend ~65 us: starting the read,
waiting for the part of it its cached experts did not cover, widening the nibbles (numpy, 20-30 us)
and the bookkeeping. A helper *thread* gives the widening's time back trading the GIL around numpy
calls of a few microseconds each (measured, docs/moe.md). The widener is a *process*: it shares
the arena of slots (and the read buffers of read-ahead's queue) with the decoder through ``memfd``
regions passed by descriptor, takes commands through a pipe, and writes each finished command's
sequence number (its negative if it failed) into a shared array that the decode thread polls when
it needs the expert. Commands:

- *load* (a layer's misses, posted before the layer's cached experts run): read the record at a
  file offset with its own native AIO (aio.py, O_DIRECT), check its CRC-32 the first time, and
  widen it into its slot the moment the read lands; the decode thread pays a few microseconds;
- *widen* a record already read into a shared read buffer (a guess read ahead by reads.py).

It is ``python -m edgeinfer.moe.widener``, started with ``subprocess``: not a fork (the decoder's
process holds onnxruntime's threads) and not multiprocessing's spawn (it re-imports the caller's
main module). It runs on a core of its own, and the decoding thread stays off that core while a
token decodes (``pinned``; Linux affinity is per thread): left to the scheduler, the woken worker
runs on the poster's core and nothing overlaps (measured: a post then took as long as the
widening). The decoder starts one where its compute threads leave a core (Linux); elsewhere the
decode thread reads and widens. While reads are in flight the worker polls for their completion
(its core is its own); otherwise it sleeps on its pipe, and it exits when the pipe closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import time
import zlib
from collections import deque

import numpy as np

from ..errors import PackageError
from .formats import record_layout, slot_filler, slot_layout, tensor_views

# sequence number, file offset (load) or read buffer (widen), slot, kind, expected CRC-32 (load, checked if kind
# says so): 32 bytes, so a batch of commands up to the pipe's atomic size arrives whole
_COMMAND = struct.Struct("qqiiIi")
_WIDEN, _LOAD, _LOAD_CHECKED = 0, 1, 2
_CHECK_S = 1e-3  # while waiting, how often the worker's liveness is checked
_OWN_BUFFERS = 32  # the worker's own read buffers (loads beyond them wait for one)
_READY_S = 30.0  # how long a starting worker may take to say it is ready (imports on a cold disk)


def shared_region(name: str, size: int) -> tuple[int, mmap.mmap]:
    """Anonymous shared memory another process can map through the returned descriptor."""
    fd = os.memfd_create(name)
    os.ftruncate(fd, max(1, size))
    return fd, mmap.mmap(fd, max(1, size))


def worker_cpu(threads: int | None) -> int | None:
    """The core a widener may have to itself: the last of this thread's cores when the decoder computes on fewer
    threads than it has cores (Linux); else None (no widener)."""
    if threads is None or not hasattr(os, "memfd_create") or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > threads else None


class Widener:
    """The decoder's side of the worker: posts commands, waits for them, stops it."""

    def __init__(self, proc: subprocess.Popen, command_fd: int, done_map: mmap.mmap, buffers: int, cpu: int):
        self.proc, self._command, self._done_map, self.cpu = proc, command_fd, done_map, cpu
        self.done = np.frombuffer(done_map, np.int64)  # per read buffer, then per slot: the last command done
        self.buffers = buffers
        self._seq = 0

    @classmethod
    def start(cls, index: dict, store_path: str, arena_fd: int, arena_bytes: int, slot_bytes: int, buffers_fd: int,
              buffers: int, cpu: int) -> Widener:
        """A worker for the store INDEX (the file at STORE_PATH): widening into slots of SLOT_BYTES of the arena
        (memfd ARENA_FD, ARENA_BYTES) from its own reads or from BUFFERS read buffers (memfd BUFFERS_FD, one record
        each), pinned to CPU."""
        slots = arena_bytes // slot_bytes
        done_fd, done_map = shared_region("edgeinfer-widener-done", (buffers + slots) * 8)
        read_end, write_end = os.pipe()
        spec = {"index": index, "store": store_path, "arena_fd": arena_fd, "arena_bytes": arena_bytes,
                "slot_bytes": slot_bytes, "buffers_fd": buffers_fd, "buffers": buffers, "done_fd": done_fd,
                "command_fd": read_end, "cpu": cpu}
        proc = None
        try:
            proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.moe.widener"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, pass_fds=(read_end, arena_fd, buffers_fd, done_fd))
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
            ready, _, _ = select.select([proc.stdout], [], [], _READY_S)
            if not ready or proc.stdout.readline() != b"ready\n":
                raise OSError(f"the expert widener did not start (exit code {proc.poll()})")
        except BaseException:
            os.close(write_end)
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        finally:
            os.close(read_end)
            os.close(done_fd)
        return cls(proc, write_end, done_map, buffers, cpu)

    def _post(self, commands: list[tuple]) -> list[int]:
        data, seqs = [], []
        for where, slot, kind, crc in commands:
            self._seq += 1
            seqs.append(self._seq)
            data.append(_COMMAND.pack(self._seq, where, slot, kind, crc, 0))
        os.write(self._command, b"".join(data))
        return seqs

    def widen(self, buffer: int, slot: int) -> int:
        """Widen the record in read BUFFER into SLOT; its sequence number (``wait(buffer, seq)``)."""
        return self._post([(buffer, slot, _WIDEN, 0)])[0]

    def load(self, loads: list[tuple[int, int, int | None]]) -> list[int]:
        """Read the records at file offsets into slots ((offset, slot, CRC-32 to check or None) each, in one
        write); their sequence numbers (``wait_slot(slot, seq)``)."""
        return self._post([(offset, slot, _LOAD if crc is None else _LOAD_CHECKED, crc or 0)
                           for offset, slot, crc in loads])

    def wait(self, buffer: int, seq: int) -> None:
        """Until the widening SEQ of read BUFFER is done."""
        self._wait(buffer, seq, "an expert record")

    def wait_slot(self, slot: int, seq: int, key: tuple[int, int]) -> None:
        """Until the load SEQ into SLOT (of expert KEY) is done."""
        self._wait(self.buffers + slot, seq, f"expert {key[1]} of layer {key[0]}")

    def _wait(self, i: int, seq: int, what: str) -> None:
        done = self.done
        check = time.perf_counter() + _CHECK_S
        while True:
            got = int(done[i])
            if got == seq:
                return
            if got == -seq:
                raise PackageError(f"{what} could not be read or does not match its checksum in the manifest: the "
                                   "expert store is corrupt, re-export the package.")
            if time.perf_counter() > check:
                if self.proc.poll() is not None:
                    raise PackageError(f"the expert widener process exited (code {self.proc.returncode}) while "
                                       "decoding: load the model again.")
                check = time.perf_counter() + _CHECK_S

    @contextlib.contextmanager
    def pinned(self):
        """The calling thread off the worker's core for the duration (its affinity restored after)."""
        saved = os.sched_getaffinity(0)
        others = saved - {self.cpu}
        move = bool(others) and others != saved
        if move:
            os.sched_setaffinity(0, others)
        try:
            yield
        finally:
            if move:
                os.sched_setaffinity(0, saved)

    def close(self) -> None:
        """Stop the worker (the end of its command pipe) and wait for it."""
        if self._command < 0:
            return
        os.close(self._command)
        self._command = -1
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    """The worker process's state: the shared memory, its own reads, the commands not yet done."""

    def __init__(self, spec: dict):
        from .aio import AsyncReader

        index = spec["index"]
        self.size = size = int(index["record_size"])
        self.stride = spec["slot_bytes"]
        self.arena = mmap.mmap(spec["arena_fd"], spec["arena_bytes"])
        self.nbuf = spec["buffers"]
        shared = mmap.mmap(spec["buffers_fd"], max(1, self.nbuf * size))
        self.done = np.frombuffer(mmap.mmap(spec["done_fd"], (self.nbuf + spec["arena_bytes"] // self.stride) * 8),
                                  np.int64)
        self.fill = slot_filler(index)
        self.records, self.slots = record_layout(index["tensors"]), slot_layout(index)
        self.shared = [self._record(shared, b) for b in range(self.nbuf)]
        self.slot_views: dict[int, dict] = {}
        self.aio = AsyncReader.open() if hasattr(os, "O_DIRECT") else None
        self.sync = self.aio is None  # reads done here, synchronously
        try:
            self.fd = os.open(spec["store"], os.O_RDONLY | (os.O_DIRECT if self.aio is not None else 0))
        except OSError:  # a file system without O_DIRECT: synchronous reads through the page cache
            if self.aio is not None:
                self.aio.close()
            self.aio = None
            self.fd = os.open(spec["store"], os.O_RDONLY)
        own = mmap.mmap(-1, _OWN_BUFFERS * size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(own))
        self.own = [(base + b * size, memoryview(own)[b * size:(b + 1) * size], self._record(own, b))
                    for b in range(_OWN_BUFFERS)]
        self.free = list(range(_OWN_BUFFERS))
        self.queue: deque = deque()  # loads waiting for an own buffer: (seq, offset, slot, kind, crc)
        self.inflight: dict[int, tuple] = {}  # AIO tag -> (seq, offset, slot, kind, crc, own buffer)

    def _record(self, region: mmap.mmap, b: int) -> dict:
        return tensor_views(memoryview(region)[b * self.size:(b + 1) * self.size], self.records)

    def widen(self, record: dict, slot: int, flag: int, seq: int) -> None:
        try:
            views = self.slot_views.get(slot)
            if views is None:
                views = self.slot_views[slot] = tensor_views(
                    memoryview(self.arena)[slot * self.stride:(slot + 1) * self.stride], self.slots)
            self.fill(record, views)
            self.done[flag] = seq
        except Exception as e:  # the decoder raises PackageError when it waits for this one
            self.fail(flag, seq, f"{type(e).__name__}: {e}")

    def fail(self, flag: int, seq: int, why: str) -> None:
        print(f"edgeinfer expert widener: {why}", file=sys.stderr)
        self.done[flag] = -seq

    def command(self, seq: int, where: int, slot: int, kind: int, crc: int) -> None:
        if kind == _WIDEN:
            self.widen(self.shared[where], slot, where, seq)
        else:
            self.queue.append((seq, where, slot, kind, crc))

    def submit(self) -> None:
        """Start the waiting loads that have a buffer (read synchronously where AIO is missing or refused)."""
        batch = []
        while self.queue and self.free:
            batch.append((*self.queue.popleft(), self.free.pop()))
        if not batch:
            return
        if not self.sync:
            try:
                tags = self.aio.submit(self.fd, [(offset, self.size, self.own[b][0])
                                                 for _, offset, _, _, _, b in batch])
            except OSError:  # the kernel refuses AIO on this file after all: synchronous reads from now on
                self.sync = True
            else:
                for tag, (seq, offset, slot, kind, crc, b) in zip(tags, batch):
                    self.inflight[tag] = (seq, offset, slot, kind, crc, b)
                return
        for seq, offset, slot, kind, crc, b in batch:
            self.land(seq, offset, slot, kind, crc, b, -1)

    def reap(self) -> None:
        """Widen the loads whose reads have landed."""
        self.aio.poll()
        for tag in [t for t in self.inflight if t in self.aio.done]:
            self.land(*self.inflight.pop(tag), self.aio.done.pop(tag))

    def land(self, seq: int, offset: int, slot: int, kind: int, crc: int, b: int, got: int) -> None:
        """The read of load SEQ ended with GOT bytes (negative: not done, say refused: read it here now)."""
        flag = self.nbuf + slot
        try:
            if got < 0:
                got = os.preadv(self.fd, [self.own[b][1]], offset)
            if got != self.size:
                self.fail(flag, seq, f"read {got} of {self.size} bytes of a record")
            elif kind == _LOAD_CHECKED and zlib.crc32(self.own[b][1]) != crc:
                self.fail(flag, seq, "a record does not match its checksum")
            else:
                self.widen(self.own[b][2], slot, flag, seq)
        finally:
            self.free.append(b)


def main() -> None:
    """The worker: carry out commands until the command pipe ends."""
    spec = json.loads(sys.stdin.read())
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {spec["cpu"]})
    worker = _Worker(spec)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    command_fd = spec["command_fd"]
    os.set_blocking(command_fd, False)
    pending = b""
    while True:
        if not worker.inflight and not worker.queue:
            select.select([command_fd], [], [])  # nothing to do: sleep until commands come (or the pipe ends)
        try:
            data = os.read(command_fd, _COMMAND.size * 128)
            if not data:
                return
        except BlockingIOError:
            data = b""
        pending += data
        whole = len(pending) // _COMMAND.size * _COMMAND.size
        for seq, where, slot, kind, crc, _ in _COMMAND.iter_unpack(pending[:whole]):
            worker.command(seq, where, slot, kind, crc)
        pending = pending[whole:]
        worker.submit()
        if worker.inflight:
            worker.reap()


if __name__ == "__main__":
    main()
