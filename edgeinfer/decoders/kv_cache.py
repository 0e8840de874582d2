"""Preallocated KV buffers, one pair per layer, shared by past and present.

GroupQueryAttention writes new keys/values in place at positions
``[length, length + n)``, so the buffers never move or grow. Rolling back (a
rejected speculative draft, a BiLD rollback, a chat turn that diverges) is just
``trim(n)``: positions past ``length`` are ignored and later overwritten.

The buffers hold the dtype the package's graphs were exported with (manifest
``kv_cache.dtype``: float32, float16, or int8 with per-layer scales that are
constants of the graphs, so trimming an int8 cache is the same length change:
docs/kv-cache.md).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

# manifest kv_cache.dtype -> what load(kv_dtype=...) and --kv-dtype call it
KV_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "int8": "int8"}


def kv_buffer_dtype(kv) -> np.dtype:
    """The numpy dtype of a package's KV buffers (its manifest's kv_cache: an edgeinfer.package.KVCacheSpec)."""
    name = kv.dtype
    if name not in KV_DTYPE_NAMES:
        from edgeinfer.errors import PackageError

        raise PackageError(f"the package's KV cache dtype '{name}' is not one this runtime knows "
                           f"({', '.join(KV_DTYPE_NAMES)}): upgrade edgeinfer or re-export the package.")
    return np.dtype(name)


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


KV_DTYPES = tuple(KV_DTYPE_NAMES.values())


def checked_kv_dtype(value: str | None) -> str | None:
    """VALUE if it is None (the package's own) or one of KV_DTYPES; else one PackageError sentence."""
    if value is not None and value not in KV_DTYPES:
        from edgeinfer.errors import PackageError

        raise PackageError(f"unknown kv_dtype {value!r}: choose one of {', '.join(KV_DTYPES)} "
                           "(or leave it out for the package's own).")
    return value


def check_package_kv_dtype(spec, requested: str | None, where: str) -> None:
    """Refuse to load a package (SPEC: its edgeinfer.package.Manifest) whose KV dtype, fixed in its graphs
    at export, is not REQUESTED."""
    if checked_kv_dtype(requested) is None:
        return
    stored = spec.kv_cache.dtype
    have = KV_DTYPE_NAMES.get(stored, stored)
    if have != requested:
        from edgeinfer.errors import PackageError

        raise PackageError(f"package '{where}' stores its KV cache as {have}, fixed in its graphs at export, "
                           f"so it cannot run with kv_dtype {requested}: export it with --kv-dtype {requested} "
                           "(an alias, .gguf file or HF folder is exported so by itself).")
