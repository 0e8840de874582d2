"""The expert store: one fixed-size record per (layer, expert) in ``experts.bin``.

Opening it checks the index against the file and the format (every record 4096-aligned, inside
the file, every tensor inside its record, tensors that the format knows); a record's CRC-32 (in
the index since the layout/checksum change) is checked the first time this process reads it, so
a store whose bytes do not match the manifest is refused with one sentence, and at most once per
record does the check cost CPU. Reads are ``preadv`` calls (O_DIRECT possible: records are
4096-aligned and padded); records that lie next to each other on disk are read with one call.
Reads started ahead (reads.py) use native AIO on an O_DIRECT descriptor, or, where the file system
refuses O_DIRECT, the page cache: ``advise`` asks the kernel to start reading (POSIX_FADV_WILLNEED)
and the decoder drops the store from the page cache after every token.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib

import numpy as np

from ..errors import PackageError
from ..package import Package
from .formats import INPUT_FORMATS, record_layout, resident_bytes, tensor_views

_KNOWN_DTYPES = {"uint8", "int8", "float32"}


class ExpertStore:
    """Reads expert records from ``experts.bin`` by (layer, expert), checked against the file at open."""

    def __init__(self, pkg: Package, index: dict, direct_io: bool = False, async_reads: bool = False):
        """DIRECT_IO: synchronous reads bypass the page cache (O_DIRECT). ASYNC_READS: reads are started
        ahead (reads.py): through an O_DIRECT descriptor for native AIO where the file system takes it, else
        through the page cache (``advise``), which is then dropped after every token."""
        self.index = index
        self.path = pkg.path(index["file"])
        if not self.path.is_file():
            raise PackageError(f"expert store '{index['file']}' is missing: re-export the package.")
        self.size = self.path.stat().st_size
        self.alignment = int(index.get("alignment", 4096))
        self.record_size = int(index["record_size"])
        self.tensors = index["tensors"]
        self.precision = str(index.get("precision", ""))
        self.weights_as_inputs = bool(index.get("weights_as_inputs"))
        if self.weights_as_inputs and self.precision not in INPUT_FORMATS:
            raise PackageError(f"expert store format '{self.precision}' is unknown to this edgeinfer: upgrade "
                               "edgeinfer or re-export the package.")
        self.resident_bytes = resident_bytes(index)  # memory one cached expert holds
        self.records: dict[tuple[int, int], tuple[int, int]] = {}
        for layer, recs in index["layers"].items():
            for e, rec in enumerate(recs):
                self.records[(int(layer), e)] = self._checked(int(layer), e, rec)
        if len(set(self.records.values())) != len(self.records):
            raise PackageError("two experts share one record in the expert store index: the package is corrupt, "
                               "re-export it.")
        for t in self.tensors:
            if t.get("dtype") not in _KNOWN_DTYPES:
                raise PackageError(f"expert tensor '{t.get('name')}' has an unknown dtype: re-export the package.")
            end = int(t["offset"]) + int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
            if int(t["offset"]) < 0 or end > self.record_size:
                raise PackageError(f"expert tensor '{t['name']}' does not fit its record: the package index is "
                                   "corrupt, re-export it.")
        self.layout = record_layout(self.tensors)  # computed once: ``views`` runs per record read
        self.checksums = self._checked_sums(index.get("checksums"))
        self._verified: set[tuple[int, int]] = set()
        self.direct_io = direct_io
        self._scratch = threading.local()
        self.direct_fd: int | None = None  # for native AIO
        if async_reads and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # a file system without O_DIRECT (tmpfs): through the page cache
                self.direct_fd = None
        self.kernel = False
        self._fd = os.open(self.path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct_io else 0))
        if async_reads and self.direct_fd is None:
            self.use_page_cache()

    def use_page_cache(self) -> None:
        """Read ahead through the page cache (POSIX_FADV_WILLNEED) instead of native AIO."""
        if not hasattr(os, "posix_fadvise"):
            return
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        os.close(self._fd)
        # no O_DIRECT (reads come from the page cache the kernel fills), no read-ahead around a record
        self._fd = os.open(self.path, os.O_RDONLY)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.kernel = True

    def _checked(self, layer: int, e: int, rec) -> tuple[int, int]:
        if not (isinstance(rec, list) and len(rec) == 2 and all(isinstance(v, int) for v in rec)):
            raise PackageError(f"expert {e} of layer {layer} has a malformed index entry: re-export the package.")
        offset, size = rec
        if offset < 0 or size != self.record_size or offset % self.alignment:
            raise PackageError(f"expert {e} of layer {layer} has a bad offset or size in the index: "
                               "the package is corrupt, re-export it.")
        if offset + size > self.size:
            raise PackageError(f"expert {e} of layer {layer} lies outside the expert store ({offset + size} > "
                               f"{self.size} bytes): the store is truncated or the index corrupt, re-export it.")
        return offset, size

    def _checked_sums(self, sums) -> dict[tuple[int, int], int] | None:
        if sums is None:
            return None  # packages exported before checksums: the manifest's file hash still covers the store
        ok = isinstance(sums, dict) and set(sums) == set(self.index["layers"]) and all(
            isinstance(v, list) and len(v) == len(self.index["layers"][k]) and all(isinstance(c, int) for c in v)
            for k, v in sums.items())
        if not ok:
            raise PackageError("the expert store's checksums do not match its index: the package is corrupt, "
                               "re-export it.")
        return {(int(layer), e): c for layer, v in sums.items() for e, c in enumerate(v)}

    # -- reading -----------------------------------------------------------------
    def scratch(self, n: int = 1) -> mmap.mmap:
        """This thread's page-aligned buffer for N records (what O_DIRECT needs), grown on demand."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) < n * self.record_size:
            buf = self._scratch.buf = mmap.mmap(-1, n * self.record_size)
        return buf

    def _ranges(self, keys: list[tuple[int, int]]):
        """(offset, length) of KEYS' records, adjacent ones merged (KEYS in disk order)."""
        out: list[list[int]] = []
        for key in keys:
            offset = self.records[key][0]
            if out and out[-1][0] + out[-1][1] == offset:
                out[-1][1] += self.record_size
            else:
                out.append([offset, self.record_size])
        return out

    def advise(self, keys: list[tuple[int, int]]) -> None:
        """Start reading KEYS' records into the page cache (the kernel reads them, several in flight; no
        thread of ours waits); a later ``read_into`` then copies them from memory."""
        if self.kernel:
            for offset, length in self._ranges(sorted(keys, key=lambda k: self.records[k][0])):
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def forget(self, keys: list[tuple[int, int]]) -> None:
        """Drop KEYS' records from the page cache (advised but not needed, or read already)."""
        if self.kernel:
            for offset, length in self._ranges(sorted(keys, key=lambda k: self.records[k][0])):
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    def forget_all(self) -> None:
        """Drop every record of the store from the page cache (one call per token: records read are in
        their slots, the page cache need not keep them)."""
        if self.kernel:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_into(self, keys: list[tuple[int, int]], buffers: list) -> None:
        """Read the records of KEYS into BUFFERS (one writable, page-aligned buffer of record_size each):
        runs of records adjacent on disk with one ``preadv``; checks each record's checksum once."""
        i = 0
        while i < len(keys):
            j = i + 1
            offset = self.records[keys[i]][0]
            while j < len(keys) and self.records[keys[j]][0] == offset + (j - i) * self.record_size:
                j += 1
            want = (j - i) * self.record_size
            got = os.preadv(self._fd, buffers[i:j], offset)
            if got != want:
                self.short_read(keys[i], got, want)
            i = j
        self.verify(keys, buffers)

    def short_read(self, key: tuple[int, int], got: int, want: int | None = None) -> None:
        raise PackageError(f"expert {key[1]} of layer {key[0]}: read {got} of {want or self.record_size} bytes from "
                           "the expert store: it is truncated or unreadable, re-export the package.")

    def verify(self, keys: list[tuple[int, int]], buffers: list) -> None:
        """Check each record's checksum the first time this process reads it."""
        if self.checksums is None:
            return
        for key, buf in zip(keys, buffers):
            if key not in self._verified:
                if zlib.crc32(buf[: self.record_size]) != self.checksums[key]:
                    raise PackageError(f"expert {key[1]} of layer {key[0]} does not match its checksum in the "
                                       "manifest: the expert store is corrupt, re-export the package.")
                self._verified.add(key)

    def expected_crc(self, key: tuple[int, int]) -> int | None:
        """The CRC-32 the record of KEY must have when another process reads it for the first time (None: checked
        already, or the store has no checksums); ``mark_verified`` once it matched."""
        return None if self.checksums is None or key in self._verified else self.checksums[key]

    def mark_verified(self, key: tuple[int, int]) -> None:
        self._verified.add(key)

    def views(self, buf) -> dict[str, np.ndarray]:
        """The record tensors inside BUF (views, no copy)."""
        return tensor_views(memoryview(buf)[: self.record_size], self.layout)

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """One expert's tensors (views of one freshly allocated copy of its record)."""
        scratch = self.scratch()
        self.read_into([(layer, expert)], [scratch])
        # A copy into allocator memory: a fresh mapping per read costs more in page faults than the copy.
        return self.views(np.frombuffer(scratch, np.uint8, count=self.record_size).copy())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None


def record_checksums(path, index: dict) -> dict[str, list[int]]:
    """CRC-32 of every record of the store at PATH, by layer (for the index; the exporter calls it)."""
    out: dict[str, list[int]] = {}
    size = int(index["record_size"])
    with open(path, "rb") as f:
        for layer, recs in index["layers"].items():
            sums = []
            for offset, _ in recs:
                f.seek(offset)
                sums.append(zlib.crc32(f.read(size)))
            out[layer] = sums
    return out
