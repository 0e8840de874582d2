"""Block-wise weight quantization in numpy, laid out for onnxruntime's MatMulNBits.

A weight ``W`` of shape ``(N, K)`` (out features, in features — the layout of a
PyTorch ``Linear``) is cut into blocks of ``block_size`` along ``K``. Each block
gets a float scale and an integer zero point (asymmetric round-to-nearest), so
``W ≈ (q - zero_point) * scale`` with ``q`` in ``[0, 2**bits - 1]``.

The packed layout is the one MatMulNBits reads and GatherBlockQuantized reads
too (uint8, low nibble first, packed along K), which lets a tied embedding and
LM head share one initializer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockQuantized:
    """A block-quantized matrix ready to become MatMulNBits initializers."""

    packed: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray  # uint8, packed (N, ceil(k_blocks * bits / 8))
    bits: int
    block_size: int
    n: int
    k: int

    @property
    def symmetric(self) -> bool:
        return self.zero_points.size == 0

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def dequantize(self) -> np.ndarray:
        """The float weight (N, K) this quantization stands for (for tests and checks)."""
        q = unpack_bits(self.packed.reshape(self.n, -1), self.bits).reshape(self.n, -1, self.block_size)
        k_blocks = q.shape[1]
        if self.symmetric:
            zp = np.full((self.n, k_blocks), 1 << (self.bits - 1), np.float32)
        else:
            zp = unpack_bits(self.zero_points, self.bits)[:, :k_blocks].astype(np.float32)
        w = (q.astype(np.float32) - zp[:, :, None]) * self.scales[:, :, None]
        return w.reshape(self.n, -1)[:, : self.k]


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints of ``bits`` width along the last axis, low bits first."""
    if bits == 8:
        return values.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"unsupported bit width {bits}")
    v = values.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.uint8)
    low = packed & 0x0F
    high = packed >> 4
    return np.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (-1,))


def quantize_blockwise(weight: np.ndarray, bits: int = 4, block_size: int = 32,
                       symmetric: bool = False, method: str = "rtn") -> BlockQuantized:
    """Quantization of ``weight`` (N, K) in blocks along K; round-to-nearest unless METHOD
    names another of export/quant/methods.py (``mse``, ``hqq``), in the same layout.

    Asymmetric blocks carry a zero point each; symmetric ones use the kernels'
    implicit zero point ``2**(bits-1)`` and no zero-point tensor (``zero_points`` is empty).
    """
    if method != "rtn":
        from edgeinfer.export.quant.methods import quantize_with_method

        return quantize_with_method(weight, bits, block_size, symmetric, method)
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        absmax = np.abs(blocks).max(axis=2)
        # Search a few clipping ratios per block and keep the one with the least squared error:
        # the plain absmax scale wastes levels on rare outliers.
        best_err = best_scale = None
        for ratio in np.linspace(1.0, 0.7, 7):
            sc = absmax * ratio / (mid - 1)
            sc = np.where(sc == 0, 1.0, sc).astype(np.float32)
            qq = np.clip(np.round(blocks / sc[:, :, None]), -mid, mid - 1)
            err = ((qq * sc[:, :, None] - blocks) ** 2).sum(axis=2)
            if best_err is None:
                best_err, best_scale = err, sc
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, sc, best_scale)
        scale = best_scale.astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, :, None]), -mid, mid - 1) + mid
        packed = pack_bits(q.reshape(n, -1), bits).reshape(n, blocks.shape[1], block_size * bits // 8)
        return BlockQuantized(packed, scale, np.zeros((n, 0), np.uint8), bits, block_size, n, k)
    lo = np.minimum(blocks.min(axis=2), 0.0)
    hi = np.maximum(blocks.max(axis=2), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero_point = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(blocks / scale[:, :, None]) + zero_point[:, :, None], 0, qmax)
    packed = pack_bits(q.reshape(n, -1), bits).reshape(n, blocks.shape[1], block_size * bits // 8)
    zp_packed = pack_bits(zero_point.astype(np.uint8), bits)
    return BlockQuantized(packed, scale, zp_packed, bits, block_size, n, k)
