"""Check a GGUF file's header against its size before any library reads it.

A ``.gguf`` file is untrusted input: its header declares counts, string
lengths, array lengths, tensor shapes and data offsets, and a reader that
trusts them allocates what the file says (a 2^60-element tensor, a 2^40-byte
string) or reads past the end. This walk reads the header with the file size
as the bound for everything: each length is compared with the bytes left
before it is used, each tensor's extent with the data section, and counts
and ranks with fixed limits. Only then does the exporter hand the file to the
``gguf`` package / transformers.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from edgeinfer.errors import ExportError

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_ARRAY = 1 << 26  # items in one metadata array (a 262k-token vocabulary fits easily)
MAX_STRING = 1 << 26  # bytes in one metadata string (a chat template, a merge list entry)
MAX_DIMS = 4
# value type -> fixed size in bytes (8 = string, 9 = array are variable)
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


class _Reader:
    def __init__(self, f, size: int, where: str):
        self.f, self.size, self.where, self.pos = f, size, where, 0

    def fail(self, what: str):
        raise ExportError(f"'{self.where}' is not a valid GGUF file ({what}): the file is damaged or not a model.")

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"a field at byte {self.pos} runs past the end of the file")
        data = self.f.read(n)
        if len(data) != n:
            self.fail("the file is shorter than it was a moment ago")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"a field at byte {self.pos} runs past the end of the file")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self, keep: bool = False) -> str | None:
        n = self.u64()
        if n > MAX_STRING:
            self.fail(f"a string of {n} bytes")
        if not keep:
            self.skip(n)
            return None
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a key that is not UTF-8")


def _skip_value(r: _Reader, vtype: int, depth: int = 0) -> int | None:
    """Skip one metadata value; returns it when it is an integer scalar (for general.alignment)."""
    if vtype in _SCALARS:
        raw = r.take(_SCALARS[vtype])
        return int.from_bytes(raw, "little") if vtype in (4, 10) else None
    if vtype == STRING:
        r.string()
        return None
    if vtype == ARRAY:
        if depth > 2:
            r.fail("arrays nested too deep")
        itype, count = r.u32(), r.u64()
        if count > MAX_ARRAY:
            r.fail(f"an array of {count} items")
        if itype in _SCALARS:
            r.skip(count * _SCALARS[itype])
        elif itype in (STRING, ARRAY):
            for _ in range(count):
                _skip_value(r, itype, depth + 1)
        else:
            r.fail(f"an array of unknown type {itype}")
        return None
    r.fail(f"unknown metadata type {vtype}")


def check_gguf(path: str | Path) -> dict:
    """Validate PATH's header and tensor extents; returns {version, tensors, kv, data_offset}."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ExportError(f"cannot read '{path}': {e.strerror}.") from None
    with f:
        r = _Reader(f, size, str(path))
        if r.take(4) != MAGIC:
            r.fail("no GGUF magic")
        version = r.u32()
        if version not in (2, 3):
            r.fail(f"unsupported version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            r.fail(f"{n_tensors} tensors and {n_kv} metadata entries declared")
        alignment = 32
        for _ in range(n_kv):
            key = r.string(keep=True)
            value = _skip_value(r, r.u32())
            if key == "general.alignment":
                if not value or value & (value - 1) or value > 1 << 16:
                    r.fail(f"an alignment of {value}")
                alignment = value
        extents = []
        for _ in range(n_tensors):
            r.string()
            n_dims = r.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                r.fail(f"a tensor of rank {n_dims}")
            dims = [r.u64() for _ in range(n_dims)]
            ttype, offset = r.u32(), r.u64()
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                r.fail(f"unknown tensor type {ttype}")
            elements = 1
            for d in dims:
                if d == 0 or d > size * 8:  # no dimension can exceed what the file could hold
                    r.fail(f"a tensor dimension of {d}")
                elements *= d
            if elements % block:
                r.fail(f"a tensor of {elements} elements in blocks of {block}")
            extents.append((offset, elements // block * type_size))
        data_start = -(-r.pos // alignment) * alignment
        for offset, nbytes in extents:
            if offset % alignment or data_start + offset + nbytes > size:
                r.fail(f"a tensor at offset {offset} of {nbytes} bytes outside the file's {size} bytes")
    return {"version": version, "tensors": n_tensors, "kv": n_kv, "data_offset": data_start}
