"""Preallocated KV buffers, one pair per layer, shared by past and present.

GroupQueryAttention writes new keys/values in place at positions
``[length, length + n)``, so the buffers never move or grow. Rolling back (a
rejected speculative draft, a BiLD rollback, a chat turn that diverges) is just
``trim(n)``: positions past ``length`` are ignored and later overwritten.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, layers: range, kv_heads: int, head_dim: int, capacity: int, dtype=np.float32,
                 device: str = "cpu"):
        self.capacity = int(capacity)
        self.length = 0
        shape = (1, kv_heads, self.capacity, head_dim)
        self.layers = layers
        self.kv_heads, self.head_dim, self.dtype, self.device = int(kv_heads), int(head_dim), np.dtype(dtype), device
        self._arrays: dict | None = None
        if device != "cpu":
            # On the accelerator (CUDA): the buffers never cross the bus; attention reads only the first
            # `length` positions, so they need no zeroing.
            make = ort.OrtValue.ortvalue_from_shape_and_type
            self.keys = {i: make(shape, dtype, device, 0) for i in self.layers}
            self.values = {i: make(shape, dtype, device, 0) for i in self.layers}
            return
        # np.zeros pages in lazily: memory is committed as the context fills.
        self._arrays = {i: (np.zeros(shape, dtype), np.zeros(shape, dtype)) for i in self.layers}
        self.keys = {i: ort.OrtValue.ortvalue_from_numpy(k) for i, (k, _) in self._arrays.items()}
        self.values = {i: ort.OrtValue.ortvalue_from_numpy(v) for i, (_, v) in self._arrays.items()}

    def host_arrays(self) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        """layer -> (keys, values): the host buffers (1, kv heads, capacity, head dim) the graphs read and
        write in place (for the prompt cache, edgeinfer/prompt_cache/); None when they live on an
        accelerator."""
        return self._arrays

    def trim(self, n: int) -> int:
        """Forget the last N positions; returns how many were dropped."""
        n = max(0, min(int(n), self.length))
        self.length -= n
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first LENGTH positions."""
        self.trim(self.length - max(0, int(length)))

    def reset(self) -> None:
        self.length = 0
