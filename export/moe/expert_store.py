"""Write the expert store: every routed expert's weights in one file, outside the graphs.

A record holds one expert of one layer — its fused gate/up projection and its
down projection, block-quantized (int4/int8, the MatMulNBits layout) or fp32 —
at a fixed offset. Records start on 4096-byte boundaries and are padded to a
multiple of 4096 bytes, so the runtime can read an expert with one ``pread``
(or one ``O_DIRECT`` read) and never touches a neighbour's bytes. All records
have the same internal layout, described once in the index; the index (record
offsets and sizes per layer and expert, tensor names, dtypes, shapes) goes in
the package manifest under ``moe.expert_store``.

Three record formats (edgeinfer/moe/formats.py says what the runtime does with each):

- the package's precision (``int4``/``int8`` block-quantized, or fp32): the runtime
  builds a small onnxruntime session per loaded expert with the record as its
  initializers, and onnxruntime prepacks them (fast calls, a few ms of CPU per load);
- ``int8-channel`` (``expert_bits=8``): int8 weights with one scale per output
  channel, in the (K, N) layout of ``DynamicQuantizeMatMul``. The runtime feeds them
  to one shared graph as inputs, so a loaded expert needs no session at all (the
  int8 GEMM packs its operand per call, a fraction of a millisecond);
- ``int4-channel`` (``expert_bits=4``): the int8-channel weights at half the bytes: int4
  values with a 4-bit integer multiplier of the channel scale per block of ``block_size``
  along K, widened to exactly those int8 weights when loaded (numpy, ~0.3 ms per expert
  of the benchmark against ~2 ms for a prepacked session's build).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edgeinfer.export.quant.quantize import quantize_blockwise

from edgeinfer.moe.formats import CHANNEL_INT4, CHANNEL_INT8

ALIGNMENT = 4096
_TENSOR_ALIGN = 64


_MAX_MULT = 15  # block multipliers are 4-bit (and a sign)
_Q4 = 8  # int4 values in [-8, 7]: |q4 * mult| <= 120 fits int8


def channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (N, K), PyTorch layout, as symmetric int8 (K, N) with one fp32 scale per output channel."""
    w = np.asarray(w, np.float32)
    scales = np.abs(w).max(axis=1) / 127.0
    scales[scales == 0] = 1.0  # an all-zero channel: any scale gives zeros
    q = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scales.astype(np.float32)


