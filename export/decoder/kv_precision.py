"""KV cache precision of cpu decoder packages: fp32 (the default), fp16 or int8.

The dtype is fixed in the graphs at export: GroupQueryAttention reads and writes
the preallocated past/present buffers in that dtype. onnxruntime's CPU kernel
(1.32) takes fp32 queries over fp16 buffers, and over int8 buffers with static
scales (``kv_cache_bit_width=8``, ``k_quant_type``/``v_quant_type``, inputs
``k_scale``/``v_scale``): it quantizes each new key/value row as it writes it
(round to nearest, saturating) and dequantizes as it reads. Measured on SmolLM2
at 2048 positions (docs/kv-cache.md): int8 reads 4x fewer bytes than fp32 and
its attention runs faster; fp16 halves the memory but its kernel converts each
element and runs slower than fp32.

int8 scales are fixed for the life of the cache (a row written at position 3
must mean the same at position 3000), so they are calibrated at export: the
fp32-KV graphs are run over calibration text and the largest magnitude of each
layer's keys and values sets its scale. Keys are stored after rotary, which
turns each channel pair (i, i + head_dim/2) by a position-dependent angle: the
pair's norm, unchanged by the rotation, bounds both channels at every position,
so the key scale is taken from it and holds for positions the calibration text
never reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeinfer.errors import ExportError

KV_DTYPES = ("fp32", "fp16", "int8")
# the manifest's kv_cache.dtype (numpy names, read by the runtime) for each --kv-dtype
MANIFEST_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
# PER_CHANNEL: one scale per (kv head, channel) of each layer's keys and values. PER_TENSOR (one per layer)
# runs a little faster but measured +0.5% perplexity and lower agreement on SmolLM2 (keys have outlier
# channels); the CPU kernel needs K and V of one type (docs/kv-cache.md).
QUANT_TYPE = "PER_CHANNEL"
QMAX = 127.0
# Headroom over the calibrated maxima: the key pair norm already bounds every position; values have no
# such bound and text unlike the calibration exceeds their maxima (measured: docs/kv-cache.md).
# 1.25 over the values' maxima measured best among 1.0 / 1.25 / 1.5 (decode agreement with fp32 KV).
KEY_MARGIN = 1.0
VALUE_MARGIN = 1.25


def checked_kv_dtype(value: str | None) -> str:
    """'fp32' for None; the value if it is one of KV_DTYPES; else one ExportError sentence."""
    if value is None:
        return "fp32"
    if value not in KV_DTYPES:
        raise ExportError(f"unknown --kv-dtype '{value}': choose one of {', '.join(KV_DTYPES)}.")
    return value


@dataclass(frozen=True)
class KVPrecision:
    """How a package's KV buffers are stored; int8 carries one (k_scale, v_scale) per layer."""

    name: str = "fp32"
    scales: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    quant_type: str = QUANT_TYPE

    @property
    def dtype(self) -> str:
        """The numpy / GraphBuilder dtype name of the buffers."""
        return MANIFEST_DTYPES[self.name]

    @property
    def quantized(self) -> bool:
        return self.name == "int8"

    def layer_scales(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        if layer not in self.scales:
            raise ExportError(f"int8 KV has no calibrated scales for layer {layer}: the export is inconsistent.")
        return self.scales[layer]

    def describe(self) -> dict:
        """The manifest's kv_cache entries that say how the buffers are stored."""
        d = {"dtype": self.dtype}
        if self.quantized:
            d["quantization"] = {"bits": 8, "type": self.quant_type.lower(), "symmetric": True,
                                 "scales": "calibrated at export (max |key| pair norm, max |value|)",
                                 "layers": {str(i): {"k_scale": _as_list(k), "v_scale": _as_list(v)}
                                            for i, (k, v) in sorted(self.scales.items())}}
        return d


def _as_list(a: np.ndarray):
    a = np.asarray(a, np.float32)
    return float(a.reshape(-1)[0]) if a.size == 1 else a.tolist()


def scales_from_ranges(key_pair_max: dict[int, np.ndarray], value_max: dict[int, np.ndarray],
                       quant_type: str = QUANT_TYPE, key_margin: float | None = None,
                       value_margin: float | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-layer (k_scale, v_scale) from the largest key pair norms and value magnitudes, each an array
    (kv_heads, head_dim). PER_TENSOR scales are shape (1,), PER_CHANNEL ones (kv_heads, head_dim)."""
    key_margin = KEY_MARGIN if key_margin is None else key_margin
    value_margin = VALUE_MARGIN if value_margin is None else value_margin
    out = {}
    for layer in sorted(key_pair_max):
        k, v = key_pair_max[layer], value_max[layer]
        if quant_type == "PER_TENSOR":
            k, v = np.array([k.max()]), np.array([v.max()])
        out[layer] = tuple(np.maximum(x * margin / QMAX, 1e-8).astype(np.float32)
                           for x, margin in ((k, key_margin), (v, value_margin)))
    return out


def measure_kv_ranges(decoder, samples: list[list[int]]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Run the fp32-KV DECODER (a StagedDecoder) over each sample from an empty cache; returns per layer
    the largest key pair norm and the largest |value|, each (kv_heads, head_dim)."""
    keys: dict[int, np.ndarray] = {}
    values: dict[int, np.ndarray] = {}
    for ids in samples:
        decoder.reset()
        decoder.forward(ids)
        n = len(ids)
        for stage in decoder.stages:
            for i in stage.cache.layers:
                k = stage.cache.keys[i].numpy()[0, :, :n]  # (kv_heads, n, head_dim), after rotary
                v = stage.cache.values[i].numpy()[0, :, :n]
                half = k.shape[-1] // 2
                pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)
                pair = np.concatenate([pair, pair], axis=-1).max(axis=1)
                keys[i] = np.maximum(keys.get(i, 0.0), pair)
                values[i] = np.maximum(values.get(i, 0.0), np.abs(v).max(axis=1))
    decoder.reset()
    return keys, values
