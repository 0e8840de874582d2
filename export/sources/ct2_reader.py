"""Read a CTranslate2 model folder (``model.bin`` + ``config.json`` + vocabulary)
into numpy arrays, without ctranslate2 installed.

``model.bin`` layout (binary version 6, little endian)::

    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | u32 dims[rank] | u8 dtype | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is a u16 byte length followed by that many bytes (NUL-terminated).
The file is untrusted input: every count and size is checked against the bytes
that are actually left before anything is allocated, so a truncated file or an
absurd header gives one clear :class:`ExportError`, never a MemoryError.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeinfer.errors import ExportError
from edgeinfer.jsonfile import read_json_object

SUPPORTED_VERSIONS = (5, 6)
MAX_RANK = 8
MAX_NAME_BYTES = 4096
# CTranslate2's DataType enum
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model, by name (aliases resolved)."""

    folder: Path
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    config: dict = field(default_factory=dict)
    vocabulary: list[str] = field(default_factory=list)
    tokenizer_json: str | None = None

    def scalar(self, name: str) -> int:
        return int(np.asarray(self.variables[name]).reshape(-1)[0])


class _Cursor:
    """Bounds-checked reads over the file's bytes."""

    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def left(self) -> int:
        return len(self.data) - self.pos

    def _check(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise ExportError(f"'{self.path}' is truncated or corrupt: {what} needs {n} bytes but only "
                              f"{self.left()} are left; reinstall or re-convert the model.")

    def take(self, n: int, what: str) -> bytes:
        self._check(n, what)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw

    def array(self, n_bytes: int, dtype: np.dtype, what: str) -> np.ndarray:
        """A copy of the next N_BYTES as DTYPE (no view into the file outlives the read)."""
        self._check(n_bytes, what)
        arr = np.frombuffer(self.data, dtype, n_bytes // dtype.itemsize, self.pos).copy()
        self.pos += n_bytes
        return arr

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(what)
        if n > MAX_NAME_BYTES:
            raise ExportError(f"'{self.path}' is corrupt: {what} claims {n} bytes.")
        raw = bytes(self.take(n, what)).rstrip(b"\x00")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"'{self.path}' is corrupt: {what} is not UTF-8 text.") from None


def read_model_bin(path: str | Path) -> tuple[str, int, dict[str, np.ndarray]]:
    """Parse ``model.bin``: (spec name, spec revision, variables by name).

    Arrays are copied out of the mapped file (float16 stays float16), so the
    file is closed when this returns.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"'{path}' does not exist: a CTranslate2 folder needs model.bin.")
    size = path.stat().st_size
    if size < 16:
        raise ExportError(f"'{path}' has {size} bytes: too short to be a CTranslate2 model.bin.")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse(_Cursor(data, path))


def _parse(cur: _Cursor) -> tuple[str, int, dict[str, np.ndarray]]:
    version = cur.u32("the format version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportError(f"'{cur.path}' has CTranslate2 binary version {version}; this reader knows "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))}: re-convert it with a matching ctranslate2.")
    spec = cur.string("the spec name")
    revision = cur.u32("the spec revision")
    count = cur.u32("the variable count")
    # each variable takes at least 2 + 1 + 1 + 4 bytes: refuse counts the file cannot hold
    if count * 8 > cur.left():
        raise ExportError(f"'{cur.path}' is corrupt: it claims {count} variables in {cur.left()} bytes.")
    variables: dict[str, np.ndarray] = {}
    for i in range(count):
        name = cur.string(f"the name of variable {i}")
        rank = cur.u8(f"the rank of '{name}'")
        if rank > MAX_RANK:
            raise ExportError(f"'{cur.path}' is corrupt: variable '{name}' has rank {rank}.")
        dims = [cur.u32(f"the shape of '{name}'") for _ in range(rank)]
        dtype_id = cur.u8(f"the dtype of '{name}'")
        n_bytes = cur.u32(f"the size of '{name}'")
        if dtype_id == _BFLOAT16:
            dtype = None
        elif dtype_id in _DTYPES:
            dtype = np.dtype(_DTYPES[dtype_id])
        else:
            raise ExportError(f"'{cur.path}' is corrupt: variable '{name}' has unknown dtype {dtype_id}.")
        itemsize = 2 if dtype is None else dtype.itemsize
        elements = int(np.prod(dims, dtype=object)) if dims else 1
        if elements * itemsize != n_bytes:
            raise ExportError(f"'{cur.path}' is corrupt: variable '{name}' of shape {tuple(dims)} should take "
                              f"{elements * itemsize} bytes but says {n_bytes}.")
        if dtype is None:  # bfloat16: the high half of a float32
            raw = cur.array(n_bytes, np.dtype(np.uint16), f"the data of '{name}'")
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = cur.array(n_bytes, dtype, f"the data of '{name}'")
        try:
            variables[name] = arr.reshape(dims)
        except ValueError:  # e.g. a zero dimension beside a huge one (found by fuzzing)
            raise ExportError(f"'{cur.path}' is corrupt: variable '{name}' has an impossible shape "
                              f"{tuple(dims)}.") from None
    if cur.left() >= 4:
        n_alias = cur.u32("the alias count")
        if n_alias * 4 > cur.left():
            raise ExportError(f"'{cur.path}' is corrupt: it claims {n_alias} aliases in {cur.left()} bytes.")
        for i in range(n_alias):
            alias = cur.string(f"alias {i}")
            target = cur.string(f"the target of alias '{alias}'")
            if target not in variables:
                raise ExportError(f"'{cur.path}' is corrupt: alias '{alias}' names a missing variable '{target}'.")
            variables[alias] = variables[target]
    if cur.left():
        raise ExportError(f"'{cur.path}' has {cur.left()} unexpected bytes after its variables: it is corrupt.")
    return spec, revision, variables


def _read_json(path: Path) -> dict:
    return read_json_object(path, error=ExportError, remedy="the CTranslate2 folder is damaged, convert it again")


def is_ct2_folder(folder: str | Path) -> bool:
    p = Path(folder)
    return p.is_dir() and (p / "model.bin").is_file() and not any(p.glob("*.safetensors"))


def read_ct2_folder(folder: str | Path) -> CT2Model:
    """Read model.bin and, where present, config.json, vocabulary.txt and tokenizer.json."""
    folder = Path(folder)
    spec, revision, variables = read_model_bin(folder / "model.bin")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    vocab: list[str] = []
    if (folder / "vocabulary.txt").is_file():
        vocab = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
    elif (folder / "vocabulary.json").is_file():
        vocab = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    tok = folder / "tokenizer.json"
    tokenizer_json = tok.read_text(encoding="utf-8") if tok.is_file() else None
    return CT2Model(folder, spec, revision, variables, config, vocab, tokenizer_json)