def channel_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (N, K), PyTorch layout, as ``int4-channel``: packed nibbles (K/2, N) uint8 (row k low, row
    k + K/2 high), signed block multipliers (K/B, N) int8 with |m| in 1..15, channel scales (N,) fp32,
    such that ``W.T ~= widen(q4) * mult * scale`` with the int8 ``q4 * mult`` exact (|q4 * m| <= 120).

    Each block uses all 16 int4 levels: the sign of its multiplier maps the block's largest-magnitude
    weight to -8 (as symmetric MatMulNBits blocks do with a signed scale), and of the smallest
    multiplier that does not clip and the one or two below it, the one with the least squared error
    is kept (clipping the extremes can cost less than coarser steps)."""
    wt = np.ascontiguousarray(np.asarray(w, np.float32).T)  # (K, N)
    k, n = wt.shape
    if k % block_size or k % 2:
        raise ValueError(f"int4-channel experts need K ({k}) divisible by the block size {block_size}")
    blocks = wt.reshape(k // block_size, block_size, n)
    amax = np.abs(blocks).max(axis=1)  # (K/B, N)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
    sign = np.where(extreme > 0, -1.0, 1.0)
    scale = amax.max(axis=0) / (_Q4 * _MAX_MULT)
    scale[scale == 0] = 1.0
    ceil = np.clip(np.ceil(amax / (_Q4 * scale) - 1e-6), 1, _MAX_MULT)
    best, best_err = None, None
    for m in (ceil, np.maximum(ceil - 1, 1), np.maximum(ceil - 2, 1)):
        step = (sign * scale[None, :] * m)[:, None, :]
        err = ((np.clip(np.rint(blocks / step), -_Q4, _Q4 - 1) * step - blocks) ** 2).sum(axis=1)
        if best is None:
            best, best_err = m.copy(), err
        else:
            better = err < best_err
            best[better], best_err[better] = m[better], err[better]
    mult = (sign * best).astype(np.int8)
    step = scale[None, :] * mult  # (K/B, N): the block's effective (signed) scale
    q = np.clip(np.rint(blocks / step[:, None, :]), -_Q4, _Q4 - 1).astype(np.int8).reshape(k, n)
    half = k // 2
    packed = ((q[half:].view(np.uint8) & 0xF) << 4) | (q[:half].view(np.uint8) & 0xF)
    return packed.astype(np.uint8), mult, scale.astype(np.float32)


def expert_tensors(gate_up: np.ndarray, down: np.ndarray, bits: int | None, block_size: int,
                   symmetric: bool, channel: bool = False, channel_bits: int = 8) -> dict[str, np.ndarray]:
    """The arrays an expert's FFN graph reads, by initializer name.

    ``gate_up`` is (2*inter, hidden) and ``down`` (hidden, inter), PyTorch layout.
    Quantized matrices keep that (N, K) layout (MatMulNBits); fp32 ones are
    stored transposed (K, N) so that a plain MatMul reads them directly; so are
    CHANNEL ones (``int8-channel``, or ``int4-channel`` with CHANNEL_BITS=4), for DynamicQuantizeMatMul.
    """
    out: dict[str, np.ndarray] = {}
    for name, w in (("gate_up", gate_up), ("down", down)):
        if channel and channel_bits == 4:
            out[f"{name}.q4"], out[f"{name}.mult"], out[f"{name}.scales"] = channel_int4(w, block_size)
        elif channel:
            out[f"{name}.qweight"], out[f"{name}.scales"] = channel_int8(w)
        elif bits:
            q = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
            out[f"{name}.qweight"] = q.packed
            out[f"{name}.scales"] = q.scales
            if not q.symmetric:
                out[f"{name}.zero_points"] = q.zero_points
        else:
            out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(w, np.float32).T)
    return out


class ExpertStoreWriter:
    """Appends expert records to ``experts.bin`` and builds the index for the manifest."""

    def __init__(self, path: Path, rel_path: str, num_layers: int, num_experts: int, precision: str,
                 block_size: int, symmetric: bool):
        self.path, self.rel_path = path, rel_path
        self.channel = precision in (CHANNEL_INT8, CHANNEL_INT4)
        self.bits = {"int4": 4, "int8": 8, CHANNEL_INT4: 4, CHANNEL_INT8: 8}.get(precision)
        self.precision, self.block_size, self.symmetric = precision, block_size, symmetric
        self.layout: list[dict] | None = None
        self.record_size = 0
        self.records: dict[int, list[list[int] | None]] = {}
        self.num_experts = num_experts
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")
        self._offset = 0

    def add(self, layer: int, expert: int, gate_up: np.ndarray, down: np.ndarray) -> None:
        tensors = expert_tensors(gate_up, down, self.bits, self.block_size, self.symmetric, self.channel,
                                 self.bits or 8)
        if self.layout is None:
            self.layout, pos = [], 0
            for name, a in tensors.items():
                self.layout.append({"name": name, "offset": pos, "dtype": str(a.dtype), "shape": list(a.shape),
                                    "nbytes": a.nbytes})
                pos = _round_up(pos + a.nbytes, _TENSOR_ALIGN)
            self.record_size = _round_up(pos, ALIGNMENT)
        record = bytearray(self.record_size)
        for t in self.layout:
            a = tensors[t["name"]]
            if list(a.shape) != t["shape"] or str(a.dtype) != t["dtype"]:
                raise ValueError(f"expert {expert} of layer {layer} has a different shape than the others")
            record[t["offset"]:t["offset"] + a.nbytes] = np.ascontiguousarray(a).tobytes()
        self._file.write(record)
        self.records.setdefault(layer, [None] * self.num_experts)[expert] = [self._offset, self.record_size]
        self._offset += self.record_size

    def close(self) -> dict:
        """Flush the file; returns the index for the manifest."""
        self._file.flush()
        self._file.close()
        if self.channel:  # one shared graph takes the weights as inputs: no session per expert
            quant = {"bits": self.bits, "symmetric": True, "weights_as_inputs": True}
            if self.bits == 4:
                quant["block_size"] = self.block_size
        elif self.bits:
            quant = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}
        else:
            quant = {}
        return {"file": self.rel_path, "alignment": ALIGNMENT, "precision": self.precision, **quant,
                "record_size": self.record_size, "tensors": self.layout or [],
                "layers": {str(layer): recs for layer, recs in sorted(self.records.items())},
                "total_bytes": self._offset}


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a
