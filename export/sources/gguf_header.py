"""The GGUF file header: its key/value metadata and tensor table, parsed from the bytes.

Parsed here rather than with ``gguf.GGUFReader``, which builds a numpy view per array
element and takes ~12 s on Gemma-3's 262k-token vocabulary; this walk takes a fraction of
a second. Every length is bounded by the file size (the file is untrusted input).
export/sources/gguf_metadata.py turns the metadata into a config and a tokenizer;
export/sources/gguf_tensors.py reads the tensors.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.errors import ExportError

# GGUF metadata value types (gguf's GGUFValueType)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY = 1 << 26


@dataclass
class TensorInfo:
    """One tensor of the file: its GGUF name, dims (GGUF order: fastest first), ggml type, where its bytes lie."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_offset: int


class _Cursor:
    def __init__(self, buf, size: int, where: str):
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def fail(self, what: str):
        raise ExportError(f"'{self.where}' is not a valid GGUF file ({what}): the file is damaged or not a model.")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if n > self.size - self.pos:
            self.fail(f"a field at byte {self.pos} runs past the end of the file")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("Q")
        if n > self.size - self.pos:
            self.fail(f"a string of {n} bytes at byte {self.pos}")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 2:
                self.fail("arrays nested too deep")
            itype, count = self.unpack("I"), self.unpack("Q")
            if count > MAX_ARRAY:
                self.fail(f"an array of {count} items")
            if itype in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[itype]
                n = struct.calcsize(fmt) * count
                if n > self.size - self.pos:
                    self.fail(f"an array of {count} items runs past the end of the file")
                values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
                self.pos += n
                return values
            if itype == _STRING:
                return [self.string() for _ in range(count)]
            return [self.value(itype, depth + 1) for _ in range(count)]
        self.fail(f"unknown metadata type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse PATH's metadata and tensor table (the tensor bytes are not read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ExportError(f"'{path}' is not a valid GGUF file (only {size} bytes).")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size, path)
    except OSError as e:
        raise ExportError(f"cannot read '{path}': {e.strerror or e}.") from None


def _parse(buf, size: int, path: Path) -> GGUFHeader:
    c = _Cursor(buf, size, str(path))
    if c.buf[:4] != b"GGUF":
        c.fail("no GGUF magic")
    c.pos = 4
    version = c.unpack("I")
    if version not in (2, 3):
        c.fail(f"unsupported version {version}")
    n_tensors, n_kv = c.unpack("Q"), c.unpack("Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        c.fail(f"{n_tensors} tensors and {n_kv} metadata entries declared")
    metadata = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.unpack("I"))
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("I")
        if not 1 <= n_dims <= 4:
            c.fail(f"a tensor of rank {n_dims}")
        dims = tuple(c.unpack("Q") for _ in range(n_dims))
        tensors.append(TensorInfo(name, dims, c.unpack("I"), c.unpack("Q")))
    alignment = int(metadata.get("general.alignment", 32) or 32)
    if alignment & (alignment - 1) or alignment > 1 << 16:
        c.fail(f"an alignment of {alignment}")
    data_offset = -(-c.pos // alignment) * alignment
    for t in tensors:
        t.offset += data_offset
    return GGUFHeader(path, version, metadata, tensors, data_offset)


# -- tensors, without gguf.GGUFReader ------------------------------------------------------------------------

_TYPED = {0: np.float32, 1: np.float16, 28: np.float64, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}


@dataclass
class GGUFTensorView:
    """One tensor as ``gguf.GGUFReader`` presents it (name, tensor_type, shape, data), built from the header
    parsed above: typed arrays for float/int types, raw block bytes ``(..., bytes per row)`` otherwise."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: fastest axis first
    data: np.ndarray  # a read-only view of the file (memory-mapped)
    n_elements: int
    n_bytes: int


class GGUFTensorTable:
    """``.tensors`` like ``gguf.GGUFReader(path).tensors``, from :func:`read_gguf_header`'s table: one memory
    map of the file and one numpy view per tensor (the reader builds a view per metadata array element too,
    ~12 s for a 262k-token vocabulary; this takes milliseconds). Every extent is checked against the file."""

    def __init__(self, header: GGUFHeader):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.header = header
        self._map = np.memmap(header.path, dtype=np.uint8, mode="r")
        size = self._map.shape[0]
        self.tensors: list[GGUFTensorView] = []
        for t in header.tensors:
            try:
                qtype = GGMLQuantizationType(t.ggml_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ExportError(f"'{header.path.name}' has tensor '{t.name}' of unknown type {t.ggml_type}: "
                                  "the file is damaged or newer than this gguf package.") from None
            elements = int(np.prod(t.dims, dtype=np.int64))
            if elements % block:
                raise ExportError(f"'{header.path.name}' has tensor '{t.name}' of {elements} elements in blocks "
                                  f"of {block}: the file is damaged.")
            n_bytes = elements // block * type_size
            if t.offset < header.data_offset or t.offset + n_bytes > size:
                raise ExportError(f"'{header.path.name}' has tensor '{t.name}' outside the file: the file is "
                                  "damaged or truncated.")
            np_dims = tuple(reversed(t.dims))
            raw = self._map[t.offset:t.offset + n_bytes]
            if t.ggml_type in _TYPED:
                data = raw.view(_TYPED[t.ggml_type]).reshape(np_dims)
            else:
                data = raw.reshape(quant_shape_to_byte_shape(np_dims, qtype))
            self.tensors.append(GGUFTensorView(t.name, qtype, np.array(t.dims, dtype=np.uint64), data, elements,
                                               n_bytes))


# -- config ---------------------------------------------------------------------------------------------------
