"""The expert store: one fixed-size record per (layer, expert) in ``experts.bin``, every index
entry checked against the file when it is opened, read with one ``preadv`` per record (O_DIRECT
possible: the records are 4096-aligned and padded)."""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from ..errors import PackageError
from ..package import Package
from .budget import resident_records


class ExpertStore:
    """Reads expert records from ``experts.bin`` by (layer, expert), checked against the file at open."""

    def __init__(self, pkg: Package, index: dict, direct_io: bool = False):
        self.path = pkg.path(index["file"])
        if not self.path.is_file():
            raise PackageError(f"expert store '{index['file']}' is missing: re-export the package.")
        self.size = self.path.stat().st_size
        self.alignment = int(index.get("alignment", 4096))
        self.record_size = int(index["record_size"])
        self.tensors = index["tensors"]
        self.weights_as_inputs = bool(index.get("weights_as_inputs"))
        self.resident_records = resident_records(index)  # memory one cached expert holds, in records
        self.records: dict[tuple[int, int], tuple[int, int]] = {}
        for layer, recs in index["layers"].items():
            for e, rec in enumerate(recs):
                self.records[(int(layer), e)] = self._checked(int(layer), e, rec)
        for t in self.tensors:
            end = int(t["offset"]) + int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
            if int(t["offset"]) < 0 or end > self.record_size:
                raise PackageError(f"expert tensor '{t['name']}' does not fit its record: the package index is "
                                   "corrupt, re-export it.")
        self.direct_io = direct_io
        self._scratch = threading.local()
        self._fd = os.open(self.path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct_io else 0))

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

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """One expert's tensors (views of one freshly allocated copy of its record)."""
        offset, size = self.records[(layer, expert)]
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None:  # one per thread; anonymous and page-aligned: what O_DIRECT needs
            scratch = self._scratch.buf = mmap.mmap(-1, size)
        got = os.preadv(self._fd, [scratch], offset)
        if got != size:
            raise PackageError(f"expert {expert} of layer {layer}: read {got} of {size} bytes from the expert "
                               "store: it is truncated, re-export the package.")
        # A copy into allocator memory: a fresh mapping per read costs more in page faults than the copy.
        raw = np.frombuffer(scratch, np.uint8).copy()
        out = {}
        for t in self.tensors:
            dt = np.dtype(t["dtype"])
            n = int(np.prod(t["shape"])) * dt.itemsize
            out[t["name"]] = raw[t["offset"]:t["offset"] + n].view(dt).reshape(t["shape"])
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
