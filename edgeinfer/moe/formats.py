"""Expert record formats: what a store record holds, and what a cached expert holds in memory.

- ``session`` formats (the package precision: int4/int8 blocks, fp32): the record is a small
  onnxruntime session's initializers; the session prepacks them (CPU work per load) and the
  cache holds the record beside onnxruntime's copy (two records of memory).
- ``int8-channel`` (``expert_bits=8``): int8 weights (K, N) with one fp32 scale per output
  channel, bound as inputs of one shared ``DynamicQuantizeMatMul`` graph. The record is what
  the graph reads: loading is reading.
- ``int4-channel`` (``expert_bits=4``): the same graph inputs, stored at half the bytes. A weight
  is int4 in [-8, 7] with, per block of ``block_size`` rows along K, a signed 4-bit integer
  multiplier (|m| in 1..15) of its channel's fp32 scale (double quantization, as in k-quants):
  ``q4 * mult`` is exactly an int8 weight of the int8-channel format (|q4 * mult| <= 120). Loading
  widens the nibbles to int8 in numpy (four passes over the record) into a preallocated slot.

Nibble layout (``{name}.q4``, uint8 (K/2, N)): byte ``[k, n]`` holds row ``k`` in its low nibble
and row ``k + K/2`` in its high nibble, two's complement; as int8, ``byte >> 4`` is the high row
and ``(byte * 16) >> 4`` the low one (arithmetic shifts; numpy's int8 multiply is vectorized, its
left shift is not), each written into one contiguous half of the int8 weight.
"""

from __future__ import annotations

import numpy as np

CHANNEL_INT8 = "int8-channel"
CHANNEL_INT4 = "int4-channel"
INPUT_FORMATS = (CHANNEL_INT8, CHANNEL_INT4)


def graph_inputs(index: dict) -> list[dict]:
    """The weight inputs (name, dtype, shape) of the shared expert graph of a weights-as-inputs store,
    in record order; what a cached expert holds."""
    if index.get("precision") != CHANNEL_INT4:
        return [{"name": t["name"], "dtype": t["dtype"], "shape": list(t["shape"])} for t in index["tensors"]]
    out = []
    for t in index["tensors"]:
        if t["name"].endswith(".q4"):
            half, n = t["shape"]
            out.append({"name": t["name"][:-3] + ".qweight", "dtype": "int8", "shape": [2 * half, n]})
        elif t["name"].endswith(".scales"):
            out.append({"name": t["name"], "dtype": t["dtype"], "shape": list(t["shape"])})
    return out


def resident_bytes(index: dict) -> int:
    """The memory one cached expert of this store holds, in bytes: its graph inputs (weights-as-inputs
    formats, 64-byte aligned each), else its record and onnxruntime's prepacked copy (two records)."""
    if not index.get("weights_as_inputs"):
        return 2 * int(index["record_size"])
    return sum(_round_up(_nbytes(t), 64) for t in graph_inputs(index))


Layout = list[tuple[str, int, int, np.dtype, tuple]]  # (name, offset, bytes, dtype, shape) per tensor


def slot_layout(index: dict) -> Layout:
    """Where each graph input lies inside one slot of ``resident_bytes``."""
    out, pos = [], 0
    for t in graph_inputs(index):
        out.append((t["name"], pos, _nbytes(t), np.dtype(t["dtype"]), tuple(t["shape"])))
        pos = _round_up(pos + _nbytes(t), 64)
    return out


def record_layout(tensors: list[dict]) -> Layout:
    """Where each tensor of a store record lies (the index's offsets)."""
    return [(t["name"], int(t["offset"]), _nbytes(t), np.dtype(t["dtype"]), tuple(t["shape"])) for t in tensors]


def tensor_views(buf, layout: Layout) -> dict[str, np.ndarray]:
    """The tensors of LAYOUT inside BUF (views, no copy)."""
    raw = np.frombuffer(buf, np.uint8)
    return {name: raw[off:off + n].view(dt).reshape(shape) for name, off, n, dt, shape in layout}


def widen_int4(q4: np.ndarray, mult: np.ndarray, out: np.ndarray) -> None:
    """int4 nibbles Q4 (K/2, N) with block multipliers MULT (K/B, N) into the int8 weight OUT (K, N)."""
    k, n = out.shape
    half = k // 2
    b = q4.view(np.int8)
    np.right_shift(b, 4, out=out[half:])
    lo = out[:half]
    np.multiply(b, np.int8(16), out=lo)
    np.right_shift(lo, 4, out=lo)
    blocks = out.reshape(mult.shape[0], k // mult.shape[0], n)
    np.multiply(blocks, mult[:, None, :], out=blocks)


def slot_filler(index: dict):
    """fill(record, slot): make a slot's graph inputs from a read record (views into the read buffer): widen
    int4-channel weights, copy the rest. The tensor names are resolved once here: it runs per record read."""
    names = [name for name, *_ in slot_layout(index)]
    widened = []
    if index.get("precision") == CHANNEL_INT4:
        widened = [(n[: -len(".qweight")] + ".q4", n[: -len(".qweight")] + ".mult", n)
                   for n in names if n.endswith(".qweight")]
    copied = [n for n in names if n not in {w for *_, w in widened}]

    def fill(record: dict[str, np.ndarray], slot: dict[str, np.ndarray]) -> None:
        for q4, mult, name in widened:
            widen_int4(record[q4], record[mult], slot[name])
        for name in copied:
            np.copyto(slot[name], record[name])

    return fill


def _nbytes(t: dict) -> int:
    return int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a
