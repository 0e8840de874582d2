"""Calibration inputs for static QDQ quantization of the npu graphs.

Activation scales are fixed at export, so they must be measured on text that
looks like what the model will see. The float graphs are run (on the CPU) over
sample paragraphs — ``calibration.txt`` shipped with the exporter, or the
user's ``--calibration FILE`` — exactly as the runtime will drive them, and
every run's inputs are handed to onnxruntime's calibrator: the prefill graph
sees full chunks, the decode graph sees one token at a time at positions
spread over the context, so the mask, the rotary rows and the KV inputs are
calibrated on real values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from edgeinfer.export.calibration_text import read_paragraphs

from edgeinfer.decoders.static import StaticDecoder
from edgeinfer.errors import ExportError

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")


def calibration_samples(tokenizer_json: str, path: str | Path | None, max_tokens: int) -> list[list[int]]:
    """Token ids of each paragraph (blank-line separated) of the calibration text, cut to MAX_TOKENS."""
    from tokenizers import Tokenizer

    path = Path(path) if path else DEFAULT_CALIBRATION
    tok = Tokenizer.from_str(tokenizer_json)
    samples = [tok.encode(p.strip(), add_special_tokens=False).ids[:max_tokens] for p in read_paragraphs(path)]
    samples = [s for s in samples if len(s) >= 2]
    if not samples:
        raise ExportError(f"the calibration text '{path}' has no paragraph of two tokens or more.")
    return samples


class FeedReader:
    """An onnxruntime CalibrationDataReader over recorded (lazily produced) graph inputs."""

    def __init__(self, feeds: Iterator[dict]):
        self._feeds = feeds

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # the calibrator reads once
        pass


def prefill_feeds(decoder: StaticDecoder, samples: list[list[int]], limit: int) -> Iterator[dict]:
    """Inputs of the prefill graph over the samples' full chunks (and each sample's last partial one)."""
    chunk = decoder.prefill_graph.chunk
    count = 0
    for ids in samples:
        decoder.reset()
        for start in range(0, len(ids) - 1, chunk):
            part = ids[start:start + chunk]
            if len(part) < 2:
                break
            yield _captured(decoder, part)
            count += 1
            if count >= limit:
                return


def decode_feeds(decoder: StaticDecoder, samples: list[list[int]], limit: int) -> Iterator[dict]:
    """Inputs of the one-token graph: each sample's first half is prefilled, the rest stepped
    token by token (teacher-forced), so positions spread over the sample's length."""
    per_sample = max(1, limit // len(samples))
    count = 0
    for ids in samples:
        decoder.reset()
        half = max(1, len(ids) // 2)
        if half > 1:
            decoder.forward(ids[:half])
        for t in ids[half:half + per_sample]:
            yield _captured(decoder, [t])
            count += 1
            if count >= limit:
                return


def _captured(decoder: StaticDecoder, ids: list[int]) -> dict:
    seen: list[dict] = []
    decoder.feed_hook = lambda chunk, feeds: seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
    try:
        decoder.forward(ids)
    finally:
        decoder.feed_hook = None
    return seen[0]


def kv_ranges(decoder: StaticDecoder, samples: list[list[int]], margin: float = 0.1) -> dict[str, tuple]:
    """One (min, max) per layer for keys and for values over the samples, widened by MARGIN of the span.

    The prefill and decode graphs must quantize the KV cache identically — it is written by one and read
    by the other as 16-bit values — so its range is measured here once and given to both, for the past
    inputs and the new outputs alike."""
    io = decoder.io
    lo = {}
    hi = {}
    for ids in samples:
        decoder.reset()
        decoder.forward(ids)
        n = decoder.length
        for i in range(decoder.num_layers):
            for kind, buf in (("key", decoder.keys[i]), ("value", decoder.values[i])):
                x = buf[:, :, :n]
                k = (kind, i)
                lo[k] = min(lo.get(k, 0.0), float(x.min()))
                hi[k] = max(hi.get(k, 0.0), float(x.max()))
    out = {}
    for (kind, i), low in lo.items():
        span = hi[(kind, i)] - low
        rng = (low - margin * span, hi[(kind, i)] + margin * span)
        out[io[f"past_{kind}"].format(layer=i)] = rng
        out[io[f"new_{kind}"].format(layer=i)] = rng
    return out
