"""The prompt cache's file format (edgeinfer/prompt_cache/ keeps the folder and the policy).

    magic (8 bytes) | version u32 | JSON length u32 | token count u32 | CRC-32 of JSON + tokens u32
    | JSON (the key, the model's name, the payload's length and CRC-32) | token ids (int32) | payload

Readers raise BadEntry, whose message says in one clause why a file cannot be used.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"EIKVPC1\n"
VERSION = 1
HEAD = struct.Struct("<8sIIII")  # magic, version, JSON length, token count, CRC-32 of JSON + tokens
MAX_JSON = 1 << 20
MAX_TOKENS = 1 << 22


@dataclass
class EntryHeader:
    """What an entry's header says (read_header checked it)."""

    key: dict
    tokens: np.ndarray  # int32
    payload_bytes: int
    payload_crc32: int
    offset: int  # where the payload starts
    model: str


class BadEntry(Exception):
    """A file that cannot be used; the message is the reason, one clause."""


def read_header(f, size: int) -> EntryHeader:
    """The header of the open file F of SIZE bytes (the payload is not read)."""
    raw = f.read(HEAD.size)
    if len(raw) < HEAD.size:
        raise BadEntry("it is truncated")
    magic, version, json_len, n_tokens, crc = HEAD.unpack(raw)
    if magic != MAGIC:
        raise BadEntry("it is not a prompt cache file")
    if version != VERSION:
        raise BadEntry(f"it was written by format version {version}, this edgeinfer reads {VERSION}")
    if json_len > MAX_JSON or n_tokens > MAX_TOKENS:
        raise BadEntry("its header is malformed")
    body = f.read(json_len + 4 * n_tokens)
    if len(body) < json_len + 4 * n_tokens:
        raise BadEntry("it is truncated")
    if zlib.crc32(body) != crc:
        raise BadEntry("its header fails its CRC-32 (corrupt)")
    try:
        meta = json.loads(body[:json_len].decode("utf-8"))
        tokens = np.frombuffer(body, dtype="<i4", offset=json_len, count=n_tokens)
        header = EntryHeader(key=meta["key"], tokens=tokens, payload_bytes=int(meta["payload_bytes"]),
                             payload_crc32=int(meta["payload_crc32"]), offset=HEAD.size + len(body),
                             model=str(meta.get("model", "?")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadEntry("its header is malformed") from None
    if size < header.offset + header.payload_bytes:
        raise BadEntry("it is truncated")
    if size > header.offset + header.payload_bytes:
        raise BadEntry("it has trailing bytes (corrupt)")
    return header


def key_difference(got: dict, want: dict) -> str:
    """Why an entry's key GOT is not the model's key WANT, as the clause of a warning."""
    names = {"manifest_sha256": "another package", "kv": "another KV layout or dtype", "provider": "another provider",
             "decoder": "another decoder kind", "onnxruntime": "another onnxruntime version",
             "format": "another format version"}
    for field_name, what in names.items():
        if got.get(field_name) != want.get(field_name):
            return f"it belongs to {what}"
    return "its key differs from its name"


def entry_head(meta: dict, tokens: np.ndarray, payload: np.ndarray) -> bytes:
    """Everything of an entry before its payload: the header, the JSON (META plus the payload's length
    and CRC-32) and the token ids."""
    meta = dict(meta, payload_bytes=int(payload.nbytes), payload_crc32=zlib.crc32(payload))
    body = json.dumps(meta, sort_keys=True).encode("utf-8")
    toks = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    return HEAD.pack(MAGIC, VERSION, len(body), len(tokens), zlib.crc32(body + toks)) + body + toks


def read_payload(path: Path, h: EntryHeader) -> np.ndarray:
    """The payload of the entry at PATH, its size and CRC-32 checked."""
    buf = np.empty(h.payload_bytes, np.uint8)
    with open(path, "rb") as f:
        f.seek(h.offset)
        got = f.readinto(memoryview(buf))
        if got != h.payload_bytes or f.read(1):
            raise BadEntry("its payload is truncated" if got != h.payload_bytes else "it has trailing bytes")
    if zlib.crc32(buf) != h.payload_crc32:
        raise BadEntry("its payload fails its CRC-32 (corrupt)")
    return buf
