"""Asynchronous O_DIRECT reads without threads: Linux native AIO (io_setup / io_submit /
io_getevents) through ctypes.

Several record reads go to the disk in one system call and land straight in page-aligned buffers
of ours (no page cache: nothing to allocate, copy or drop); the decode thread later waits only
for the ones it needs. No thread of ours is involved, so nothing has to be scheduled on a busy
machine, and the GIL is released while waiting (ctypes calls release it). ``AsyncReader.open``
returns None where native AIO is not available (another OS, a kernel without it, a file system
refusing O_DIRECT): the store then reads synchronously.
"""

from __future__ import annotations

import ctypes
import os
import platform

_SYS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # io_setup, io_destroy, io_getevents, io_submit
_IOCB_CMD_PREAD = 0


class _Iocb(ctypes.Structure):  # struct iocb (little-endian field order)
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32),
                ("aio_resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class AsyncReader:
    """Reads of (offset, length) into buffers, submitted in batches, waited for by tag."""

    def __init__(self, libc, nums, ctx, depth: int):
        self._libc, self._ctx, self.depth = libc, ctx, depth
        self._setup, self._destroy, self._getevents, self._submit = nums
        self._next = 1
        self._pending: dict[int, int] = {}  # tag -> expected length while in flight
        self.done: dict[int, int] = {}  # tag -> bytes read (negative: -errno), completed but not yet claimed
        self._events = (_Event * depth)()
        # The kernel copies an iocb when it is submitted: one preallocated batch serves every submit.
        self._iocbs = (_Iocb * depth)()
        self._iocb_ptrs = (ctypes.POINTER(_Iocb) * depth)(*[ctypes.pointer(cb) for cb in self._iocbs])
        for cb in self._iocbs:
            cb.aio_lio_opcode = _IOCB_CMD_PREAD

    @classmethod
    def open(cls, depth: int = 128) -> AsyncReader | None:
        nums = _SYS.get(platform.machine())
        if nums is None or os.name != "posix":
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ctx = ctypes.c_ulong(0)
            if libc.syscall(nums[0], depth, ctypes.byref(ctx)) != 0:
                return None
        except (OSError, AttributeError):
            return None
        return cls(libc, nums, ctx, depth)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, fd: int, reads: list[tuple[int, int, int]]) -> list[int]:
        """READS: (offset, length, buffer address); returns their tags. Raises OSError if the kernel
        refuses them."""
        tags = []
        for start in range(0, len(reads), self.depth):
            tags += self._submit_batch(fd, reads[start:start + self.depth])
        return tags

    def _submit_batch(self, fd: int, reads: list[tuple[int, int, int]]) -> list[int]:
        tags = []
        for cb, (offset, length, address) in zip(self._iocbs, reads):
            tag = self._next
            self._next += 1
            cb.aio_data, cb.aio_fildes, cb.aio_buf, cb.aio_nbytes, cb.aio_offset = tag, fd, address, length, offset
            tags.append(tag)
            self._pending[tag] = length
        array = self._iocb_ptrs
        sent = 0
        while sent < len(reads):
            n = self._libc.syscall(self._submit, self._ctx, len(reads) - sent,
                                   ctypes.byref(array, sent * ctypes.sizeof(ctypes.c_void_p)))
            if n <= 0:
                err = ctypes.get_errno()
                for tag in tags[sent:]:
                    self._pending.pop(tag, None)
                if err == 11 and sent:  # EAGAIN: the rest would not fit now; report them as failed
                    for tag in tags[sent:]:
                        self.done[tag] = -err
                    return tags
                raise OSError(err, os.strerror(err))
            sent += n
        return tags

    def _reap(self, min_nr: int) -> None:
        n = self._libc.syscall(self._getevents, self._ctx, min_nr, self.depth, self._events, None)
        if n < 0:
            err = ctypes.get_errno()
            if err == 4:  # EINTR: try again
                return
            raise OSError(err, os.strerror(err))
        for i in range(n):
            ev = self._events[i]
            if self._pending.pop(ev.data, None) is not None:
                self.done[ev.data] = ev.res

    def poll(self) -> None:
        """Collect what has completed, without waiting."""
        if self._pending:
            self._reap(0)

    def wait(self, tags: list[int]) -> dict[int, int]:
        """Block until TAGS completed; returns tag -> bytes read (negative: -errno) and forgets them."""
        while any(t not in self.done for t in tags):
            self._reap(1)
        return {t: self.done.pop(t) for t in tags}

    def wait_any(self, tags: list[int]) -> None:
        """Block until at least one of TAGS completed (its result then waits in ``done``)."""
        while not any(t in self.done for t in tags):
            self._reap(1)

    def forget(self, tags: list[int]) -> None:
        """Completed reads nobody will claim (wrong guesses): drop their results."""
        for t in tags:
            self.done.pop(t, None)

    def close(self) -> None:
        if self._ctx.value:
            while self._pending:
                self._reap(1)
            self._libc.syscall(self._destroy, self._ctx)
            self._ctx.value = 0
